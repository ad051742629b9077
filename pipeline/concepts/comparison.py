"""The seed-000 FINAL COMPARISON table (markdown), its test cos_sim over seeds with 95%
intervals, the branch's `summary` block for the metrics JSON; with an analogy block, the
analogy columns, the section under the table and its summary entries.

Trained rows are ranked apart from the baselines; every split column names its rows and
a metric over fewer than `evaluate.min_rows` reads `n=10 < 30` (`Rests`); each trained
row gives its best epoch per seed, marked where the seed's val curve never left the
train-mean baseline's interval (`never_left`).

rows = [Row("linear_probe", "Linear Probe", metrics["linear_probe"], frozen=True), ...]
teacher = TeacherFacts("data/teachers/all-minilm-l6-v2", layer=6, pooling="mean", caveat="")
rests = Rests(metrics["counts"], min_rows=30)
text = comparison_table(rows, ks=(1, 10), split_by="text", teacher=teacher, rests=rests)
metrics["summary"] = summary(rows, split_by="text", teacher=teacher, rests=rests)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from pipeline.common.intervals import t_interval
from pipeline.common.tables import (
    MISSING,
    counted,
    markdown_table,
    over_rows,
    spec,
    with_interval,
)
from pipeline.concepts.params import RunParams

FOOTNOTE = "\\* needs the teacher's embedding table at inference"
CHAR_BASELINE = "baseline_char_ngrams"
"""The bag-of-characters ridge baseline: the character student's linear control."""
TOKEN_COUNT_BASELINE = "baseline_token_count"
"""The train-mean direction per token count: what a position artefact would match."""
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


@dataclass(frozen=True)
class Rests:
    """What the table's numbers rest on: the rows of each split (evaluate's `counts`:
    train, val, test, test_seen, test_unseen; `test_analogies` with an analogy set) and
    the stated minimum below which a metric is shown as `n=10 < 30` (`evaluate.min_rows`)."""

    counts: dict[str, int]
    min_rows: int

    def cell(self, value: float | None, split: str | Sequence[str], form: str) -> str:
        """The metric's cell: its value, or the mark of too few rows (the fewest of `split`s)."""
        rows = min(self.counts[s] for s in ([split] if isinstance(split, str) else split))
        return over_rows(value, rows, self.min_rows, spec(form))

    def header(self, label: str, split: str) -> str:
        return counted(label, self.counts[split])


NOISE_MARK = "†"
NOISE_NOTE = (
    f"{NOISE_MARK} chosen on noise: in no epoch did that seed's val cos_sim rise above the "
    "train-mean baseline's interval (the baseline's val cos_sim plus 1.96 standard errors "
    "of the seed's per-concept val cos_sim at its best epoch), so its best epoch was "
    "picked among noisy values and its train cos_sim and gap are an arbitrary epoch's."
)
BASELINE_BLOCK = "*baselines and controls (no training):*"
"""The separator row: trained rows are ranked above it, baselines below, each block by
test cos_sim, so a baseline is never ranked among trained rows by noise."""


def is_trained(row: Row) -> bool:
    """A row trained over seeds (a run), not a deterministic baseline."""
    return "num_seeds" in row.metrics


def never_left(curve: Sequence[float], baseline: float, width: float | None) -> bool | None:
    """Whether a val curve (one value per epoch) never rose above the baseline's interval,
    `baseline + width`: then its best epoch was picked among noisy values, none of them
    better than the baseline. None where the width is unknown."""
    if width is None or not curve:
        return None
    return max(curve) <= baseline + width


def best_epochs(metrics: dict[str, Any]) -> str:
    """Each seed's best epoch on val of the run's epochs, marked where it was chosen on
    noise (`never_left`): `20, 27, 1† of 30`."""
    seeds = metrics.get("seeds") or {}
    if not seeds or any(seed.get("best_epoch") is None for seed in seeds.values()):
        return MISSING
    epochs = sorted({seed["epochs"] for seed in seeds.values()})
    picks = ", ".join(
        f"{seed['best_epoch']}{NOISE_MARK if seed['chosen_on_noise'] else ''}"
        for seed in seeds.values()
    )
    return f"{picks} of {'/'.join(map(str, epochs))}"


