"""Progress bars that suit where the output goes: a tqdm bar redrawn in place on a
terminal; elsewhere (a `dvc exp run --queue` log, CI, a pipe) the same bar text as a
plain line at most every PERIODIC_S seconds, with no carriage-return redraws.

    for step in progress(range(steps), desc="sidecar", unit="step"):
        ...
    with progress(total=rows, desc="directions", unit="row") as bar:
        bar.update(n)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

PERIODIC_S = 30.0
"""Seconds between lines when the output is not a terminal."""


LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
"""A log line: counts, times and postfix (e.g. the loss), without the bar's drawing."""


CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""ANSI cursor moves, which tqdm writes around a bar nested in another (`position`)."""


class _Lines:
    """A file for tqdm that writes each redraw (`\\r` + bar + padding) as its own line;
    cursor moves (nested bars) are dropped, so a log holds text only."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        line = CURSOR_MOVES.sub("", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar whose postfix waits for the next periodic line instead of forcing one."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(
    iterable: Iterable | None = None,
    *,
    file: TextIO | None = None,
    interval: float = PERIODIC_S,
    **kwargs: Any,
) -> tqdm:
    """`tqdm(iterable, **kwargs)` on `file` (stderr by default): a live bar if it is a
    terminal, else a line at most every `interval` seconds and one at the end."""
    stream = file if file is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("leave", None)  # a finished bar is one more line, worth keeping in a log
    return _LogBar(
        iterable,
        file=_Lines(stream),
        mininterval=interval,
        bar_format=LOG_FORMAT,
        leave=True,
        **kwargs,
    )
