"""The seed-000 FINAL COMPARISON table (markdown), its test cos_sim over seeds with 95%
intervals, the branch's `summary` block for the metrics JSON; with an analogy block, the
analogy columns, the section under the table and its summary entries.

rows = [Row("linear_probe", "Linear Probe", metrics["linear_probe"], frozen=True), ...]
teacher = TeacherFacts("data/teachers/all-minilm-l6-v2", layer=6, pooling="mean", caveat="")
text = comparison_table(rows, ks=(1, 10), split_by="text", teacher=teacher)
metrics["summary"] = summary(rows, split_by="text", teacher=teacher)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.common.intervals import t_interval
from pipeline.common.tables import MISSING, markdown_table
from pipeline.concepts.params import RunParams

FOOTNOTE = "\\* needs the teacher's embedding table at inference"
CHAR_BASELINE = "baseline_char_ngrams"
"""The bag-of-characters ridge baseline: the character student's linear control."""
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
    approach: str | None = None
    """The run's `distill.runs` approach; None for a baseline."""


def run_label(run: RunParams) -> str:
    """Seed 000's name for a run: "Trainable e=64,h=256", "Frozen+MLP h=128", "Linear Probe";
    " + analogy loss w=0.5" where the run trains with the auxiliary analogy loss."""
    return _approach_label(run) + (
        f" + analogy loss w={run.analogy_weight:g}" if run.analogy_weight > 0 else ""
    )


def _approach_label(run: RunParams) -> str:
    if run.approach == "trainable":
        return f"Trainable e={run.embed_dim},h={run.hidden_dim}"
    if run.approach == "frozen_mlp":
        return f"Frozen+MLP h={run.hidden_dim}"
    if run.approach == "distilled":
        return f"Distilled e={run.embed_dim},h={run.hidden_dim}"
    if run.approach == "char_cnn":
        return f"Char CNN e={run.embed_dim},c={run.channels},k={run.kernel_size},h={run.hidden_dim}"
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
    rows: Sequence[Row],
    ks: Sequence[int],
    split_by: str,
    teacher: TeacherFacts,
    analogies: dict[str, Any] | None = None,
) -> str:
    """Title (`table_title`), then the markdown table, best test cos_sim first; a footnote
    when any row is frozen; then the test cos_sim over seeds, naming what the concept split
    was hashed by (`split_by`). With `analogies` (the evaluate stage's analogy block), the
    table gains each row's test 3CosAdd and only-c accuracy, and `analogy_section` follows."""
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
    cells = [_row_cells(row, ks) for row in sorted(rows, key=_sort_key)]
    if analogies is not None:
        header += [f"Test {METHOD_NAMES[m]}" for m in ANALOGY_METHODS]
        for cell, row in zip(cells, sorted(rows, key=_sort_key), strict=True):
            cell += [_cell(row.metrics.get(_key("test", m)), ".1%") for m in ANALOGY_METHODS]
    lines = [table_title(teacher, split_by), ""]
    lines += markdown_table(header, cells)
    if any(row.frozen for row in rows):
        lines += ["", FOOTNOTE]
    lines += _table_notes(rows)
    lines += ["", *seed_table(sorted(rows, key=_sort_key), split_by)]
    if analogies is not None:
        lines += ["", *analogy_section(rows, analogies)]
    return "\n".join(lines) + "\n"


