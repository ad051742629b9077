"""Stage `cross_teacher`: reads the concept table, the main teacher's evaluate metrics and directions; writes a second teacher's directions into `--out`, and the cross-teacher table and metrics JSON.

Command: python -m pipeline.cli cross_teacher --params params.yaml --wordlist data/wordlist/concepts.parquet --main-metrics metrics/distill.json --main-directions data/directions --out data/cross_teacher --metrics metrics/cross_teacher.json --table metrics/cross_teacher.md

Does a student's edge over the trivial predictors hold on another teacher? With
`cross_teacher.model` set, the second teacher's directions for the same concepts and splits
are extracted by the directions code (`direction_extraction.extract`, resumable like stage
`directions`) into `--out`; each run of `cross_teacher.runs` (keys of `distill.runs`) is
trained on them by the distill code (`training.fit`: `distill.train`'s seeds, epochs, lr,
best epoch on val) and scored with the evaluate scorers and baselines (train mean, token
count, kNN, char n-grams: `baselines.py`). Per teacher (the main one's rows from
`--main-metrics`, restricted to the same runs) the table gives the best of the runs on val,
its test cos_sim with its 95% t-interval over seeds, the best baseline on val and its test
cos_sim (deterministic: a point), the gain, and the verdict: "not a finding" where the
student's interval reaches the baseline. Below it, how much one teacher's geometry predicts
the other's: an affine ridge map between the two teachers' directions of the same
concepts, fitted on train, its penalty picked on val, scored on test (mean cos_sim,
bootstrap 95% interval), each way. The metrics JSON holds `runs`, `teachers` (main,
second: `headline`), `maps`, `second` (every run's and baseline's scores on the second
teacher, as evaluate writes them), `counts` and `summary` (one entry: the second teacher's
headline, the main one's gain as downstream). With `cross_teacher.model: null` nothing is
extracted or trained: the JSON says `skipped` and holds an empty `summary`, the table one
line.
"""  # noqa: E501

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch import Tensor

from pipeline.common.bootstrap import paired_interval
from pipeline.common.extraction import ShardedExtraction
from pipeline.common.intervals import t_interval
from pipeline.common.io import write_json, write_text
from pipeline.common.params import Sections, load_params
from pipeline.common.splits import SPLITS
from pipeline.common.tables import counted, markdown_table, spec, too_few, with_interval
from pipeline.concepts.baselines import baseline_predictions
from pipeline.concepts.comparison import (
    BRANCH,
    INTERVAL_KIND,
    Row,
    interval,
    is_trained,
    overlaps,
    run_label,
    token_count_warning,
)
from pipeline.concepts.direction_extraction import RESULT_NEUTRAL, extract
from pipeline.concepts.layout import KIND, DirectionSet
from pipeline.concepts.params import CrossTeacherParams, DistillParams, EvaluateParams
from pipeline.concepts.scores import (
    fit_affine,
    mean_over_seeds,
    row_cosine,
    split_metrics,
    token_coverage,
)
from pipeline.concepts.students import build_model, predict
from pipeline.concepts.training import fit

PARAMS = Path("params.yaml")
log = logging.getLogger(__name__)
EXTRACTION = ShardedExtraction("cross_teacher", KIND, __name__, result_neutral=RESULT_NEUTRAL)
BASELINE_PREFIX = "baseline_"
"""evaluate's metrics keys of the deterministic baselines."""
SKIPPED_FILE = "skipped.txt"
NOT_A_FINDING = "not a finding: the student's interval reaches its baseline"
MAP_INTERVAL = "bootstrap 95% (BCa) over test concepts"
MAP_RIDGES = (0.0, 0.001, 0.01, 0.1, 1.0)
"""Ridge penalties of the teacher-to-teacher map, relative to the mean eigenvalue of the
centred train inputs' X^T X (so they mean the same for directions of any scale); the best
on val is kept."""
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def run(
    params: Sections,
    wordlist: Path,
    main_metrics: Path,
    main_directions: Path,
    out: Path,
    metrics: Path,
    table: Path,
) -> dict[str, Any]:
    """Extract, train and score the second teacher; write the table and metrics; return them."""
    cross = params.cross_teacher
    out = Path(out)
    if cross.model is None:
        return skipped(out, metrics, table)
    directions = cross.directions_params(params.directions)
    extract(directions, wordlist, out, EXTRACTION, layers_key="cross_teacher.layer")
    data = DirectionSet(out, cross.layer)
    second = train_and_score(params, data)
    main = json.loads(Path(main_metrics).read_text(encoding="utf-8"))
    main_data = DirectionSet(main_directions, params.distill.train.layer)
    labels = {name: run_label(spec_) for name, spec_ in params.distill.runs.items()}
    teachers = {
        "main": teacher_facts(main_data) | headline(main, cross.runs, labels),
        "second": teacher_facts(data) | headline(second, cross.runs, labels),
    }
    results = {
        "runs": list(cross.runs),
        "teachers": teachers,
        "maps": teacher_maps(main_data, data),
        "second": {key: value for key, value in second.items() if key != "counts"},
        "counts": second["counts"],
    }
    warning = token_count_warning(table_rows(second, cross.runs, labels))
    results["summary"] = summary(results, params.evaluate.min_rows, warning)
    write_json(metrics, results)
    write_text(table, cross_table(results, params.wordlist.split_by, params.evaluate.min_rows))
    return results


