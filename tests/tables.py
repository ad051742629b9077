"""Reading the report pages' markdown tables in tests: tabulate pads every cell to its
column's width, so a test compares a row with the padding squeezed out."""

from __future__ import annotations

import re

_PIPE = re.compile(r"(?<!\\)\|")


def squeeze(text: str) -> str:
    """`text` with every table line's cells stripped, one space each side of a pipe:
    `| a    |   1 |      |` -> `| a | 1 | |` (an escaped `\\|` inside a cell stays)."""
    lines = [
        "|" + "".join(f" {c} |" if c else " |" for c in map(str.strip, _PIPE.split(line)[1:-1]))
        if line.startswith("|")
        else line
        for line in text.splitlines()
    ]
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")
