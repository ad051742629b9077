"""Stage `evaluate`: reads data/directions, every data/distill/<run> and its dvclive curves; writes metrics JSON, the markdown table, the val-curves PNG.

Command: python -m pipeline.cli evaluate --params params.yaml --directions data/directions --distill data/distill --live metrics/live/distill --analogies data/analogies/analogies.parquet --metrics metrics/distill.json --table metrics/comparison.md --plot metrics/plots/distill_val_curves.png

Reads the `distill` and `evaluate` sections of params.yaml, the directions folder
(layer `distill.train.layer`), `<distill>/<run>/{config.json,seeds/<seed>/}` and the
dvclive curves `<live>/<run>/` (val_cos per epoch, mean over seeds) for every key of
`distill.runs`. The PNG overlays every run's val cos_sim per epoch, the kNN baseline
as a dashed line. The metrics JSON holds one dict per
run (the mean over its seeds of cos, gap, top-k, seen/unseen-token subsets, null
where a subset is empty; `num_seeds`; `test_cos_ci95_low` / `_high`, the 95% t-interval
of test cos over seeds, null with one seed; `seeds`, each seed's own scores, its best
epoch of `epochs` and `chosen_on_noise`: whether its val curve (dvclive,
`<live>/<run>/seeds/<seed>/`) never rose above the train-mean baseline's val cos_sim plus
`val_half_width`, 1.96 standard errors of the seed's per-concept val cos_sim at its best
epoch; null where there is no width),
`table_cos` for a distilled run (its table reconstruction), `held_tokens` for a
trainable run (its embedding's rows: the tokens the concepts use), `baseline_train_mean`,
`baseline_knn`, `baseline_char_ngrams` (the bag-of-characters ridge baseline, the char
student's control), `baseline_token_count` (the train-mean direction of the train concepts
with as many tokens: what a position artefact such as a decoder's attention sink would
match; all deterministic: no seeds), `counts` (concepts per split, test
concepts with seen / unseen tokens, test analogies), and
`summary` (the branch's headline next to its control: `comparison.summary`). The table's
title names the teacher, its layer and the split, and says when the teacher has random
weights (the directions manifest's `teacher_caveat`).

With `--analogies` (stage `analogies`), every row's predictions of all splits form its
space, one vector per concept, and the teacher's directions form the reference space;
each answers the val and test analogies by 3CosAdd and by the only-c control
(`pipeline.concepts.analogy_set`): per row `analogy_<split>_<3cosadd|only_c>` (mean over
seeds, test t-intervals `..._ci95_low` / `_high`, each seed's in `seeds`), and the block
`analogies` (`num_concepts`, `counts` per relation and split, `teacher` scores with
`relations`, `relations` per row, `twins`: each analogy_weight > 0 run's weight-0 twin);
the table gains the Test 3CosAdd / only-c columns and `comparison.analogy_section`, and
`summary` the entries of `comparison.analogy_summary`.
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from torch import Tensor

from pipeline.common.checkpoints import CONFIG, read_config
from pipeline.common.devices import set_threads
from pipeline.common.intervals import half_width, t_interval
from pipeline.common.io import write_json, write_text
from pipeline.common.live import read_metric
from pipeline.common.params import Sections, load_params
from pipeline.common.pictures import Panel, line_panels
from pipeline.common.splits import SPLITS
from pipeline.common.tables import spec
from pipeline.concepts.analogy_set import AnalogySet, analogy_scores, space
from pipeline.concepts.baselines import Splits, baseline_predictions
from pipeline.concepts.comparison import (
    ANALOGY_METHODS,
    ANALOGY_PREFIX,
    Rests,
    Row,
    TeacherFacts,
    analogy_summary,
    analogy_twins,
    comparison_table,
    never_left,
    run_label,
    summary,
)
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import DistillParams, EvaluateParams
from pipeline.concepts.scores import mean_over_seeds, row_cosine, split_metrics, token_coverage
from pipeline.concepts.students import FROZEN_APPROACHES, load_student, predict, seed_folder

VAL_CURVE = "val_cos"
"""The dvclive metric of each run's folder that the PNG plots."""
PARAMS = Path("params.yaml")
CHECKPOINT_KEYS = ("trainable_params", "inference_bytes")
SEED_FACTS = ("best_epoch", "epochs", "val_half_width", "chosen_on_noise")
"""What a seed's entry holds besides its scores; not averaged over seeds."""


