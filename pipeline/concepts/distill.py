"""Stage `distill@<run>`: reads a directions folder, trains one row of the comparison table once per seed, writes seeds/<seed>/{model.safetensors,config.json}, config.json and the run's dvclive folder.

Command: python -m pipeline.cli distill --params params.yaml --run frozen_h256 --directions data/directions --analogies data/analogies/analogies.parquet --out data/distill/frozen_h256 --live metrics/live/distill/frozen_h256

Reads `distill.train` and `distill.runs.<run>` from params, and with `--analogies` the
analogy set (stage `analogies`), whose train analogies a run with `analogy_weight` > 0
adds its auxiliary loss on (`pipeline.concepts.training.AnalogyOffsetLoss`); the cached layer is
`distill.train.layer`; each seed of `distill.train.seeds` trains one student into
`seeds/<seed>/` (checkpoint, its config with best epoch). The run folder's
`config.json` carries the params, sizes, `seeds` and each seed's best epoch (a
`distilled` run also `table_cos`: its stage one, the mean row cos_sim of the rank-e
table x projection against the teacher rows; a `trainable` run `held_tokens`: its
embedding's rows, one per token the concepts use, whose ids the checkpoint keeps). dvclive
(`pipeline.common.live`) logs train_loss, train_cos and val_cos per epoch (step =
epoch): each seed as it trains into `<live>/seeds/<seed>/`, then their mean over seeds
into `<live>/` itself, which the top-level plots of dvc.yaml overlay across runs.
"""  # noqa: E501

from __future__ import annotations

import shutil
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from pipeline.common.checkpoints import CONFIG, save_checkpoint
from pipeline.common.devices import set_threads
from pipeline.common.io import write_json
from pipeline.common.live import log_row, open_live
from pipeline.common.params import Sections, load_params, to_dict
from pipeline.concepts.analogy_set import AnalogySet
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import DistillParams, RunParams
from pipeline.concepts.scores import mean_cosine
from pipeline.concepts.students import (
    SEEDS_DIR,
    DistilledEmbeddingModel,
    TrainableEmbeddingMLP,
    build_model,
    count_trainable,
    inference_bytes,
    seed_folder,
)
from pipeline.concepts.training import AnalogyOffsetLoss, FitResult, fit

CURVE_FIELDS = ("epoch", "train_loss", "train_cos", "val_cos")
SEED_KEYS = ("best_val_cos", "best_epoch")
"""What differs between the seeds of one run; the rest of a seed's config is shared."""
PARAMS = Path("params.yaml")


def run(
    params: Sections,
    run_name: str,
    directions: Path,
    out: Path,
    live: Path,
    analogies: Path | None = None,
) -> dict[str, Any]:
    """Train run `run_name` once per seed on `directions` into `out`, logging into the
    dvclive folder `live`; returns the summary. A run with `analogy_weight` > 0 reads the
    train analogies of the analogy set `analogies` for its auxiliary loss."""
    spec = run_spec(params, run_name)
    train = params.distill.train
    set_threads(train.num_threads)
    dataset = DirectionSet(Path(directions), train.layer)
    analogy_loss = None
    if spec.analogy_weight > 0:
        if analogies is None:
            raise ValueError(
                f"distill.analogy_runs.{run_name}.analogy_weight={spec.analogy_weight} needs the "
                "analogy set (--analogies data/analogies/analogies.parquet)"
            )
        analogy_set = AnalogySet.read(Path(analogies))
        analogy_loss = AnalogyOffsetLoss(
            analogy_set, dataset, spec.analogy_weight, train.batch_size
        )
    out, live = Path(out), Path(live)
    # no stale seed from an earlier run; `<live>/seeds/<seed>/` is each seed's dvclive folder
    shutil.rmtree(live / SEEDS_DIR, ignore_errors=True)
    configs, curves = {}, {}
    for seed in train.seeds:
        torch.manual_seed(seed)  # model init is part of what the seed fixes
        model = build_model(
            spec,
            dataset.vocab_size,
            dataset.dim,
            dataset.embedding_token_ids,
            dataset.embedding_rows,
        )
        with open_live(seed_folder(live, seed)) as seed_live:
            logger = partial(log_row, seed_live, step="epoch")
            result = fit(model, dataset, train, seed, logger, analogy_loss)
        config = checkpoint_config(run_name, spec, dataset, model, result, params) | {"seed": seed}
        save_checkpoint(seed_folder(out, seed), model.state_dict(), config)
        configs[seed], curves[seed] = config, result.curves
    first = configs[train.seeds[0]]
    per_seed = {str(seed): {key: c[key] for key in SEED_KEYS} for seed, c in configs.items()}
    summary_config = {key: v for key, v in first.items() if key not in (*SEED_KEYS, "seed")}
    write_json(out / CONFIG, summary_config | {"seeds": list(train.seeds), "per_seed": per_seed})
    with open_live(live) as run_live:
        for row in mean_curves(list(curves.values())):
            log_row(run_live, row, step="epoch")
    summary = {"trainable_params": first["trainable_params"], "per_seed": per_seed}
    return summary


