"""Markdown tables for the report pages, through `tabulate` (its `pipe` format).

Cells are written as given: every cell is a string the report already formatted, so
tabulate neither parses numbers (`disable_numparse`) nor strips spaces (an exemplar's
text may start with one).

    lines = markdown_table(["method", "MSE"], [["SAE", "0.1664"]], align="lr")
    # ['| method   |    MSE |', '|:---------|-------:|', '| SAE      | 0.1664 |']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tabulate import tabulate

_ALIGN = {"l": "left", "r": "right"}
MISSING = "—"
"""The cell of a value that was not measured."""


def fmt(value: Any) -> str:
    """A number as the report tables print it: 4 significant digits, scientific outside
    [1e-3, 1e4); MISSING for None."""
    if value is None:
        return MISSING
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None
) -> list[str]:
    """The table's lines. `align`: one letter per column, `l` (left) or `r` (right);
    None: all left."""
    rows = [list(row) for row in rows]
    align = align if align is not None else "l" * len(header)
    bad = [row for row in rows if len(row) != len(header)]
    if len(align) != len(header) or set(align) - set(_ALIGN) or bad:
        raise ValueError(
            f"a table of {len(header)} columns needs as many cells per row and an align "
            f"string of that many l/r letters; got align {align!r} and rows {bad[:1]}"
        )
    text = tabulate(
        rows,
        headers=list(header),
        tablefmt="pipe",
        colalign=[_ALIGN[a] for a in align],
        disable_numparse=True,
        preserve_whitespace=True,
    )
    return text.splitlines()
