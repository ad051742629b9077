"""Stage `sidecar`: reads one layer of data/trajectories, trains the seed-003 KV sidecar, writes model.safetensors, config.json, its dvclive folder, the metrics JSON, the compressor table and two PNGs.

Command: python -m pipeline.cli sidecar --params params.yaml --trajectories data/trajectories --corpus data/corpus --out data/sidecar --live metrics/live/sidecar --metrics metrics/sidecar.json --table metrics/sidecar.md --plot-training metrics/plots/sidecar_training.png --plot-lm-loss metrics/plots/sidecar_lm_loss.png

Reads the `sidecar` section of params.yaml (layer `sidecar.layer` of the trajectories).
Samples are (chunk, KV head) pairs; chunks held out by the TrajectorySet split
(`sidecar.eval_fraction`) are never trained on. On the held-out chunks every compressor
(the sidecar and the training-free baselines of `compressors.py`) gets the same
attention diagnostics and loss terms, and the downstream metric (`lm_loss.py`): the
trajectories' teacher (its manifest's `model` and `revision`) re-reads the chunks'
tokens from the corpus with that layer's window K/V replaced by the super-tokens,
and its LM loss at the future positions is compared with the dense one, chunk by chunk.
The metrics JSON holds `dense`, `compressors` (name -> numbers), `ranking` (by LM loss
increase), `counts`, `train` and the `summary` block. dvclive (`pipeline.common.live`)
logs `train/<column>` every step (lr, loss, each term, the batch's Jacobian / K / V norm
ratios) and `heldout/<column>` every `sidecar.eval_every` steps (held-out loss and
diagnostics on `sidecar.eval_batches` batches). The PNGs: the Jacobian ratio and the
loss over steps (train and held out), and each compressor's held-out LM loss increase
over dense with its paired bootstrap 95% interval (computed once, after training).
"""  # noqa: E501

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import Tensor

from pipeline.common.checkpoints import save_checkpoint
from pipeline.common.devices import resolve_device, set_threads
from pipeline.common.identity import MODEL_KEYS
from pipeline.common.io import write_json, write_text
from pipeline.common.live import log_row, open_live
from pipeline.common.params import Sections, load_params, to_dict
from pipeline.common.pictures import Panel, bar_chart, line_panels
from pipeline.common.progress import progress
from pipeline.common.run_info import INFO, split_info
from pipeline.common.shards import MANIFEST, sha256_file
from pipeline.common.tables import rounded
from pipeline.common.teacher import load_causal_lm, teacher_caveat
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.kv_sidecar.compressors import Compressor, compressor_set
from pipeline.kv_sidecar.lm_loss import LMLosses, heldout_lm_losses, paired_increase
from pipeline.kv_sidecar.params import SidecarParams
from pipeline.kv_sidecar.report import label, ranking, sidecar_table, summary
from pipeline.kv_sidecar.set_transformer import (
    FitResult,
    build_sidecar,
    count_parameters,
    evaluate,
    fit,
)
from pipeline.kv_sidecar.trajectory_set import TrajectorySet

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")


