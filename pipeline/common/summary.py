"""Stage `summary`: every branch's headline number next to its control, on one page.

Each branch's metrics JSON holds a `summary` list: the numbers its own table reports,
picked out by its report module (never recomputed here). This stage checks each entry
against the contract below and writes them side by side: `metrics/summary.md` for
people, `metrics/summary.json` (numbers only) for `dvc metrics diff`. A stage that its
params switched off writes `{"skipped": "<why>", "summary": []}`, which adds no row.

    python -m pipeline.cli summary --out metrics/summary.json --table metrics/summary.md \
        --metrics metrics/distill.json --metrics metrics/sidecar.json ...

An entry (one headline of one branch):
    branch, metric, teacher: str       what was measured, on which model
    value: float                       the headline number
    interval: [lo, hi] | null          its interval; interval_kind says which (e.g.
    interval_kind: str | null          "paired bootstrap 95%")
    control: str                       the baseline or control that could explain it away
    control_value: float | null
    control_interval: [lo, hi] | null
    downstream: str | null             the effect that matters, if the headline is not it
    downstream_value: float | null
    n: int                             the count the interval is over
    rows, min_rows: int | null         optional: the held-out rows the value (and the control's,
                                       on the same rows) is a mean over, and the branch's stated
                                       minimum; below it the page shows `n=10 < 30`, not the
                                       value (summary.json keeps the number)
    caveat: str | null                 optional, e.g. that the teacher has random weights
    warning: str | null                optional: one line saying a control matches what the
                                       headline rests on (e.g. a baseline that matches
                                       trained students); the page marks the row and prints
                                       the line under the table
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.common import tables
from pipeline.common.io import write_json, write_text
from pipeline.common.tables import MISSING, fmt, markdown_table, too_few

KEY = "summary"
SKIPPED = "skipped"
"""A metrics file whose stage its params switched off says why under this key, with an
empty `summary`: it adds no row."""
TEXT_FIELDS = ("branch", "metric", "teacher", "control")
NUMBER_FIELDS = ("value",)
OPTIONAL_NUMBER_FIELDS = ("control_value", "downstream_value")
INTERVAL_FIELDS = ("interval", "control_interval")
OPTIONAL_TEXT_FIELDS = ("interval_kind", "downstream", "caveat", "warning")
OPTIONAL_COUNT_FIELDS = ("rows", "min_rows")
FIELDS = (
    *TEXT_FIELDS,
    *NUMBER_FIELDS,
    *OPTIONAL_NUMBER_FIELDS,
    *INTERVAL_FIELDS,
    *OPTIONAL_TEXT_FIELDS,
    *OPTIONAL_COUNT_FIELDS,
    "n",
)
REQUIRED = (*TEXT_FIELDS, *NUMBER_FIELDS, "n")
WARNING_MARK = "⚠"
"""Marks a headline whose entry carries a `warning`, and that warning's line."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_entry(entry: Any, where: str) -> dict[str, Any]:
    """`entry` if it keeps the contract; else ValueError naming `where` and the key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; the contract's keys are {FIELDS}")
    missing = [key for key in REQUIRED if entry.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    for key in TEXT_FIELDS:
        if not isinstance(entry[key], str) or not entry[key]:
            raise ValueError(f"{where}.{key}: expected a non-empty string, got {entry[key]!r}")
    for key in OPTIONAL_TEXT_FIELDS:
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ValueError(f"{where}.{key}: expected a string or null, got {entry[key]!r}")
    for key in NUMBER_FIELDS + OPTIONAL_NUMBER_FIELDS:
        value = entry.get(key)
        if (key in NUMBER_FIELDS or value is not None) and not _is_number(value):
            raise ValueError(f"{where}.{key}: expected a finite number, got {value!r}")
    for key in INTERVAL_FIELDS:
        value = entry.get(key)
        if value is None:
            continue
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not all(_is_number(v) for v in value)
            or value[0] > value[1]
        ):
            raise ValueError(f"{where}.{key}: expected [low, high] with low <= high, got {value!r}")
    if entry.get("interval") is not None and not entry.get("interval_kind"):
        raise ValueError(f"{where}.interval_kind: an interval must say which kind it is")
    n = entry["n"]
    if not _is_count(n) or n < 1:
        raise ValueError(f"{where}.n: expected a positive integer, got {n!r}")
    for key in OPTIONAL_COUNT_FIELDS:
        if entry.get(key) is not None and not _is_count(entry[key]):
            raise ValueError(f"{where}.{key}: expected an integer >= 0 or null, got {entry[key]!r}")
    if (entry.get("rows") is None) != (entry.get("min_rows") is None):
        raise ValueError(f"{where}: rows and min_rows come together, got only one of them")
    return entry


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The checked `summary` entries of one metrics JSON file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such metrics file; run the stage that writes it"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    entries = data.get(KEY) if isinstance(data, dict) else None
    if isinstance(data, dict) and data.get(SKIPPED) and entries == []:
        return []  # a stage its params switched off (e.g. cross_teacher.model: null)
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"{path}: no `{KEY}` list of headline entries; the branch's stage writes one"
        )
    return [check_entry(e, f"{path}: {KEY}[{i}]") for i, e in enumerate(entries)]


def slug(text: str) -> str:
    """A JSON key for a label: lowercase words joined by underscores."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "value"