def skipped(out: Path, metrics: Path, table: Path) -> dict[str, Any]:
    """No second teacher: a record saying so, no summary entry."""
    reason = "cross_teacher.model is null: no second concept teacher"
    shutil.rmtree(out, ignore_errors=True)
    write_text(out / SKIPPED_FILE, reason + "\n")
    results = {"skipped": reason, "summary": []}
    write_json(metrics, results)
    write_text(table, f"# Cross-teacher comparison: skipped ({reason})\n")
    return results


def train_and_score(params: Sections, data: DirectionSet) -> dict[str, Any]:
    """Each run of `cross_teacher.runs` trained once per seed of `distill.train` (the seed
    fixes the init, as in stage distill; best epoch on val) and scored on every split, and
    every baseline: evaluate's metrics dicts (`split_metrics`; a run's mean over seeds with
    `num_seeds`, the t-interval of test cos and `best_epochs`), plus `counts`."""
    splits = {split: data.load_split(split) for split in SPLITS}
    if splits["train"][0].numel() == 0:
        raise ValueError(f"{data.folder}: the train split is empty; nothing to train on")
    targets = {split: dirs for split, (_, dirs) in splits.items()}
    seen = token_coverage(data.offsets, data.flat_tokens, splits["train"][0])[splits["test"][0]]
    ks, train = params.evaluate.retrieval_k, params.distill.train
    results: dict[str, Any] = {}
    for name in params.cross_teacher.runs:
        per_seed, epochs = [], []
        for seed in train.seeds:
            torch.manual_seed(seed)
            model = build_model(
                params.distill.runs[name],
                data.vocab_size,
                data.dim,
                data.embedding_token_ids,
                data.embedding_rows,
            )
            epochs.append(fit(model, data, train, seed).best_epoch)
            preds = {split: predict(model, data, ids) for split, (ids, _) in splits.items()}
            per_seed.append(split_metrics(preds, targets, seen, ks))
        results[name] = over_seeds(per_seed) | {"best_epochs": epochs}
    for name, (_, preds, _) in baseline_predictions(data, splits, params.evaluate).items():
        results[name] = split_metrics(preds, targets, seen, ks)
    results["counts"] = {split: int(ids.numel()) for split, (ids, _) in splits.items()}
    results["counts"] |= {"test_seen": int(seen.sum()), "test_unseen": int((~seen).sum())}
    return results


def over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over seeds of each score, `num_seeds`, and the 95% t-interval of test cos
    (None with one seed), as evaluate's rows hold them."""
    span = t_interval([m["test_cos"] for m in per_seed])
    return mean_over_seeds(per_seed) | {
        "num_seeds": len(per_seed),
        "test_cos_ci95_low": None if span is None else span[0],
        "test_cos_ci95_high": None if span is None else span[1],
    }


def teacher_facts(data: DirectionSet) -> dict[str, Any]:
    """What the table says of a teacher, from its directions manifest."""
    extra = data.manifest.extra
    return {
        "model": extra["model"],
        "layer": data.layer,
        "pooling": extra["pooling"],
        "caveat": extra.get("teacher_caveat") or None,
    }


def table_rows(metrics: dict[str, Any], runs: tuple[str, ...], labels: dict[str, str]) -> list:
    """One teacher's runs `runs` and its baselines as the concept table's rows."""
    missing = [name for name in runs if name not in metrics]
    if missing:
        raise ValueError(
            f"the evaluate metrics hold no run {missing}: cross_teacher.runs must be trained "
            "by distill (keys of distill.runs)"
        )
    rows = [Row(name, labels.get(name, name), metrics[name]) for name in runs]
    return rows + [
        Row(name, name.removeprefix(BASELINE_PREFIX).replace("_", " "), value)
        for name, value in metrics.items()
        if name.startswith(BASELINE_PREFIX) and value.get("val_cos") is not None
    ]


