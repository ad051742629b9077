"""Stage `sidecar`: reads one layer of data/trajectories, trains the seed-003 KV sidecar, writes model.safetensors, config.json, curves.csv, eval_curves.csv, the metrics JSON and the sidecar-vs-baseline table.

Command: python -m pipeline.cli sidecar --params params.yaml --trajectories data/trajectories --out data/sidecar --metrics metrics/sidecar.json --table metrics/sidecar.md

Reads the `sidecar` section of params.yaml (layer `sidecar.layer` of the trajectories).
Samples are (chunk, KV head) pairs; chunks held out by a stable hash of their id
(`sidecar.eval_fraction`) are never trained on. The metrics JSON holds `sidecar` and
`baseline_mean` (each window's mean K and V: the training-free reference) with the same
held-out diagnostics and loss terms, plus `counts` and `train`. `curves.csv` has one
row per step, `eval_curves.csv` one per `sidecar.eval_every` steps (dvc plots).
"""  # noqa: E501

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from pipeline.common.checkpoints import save_checkpoint
from pipeline.common.devices import resolve_device
from pipeline.common.io import write_csv, write_json, write_text
from pipeline.common.params import Sections, load_params, to_dict
from pipeline.kv_sidecar.params import SidecarParams
from pipeline.kv_sidecar.report import sidecar_table
from pipeline.kv_sidecar.set_transformer import (
    BASELINE,
    FitResult,
    build_sidecar,
    count_parameters,
    evaluate,
    fit,
)
from pipeline.kv_sidecar.trajectory_set import TrajectorySet

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
CURVES, EVAL_CURVES = "curves.csv", "eval_curves.csv"


def run(
    params: Sections, trajectories: Path, out: Path, metrics: Path, table: Path
) -> dict[str, Any]:
    """Train on `trajectories`, evaluate on its held-out chunks; write outputs; return metrics."""
    sp = params.sidecar
    data = TrajectorySet(Path(trajectories), sp.layer, sp.eval_fraction)
    window_size = resolve_window_size(data, sp.window_size)
    chunks = data.chunk_counts()
    for split, count in chunks.items():
        if count == 0:
            raise ValueError(
                f"{trajectories}: no {split} chunks among {sum(chunks.values())} with "
                f"sidecar.eval_fraction={sp.eval_fraction}; change it or store more chunks"
            )
    if sp.num_threads:
        torch.set_num_threads(sp.num_threads)
    torch.manual_seed(sp.seed)  # model init is part of what the seed fixes
    model = build_sidecar(sp, data.head_dim)
    log.info("sidecar: %d trainable parameters, %s chunks", count_parameters(model), chunks)
    result = fit(model, data, sp, window_size, resolve_device(sp.device))
    heldout = data.batches("heldout", sp.batch_size, sp.batch_size, shuffle=False)
    scores = evaluate(model, heldout, sp, window_size)
    results = scores | {
        "counts": counts(data, window_size, chunks),
        "train": train_summary(model, result),
    }
    out = Path(out)
    config = checkpoint_config(data, window_size, model, result, params)
    save_checkpoint(out, model.state_dict(), config)
    write_csv(out / CURVES, result.curves)
    write_csv(out / EVAL_CURVES, result.eval_curves)
    write_json(Path(metrics), results)
    write_text(Path(table), sidecar_table(results))
    return results


def resolve_window_size(data: TrajectorySet, window_size: int | None) -> int:
    size = window_size or data.sizes["window_size"]
    if data.dense_tokens % size:
        raise ValueError(
            f"sidecar.window_size={size} does not divide the {data.dense_tokens} dense tokens "
            f"of a chunk in {data.folder} (num_windows x window_size = "
            f"{data.sizes['num_windows']} x {data.sizes['window_size']})"
        )
    return size


def counts(data: TrajectorySet, window_size: int, chunks: dict[str, int]) -> dict[str, int]:
    kv = data.sizes["n_kv_heads"]
    return {
        "layer": data.layer,
        "train_chunks": chunks["train"],
        "heldout_chunks": chunks["heldout"],
        "heldout_samples": chunks["heldout"] * kv,
        "dense_tokens": data.dense_tokens,
        "super_tokens": data.dense_tokens // window_size,
        "window_size": window_size,
        "queries_per_sample": data.queries_per_sample,
    }


def train_summary(model: torch.nn.Module, result: FitResult) -> dict[str, float]:
    first, last = result.curves[0], result.curves[-1]
    return {
        "steps": last["step"],
        "first_loss": first["loss"],
        "final_loss": last["loss"],
        "seconds": round(result.seconds, 2),
        "trainable_params": count_parameters(model),
    }


def checkpoint_config(
    data: TrajectorySet,
    window_size: int,
    model: torch.nn.Module,
    result: FitResult,
    params: Sections,
) -> dict[str, Any]:
    """What `load_sidecar` needs to rebuild the model, plus where its data came from."""
    extra = data.manifest.extra
    return {
        "head_dim": data.head_dim,
        "window_size": window_size,
        "layer": data.layer,
        "trainable_params": count_parameters(model),
        "steps": result.curves[-1]["step"],
        "params": to_dict(params.sidecar),
        "trajectories": {
            key: extra.get(key) for key in ("model", "revision", "force_space", "rope")
        }
        | data.sizes,
    }


def command(
    trajectories: Annotated[Path, typer.Option(help="Folder written by the trajectories stage.")],
    out: Annotated[
        Path, typer.Option(help="For model.safetensors, config.json, curves.csv, eval_curves.csv.")
    ],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON: sidecar vs baseline, held out.")],
    table: Annotated[Path, typer.Option(help="Markdown table: sidecar vs baseline.")],
    params: Annotated[Path, typer.Option(help="Params file; its `sidecar` section.")] = PARAMS,
) -> None:
    """Train the seed-003 KV sidecar on cached trajectories; score it against the mean baseline."""
    results = run(load_params(params, sidecar=SidecarParams), trajectories, out, metrics, table)
    headline = {
        name: {k: results[name][k] for k in ("jacobian_ratio", "output_cosine")}
        for name in ("sidecar", BASELINE)
    }
    typer.echo(f"sidecar: {json.dumps(headline)} -> {out}")
