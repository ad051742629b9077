"""Stage `trajectories`: K, V, future Q and LM-loss forces per layer, in resumable shards.

Reads the chunks of stage `corpus` and runs the causal LM over each chunk once
forward and once backward (`pipeline/kv_sidecar/forces.py` defines the loss and the
forces). Writes `<out>/shard-*.safetensors` (chunk_id and, per stored layer, keys,
values, queries and the forces of `trajectories.force_space`; layout:
`pipeline/kv_sidecar/layout.py`) and `manifest.json`. The planned disk use is logged
before the first forward. A killed run resumes from its finished shards; under torchrun
each rank computes its own shards and rank 0 writes the manifest
(`pipeline/common/extraction.py`).

    python -m pipeline.cli trajectories --params params.yaml \
        --corpus data/corpus --out data/trajectories
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
import typer

from pipeline.common.devices import set_threads
from pipeline.common.extraction import (
    CompletedShards,
    ManifestAdditions,
    Progress,
    Shard,
    ShardedExtraction,
    ShardPlan,
)
from pipeline.common.identity import ModelIdentity, resolve_model_params
from pipeline.common.params import load_params
from pipeline.common.shards import MANIFEST, sha256_file
from pipeline.common.teacher import DTYPES, load_causal_lm
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.kv_sidecar.forces import (
    FORCE_SPACES,
    LOSS_NOTE,
    ROPE_NOTE,
    Sizes,
    bytes_per_chunk,
    bytes_per_window,
    resolve_layers,
    trajectory_batch,
)
from pipeline.kv_sidecar.layout import TRAJECTORIES, kv_head_of_query_head
from pipeline.kv_sidecar.params import TrajectoriesParams

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")

EXTRACTION = ShardedExtraction(
    "trajectories", TRAJECTORIES, __name__, result_neutral=("batch_size", "device", "num_threads")
)


def run(params: TrajectoriesParams, corpus: Path, out: Path) -> dict:
    started = time.perf_counter()
    set_threads(params.num_threads)
    chunks = CorpusChunks(corpus)
    _check_corpus(params, chunks)
    num_chunks = min(params.max_chunks, len(chunks))
    params, identity = resolve_model_params(params, "trajectories")
    model, _ = load_causal_lm(
        params.model, identity.revision, params.compute_dtype, params.device, "trajectories.model"
    )
    layers = resolve_layers(params.layers, model.config.num_hidden_layers)
    sizes = Sizes.of(model.config, params.window_size, params.num_windows, params.num_queries)
    plan = _plan(params, sizes, layers, num_chunks)
    done = EXTRACTION.run(
        params,
        {"corpus": corpus / MANIFEST},
        out,
        plan,
        partial(_trajectory_shard, params, model, chunks, layers, sizes),
        partial(
            _describe,
            params,
            model,
            identity,
            corpus,
            layers,
            sizes,
            num_chunks,
            chunks.block_chunks,
        ),
        identity,
    )
    if not done.world.is_main:
        return done.rank_stats
    return {
        "chunks": num_chunks,
        "layers": len(layers),
        "lm_loss_mean": round(done.manifest.extra["lm_loss_mean"], 6),
        "bytes": plan.planned_bytes,
    } | done.stats(started)


def _trajectory_shard(
    params: TrajectoriesParams,
    model,
    chunks: CorpusChunks,
    layers: tuple[int, ...],
    sizes: Sizes,
    rows: range,
    progress: Progress,
) -> Shard:
    """The shard of chunks `rows`, in batches; its summary keeps their summed LM loss."""
    first, stop = rows.start, rows.stop
    storage = DTYPES[params.storage_dtype]
    parts, loss_sum = [], 0.0
    for start in range(first, stop, params.batch_size):
        batch = chunks.read(start, min(start + params.batch_size, stop))
        tensors, losses = trajectory_batch(model, batch, layers, sizes, params.force_space)
        parts.append({k: v.to(device="cpu", dtype=storage) for k, v in tensors.items()})
        loss_sum += float(losses.double().sum())
        progress(len(batch))
    shard = {"chunk_id": torch.arange(first, stop, dtype=torch.long)}
    shard |= {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return Shard(shard, summary={"loss_sum": loss_sum})


def _describe(
    params: TrajectoriesParams,
    model,
    identity: ModelIdentity,
    corpus: Path,
    layers: tuple[int, ...],
    sizes: Sizes,
    num_chunks: int,
    block_chunks: int,
    shards: CompletedShards,
) -> ManifestAdditions:
    lm_loss = sum(summary["loss_sum"] for summary in shards.summaries) / num_chunks
    return ManifestAdditions(
        extra={
            "model": params.model,
            **identity.manifest(),
            "layers": list(layers),
            "num_layers": model.config.num_hidden_layers,
            "n_heads": sizes.n_heads,
            "n_kv_heads": sizes.n_kv_heads,
            "head_dim": sizes.head_dim,
            "hidden_size": sizes.hidden_size,
            "window_size": sizes.window_size,
            "num_windows": sizes.num_windows,
            "num_queries": sizes.num_queries,
            "force_space": params.force_space,
            "rope": "after",
            "rope_note": ROPE_NOTE,
            "kv_head_of_query_head": kv_head_of_query_head(sizes.n_heads, sizes.n_kv_heads),
            "loss": LOSS_NOTE,
            "lm_loss_mean": lm_loss,
            "num_chunks": num_chunks,
            "block_chunks": block_chunks,
            "compute_dtype": params.compute_dtype,
            "storage_dtype": params.storage_dtype,
            "corpus_manifest_sha256": sha256_file(corpus / MANIFEST),
        }
    )


def _check_corpus(params: TrajectoriesParams, chunks: CorpusChunks) -> None:
    extra = chunks.manifest.extra
    if chunks.chunk_tokens != params.chunk_tokens:
        raise ValueError(
            f"{chunks.folder} holds chunks of {chunks.chunk_tokens} tokens but trajectories "
            f"needs num_windows * window_size + num_queries + 1 = {params.chunk_tokens}: "
            "set corpus.chunk_tokens to match and re-run the corpus stage"
        )
    if extra.get("model") != params.model:
        raise ValueError(
            f"{chunks.folder} was tokenized for {extra.get('model')!r} but trajectories.model "
            f"is {params.model!r}: set corpus.model to match"
        )
    if len(chunks) == 0:
        raise ValueError(f"{chunks.folder} holds no chunks")
    if len(chunks) < params.max_chunks:
        log.warning(
            "trajectories: the corpus holds %d chunks, fewer than trajectories.max_chunks=%d",
            len(chunks),
            params.max_chunks,
        )


def _plan(
    params: TrajectoriesParams, sizes: Sizes, layers: tuple[int, ...], num_chunks: int
) -> ShardPlan:
    """Log bytes per window in both force spaces; plan the chosen one."""
    width = DTYPES[params.storage_dtype].itemsize
    for space in FORCE_SPACES:
        log.info(
            "trajectories: force space %-6s %s: %.0f bytes per window per layer "
            "(forces alone %.0f), %.1f MB per chunk over %d layers",
            space,
            "(chosen)" if space == params.force_space else "        ",
            bytes_per_window(sizes, space, width),
            bytes_per_window(sizes, space, width, forces_only=True),
            bytes_per_chunk(sizes, space, width) * len(layers) / 1e6,
            len(layers),
        )
    return ShardPlan(
        num_rows=num_chunks,
        rows_per_shard=params.shard_rows,
        planned_bytes=bytes_per_chunk(sizes, params.force_space, width) * len(layers) * num_chunks,
        description=f"{num_chunks} chunks x {sizes.num_windows} windows of {sizes.window_size} "
        f"tokens + {sizes.num_queries} future positions through {params.model} "
        f"({params.force_space}, {params.storage_dtype})",
    )


def command(
    corpus: Annotated[Path, typer.Option(help="Chunk folder written by the corpus stage.")],
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    params: Annotated[Path, typer.Option(help="Params file; its `trajectories` section.")] = PARAMS,
) -> None:
    """Store K, V, future Q and LM-loss forces per layer into safetensors shards (resumable)."""
    stats = run(load_params(params, trajectories=TrajectoriesParams).trajectories, corpus, out)
    typer.echo(f"trajectories: {json.dumps(stats)}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    typer.run(command)
