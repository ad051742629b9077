"""Stage `activations`: token-level teacher hidden states over corpus chunks, in resumable shards.

Reads the `corpus` artifact (chunk_id, token_ids; `pipeline/inputs/corpus.py`),
runs `activations.model` over each chunk and keeps, at each layer of
`activations.layers`, every non-padding token (`positions: all`) or the last
non-padding token of each chunk (`positions: last`). Writes shards of
chunk_id, position, token_id, layer_<L> (layout `pipeline/sparse_autoencoder/layout.py`)
plus `manifest.json`. Padding is what the corpus manifest's `pad_token_id` marks; packed
chunks have none. A killed run resumes from its finished shards; under torchrun each
rank computes its own shards and rank 0 writes the manifest
(`pipeline/common/extraction.py`).

    python -m pipeline.cli activations --params params.yaml \
        --corpus data/corpus --out data/activations
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from pipeline.common.devices import set_threads
from pipeline.common.extraction import (
    ManifestAdditions,
    Progress,
    Shard,
    ShardedExtraction,
    ShardPlan,
)
from pipeline.common.identity import ModelIdentity, resolve_model_params
from pipeline.common.params import load_params
from pipeline.common.shards import MANIFEST, layer_key, sha256_file
from pipeline.common.teacher import DTYPES, Teacher, load_teacher
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.sparse_autoencoder.layout import ACTIVATIONS
from pipeline.sparse_autoencoder.params import ActivationsParams

PARAMS = Path("params.yaml")

EXTRACTION = ShardedExtraction(
    "activations", ACTIVATIONS, __name__, result_neutral=("batch_size", "device", "num_threads")
)


def chunk_activations(
    teacher: Teacher,
    token_ids: torch.Tensor,
    pad_token_id: int | None,
    positions: str,
    batch_size: int,
    on_batch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Hidden states of chunks token_ids (C, T) at the teacher's layers.

    Returns (row_chunk (R,) index into the C chunks, position (R,), token_id (R,),
    {layer: (R, D) float32}); rows are chunk-major, positions ascending.
    """
    mask = torch.ones_like(token_ids, dtype=torch.bool)
    if pad_token_id is not None:
        mask = token_ids != pad_token_id  # (C, T)
    if positions == "last":
        index = torch.arange(token_ids.shape[1]).expand_as(mask)
        last = torch.where(mask, index, -1).max(1).values  # (C,)
        keep = torch.zeros_like(mask)
        real = last >= 0
        keep[real.nonzero().flatten(), last[real]] = True
    else:
        keep = mask
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in teacher.layers}
    for start in range(0, token_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        ids, attention = token_ids[rows].to(teacher.device), mask[rows].long().to(teacher.device)
        hidden = teacher.hidden_at(ids, attention)
        for layer, states in hidden.items():
            parts[layer].append(states.float().cpu()[keep[rows]])  # (r, D)
        if on_batch is not None:
            on_batch(ids.shape[0])
    chunk_index, position = keep.nonzero(as_tuple=True)
    acts = {layer: torch.cat(p) for layer, p in parts.items()}
    return chunk_index, position, token_ids[chunk_index, position], acts


def run(params: ActivationsParams, corpus: Path, out: Path) -> dict:
    started = time.perf_counter()
    set_threads(params.num_threads)
    reader = CorpusChunks(Path(corpus))
    corpus_model = reader.manifest.extra.get("model")
    if corpus_model != params.model:
        raise ValueError(
            f"activations.model={params.model!r} but {corpus} was tokenized for "
            f"{corpus_model!r}: set activations.model to the corpus model"
        )
    num_chunks = min(len(reader), params.max_chunks or len(reader))
    if num_chunks == 0:
        raise ValueError(f"{corpus} holds no chunks: nothing to run the teacher over")
    params, identity = resolve_model_params(params, "activations")
    teacher = load_teacher(
        params.model,
        identity.revision,
        params.layers,
        params.compute_dtype,
        params.device,
        layers_key="activations.layers",
        model_key="activations.model",
    )
    rows_per_chunk = reader.chunk_tokens if params.positions == "all" else 1
    row_bytes = teacher.hidden_size * len(params.layers) * DTYPES[params.storage_dtype].itemsize
    plan = ShardPlan(
        num_rows=num_chunks,
        rows_per_shard=max(1, params.shard_rows // rows_per_chunk),
        # At most: padding positions are planned but not stored.
        planned_bytes=num_chunks * rows_per_chunk * row_bytes,
        description=f"{num_chunks} chunks ({params.positions} tokens) through {params.model}, "
        f"layers {list(params.layers)} of {teacher.num_layers}",
    )
    done = EXTRACTION.run(
        params,
        {"corpus": Path(corpus) / MANIFEST},
        out,
        plan,
        lambda rows, progress: _chunk_shard(params, teacher, reader, rows, progress),
        lambda shards: _describe(params, teacher, identity, reader, corpus, num_chunks),
        identity,
    )
    if not done.world.is_main:
        return done.rank_stats
    return {"chunks": num_chunks, "rows": done.manifest.rows} | done.stats(started)


def _chunk_shard(
    params: ActivationsParams,
    teacher: Teacher,
    reader: CorpusChunks,
    rows: range,
    progress: Progress,
) -> Shard:
    chunk_ids, tokens = reader.chunk_ids(rows.start, rows.stop), reader.read(rows.start, rows.stop)
    chunk_index, position, token_id, acts = chunk_activations(
        teacher, tokens, reader.pad_token_id, params.positions, params.batch_size, progress
    )
    storage = DTYPES[params.storage_dtype]
    tensors = {"chunk_id": chunk_ids[chunk_index], "position": position, "token_id": token_id}
    return Shard(tensors | {layer_key(layer): a.to(storage) for layer, a in acts.items()})


def _describe(
    params: ActivationsParams,
    teacher: Teacher,
    identity: ModelIdentity,
    reader: CorpusChunks,
    corpus: Path,
    num_chunks: int,
) -> ManifestAdditions:
    return ManifestAdditions(
        extra={
            "model": params.model,
            **identity.manifest(),
            "layers": list(params.layers),
            "num_layers": teacher.num_layers,
            "hidden_size": teacher.hidden_size,
            "positions": params.positions,
            "chunk_tokens": reader.chunk_tokens,
            "num_chunks": num_chunks,
            "block_chunks": reader.block_chunks,
            "pad_token_id": reader.pad_token_id,
            **_start_tokens(reader),
            "storage_dtype": params.storage_dtype,
            "corpus_manifest_sha256": sha256_file(Path(corpus) / MANIFEST),
        }
    )


def _start_tokens(reader: CorpusChunks) -> dict[str, Any]:
    """How many leading start tokens each chunk has and their ids, as the corpus manifest
    records them (none for a corpus that predates them): the SAE also leaves out rows where
    they recur, mid-chunk, at a document's start."""
    ids = reader.manifest.extra.get("start_token_ids", []) if reader.start_tokens else []
    return {"start_tokens": reader.start_tokens, "start_token_ids": list(ids)}


def command(
    corpus: Annotated[Path, typer.Option(help="Folder written by the corpus stage.")],
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    params: Annotated[Path, typer.Option(help="Params file; its `activations` section.")] = PARAMS,
) -> None:
    """Dump token-level teacher activations over corpus chunks into safetensors shards."""
    stats = run(load_params(params, activations=ActivationsParams).activations, corpus, out)
    typer.echo(f"activations: {json.dumps(stats)}")
