"""The seed-000 FINAL COMPARISON table (markdown), its test cos_sim over seeds with 95%
intervals, the branch's `summary` block for the metrics JSON.

rows = [Row("linear_probe", "Linear Probe", metrics["linear_probe"], frozen=True), ...]
teacher = TeacherFacts("data/teachers/all-minilm-l6-v2", layer=6, pooling="mean", caveat="")
text = comparison_table(rows, ks=(1, 10), split_by="text", teacher=teacher)
metrics["summary"] = summary(rows, split_by="text", teacher=teacher)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.common.tables import MISSING, markdown_table
from pipeline.concepts.params import RunParams

FOOTNOTE = "\\* needs the teacher's embedding table at inference"
BRANCH = "concept directions"
INTERVAL_KIND = "t-interval 95% over seeds"


@dataclass(frozen=True)
class TeacherFacts:
    """What the table title says about the teacher (from the directions manifest)."""

    model: str
    layer: int
    """The HF `hidden_states` index the directions were taken at (0 = embedding output)."""
    pooling: str
    caveat: str
    """`pipeline.common.teacher.teacher_caveat` of the model, "" for a pretrained one."""


def table_title(teacher: TeacherFacts, split_by: str) -> str:
    """`# Concept directions: <model>, hidden_states[L], <pooling> pooling; concepts split
    by <split_by>`, plus the random-weight caveat in parentheses where there is one."""
    title = (
        f"# Concept directions: {teacher.model}, hidden_states[{teacher.layer}], "
        f"{teacher.pooling} pooling; concepts split by {split_by}"
    )
    return title + (f" ({teacher.caveat})" if teacher.caveat else "")


@dataclass(frozen=True)
class Row:
    """One table row: a run or a baseline, with its metrics dict from the evaluate stage."""

    name: str
    label: str
    metrics: dict[str, Any]
    frozen: bool = False


def run_label(run: RunParams) -> str:
    """Seed 000's name for a run: "Trainable e=64,h=256", "Frozen+MLP h=128", "Linear Probe"."""
    if run.approach == "trainable":
        return f"Trainable e={run.embed_dim},h={run.hidden_dim}"
    if run.approach == "frozen_mlp":
        return f"Frozen+MLP h={run.hidden_dim}"
    return "Linear Probe"


def _human(value: float, units: Sequence[tuple[str, float]]) -> str:
    """Three significant figures, trailing zeros dropped: 132K, 1.05M, 9.8M, 10M.

    `units` ascending from ("", 1); a value that rounds up to 1000 of a unit
    (999,600 -> "1e+03K") moves to the next unit ("1M").
    """
    index = max((i for i, (_, scale) in enumerate(units) if value >= scale), default=0)
    text = f"{value / units[index][1]:.3g}"
    if float(text) >= 1000 and index + 1 < len(units):
        index += 1
        text = f"{value / units[index][1]:.3g}"
    return text + units[index][0]


def human_count(n: int) -> str:
    return _human(n, (("", 1), ("K", 1e3), ("M", 1e6), ("B", 1e9)))


def human_bytes(n: int) -> str:
    return _human(n, (("B", 1), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9)))