def run(
    params: Sections,
    directions: Path,
    distill: Path,
    live: Path,
    metrics: Path,
    table: Path,
    plot: Path,
    analogies: Path | None = None,
) -> dict[str, Any]:
    """Evaluate all runs and baselines; write metrics JSON, table and plot; return the
    metrics. With `analogies` (the analogy set), every row's predicted space and the
    teacher's direction space also answer the val and test analogies."""
    set_threads(params.evaluate.num_threads)
    folders = _run_folders(distill, list(params.distill.all_runs))
    data = DirectionSet(directions, params.distill.train.layer)
    splits = {split: data.load_split(split) for split in SPLITS}
    if splits["train"][0].numel() == 0:
        raise ValueError(f"{directions}: the train split is empty; baselines need train concepts")
    analogy_set = None if analogies is None else AnalogySet.read(analogies)
    relations: dict[str, Any] = {}
    seen = token_coverage(data.offsets, data.flat_tokens, splits["train"][0])[splits["test"][0]]
    ks = params.evaluate.retrieval_k
    val_dirs = splits["val"][1]
    results: dict[str, Any] = {}
    rows, curves, seed_curves = [], {}, {}
    for name, folder in folders.items():
        per_seed = {}
        for seed in read_config(folder, ("seeds",))["seeds"]:
            model, config = load_student(seed_folder(folder, seed), data)
            preds = {split: predict(model, data, ids) for split, (ids, _) in splits.items()}
            per_seed[str(seed)] = _score(preds, splits, seen, ks) | {
                "best_epoch": config.get("best_epoch"),
                "epochs": config["train"]["epochs"],
                "val_half_width": half_width(row_cosine(preds["val"], val_dirs)),
            }
            # A run's seed folders in the live folder mirror its checkpoints' (`seed_folder`).
            seed_curves[name, str(seed)] = read_metric(seed_folder(live / name, seed), VAL_CURVE)[1]
            if analogy_set is not None:
                flat, per_relation = _analogy_scores(data, preds, splits, analogy_set)
                per_seed[str(seed)] |= flat
                relations.setdefault(name, []).append(per_relation)
        scores = mean_over_seeds(
            [{k: v for k, v in m.items() if k not in SEED_FACTS} for m in per_seed.values()]
        )
        interval = t_interval([m["test_cos"] for m in per_seed.values()])
        stage_one, held = config.get("table_cos"), config.get("held_tokens")
        distilled = {} if stage_one is None else {"table_cos": stage_one}
        trainable = {} if held is None else {"held_tokens": held}
        results[name] = (
            scores
            | {key: config.get(key) for key in CHECKPOINT_KEYS}
            | distilled
            | trainable
            | {
                "num_seeds": len(per_seed),
                "test_cos_ci95_low": None if interval is None else interval[0],
                "test_cos_ci95_high": None if interval is None else interval[1],
            }
            | (_analogy_intervals(per_seed) if analogy_set is not None else {})
            | {"seeds": per_seed}
        )
        frozen = config["approach"] in FROZEN_APPROACHES
        run_params = params.distill.all_runs[name]
        rows.append(Row(name, run_label(run_params), results[name], frozen, run_params.approach))
        curves[name] = read_metric(Path(live) / name, VAL_CURVE)
    for name, (label, preds, frozen) in baseline_predictions(data, splits, params.evaluate).items():
        results[name] = _score(preds, splits, seen, ks)
        if analogy_set is not None:
            flat, per_relation = _analogy_scores(data, preds, splits, analogy_set)
            results[name] |= flat
            relations[name] = [per_relation]
        rows.append(Row(name, label, results[name], frozen))
    baseline_val = results["baseline_train_mean"]["val_cos"]
    for (name, seed), curve in seed_curves.items():
        facts = results[name]["seeds"][seed]
        facts["chosen_on_noise"] = never_left(curve, baseline_val, facts["val_half_width"])
    results["counts"] = {split: int(ids.numel()) for split, (ids, _) in splits.items()}
    results["counts"] |= {"test_seen": int(seen.sum()), "test_unseen": int((~seen).sum())}
    if analogy_set is not None:
        results["counts"]["test_analogies"] = int(analogy_set.select("test").numel())
    rests = Rests(results["counts"], params.evaluate.min_rows)
    # The wordlist section comes with distill (via directions' READS): the split it drew.
    split_by = params.wordlist.split_by
    extra = data.manifest.extra
    teacher = TeacherFacts(extra["model"], data.layer, extra["pooling"], extra["teacher_caveat"])
    rows = _unique_labels(rows)
    results["summary"] = summary(rows, split_by, teacher, rests)
    block = None
    if analogy_set is not None:
        teacher_space = {split: dirs for split, (_, dirs) in splits.items()}
        teacher_scores = analogy_scores(
            space(data.num_concepts, teacher_space, _ids(splits)), analogy_set
        )
        block = {
            "num_concepts": data.num_concepts,
            "counts": analogy_set.counts(),
            "teacher": teacher_scores,
            "relations": {name: _mean_relations(per) for name, per in relations.items()},
            "twins": analogy_twins(params.distill.all_runs),
        }
        results["analogies"] = block
        results["summary"] += analogy_summary(rows, block, teacher, rests)
    write_json(metrics, results)
    write_text(table, comparison_table(rows, ks, split_by, teacher, rests, block))
    knn_val = results["baseline_knn"]["val_cos"]
    plot_val_curves(curves, plot, {"kNN baseline": knn_val} if knn_val is not None else None)
    return results