def headline(metrics: dict[str, Any], runs: tuple[str, ...], labels: dict[str, str]) -> dict:
    """One teacher's row from its evaluate metrics: the best of `runs` on val, its test
    cos_sim and 95% interval over seeds, the best baseline on val and its test cos_sim, the
    gain, and whether the student's interval reaches the baseline (`not_a_finding`; None
    with one seed: no interval)."""
    rows = table_rows(metrics, runs, labels)
    trained = [row for row in rows if is_trained(row) and row.metrics.get("val_cos") is not None]
    baselines = [row for row in rows if not is_trained(row)]
    if not trained or not baselines:
        raise ValueError("no scored run or baseline on val: nothing to compare")
    best = max(trained, key=lambda row: row.metrics["val_cos"])
    control = max(baselines, key=lambda row: row.metrics["val_cos"])
    span = interval(best.metrics)
    reaches = overlaps(span, interval(control.metrics))
    value, control_value = best.metrics["test_cos"], control.metrics["test_cos"]
    return {
        "student": best.name,
        "student_label": best.label,
        "test_cos": value,
        "test_cos_ci95_low": None if span is None else span[0],
        "test_cos_ci95_high": None if span is None else span[1],
        "num_seeds": best.metrics["num_seeds"],
        "baseline": control.name,
        "baseline_label": control.label,
        "baseline_test_cos": control_value,
        "gain": None if value is None or control_value is None else value - control_value,
        "not_a_finding": reaches,
    }


def verdict(row: dict[str, Any]) -> str:
    if row["not_a_finding"] is None:
        return "no interval (one seed)"
    if row["not_a_finding"]:
        return NOT_A_FINDING
    return "above its baseline" if row["gain"] > 0 else "below its baseline"


def _aligned(data: DirectionSet, split: str) -> tuple[Tensor, Tensor]:
    """A split's (concept ids, directions), sorted by concept id."""
    ids, dirs = data.load_split(split)
    order = torch.argsort(ids)
    return ids[order], dirs[order]