def _table_notes(rows: Sequence[Row]) -> list[str]:
    """What the trainable rows' embeddings hold; what a distilled row's first stage kept
    of the teacher table."""
    notes = []
    held = {row.metrics["held_tokens"] for row in rows if row.metrics.get("held_tokens")}
    if held:
        counts = " / ".join(f"{n:,}" for n in sorted(held))
        notes += [
            "",
            f"Trainable rows: the embedding holds one row per token the concepts use ({counts} "
            "tokens, all splits), not one per vocabulary token: Trainable Params = rows x e + "
            "head; Inference Size adds their ids (int64).",
        ]
    distilled = [row for row in rows if row.metrics.get("table_cos") is not None]
    if distilled:
        parts = ", ".join(f"{row.label}: {row.metrics['table_cos']:.4f}" for row in distilled)
        notes += [
            "",
            "Distilled rows: table reconstruction, mean row cos_sim of tiny table x projection "
            f"(the rank-e truncated SVD, the least-squares optimum) vs the teacher rows: {parts}",
        ]
    return notes


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
    """The branch's `summary` block: the distilled student with the best mean val
    cos_sim, reported by its test cos_sim mean over seeds with its 95% t-interval, next to
    the baseline (kNN, train mean, char n-grams) with the best val cos_sim and its test
    value (deterministic: no interval); then `char_entry` and `distilled_entry` where
    those students are in the table. Students are picked on val, so the test numbers are
    not selected on test; they are the table's own numbers."""
    scored = [row for row in rows if row.metrics.get("val_cos") is not None]
    trained = [row for row in scored if "num_seeds" in row.metrics]
    baselines = [row for row in scored if "num_seeds" not in row.metrics]
    if not trained:
        return []
    best = max(trained, key=lambda row: row.metrics["val_cos"])
    control = max(baselines, key=lambda row: row.metrics["val_cos"]) if baselines else None
    span = interval(best.metrics)
    entries = [
        _entry(
            teacher,
            best,
            f"test cos_sim of the best student on val ({best.label}), mean over "
            f"seeds; concepts split by {split_by}",
            best.metrics["test_cos"],
            None if span is None else list(span),
            control=None if control is None else f"best baseline on val ({control.label})",
            control_value=None if control is None else control.metrics["test_cos"],
        )
    ]
    extra = (char_entry(scored, split_by, teacher), distilled_entry(scored, split_by, teacher))
    return entries + [entry for entry in extra if entry is not None]


def _best_on_val(rows: Sequence[Row], approach: str) -> Row | None:
    runs = [row for row in rows if row.approach == approach and "num_seeds" in row.metrics]
    return max(runs, key=lambda row: row.metrics["val_cos"]) if runs else None


def _seed_interval(metrics: dict[str, Any], key: str) -> list[float] | None:
    """The 95% t-interval over seeds of one per-seed score (None below two seeds)."""
    values = [seed[key] for seed in metrics.get("seeds", {}).values()]
    if any(value is None for value in values):
        return None
    span = t_interval(values)
    return None if span is None else list(span)


def char_entry(rows: Sequence[Row], split_by: str, teacher: TeacherFacts) -> dict | None:
    """Generalisation to words whose tokens no train concept has: the best character
    student on val, its test cos_sim on the unseen-token test concepts (mean over seeds,
    t-interval), next to the bag-of-characters ridge baseline (the same input, linear) on
    the same concepts; downstream, the best trainable-embedding student's (seed 000's
    failure there). None without such a student, baseline or unseen-token concept."""
    best = _best_on_val(rows, "char_cnn")
    control = next((row for row in rows if row.name == CHAR_BASELINE), None)
    if best is None or control is None or best.metrics.get("test_unseen_cos") is None:
        return None
    trainable = _best_on_val(rows, "trainable")
    return _entry(
        teacher,
        best,
        f"test cos_sim on unseen-token concepts (no token of theirs in any train concept) "
        f"of the best char student on val ({best.label}), mean over seeds; concepts split "
        f"by {split_by}",
        best.metrics["test_unseen_cos"],
        _seed_interval(best.metrics, "test_unseen_cos"),
        control=f"{control.label}, same concepts",
        control_value=control.metrics.get("test_unseen_cos"),
        downstream=None
        if trainable is None
        else f"best trainable-embedding student on val ({trainable.label}), same concepts",
        downstream_value=None if trainable is None else trainable.metrics["test_unseen_cos"],
    )


def distilled_entry(rows: Sequence[Row], split_by: str, teacher: TeacherFacts) -> dict | None:
    """Accuracy against size: the best distilled student on val, its test cos_sim (mean
    over seeds, t-interval) next to the best frozen_mlp on val (the full teacher table);
    downstream, the distilled student's inference size in bytes, both sizes in words."""
    best = _best_on_val(rows, "distilled")
    control = _best_on_val(rows, "frozen_mlp")
    if best is None:
        return None
    size = best.metrics.get("inference_bytes")
    own = MISSING if size is None else human_bytes(size)
    span = None if control is None else interval(control.metrics)
    other = None if control is None else control.metrics.get("inference_bytes")
    return _entry(
        teacher,
        best,
        f"test cos_sim of the best distilled-embedding student on val ({best.label}), mean "
        f"over seeds; concepts split by {split_by}",
        best.metrics["test_cos"],
        None if interval(best.metrics) is None else list(interval(best.metrics)),
        control=None if control is None else f"best Frozen+MLP on val ({control.label})",
        control_value=None if control is None else control.metrics["test_cos"],
        control_interval=None if span is None else list(span),
        downstream=f"inference size in bytes: {own}"
        + ("" if other is None else f" vs {human_bytes(other)} for {control.label}"),
        downstream_value=size,
    )


