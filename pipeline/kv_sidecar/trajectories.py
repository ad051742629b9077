"""Stage `trajectories`: K, V, future Q and LM-loss forces per layer, in resumable shards.

Reads the chunks of stage `corpus` and runs the causal LM over each chunk once
forward and once backward (`pipeline/trajectories.py` defines the loss and the forces).
Writes `<out>/shard-*.safetensors` (chunk_id and, per stored layer, keys, values,
queries and the forces of `trajectories.force_space`; layout: `pipeline/layouts.py`)
and `manifest.json`. The planned disk use is logged before the first forward. A killed
run resumes from its finished shards (`pipeline/resume.py`); under torchrun each rank
computes its own shards and rank 0 writes the manifest.

    python -m pipeline.cli trajectories --params params.yaml \
        --corpus data/corpus --out data/trajectories
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from tqdm import tqdm

from pipeline.common.code_deps import code_fingerprint
from pipeline.common.distributed import process_group
from pipeline.common.params import load_params, to_dict
from pipeline.common.scratch import Scratch, owned_shards
from pipeline.common.shards import MANIFEST, Manifest, sha256_file
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

# Params that do not change the stored values; kept out of the resume fingerprint.
RESULT_NEUTRAL = ("batch_size", "device")


def run(params: TrajectoriesParams, corpus: Path, out: Path) -> dict:
    started = time.perf_counter()
    chunks = CorpusChunks(corpus)
    _check_corpus(params, chunks)
    num_chunks = min(params.max_chunks, len(chunks))
    model, _ = load_causal_lm(params.model, params.revision, params.compute_dtype, params.device)
    layers = resolve_layers(params.layers, model.config.num_hidden_layers)
    sizes = Sizes.of(model.config, params.window_size, params.num_windows, params.num_queries)
    planned = _log_plan(params, sizes, layers, num_chunks)

    with process_group() as world:
        scratch = Scratch.for_output(out, _fingerprint_inputs(params, corpus))
        num_shards = math.ceil(num_chunks / params.shard_rows)
        owned = owned_shards(num_shards, world.rank, world.size)
        reused = _extract_shards(params, model, chunks, layers, sizes, num_chunks, scratch, owned)
        world.barrier()
        if not world.is_main:
            return {"rank": world.rank, "shards": len(owned), "reused_shards": reused}
    records = scratch.all_records(num_shards)
    loss_sum = sum(_pop_loss(scratch, index) for index in range(num_shards))
    lm_loss = loss_sum / num_chunks
    revision = getattr(model.config, "_commit_hash", None) or params.revision
    extra = {
        "model": params.model,
        "revision": revision,
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
        "compute_dtype": params.compute_dtype,
        "storage_dtype": params.storage_dtype,
        "corpus_manifest_sha256": sha256_file(corpus / MANIFEST),
    }
    manifest = Manifest(kind=TRAJECTORIES, params=to_dict(params), shards=records, extra=extra)
    manifest.save(scratch.folder)
    scratch.publish()
    return {
        "chunks": num_chunks,
        "layers": len(layers),
        "shards": num_shards,
        "reused_shards": reused,
        "lm_loss_mean": round(lm_loss, 6),
        "bytes": planned,
        "world_size": world.size,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _extract_shards(params, model, chunks, layers, sizes, num_chunks, scratch, owned) -> int:
    """Compute the shards in `owned` that a previous run did not finish; return reused count."""
    storage = DTYPES[params.storage_dtype]
    reused = 0
    spans = [(i * params.shard_rows, min((i + 1) * params.shard_rows, num_chunks)) for i in owned]
    with tqdm(total=sum(b - a for a, b in spans), unit="chunk", desc="trajectories") as bar:
        for index, (first, stop) in zip(owned, spans, strict=True):
            if scratch.completed(index) is not None and _loss_path(scratch, index).is_file():
                reused += 1
                bar.update(stop - first)
                continue
            parts, loss_sum = [], 0.0
            for start in range(first, stop, params.batch_size):
                batch = chunks.read(start, min(start + params.batch_size, stop))
                tensors, losses = trajectory_batch(model, batch, layers, sizes, params.force_space)
                parts.append({k: v.to(device="cpu", dtype=storage) for k, v in tensors.items()})
                loss_sum += float(losses.double().sum())
                bar.update(len(batch))
            shard = {"chunk_id": torch.arange(first, stop, dtype=torch.long)}
            shard |= {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            # The loss record goes first: a shard record always has its loss beside it.
            _write_loss(scratch, index, loss_sum)
            scratch.write(index, shard)
    return reused


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


def _log_plan(params, sizes: Sizes, layers, num_chunks: int) -> int:
    """Log bytes per window in both force spaces and the total; return the planned bytes."""
    width = torch.finfo(DTYPES[params.storage_dtype]).bits // 8
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
    total = bytes_per_chunk(sizes, params.force_space, width) * len(layers) * num_chunks
    log.info(
        "trajectories: %d chunks x %d windows of %d tokens + %d future positions through %s; "
        "planned shards %.2f GB (%s, %s)",
        num_chunks,
        sizes.num_windows,
        sizes.window_size,
        sizes.num_queries,
        params.model,
        total / 1e9,
        params.force_space,
        params.storage_dtype,
    )
    return total


def _fingerprint_inputs(params: TrajectoriesParams, corpus: Path) -> dict:
    code = code_fingerprint(__name__)
    values = {k: v for k, v in to_dict(params).items() if k not in RESULT_NEUTRAL}
    return {"params": values, "corpus": sha256_file(corpus / MANIFEST), "code": code}


def _loss_path(scratch: Scratch, index: int) -> Path:
    return scratch.folder / f"loss-{index:05d}.json"


def _write_loss(scratch: Scratch, index: int, loss_sum: float) -> None:
    path = _loss_path(scratch, index)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"loss_sum": loss_sum}))
    os.replace(tmp, path)


def _pop_loss(scratch: Scratch, index: int) -> float:
    """The shard's summed chunk losses; the file is removed so it is not published."""
    path = _loss_path(scratch, index)
    loss_sum = json.loads(path.read_text())["loss_sum"]
    path.unlink()
    return loss_sum


def command(
    corpus: Annotated[Path, typer.Option(help="Chunk folder written by the corpus stage.")],
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    params: Annotated[Path, typer.Option(help="Params file; its `trajectories` section.")] = PARAMS,
) -> None:
    """Store K, V, future Q and LM-loss forces per layer into safetensors shards (resumable)."""
    stats = run(load_params(params, trajectories=TrajectoriesParams).trajectories, corpus, out)
    typer.echo(f"trajectories: {stats}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    typer.run(command)