def ridge_map(inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> dict[str, Any]:
    """Affine ridge map inputs -> outputs (split -> rows of the same concepts): fitted on
    train for each of MAP_RIDGES (relative to the mean eigenvalue of the centred train
    X^T X), the best on val mean cos_sim kept; its test mean cos_sim with a bootstrap 95%
    interval over test concepts."""
    train = inputs["train"].double()
    scale = float((train - train.mean(0)).pow(2).sum() / train.shape[1])
    best = None
    for ridge in MAP_RIDGES:
        fitted = fit_affine(train, outputs["train"], ridge * scale)
        val = float(row_cosine(fitted(inputs["val"]), outputs["val"]).mean())
        if best is None or val > best[0]:
            best = (val, ridge, fitted)
    val, ridge, fitted = best
    test = row_cosine(fitted(inputs["test"]), outputs["test"]).numpy()
    low, high = paired_interval((test,), np.mean, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED)
    return {
        "ridge": ridge,
        "val_cos": val,
        "test_cos": float(test.mean()),
        "test_cos_ci95_low": low,
        "test_cos_ci95_high": high,
    }


def teacher_maps(main: DirectionSet, second: DirectionSet) -> dict[str, Any]:
    """`second_to_main` and `main_to_second`: how much one teacher's directions of a
    concept predict the other's (`ridge_map`)."""
    splits = {}
    for split in ("train", "val", "test"):
        (main_ids, main_dirs), (ids, dirs) = _aligned(main, split), _aligned(second, split)
        if not torch.equal(main_ids, ids):
            raise ValueError(
                f"the two teachers' {split} splits hold different concepts "
                f"({main_ids.numel()} vs {ids.numel()}): their directions come from "
                "different word lists"
            )
        splits[split] = (main_dirs, dirs)
    main_side = {split: pair[0] for split, pair in splits.items()}
    second_side = {split: pair[1] for split, pair in splits.items()}
    return {
        "second_to_main": ridge_map(second_side, main_side),
        "main_to_second": ridge_map(main_side, second_side),
    }


def _span(row: dict[str, Any]) -> list[float] | None:
    low, high = row["test_cos_ci95_low"], row["test_cos_ci95_high"]
    return None if low is None or high is None else [low, high]


def _name(teacher: dict[str, Any]) -> str:
    return f"{teacher['model']}, hidden_states[{teacher['layer']}], {teacher['pooling']} pooling"


def summary(results: dict[str, Any], min_rows: int, warning: str | None) -> list[dict]:
    """One entry: the second teacher's best student on val next to its best baseline on
    val; downstream, the main teacher's gain over its own best baseline (same runs)."""
    second, main = results["teachers"]["second"], results["teachers"]["main"]
    runs = ", ".join(results["runs"])
    return [
        {
            "branch": BRANCH,
            "metric": f"second teacher ({_name(second)}): test cos_sim of the best of "
            f"[{runs}] on val ({second['student_label']}), mean over seeds",
            "value": second["test_cos"],
            "interval": _span(second),
            "interval_kind": INTERVAL_KIND,
            "control": f"best baseline on val ({second['baseline_label']})",
            "control_value": second["baseline_test_cos"],
            "control_interval": None,
            "downstream": f"the main teacher's gain over its best baseline, same runs "
            f"({main['student_label']} vs {main['baseline_label']}; {_name(main)})",
            "downstream_value": main["gain"],
            "teacher": second["model"],
            "n": second["num_seeds"],
            "rows": results["counts"]["test"],
            "min_rows": min_rows,
            "caveat": second["caveat"],
            "warning": warning,
        }
    ]


def cross_table(results: dict[str, Any], split_by: str, min_rows: int) -> str:
    """Title, one row per teacher (student vs its baseline, gain, verdict), then the maps.
    Over fewer than `min_rows` test concepts a score reads `n=10 < 30`, as in evaluate."""
    four = spec(".4f")
    test = results["counts"]["test"]
    mark = too_few(test, min_rows)
    lines = [
        f"# Cross-teacher comparison: the same concepts (split by {split_by}), runs and "
        "baselines on two teachers",
        "",
        f"Per teacher the best of the runs [{', '.join(results['runs'])}] on val, its test "
        "cos_sim (mean over seeds, 95% t-interval), next to that teacher's best baseline on "
        "val (deterministic: a point). A student whose interval reaches its baseline is not "
        "a finding. The main teacher's rows come from stage `evaluate`.",
        "",
    ]
    header = [
        "Teacher",
        "Best student on val",
        counted("Test cos_sim [95%]", test),
        "Best baseline on val",
        "Its test cos_sim",
        "Gain",
        "Verdict",
    ]
    body = []
    for role, row in results["teachers"].items():
        caveat = f" ({row['caveat']})" if row["caveat"] else ""
        body.append(
            [
                f"{role}: {_name(row)}{caveat}",
                row["student_label"],
                mark or with_interval(row["test_cos"], _span(row), four),
                row["baseline_label"],
                mark or four(row["baseline_test_cos"]),
                mark or spec("+.4f")(row["gain"]),
                verdict(row),
            ]
        )
    lines += markdown_table(header, body, align="llrlrrl")
    lines += ["", *map_lines(results["maps"], mark)]
    return "\n".join(lines) + "\n"


def map_lines(maps: dict[str, Any], mark: str | None = None) -> list[str]:
    """The teacher-to-teacher ridge maps: test cos_sim [bootstrap 95%] each way."""
    four = spec(".4f")
    lines = [
        "How much one teacher's directions predict the other's: an affine ridge map between "
        "the two teachers' directions of the same concepts, fitted on train, its penalty "
        "picked on val, scored on test (mean cos_sim; the train mean predicts 0).",
        "",
    ]
    body = [
        [
            name.replace("_to_", " -> "),
            mark or with_interval(m["test_cos"], _span(m), four),
            f"{m['ridge']:g}",
        ]
        for name, m in maps.items()
    ]
    header = ["Map", f"Test cos_sim [{MAP_INTERVAL}]", "Ridge (x mean eigenvalue)"]
    return lines + markdown_table(header, body, align="lrr")


def command(
    wordlist: Annotated[Path, typer.Option(help="Concept table written by the wordlist stage.")],
    main_metrics: Annotated[Path, typer.Option(help="The main teacher's evaluate metrics JSON.")],
    main_directions: Annotated[Path, typer.Option(help="The main teacher's directions folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the second teacher's directions, runs.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write (with `summary`).")],
    table: Annotated[Path, typer.Option(help="Markdown table to write.")],
    params: Annotated[
        Path, typer.Option(help="Params file; `cross_teacher`, `distill`, `evaluate`.")
    ] = PARAMS,
) -> None:
    """Train and score the named runs on a second concept teacher; compare with the main one."""
    loaded = load_params(
        params, cross_teacher=CrossTeacherParams, distill=DistillParams, evaluate=EvaluateParams
    )
    results = run(loaded, wordlist, main_metrics, main_directions, out, metrics, table)
    if "skipped" in results:
        typer.echo(f"cross_teacher: {results['skipped']} -> {table}")
        return
    rows = "; ".join(
        f"{role} {row['student']} {spec('.4f')(row['test_cos'])} vs {row['baseline']} "
        f"{spec('.4f')(row['baseline_test_cos'])}"
        for role, row in results["teachers"].items()
    )
    typer.echo(f"cross_teacher: {rows} -> {table}")
