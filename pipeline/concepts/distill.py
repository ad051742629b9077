"""Stage `distill@<run>`: reads a directions folder, trains one row of the comparison table, writes model.safetensors, config.json, curves.csv.

Command: python -m pipeline.cli distill --params params.yaml --run frozen_h256 --directions data/directions --out data/distill/frozen_h256

Reads `distill.train` and `distill.runs.<run>` from params; the cached layer is
`distill.train.layer`. `curves.csv` (epoch,train_loss,train_cos,val_cos) feeds
`dvc plots`; `config.json` carries the run's params, sizes and best epoch.
"""  # noqa: E501

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from pipeline.common.checkpoints import save_checkpoint
from pipeline.common.io import write_csv
from pipeline.common.params import Sections, load_params, to_dict
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import DistillParams, RunParams
from pipeline.concepts.students import build_model, count_trainable, inference_bytes
from pipeline.concepts.training import FitResult, fit

log = logging.getLogger(__name__)
CURVE_FIELDS = ("epoch", "train_loss", "train_cos", "val_cos")
PARAMS = Path("params.yaml")


def run(params: Sections, run_name: str, directions: Path, out: Path) -> dict[str, Any]:
    """Train run `run_name` on `directions` into `out`; returns the summary metrics."""
    spec = run_spec(params, run_name)
    train = params.distill.train
    dataset = DirectionSet(Path(directions), train.layer)
    torch.manual_seed(train.seed)  # model init is part of what the seed fixes
    model = build_model(
        spec, dataset.vocab_size, dataset.dim, dataset.embedding_token_ids, dataset.embedding_rows
    )
    result = fit(model, dataset, train)
    config = checkpoint_config(run_name, spec, dataset, model, result, params)
    out = Path(out)
    save_checkpoint(out, model.state_dict(), config)
    write_csv(out / "curves.csv", result.curves, CURVE_FIELDS)
    summary = {key: config[key] for key in ("best_val_cos", "best_epoch", "trainable_params")}
    log.info("distill %s: %s", run_name, summary)
    return summary


# `command` takes an option named `run`, which shadows the function above inside it.
_run_stage = run


def run_spec(params: Sections, run_name: str) -> RunParams:
    runs = params.distill.runs
    if run_name not in runs:
        raise ValueError(f"unknown distill run {run_name!r}; distill.runs holds {sorted(runs)}")
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
    return {
        "run": run_name,
        "approach": spec.approach,
        "embed_dim": spec.embed_dim,
        "hidden_dim": spec.hidden_dim,
        "vocab_size": dataset.vocab_size,
        "output_dim": dataset.dim,
        "embedding_dim": embedding_dim,
        "layer": dataset.layer,
        "trainable_params": trainable,
        "inference_bytes": inference_bytes(
            spec.approach, trainable, dataset.vocab_size, embedding_dim
        ),
        "best_epoch": result.best_epoch,
        "best_val_cos": result.best_val_cos,
        "train": to_dict(params.distill.train),
    }


def command(
    run: Annotated[str, typer.Option("--run", help="Key of distill.runs to train.")],
    directions: Annotated[Path, typer.Option(help="Folder written by the directions stage.")],
    out: Annotated[Path, typer.Option(help="For model.safetensors, config.json, curves.csv.")],
    params: Annotated[Path, typer.Option(help="Params file; its `distill` section.")] = PARAMS,
) -> None:
    """Train one seed-000 student (a distill.runs entry) on cached directions, best epoch on val."""
    summary = _run_stage(load_params(params, distill=DistillParams), run, directions, out)
    typer.echo(f"distill {run}: {json.dumps(summary)} -> {out}")