def _chosen_on_noise(rows: Sequence[Row]) -> bool:
    seeds = [seed for row in rows for seed in row.metrics.get("seeds", {}).values()]
    return any(seed.get("chosen_on_noise") for seed in seeds)


def _row_cells(row: Row, ks: Sequence[int], rests: Rests) -> list[str]:
    m = row.metrics
    params = m.get("trainable_params")
    size = m.get("inference_bytes")
    size_text = MISSING if size is None else human_bytes(size)
    return [
        row.label,
        MISSING if params is None else human_count(params),
        size_text + ("*" if row.frozen else ""),
        *(rests.cell(m.get(f"{split}_cos"), split, ".4f") for split in ("train", "val")),
        best_epochs(m) if is_trained(row) else MISSING,
        rests.cell(m.get("test_cos"), "test", ".4f"),
        rests.cell(m.get("gap"), ("train", "test"), ".4f"),
        *(rests.cell(m.get(f"test_top{k}"), "test", ".1%") for k in ks),
        rests.cell(m.get("test_seen_cos"), "test_seen", ".4f"),
        rests.cell(m.get("test_unseen_cos"), "test_unseen", ".4f"),
    ]


def _sort_key(row: Row) -> tuple[bool, bool, float]:
    test = row.metrics.get("test_cos")
    return (not is_trained(row), test is None, -(test or 0.0))