def with_interval(
    value: float | None, interval: Sequence[float] | None, entry: dict[str, Any] | None = None
) -> str:
    """`value [low, high]`; `n=10 < 30` instead where `entry` rests on fewer rows than its
    stated minimum (`rows`, `min_rows`)."""
    if entry is not None and entry.get("rows") is not None:
        mark = too_few(entry["rows"], entry["min_rows"])
        if mark is not None:
            return mark
    return tables.with_interval(value, interval)


def summary_table(entries: Sequence[dict[str, Any]]) -> str:
    """The page: one row per headline, its control beside it, caveats as footnotes."""
    lines = [
        "# Summary: each branch's headline next to its control",
        "",
        "Values are on held-out data; intervals as the `interval` column says. A headline "
        "that its control matches is not a finding.",
        "",
    ]
    header = [
        "branch",
        "metric",
        "value [interval]",
        "control",
        "control [interval]",
        "downstream",
        "interval",
        "n",
        "teacher",
    ]
    rows = []
    notes: list[str] = []  # one footnote per distinct caveat
    warnings: list[str] = []
    for entry in entries:
        downstream = MISSING
        if entry.get("downstream"):
            downstream = f"{entry['downstream']}: {fmt(entry.get('downstream_value'))}"
        teacher = entry["teacher"]
        if entry.get("caveat"):
            if entry["caveat"] not in notes:
                notes.append(entry["caveat"])
            teacher += f" ({notes.index(entry['caveat']) + 1})"
        metric = entry["metric"]
        if entry.get("warning"):
            warnings.append(f"{WARNING_MARK} {entry['branch']}: {entry['warning']}")
            metric += f" {WARNING_MARK}"
        rows.append(
            [
                entry["branch"],
                metric,
                with_interval(entry["value"], entry.get("interval"), entry),
                entry["control"],
                with_interval(entry.get("control_value"), entry.get("control_interval"), entry),
                downstream,
                entry.get("interval_kind") or "none",
                str(entry["n"]),
                teacher,
            ]
        )
    lines += markdown_table(header, rows, align="llrlrllrl")
    if warnings:
        lines.append("")
        lines += [f"**{line}**" for line in warnings]
    if notes:
        lines.append("")
        lines += [f"({i}) {note}" for i, note in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def summary_numbers(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{branch: {metric: {value, low, high, control, ...}}}: numbers only, for `dvc metrics`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for entry in entries:
        numbers: dict[str, float] = {"value": entry["value"], "n": entry["n"]}
        for key, prefix in (("interval", ""), ("control_interval", "control_")):
            if entry.get(key) is not None:
                numbers[f"{prefix}low"], numbers[f"{prefix}high"] = entry[key]
        for key, name in (("control_value", "control"), ("downstream_value", "downstream")):
            if entry.get(key) is not None:
                numbers[name] = entry[key]
        metrics = out.setdefault(slug(entry["branch"]), {})
        name = slug(entry["metric"])
        if name in metrics:
            raise ValueError(f"summary: branch {entry['branch']!r} has two {name!r} headlines")
        metrics[name] = numbers
    return out


def run(metrics: Sequence[Path], out: Path, table: Path) -> dict[str, Any]:
    """Collect the entries of every `metrics` file; write `out` (JSON) and `table` (Markdown)."""
    if not metrics:
        raise ValueError("summary: name at least one --metrics file")
    entries = [entry for path in metrics for entry in read_entries(Path(path))]
    numbers = summary_numbers(entries)
    write_json(Path(out), numbers)
    write_text(Path(table), summary_table(entries))
    return {"entries": len(entries), "branches": len(numbers)}


def command(
    out: Annotated[Path, typer.Option(help="Numbers-only JSON, for `dvc metrics diff`.")],
    table: Annotated[Path, typer.Option(help="The summary page (Markdown).")],
    metrics: Annotated[
        list[Path], typer.Option(help="A branch's metrics JSON (its `summary` list); repeat.")
    ],
) -> None:
    """Put every branch's headline number next to its control and interval, on one page."""
    stats = run(metrics, out, table)
    typer.echo(f"summary: {stats['entries']} headlines of {stats['branches']} branches -> {table}")