def _cell(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _row_cells(row: Row, ks: Sequence[int]) -> list[str]:
    m = row.metrics
    params = m.get("trainable_params")
    size = m.get("inference_bytes")
    size_text = MISSING if size is None else human_bytes(size)
    return [
        row.label,
        MISSING if params is None else human_count(params),
        size_text + ("*" if row.frozen else ""),
        *(_cell(m.get(f"{split}_cos"), ".4f") for split in ("train", "val", "test")),
        _cell(m.get("gap"), ".4f"),
        *(_cell(m.get(f"test_top{k}"), ".1%") for k in ks),
        _cell(m.get("test_seen_cos"), ".4f"),
        _cell(m.get("test_unseen_cos"), ".4f"),
    ]


def _sort_key(row: Row) -> tuple[bool, float]:
    test = row.metrics.get("test_cos")
    return (test is None, -(test or 0.0))


def comparison_table(
    rows: Sequence[Row], ks: Sequence[int], split_by: str, teacher: TeacherFacts
) -> str:
    """Title (`table_title`), then the markdown table, best test cos_sim first; a footnote
    when any row is frozen; then the test cos_sim over seeds, naming what the concept split
    was hashed by (`split_by`)."""
    header = [
        "Approach",
        "Trainable Params",
        "Inference Size",
        "Train cos_sim",
        "Val cos_sim",
        "Test cos_sim",
        "Gap",
        *(f"Test top-{k}" for k in ks),
        "Test cos (seen tokens)",
        "Test cos (unseen tokens)",
    ]
    lines = [table_title(teacher, split_by), ""]
    lines += markdown_table(header, [_row_cells(row, ks) for row in sorted(rows, key=_sort_key)])
    if any(row.frozen for row in rows):
        lines += ["", FOOTNOTE]
    lines += ["", *seed_table(sorted(rows, key=_sort_key), split_by)]
    return "\n".join(lines) + "\n"


def interval(metrics: dict[str, Any]) -> tuple[float, float] | None:
    """A row's 95% interval of test cos: its t-interval over seeds; a point for a row
    without seeds (a deterministic baseline); None for one seed or no test score."""
    if metrics.get("test_cos") is None:
        return None
    if "num_seeds" not in metrics:
        return metrics["test_cos"], metrics["test_cos"]
    low, high = metrics.get("test_cos_ci95_low"), metrics.get("test_cos_ci95_high")
    return None if low is None or high is None else (low, high)


def overlaps(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    """Whether two closed intervals share a point; None when either is unknown."""
    if a is None or b is None:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def seed_table(rows: Sequence[Row], split_by: str) -> list[str]:
    """Test cos_sim mean over seeds with its 95% t-interval, in the given (table) order;
    "overlaps next" marks a row whose interval meets the next row's: their order is not
    established by these seeds."""
    header = ["Approach", "Seeds", "Test cos_sim (mean)", "95% interval", "Overlaps next"]
    lines = [
        f"Test cos_sim over seeds (95% t-interval; baselines are deterministic); "
        f"concepts split by {split_by} (wordlist.split_by):",
        "",
    ]
    body = []
    for i, row in enumerate(rows):
        m = row.metrics
        own = interval(m)
        after = overlaps(own, interval(rows[i + 1].metrics)) if i + 1 < len(rows) else None
        if "num_seeds" not in m:
            seeds, span = MISSING, "exact"
        else:
            seeds = str(m["num_seeds"])
            span = MISSING if own is None else f"[{own[0]:.4f}, {own[1]:.4f}]"
        mark = MISSING if after is None else ("yes" if after else "no")
        body.append([row.label, seeds, _cell(m.get("test_cos"), ".4f"), span, mark])
    return lines + markdown_table(header, body)


def summary(rows: Sequence[Row], split_by: str, teacher: TeacherFacts) -> list[dict[str, Any]]:
    """The branch's `summary` block (one dict): the distilled student with the best mean
    val cos_sim, reported by its test cos_sim mean over seeds with its 95% t-interval,
    next to the baseline (kNN, train mean) with the best val cos_sim and its test value
    (deterministic: no interval). Both are picked on val, so the test numbers are not
    selected on test; they are the table's own numbers."""
    scored = [row for row in rows if row.metrics.get("val_cos") is not None]
    trained = [row for row in scored if "num_seeds" in row.metrics]
    baselines = [row for row in scored if "num_seeds" not in row.metrics]
    if not trained:
        return []
    best = max(trained, key=lambda row: row.metrics["val_cos"])
    control = max(baselines, key=lambda row: row.metrics["val_cos"]) if baselines else None
    span = interval(best.metrics)
    return [
        {
            "branch": BRANCH,
            "metric": f"test cos_sim of the best student on val ({best.label}), mean over "
            f"seeds; concepts split by {split_by}",
            "value": best.metrics["test_cos"],
            "interval": None if span is None else list(span),
            "interval_kind": INTERVAL_KIND,
            "control": None if control is None else f"best baseline on val ({control.label})",
            "control_value": None if control is None else control.metrics["test_cos"],
            "control_interval": None,
            "downstream": None,
            "downstream_value": None,
            "teacher": teacher.model,
            "n": best.metrics["num_seeds"],
            "caveat": teacher.caveat or None,
        }
    ]