def ranked(rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """(trained rows, baselines), each by test cos_sim, best first."""
    ordered = sorted(rows, key=_sort_key)
    return [r for r in ordered if is_trained(r)], [r for r in ordered if not is_trained(r)]


def _with_separator(
    trained: list[list[str]], baselines: list[list[str]], width: int
) -> list[list[str]]:
    """The table body: trained rows, the BASELINE_BLOCK row, baselines (no separator
    where either block is empty)."""
    if not trained or not baselines:
        return trained + baselines
    return [*trained, [BASELINE_BLOCK] + [""] * (width - 1), *baselines]


def comparison_table(
    rows: Sequence[Row],
    ks: Sequence[int],
    split_by: str,
    teacher: TeacherFacts,
    rests: Rests,
    analogies: dict[str, Any] | None = None,
) -> str:
    """Title (`table_title`), then the markdown table: trained rows by test cos_sim, best
    first, then the baselines in their own block; every split column names its rows, a
    metric over fewer than `rests.min_rows` rows is marked as such; each trained row's
    best epoch per seed, marked where chosen on noise (footnote). A footnote when any row
    is frozen; then the test cos_sim over seeds, naming what the concept split was hashed
    by (`split_by`). With `analogies` (the evaluate stage's analogy block), the table
    gains each row's test 3CosAdd and only-c accuracy, and `analogy_section` follows."""
    header = [
        "Approach",
        "Trainable Params",
        "Inference Size",
        rests.header("Train cos_sim", "train"),
        rests.header("Val cos_sim", "val"),
        "Best epoch (per seed)",
        rests.header("Test cos_sim", "test"),
        "Gap",
        *(f"Test top-{k}" for k in ks),
        rests.header("Test cos, seen tokens", "test_seen"),
        rests.header("Test cos, unseen tokens", "test_unseen"),
    ]
    methods = ANALOGY_METHODS if analogies is not None else ()
    header += [rests.header(f"Test {METHOD_NAMES[m]}", "test_analogies") for m in methods]

    def cells(row: Row) -> list[str]:
        scores = [row.metrics.get(_key("test", m)) for m in methods]
        return _row_cells(row, ks, rests) + [
            rests.cell(score, "test_analogies", ".1%") for score in scores
        ]

    blocks = ranked(rows)
    body = _with_separator(*([cells(row) for row in block] for block in blocks), len(header))
    lines = [table_title(teacher, split_by), ""]
    lines += markdown_table(header, body)
    lines += ["", _rests_note(rests, ks)]
    if any(row.frozen for row in rows):
        lines += ["", FOOTNOTE]
    if _chosen_on_noise(rows):
        lines += ["", NOISE_NOTE]
    lines += _table_notes(rows)
    matched = token_count_warning(rows)
    lines += [] if matched is None else ["", f"**{matched}**"]
    lines += ["", *seed_table(blocks, split_by)]
    if analogies is not None:
        lines += ["", *analogy_section(rows, analogies, rests.min_rows)]
    return "\n".join(lines) + "\n"


def _rests_note(rests: Rests, ks: Sequence[int]) -> str:
    tops = "/".join(f"top-{k}" for k in ks)
    return (
        f"n: the concepts each column is a mean over; a metric over fewer than "
        f"{rests.min_rows} (evaluate.min_rows) is shown as `n=<rows> < {rests.min_rows}`. "
        f"Test {tops}: each of the {rests.counts['test']} test concepts ranked among all "
        f"test directions; Gap: train minus test cos_sim. Seen tokens: every token of the "
        f"concept occurs in some train concept."
    )


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


def token_count_warning(rows: Sequence[Row]) -> str | None:
    """One line naming every trained row whose test cos_sim 95% interval (its mean, with
    one seed) reaches down to the token-count baseline's test cos_sim or below; None when
    none does (or there is no such baseline)."""
    control = next((row for row in rows if row.name == TOKEN_COUNT_BASELINE), None)
    if control is None or control.metrics.get("test_cos") is None:
        return None
    bar = control.metrics["test_cos"]
    matched = []
    for row in rows:
        if not is_trained(row) or row.metrics.get("test_cos") is None:
            continue
        span = interval(row.metrics)
        if (row.metrics["test_cos"] if span is None else span[0]) <= bar:
            shown = with_interval(row.metrics["test_cos"], span, spec(".4f"))
            matched.append(f"{row.label} {shown}")
    if not matched:
        return None
    return (
        f"Matched by the token-count baseline (test cos_sim {bar:.4f} from the concept's "
        f"token count alone): {'; '.join(matched)}. Their test cos_sim is no evidence that "
        "they read the concept."
    )


def seed_table(blocks: tuple[Sequence[Row], Sequence[Row]], split_by: str) -> list[str]:
    """Test cos_sim mean over seeds with its 95% t-interval, trained rows then baselines
    (the table's order); "overlaps next" marks a row whose interval meets the next row's
    of its block: their order is not established by these seeds."""
    header = ["Approach", "Seeds", "Test cos_sim (mean)", "95% interval", "Overlaps next"]
    lines = [
        f"Test cos_sim over seeds (95% t-interval; baselines are deterministic); "
        f"concepts split by {split_by} (wordlist.split_by):",
        "",
    ]
    bodies = []
    for rows in blocks:
        body = []
        for i, row in enumerate(rows):
            m = row.metrics
            own = interval(m)
            after = overlaps(own, interval(rows[i + 1].metrics)) if i + 1 < len(rows) else None
            if not is_trained(row):
                seeds, span = MISSING, "exact"
            else:
                seeds = str(m["num_seeds"])
                span = MISSING if own is None else f"[{own[0]:.4f}, {own[1]:.4f}]"
            mark = MISSING if after is None else ("yes" if after else "no")
            body.append([row.label, seeds, spec(".4f")(m.get("test_cos")), span, mark])
        bodies.append(body)
    return lines + markdown_table(header, _with_separator(*bodies, len(header)))


def summary(
    rows: Sequence[Row], split_by: str, teacher: TeacherFacts, rests: Rests
) -> list[dict[str, Any]]:
    """The branch's `summary` block: the distilled student with the best mean val
    cos_sim, reported by its test cos_sim mean over seeds with its 95% t-interval, next to
    the baseline (kNN, train mean, char n-grams) with the best val cos_sim and its test
    value (deterministic: no interval), with `token_count_warning` as its `warning`
    where the token-count baseline matches a student; then `char_entry` and `distilled_entry` where
    those students are in the table. Students are picked on val, so the test numbers are
    not selected on test; they are the table's own numbers. Each entry names the rows
    its value is a mean over (`rows`) and `rests.min_rows`, so the summary page marks a
    headline that rests on too few."""
    scored = [row for row in rows if row.metrics.get("val_cos") is not None]
    trained = [row for row in scored if is_trained(row)]
    baselines = [row for row in scored if not is_trained(row)]
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
            rows=rests.counts["test"],
            min_rows=rests.min_rows,
        )
        | {"warning": token_count_warning(rows)}
    ]
    extra = (
        char_entry(scored, split_by, teacher, rests),
        distilled_entry(scored, split_by, teacher, rests),
    )
    return entries + [entry for entry in extra if entry is not None]