def _entry(
    teacher: TeacherFacts,
    row: Row,
    metric: str,
    value: float,
    span: list[float] | None,
    control: str | None,
    control_value: float | None,
    control_interval: list[float] | None = None,
    downstream: str | None = None,
    downstream_value: float | None = None,
) -> dict[str, Any]:
    return {
        "branch": BRANCH,
        "metric": metric,
        "value": value,
        "interval": span,
        "interval_kind": INTERVAL_KIND,
        "control": control,
        "control_value": control_value,
        "control_interval": control_interval,
        "downstream": downstream,
        "downstream_value": downstream_value,
        "teacher": teacher.model,
        "n": row.metrics["num_seeds"],
        "caveat": teacher.caveat or None,
    }


ANALOGY_PREFIX = "analogy_"
"""Metrics keys of the analogy scores: `analogy_<split>_<method>`."""
ANALOGY_METHODS = ("3cosadd", "only_c")
METHOD_NAMES = {"3cosadd": "3CosAdd", "only_c": "only-c"}


def _key(split: str, method: str) -> str:
    return f"{ANALOGY_PREFIX}{split}_{method}"


def analogy_twins(runs: dict[str, RunParams]) -> dict[str, str]:
    """Each run with an analogy_weight > 0 -> its twin: the first run of `runs` with the
    same params but weight 0 (the control the table and summary put it against)."""
    twins = {}
    for name, run in runs.items():
        if run.analogy_weight > 0:
            plain = replace(run, analogy_weight=0.0)
            twin = next((other for other, spec in runs.items() if spec == plain), None)
            if twin is not None:
                twins[name] = twin
    return twins


def _interval_of(metrics: dict[str, Any], key: str) -> tuple[float, float] | None:
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    return None if low is None or high is None else (low, high)


def _with_interval(metrics: dict[str, Any], key: str, form: str) -> str:
    value = metrics.get(key)
    if value is None:
        return MISSING
    span = _interval_of(metrics, key)
    text = format(value, form)
    return text if span is None else f"{text} [{format(span[0], form)}, {format(span[1], form)}]"


def _best_student(rows: Sequence[Row]) -> Row | None:
    """The trained row with the best mean val cos_sim (as `summary` picks it)."""
    trained = [r for r in rows if "num_seeds" in r.metrics and r.metrics.get("val_cos") is not None]
    return max(trained, key=lambda r: r.metrics["val_cos"]) if trained else None


def analogy_section(rows: Sequence[Row], analogies: dict[str, Any]) -> list[str]:
    """The analogy lines under the comparison table: what is scored, the teacher's
    direction space as the reference line, per relation the counts and the accuracy of the
    teacher space and of the best student on val (mean over seeds), then each run trained
    with the auxiliary analogy loss next to its twin."""
    teacher, counts = analogies["teacher"], analogies["counts"]
    test_total = sum(c["test"] for c in counts.values())
    lines = [
        f"Analogies a:b::c:d (stage `analogies`; {test_total} test analogies: any word a test "
        "concept), answered among all "
        f"{analogies['num_concepts']} concepts, a, b and c excluded: 3CosAdd = argmax "
        "cos(v, v_b - v_a + v_c) on unit vectors (Mikolov et al. 2013); only-c = the "
        "nearest neighbour of c alone, the control that needs no a:b (Linzen 2016). The "
        "table's Test 3CosAdd / Test only-c: each row's predicted space, mean over seeds. "
        f"Teacher direction space (the reference): test 3CosAdd "
        f"{_cell(teacher.get('test_3cosadd'), '.1%')}, only-c "
        f"{_cell(teacher.get('test_only_c'), '.1%')}; val 3CosAdd "
        f"{_cell(teacher.get('val_3cosadd'), '.1%')}, only-c "
        f"{_cell(teacher.get('val_only_c'), '.1%')}.",
        "",
    ]
    best = _best_student(rows)
    header = ["Relation", "Train", "Val", "Test", "Teacher 3CosAdd", "Teacher only-c"]
    if best is not None:
        header += [f"{best.label} 3CosAdd", f"{best.label} only-c"]
    body = []
    student = {} if best is None else analogies["relations"].get(best.name, {})
    for relation, count in counts.items():
        cells = [relation, *(str(count[s]) for s in ("train", "val", "test"))]
        cells += [
            _cell(teacher["relations"][relation].get(f"test_{m}"), ".1%") for m in ANALOGY_METHODS
        ]
        if best is not None:
            own = student.get(relation, {})
            cells += [_cell(own.get(f"test_{m}"), ".1%") for m in ANALOGY_METHODS]
        body.append(cells)
    total = ["all", *(str(sum(c[s] for c in counts.values())) for s in ("train", "val", "test"))]
    total += [_cell(teacher.get(f"test_{m}"), ".1%") for m in ANALOGY_METHODS]
    if best is not None:
        total += [_cell(best.metrics.get(_key("test", m)), ".1%") for m in ANALOGY_METHODS]
    body.append(total)
    lines += [
        "Test accuracy per relation (counts: analogies per split; train analogies are the "
        "ones an auxiliary loss may train on):",
        "",
        *markdown_table(header, body),
    ]
    by_name = {row.name: row for row in rows}
    pairs = [
        (by_name[a], by_name[t])
        for a, t in analogies["twins"].items()
        if a in by_name and t in by_name
    ]
    if pairs:
        lines += [
            "",
            "Auxiliary analogy loss (distill.analogy_runs.<run>.analogy_weight) against its twin "
            "(the same run at weight 0), mean over seeds [95% t-interval]:",
            "",
        ]
        table = []
        for aux, twin in pairs:
            for row in (aux, twin):
                table.append(
                    [
                        row.label,
                        _with_interval(row.metrics, "test_cos", ".4f"),
                        *(
                            _with_interval(row.metrics, _key("test", m), ".1%")
                            for m in ANALOGY_METHODS
                        ),
                    ]
                )
        lines += markdown_table(["Run", "Test cos_sim", "Test 3CosAdd", "Test only-c"], table)
    return lines


