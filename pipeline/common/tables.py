"""Markdown tables for the report pages, through `tabulate` (its `pipe` format).

Cells are written as given: every cell is a string the report already formatted, so
tabulate neither parses numbers (`disable_numparse`) nor strips spaces (an exemplar's
text may start with one).

    lines = markdown_table(["method", "MSE"], [["SAE", "0.1664"]], align="lr")
    # ['| method   |    MSE |', '|:---------|-------:|', '| SAE      | 0.1664 |']

What a number rests on, the same way in every table: a column over one split names its
rows in the header (`counted("Test cos_sim", 298)` -> "Test cos_sim (n=298)"), and a
metric over fewer rows than the table's stated minimum is shown as that, not as a number
among numbers (`over_rows(0.42, 10, 30)` -> "n=10 < 30"; the JSON keeps the value).

    fmt(0.93213086)             # '0.9321': the precision of tables and log lines alike
    rounded({"cos": 0.93213})   # {'cos': 0.9321}: a log line's numbers, as the tables print them
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tabulate import tabulate

_ALIGN = {"l": "left", "r": "right"}
MISSING = "—"
"""The cell of a value that was not measured."""
Formatter = Callable[[Any], str]
"""A number -> its cell text (MISSING for None): `fmt`, `fmt_signed`, `spec(".4f")`."""


def fmt(value: Any) -> str:
    """A number as the report tables print it: 4 significant digits, scientific outside
    [1e-3, 1e4); MISSING for None."""
    if value is None:
        return MISSING
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def fmt_signed(value: Any) -> str:
    """`fmt` with its sign always written (+0.0123, -1.200e-05): a difference."""
    if value is None:
        return MISSING
    return f"{value:+.4g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:+.3e}"


def spec(form: str) -> Formatter:
    """A cell formatter of one format spec, for a table with its own precision:
    `spec(".1%")(0.5)` -> "50.0%"; MISSING for None."""
    return lambda value: MISSING if value is None else format(value, form)


def fmt_interval(interval: Sequence[float] | None, form: Formatter = fmt) -> str:
    """`[low, high]`, both ends in `form` (`fmt_signed` for an interval of a difference);
    MISSING for None."""
    if interval is None:
        return MISSING
    return f"[{form(interval[0])}, {form(interval[1])}]"


def with_interval(
    value: float | None, interval: Sequence[float] | None, form: Formatter = fmt
) -> str:
    """`value [low, high]` in one precision; the value alone where there is no interval."""
    if interval is None:
        return form(value)
    return f"{form(value)} {fmt_interval(interval, form)}"


def rounded(value: Any) -> Any:
    """`value` with every float in it (nested dicts, lists) rounded as `fmt` prints it, for
    log and echo lines: `{"loss": 0.1234567}` -> `{"loss": 0.1235}`."""
    if isinstance(value, float):
        return float(fmt(value))
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item) for item in value]
    return value


def counted(label: str, rows: int) -> str:
    """A column header naming the rows its numbers rest on: "Test cos_sim (n=298)"."""
    return f"{label} (n={rows})"


def too_few(rows: int, min_rows: int) -> str | None:
    """The mark `n=10 < 30` where `rows` is below the stated minimum; None where it is not."""
    return f"n={rows} < {min_rows}" if rows < min_rows else None


def over_rows(value: float | None, rows: int, min_rows: int, form: Formatter = fmt) -> str:
    """The cell of a metric over `rows` rows: `too_few`'s mark below `min_rows`, else the
    value in `form` (MISSING for None)."""
    mark = too_few(rows, min_rows)
    return form(value) if mark is None else mark


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