def _best_on_val(rows: Sequence[Row], approach: str) -> Row | None:
    runs = [row for row in rows if row.approach == approach and is_trained(row)]
    return max(runs, key=lambda row: row.metrics["val_cos"]) if runs else None


def _seed_interval(metrics: dict[str, Any], key: str) -> list[float] | None:
    """The 95% t-interval over seeds of one per-seed score (None below two seeds)."""
    values = [seed[key] for seed in metrics.get("seeds", {}).values()]
    if any(value is None for value in values):
        return None
    span = t_interval(values)
    return None if span is None else list(span)


def char_entry(
    rows: Sequence[Row], split_by: str, teacher: TeacherFacts, rests: Rests
) -> dict | None:
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
        rows=rests.counts["test_unseen"],
        min_rows=rests.min_rows,
    )


def distilled_entry(
    rows: Sequence[Row], split_by: str, teacher: TeacherFacts, rests: Rests
) -> dict | None:
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
        rows=rests.counts["test"],
        min_rows=rests.min_rows,
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
    rows: int | None = None,
    min_rows: int | None = None,
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
        "rows": rows,
        "min_rows": min_rows,
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
    return with_interval(metrics.get(key), _interval_of(metrics, key), spec(form))


def _over(value: float | None, rows: int, min_rows: int) -> str:
    return over_rows(value, rows, min_rows, spec(".1%"))


def _best_student(rows: Sequence[Row]) -> Row | None:
    """The trained row with the best mean val cos_sim (as `summary` picks it)."""
    trained = [r for r in rows if is_trained(r) and r.metrics.get("val_cos") is not None]
    return max(trained, key=lambda r: r.metrics["val_cos"]) if trained else None


def analogy_section(rows: Sequence[Row], analogies: dict[str, Any], min_rows: int) -> list[str]:
    """The analogy lines under the comparison table: what is scored, the teacher's
    direction space as the reference line, per relation the counts and the accuracy of the
    teacher space and of the best student on val (mean over seeds), then each run trained
    with the auxiliary analogy loss next to its twin. A relation's accuracy over fewer than
    `min_rows` test analogies is marked as such."""
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
        f"{spec('.1%')(teacher.get('test_3cosadd'))}, only-c "
        f"{spec('.1%')(teacher.get('test_only_c'))}; val 3CosAdd "
        f"{spec('.1%')(teacher.get('val_3cosadd'))}, only-c "
        f"{spec('.1%')(teacher.get('val_only_c'))}.",
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
        pct = partial(_over, rows=count["test"], min_rows=min_rows)
        cells += [pct(teacher["relations"][relation].get(f"test_{m}")) for m in ANALOGY_METHODS]
        if best is not None:
            own = student.get(relation, {})
            cells += [pct(own.get(f"test_{m}")) for m in ANALOGY_METHODS]
        body.append(cells)
    total = ["all", *(str(sum(c[s] for c in counts.values())) for s in ("train", "val", "test"))]
    pct = partial(_over, rows=test_total, min_rows=min_rows)
    total += [pct(teacher.get(f"test_{m}")) for m in ANALOGY_METHODS]
    if best is not None:
        total += [pct(best.metrics.get(_key("test", m))) for m in ANALOGY_METHODS]
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
    rows: Sequence[Row], analogies: dict[str, Any], teacher: TeacherFacts, rests: Rests
) -> list[dict[str, Any]]:
    """The summary entries of the analogies: the best student on val's test 3CosAdd
    accuracy next to only-c in its own space (the control), the teacher space's 3CosAdd
    as downstream (the ceiling); and each auxiliary-loss run's test 3CosAdd next to its
    twin's, its test cos_sim change over the twin as downstream."""
    entries = []
    best = _best_student(rows)
    base = {"branch": BRANCH, "interval_kind": INTERVAL_KIND, "teacher": teacher.model}
    base["caveat"] = teacher.caveat or None
    base |= {"rows": rests.counts["test_analogies"], "min_rows": rests.min_rows}
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