def mean_curves(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per epoch, the mean over seeds of each column (one seed: its own curves)."""
    return [
        {"epoch": rows[0]["epoch"]}
        | {f: sum(row[f] for row in rows) / len(rows) for f in CURVE_FIELDS[1:]}
        for rows in zip(*curves, strict=True)
    ]


# `command` takes an option named `run`, which shadows the function above inside it.
_run_stage = run


def run_spec(params: Sections, run_name: str) -> RunParams:
    runs = params.distill.all_runs
    if run_name not in runs:
        raise ValueError(
            f"unknown distill run {run_name!r}; distill.runs and distill.analogy_runs hold "
            f"{sorted(runs)}"
        )
    return runs[run_name]


def checkpoint_config(
    run_name: str,
    spec: RunParams,
    dataset: DirectionSet,
    model: torch.nn.Module,
    result: FitResult,
    params: Sections,
) -> dict[str, Any]:
    """Everything `load_student` and the evaluate stage need to rebuild and report."""
    trainable = count_trainable(model)
    embedding_dim = int(dataset.embedding_rows.shape[1])
    held = int(model.token_ids.numel()) if isinstance(model, TrainableEmbeddingMLP) else None
    return {
        "run": run_name,
        "approach": spec.approach,
        **{f.name: getattr(spec, f.name) for f in fields(RunParams) if f.name != "approach"},
        "vocab_size": dataset.vocab_size,
        "output_dim": dataset.dim,
        "embedding_dim": embedding_dim,
        "layer": dataset.layer,
        "trainable_params": trainable,
        "held_tokens": held,
        "inference_bytes": inference_bytes(
            spec.approach, trainable, dataset.vocab_size, embedding_dim, spec.embed_dim, held
        ),
        "table_cos": table_cos(model, dataset),
        "best_epoch": result.best_epoch,
        "best_val_cos": result.best_val_cos,
        "train": to_dict(params.distill.train),
    }


def table_cos(model: torch.nn.Module, dataset: DirectionSet) -> float | None:
    """A distilled student's stage one: mean row cosine of its reconstructed table against
    the teacher's rows (1 = the rank-e table is exact); None for other students."""
    if not isinstance(model, DistilledEmbeddingModel):
        return None
    with torch.no_grad():
        return mean_cosine(model.reconstructed_rows().cpu(), dataset.embedding_rows)


def command(
    run: Annotated[str, typer.Option("--run", help="Key of distill.runs to train.")],
    directions: Annotated[Path, typer.Option(help="Folder written by the directions stage.")],
    out: Annotated[Path, typer.Option(help="For seeds/<seed>/ checkpoints and config.json.")],
    live: Annotated[
        Path, typer.Option(help="dvclive folder: mean curves over seeds, seeds/<seed>/ each.")
    ],
    params: Annotated[Path, typer.Option(help="Params file; its `distill` section.")] = PARAMS,
    analogies: Annotated[
        Path | None,
        typer.Option(help="Analogy set (stage `analogies`), for a run with analogy_weight > 0."),
    ] = None,
) -> None:
    """Train a distill.runs entry once per seed on cached directions, best epoch on val."""
    summary = _run_stage(
        load_params(params, distill=DistillParams), run, directions, out, live, analogies
    )
    seeds = ", ".join(
        f"seed {seed} {m['best_val_cos']:.4f} (epoch {m['best_epoch']})"
        for seed, m in summary["per_seed"].items()
    )
    typer.echo(
        f"distill {run}: {summary['trainable_params']:,} trainable params; best val cos "
        f"{seeds} -> {out}"
    )