def run(
    params: Sections,
    trajectories: Path,
    corpus: Path,
    out: Path,
    live: Path,
    metrics: Path,
    table: Path,
    plot_training: Path,
    plot_lm_loss: Path,
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
    tokens = heldout_tokens(data, CorpusChunks(Path(corpus)), sp.batch_size)
    set_threads(sp.num_threads)
    torch.manual_seed(sp.seed)  # model init is part of what the seed fixes
    model = build_sidecar(sp, data.head_dim)
    log.info("sidecar: %d trainable parameters, %s chunks", count_parameters(model), chunks)
    device = resolve_device(sp.device)
    with open_live(Path(live)) as board:
        result = fit(
            model, data, sp, window_size, device,
            lambda kind, row: log_row(board, row, prefix=f"{kind}/"),
        )  # fmt: skip
    compressors = compressor_set(model.eval(), sp)
    lm = teacher_losses(data, tokens, window_size, compressors, sp, device)
    heldout = data.batches("heldout", sp.batch_size, sp.batch_size, shuffle=False)
    desc = f"sidecar layer {data.layer} held-out scores"
    with progress(heldout, desc=desc, unit="batch") as batches:
        scores = evaluate(compressors, batches, sp, window_size, mass_lookup(lm))
    results = {
        "dense": {"lm_loss": float(lm.dense.mean())},
        "compressors": with_lm_losses(scores, lm, sp.seed),
        "counts": counts(data, window_size, chunks) | {"lm_chunks": len(lm.chunk_ids)},
        "teacher": {key: data.manifest.extra.get(key) for key in MODEL_KEYS}
        | {"caveat": teacher_caveat(str(data.manifest.extra.get("model")))},
        "scale_normalize": sp.scale_normalize,
        "train": train_summary(model, result),
    }
    results["ranking"] = ranking(results["compressors"])
    results["summary"] = summary(results)
    out = Path(out)
    config = checkpoint_config(data, window_size, model, result, params)
    save_checkpoint(out, model.state_dict(), config)
    measured, info = split_info(results, ("teacher", "scale_normalize", "counts.layer"))
    write_json(Path(metrics), measured)
    write_json(out / INFO, info)
    write_text(Path(table), sidecar_table(results))
    training_picture(result, Path(plot_training))
    lm_loss_picture(results, Path(plot_lm_loss))
    return results


def _column(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    return [row["step"] for row in rows], [row[key] for row in rows]


def training_picture(result: FitResult, path: Path) -> Path:
    """Jacobian ratio and loss per step: the train batch's and the held-out batches'."""
    panels = [
        Panel(
            "Jacobian ratio (compressed / dense)",
            "step",
            "ratio",
            {
                "train batch": _column(result.curves, "jacobian_ratio"),
                "held out": _column(result.eval_curves, "jacobian_ratio"),
            },
            {"dense (1)": 1.0},
        ),
        Panel(
            "loss (weighted total)",
            "step",
            "loss",
            {
                "train batch": _column(result.curves, "loss"),
                "held out": _column(result.eval_curves, "loss_total"),
            },
        ),
    ]
    return line_panels(path, "sidecar training", panels)


def lm_loss_picture(results: dict[str, Any], path: Path) -> Path:
    """Each compressor's held-out LM loss increase over dense, best first, with intervals."""
    bars = {
        label(name): (
            results["compressors"][name]["lm_loss_increase"],
            results["compressors"][name]["lm_loss_increase_interval"],
        )
        for name in results["ranking"]
    }
    title = "held-out LM loss increase over dense (paired bootstrap 95%)"
    return bar_chart(path, title, "nats/token", bars)


def heldout_tokens(data: TrajectorySet, corpus: CorpusChunks, batch_size: int) -> dict[int, Tensor]:
    """Token ids of the held-out chunks (the TrajectorySet split), from the corpus the
    trajectories were computed from (checked by its manifest's sha256 and its geometry)."""
    expected = data.manifest.extra.get("corpus_manifest_sha256")
    if expected is not None and sha256_file(corpus.folder / MANIFEST) != expected:
        raise ValueError(
            f"{corpus.folder}/{MANIFEST} is not the corpus {data.folder} was computed from "
            "(its sha256 differs from the trajectories manifest's corpus_manifest_sha256): "
            "pass the trajectories' own corpus or re-run the trajectories stage"
        )
    needed = data.dense_tokens + data.sizes["num_queries"] + 1
    if corpus.chunk_tokens != needed:
        raise ValueError(
            f"{corpus.folder} holds chunks of {corpus.chunk_tokens} tokens but {data.folder} "
            f"has num_windows x window_size + num_queries + 1 = {needed}"
        )
    batches = data.batches("heldout", batch_size, batch_size, shuffle=False)
    ids = sorted({int(c) for batch in batches for c in batch.chunk_id})
    return corpus.tokens_of(torch.tensor(ids, dtype=torch.long))


def teacher_losses(
    data: TrajectorySet,
    tokens: dict[int, Tensor],
    window_size: int,
    compressors: dict[str, Compressor],
    sp: SidecarParams,
    device: torch.device,
) -> LMLosses:
    """The trajectories' teacher (manifest model, revision, compute dtype): held-out LM
    losses, dense and with each compressor's super-tokens at layer `sidecar.layer`."""
    extra = data.manifest.extra
    if extra.get("model") is None:
        raise ValueError(f"{data.folder}/{MANIFEST}: extra names no teacher `model`")
    teacher, _ = load_causal_lm(
        str(extra["model"]),
        extra.get("revision"),
        str(extra.get("compute_dtype", "float32")),
        str(device),
        f"the `model` of {data.folder}/{MANIFEST} (trajectories.model)",
    )
    for compressor in compressors.values():
        if compressor.module is not None:
            compressor.module.to(device)
    losses = heldout_lm_losses(
        teacher, tokens, data.layer, data.dense_tokens, window_size, compressors,
        sp.lm_batch_size, f"sidecar layer {data.layer} LM loss",
    )  # fmt: skip
    del teacher
    return losses


def mass_lookup(lm: LMLosses):
    """(B, N) window attention mass of each (chunk, KV head) sample of a batch."""
    row_of = {chunk: row for row, chunk in enumerate(lm.chunk_ids)}

    def mass_of(batch) -> Tensor:
        rows = torch.tensor([row_of[int(c)] for c in batch.chunk_id])
        return lm.mass[rows, batch.kv_head.cpu()]

    return mass_of


def with_lm_losses(
    scores: dict[str, dict[str, Any]], lm: LMLosses, seed: int
) -> dict[str, dict[str, Any]]:
    """Each compressor's diagnostics plus its LM loss, increase over dense and interval."""
    out = {}
    for name, values in scores.items():
        increase, interval = paired_increase(lm.compressed[name], lm.dense, seed)
        out[name] = values | {
            "lm_loss": float(lm.compressed[name].mean()),
            "lm_loss_increase": increase,
            "lm_loss_increase_interval": interval,
        }
    return out


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
        "trajectories": {key: extra.get(key) for key in (*MODEL_KEYS, "force_space", "rope")}
        | data.sizes,
    }


def command(
    trajectories: Annotated[Path, typer.Option(help="Folder written by the trajectories stage.")],
    corpus: Annotated[Path, typer.Option(help="The corpus folder the trajectories came from.")],
    out: Annotated[Path, typer.Option(help="For model.safetensors and config.json.")],
    live: Annotated[Path, typer.Option(help="dvclive folder: train/ and heldout/ per step.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON: every compressor, held out.")],
    table: Annotated[Path, typer.Option(help="Markdown table: compressors by LM loss increase.")],
    plot_training: Annotated[Path, typer.Option(help="PNG: Jacobian ratio and loss per step.")],
    plot_lm_loss: Annotated[
        Path, typer.Option(help="PNG: each compressor's LM loss increase with its interval.")
    ],
    params: Annotated[Path, typer.Option(help="Params file; its `sidecar` section.")] = PARAMS,
) -> None:
    """Train the seed-003 KV sidecar on cached trajectories; rank it against the baselines."""
    sections = load_params(params, sidecar=SidecarParams)
    results = run(
        sections, trajectories, corpus, out, live, metrics, table, plot_training, plot_lm_loss
    )
    headline = {
        name: {k: results["compressors"][name][k] for k in ("lm_loss_increase", "output_cosine")}
        for name in results["ranking"]
    }
    typer.echo(f"sidecar: {json.dumps(rounded(headline))} -> {out}")