def _score(preds: dict[str, Tensor], splits: Splits, seen: Tensor, ks: tuple[int, ...]) -> dict:
    return split_metrics(preds, {split: dirs for split, (_, dirs) in splits.items()}, seen, ks)


def _ids(splits: Splits) -> dict[str, Tensor]:
    return {split: ids for split, (ids, _) in splits.items()}


def _analogy_scores(
    data: DirectionSet, preds: dict[str, Tensor], splits: Splits, analogy_set: AnalogySet
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """(flat `analogy_<split>_<method>` scores, per-relation scores) of one predicted space:
    the row's predictions of every split, one row per concept id."""
    scores = analogy_scores(space(data.num_concepts, preds, _ids(splits)), analogy_set)
    per_relation = scores.pop("relations")
    return {f"{ANALOGY_PREFIX}{key}": value for key, value in scores.items()}, per_relation


def _analogy_intervals(per_seed: dict[str, dict]) -> dict[str, float | None]:
    """The 95% t-interval over seeds of each test analogy accuracy (None with one seed)."""
    out = {}
    for method in ANALOGY_METHODS:
        key = f"{ANALOGY_PREFIX}test_{method}"
        values = [m[key] for m in per_seed.values()]
        span = None if any(v is None for v in values) else t_interval(values)
        out[f"{key}_ci95_low"] = None if span is None else span[0]
        out[f"{key}_ci95_high"] = None if span is None else span[1]
    return out


def _mean_relations(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """relation -> its scores, mean over seeds."""
    return {r: mean_over_seeds([seed[r] for seed in per_seed]) for r in per_seed[0]}


def _run_folders(distill: Path, names: list[str]) -> dict[str, Path]:
    """Checked before any work, so a missing run fails fast and names its path."""
    for name in names:
        if not (distill / name / CONFIG).is_file():
            raise FileNotFoundError(
                f"distill run {name!r} has no checkpoint: {distill / name / CONFIG} not found; "
                f"run `dvc repro` to train it"
            )
    return {name: distill / name for name in names}


def plot_val_curves(
    curves: dict[str, tuple[Sequence[int], Sequence[float]]],
    path: Path,
    baselines: dict[str, float] | None = None,
) -> Path:
    """All runs' val cos_sim per epoch on one axes; baselines as dashed lines. Writes a PNG."""
    panel = Panel(
        "val cos_sim per epoch (mean over seeds)",
        "epoch",
        "val cos_sim",
        dict(sorted(curves.items())),
        baselines or {},
        integer_x=True,
    )
    return line_panels(path, "distill: every run", [panel], columns=1)


def _unique_labels(rows: list[Row]) -> list[Row]:
    """Two runs with the same config would share a label; the run name tells them apart."""
    labels = [row.label for row in rows]
    return [
        Row(r.name, f"{r.label} ({r.name})", r.metrics, r.frozen, r.approach)
        if labels.count(r.label) > 1
        else r
        for r in rows
    ]


def command(
    directions: Annotated[Path, typer.Option(help="Folder written by the directions stage.")],
    distill: Annotated[Path, typer.Option(help="Folder holding one <run>/ per distill run.")],
    live: Annotated[Path, typer.Option(help="Folder holding each run's dvclive <run>/.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write (for `dvc metrics diff`).")],
    table: Annotated[Path, typer.Option(help="Markdown comparison table to write.")],
    plot: Annotated[Path, typer.Option(help="PNG of every run's val cos_sim per epoch.")],
    params: Annotated[Path, typer.Option(help="Params file; `distill` and `evaluate`.")] = PARAMS,
    analogies: Annotated[
        Path | None, typer.Option(help="Analogy set (stage `analogies`) to score every space on.")
    ] = None,
) -> None:
    """Score every distill run and the train-mean / kNN baselines; write metrics, table, plot."""
    results = run(
        load_params(params, distill=DistillParams, evaluate=EvaluateParams),
        directions,
        distill,
        live,
        metrics,
        table,
        plot,
        analogies,
    )
    rows = {k: m for k, m in results.items() if k not in ("counts", "summary", "analogies")}
    trained = [name for name, m in rows.items() if "num_seeds" in m]
    best = max(trained, key=lambda name: rows[name]["test_cos"] or float("-inf"))
    typer.echo(
        f"evaluate: {len(trained)} trained rows, {len(rows) - len(trained)} baselines; best "
        f"trained row on test: {best}, test cos {spec('.4f')(rows[best]['test_cos'])}"
    )