def analogy_summary(
    rows: Sequence[Row], analogies: dict[str, Any], teacher: TeacherFacts
) -> list[dict[str, Any]]:
    """The summary entries of the analogies: the best student on val's test 3CosAdd
    accuracy next to only-c in its own space (the control), the teacher space's 3CosAdd
    as downstream (the ceiling); and each auxiliary-loss run's test 3CosAdd next to its
    twin's, its test cos_sim change over the twin as downstream."""
    entries = []
    best = _best_student(rows)
    base = {"branch": BRANCH, "interval_kind": INTERVAL_KIND, "teacher": teacher.model}
    base["caveat"] = teacher.caveat or None
    if best is not None and best.metrics.get(_key("test", "3cosadd")) is not None:
        m = best.metrics
        span, control = (
            _interval_of(m, _key("test", "3cosadd")),
            _interval_of(m, _key("test", "only_c")),
        )
        entries.append(
            base
            | {
                "metric": f"test analogy accuracy (3CosAdd) in the space of the best student on "
                f"val ({best.label}), mean over seeds",
                "value": m[_key("test", "3cosadd")],
                "interval": None if span is None else list(span),
                "control": "only-c (c's nearest neighbour, no a:b) in the same space",
                "control_value": m[_key("test", "only_c")],
                "control_interval": None if control is None else list(control),
                "downstream": "3CosAdd in the teacher's direction space (the ceiling)",
                "downstream_value": analogies["teacher"].get("test_3cosadd"),
                "n": m["num_seeds"],
            }
        )
    by_name = {row.name: row for row in rows}
    for aux_name, twin_name in analogies["twins"].items():
        aux, twin = by_name.get(aux_name), by_name.get(twin_name)
        if aux is None or twin is None or aux.metrics.get(_key("test", "3cosadd")) is None:
            continue
        span, control = (_interval_of(r.metrics, _key("test", "3cosadd")) for r in (aux, twin))
        change = None
        if aux.metrics.get("test_cos") is not None and twin.metrics.get("test_cos") is not None:
            change = aux.metrics["test_cos"] - twin.metrics["test_cos"]
        entries.append(
            base
            | {
                "metric": f"test analogy accuracy (3CosAdd) with the auxiliary analogy loss "
                f"({aux.label}), mean over seeds",
                "value": aux.metrics[_key("test", "3cosadd")],
                "interval": None if span is None else list(span),
                "control": f"its twin without the loss ({twin.label})",
                "control_value": twin.metrics[_key("test", "3cosadd")],
                "control_interval": None if control is None else list(control),
                "downstream": "test cos_sim change over the twin",
                "downstream_value": change,
                "n": aux.metrics["num_seeds"],
            }
        )
    return entries
