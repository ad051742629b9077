"""Stage `activations`: token-level teacher hidden states over corpus chunks, in resumable shards.

Reads the `corpus` artifact (chunk_id, token_ids; layout `pipeline/layouts.py`),
runs `activations.model` over each chunk and keeps, at each layer of
`activations.layers`, every non-padding token (`positions: all`) or the last
non-padding token of each chunk (`positions: last`). Writes shards of
chunk_id, position, token_id, layer_<L> (layout `activations`) plus `manifest.json`.
Padding is what the corpus manifest's `pad_token_id` marks; packed chunks have none.
A killed run resumes from its finished shards (`pipeline/resume.py`).

    python -m pipeline.cli activations --params params.yaml \
        --corpus data/corpus --out data/activations
"""

from __future__ import annotations

import logging
import math
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
from pipeline.common.shards import MANIFEST, Manifest, layer_key, sha256_file
from pipeline.common.teacher import DTYPES, Teacher, load_teacher
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.sparse_autoencoder.layout import ACTIVATIONS
from pipeline.sparse_autoencoder.params import ActivationsParams

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
RESULT_NEUTRAL = ("batch_size", "device")


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
    teacher = load_teacher(
        params.model,
        params.revision,
        params.layers,
        params.compute_dtype,
        params.device,
        layers_key="activations.layers",
    )
    rows_per_chunk = reader.chunk_tokens if params.positions == "all" else 1
    chunks_per_shard = max(1, params.shard_rows // rows_per_chunk)
    num_shards = math.ceil(num_chunks / chunks_per_shard)
    _log_plan(params, num_chunks, rows_per_chunk, teacher)

    with process_group() as world:
        scratch = Scratch.for_output(out, _fingerprint_inputs(params, corpus))
        owned = owned_shards(num_shards, world.rank, world.size)
        reused = 0
        with tqdm(total=num_chunks, unit="chunk", desc="activations") as bar:
            for index in owned:
                start = index * chunks_per_shard
                stop = min(start + chunks_per_shard, num_chunks)
                if scratch.completed(index) is not None:
                    reused += 1
                    bar.update(stop - start)
                    continue
                scratch.write(index, _shard(params, teacher, reader, start, stop, bar.update))
        world.barrier()
        if not world.is_main:
            return {"rank": world.rank, "shards": len(owned), "reused_shards": reused}
    records = scratch.all_records(num_shards)

    rows = sum(r.rows for r in records)
    manifest = Manifest(
        kind=ACTIVATIONS,
        params=to_dict(params),
        shards=records,
        extra={
            "model": params.model,
            "revision": teacher.revision,
            "layers": list(params.layers),
            "num_layers": teacher.num_layers,
            "hidden_size": teacher.hidden_size,
            "positions": params.positions,
            "chunk_tokens": reader.chunk_tokens,
            "num_chunks": num_chunks,
            "pad_token_id": reader.pad_token_id,
            "storage_dtype": params.storage_dtype,
            "corpus_manifest_sha256": sha256_file(Path(corpus) / MANIFEST),
        },
    )
    manifest.save(scratch.folder)
    scratch.publish()
    return {
        "chunks": num_chunks,
        "rows": rows,
        "shards": num_shards,
        "reused_shards": reused,
        "world_size": world.size,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _shard(params, teacher, reader, start, stop, on_batch) -> dict[str, torch.Tensor]:
    chunk_ids, tokens = reader.chunk_ids(start, stop), reader.read(start, stop)
    chunk_index, position, token_id, acts = chunk_activations(
        teacher, tokens, reader.pad_token_id, params.positions, params.batch_size, on_batch
    )
    storage = DTYPES[params.storage_dtype]
    tensors = {"chunk_id": chunk_ids[chunk_index], "position": position, "token_id": token_id}
    tensors |= {layer_key(layer): a.to(storage) for layer, a in acts.items()}
    return tensors


def _fingerprint_inputs(params: ActivationsParams, corpus: Path) -> dict:
    code = code_fingerprint(__name__)
    values = {k: v for k, v in to_dict(params).items() if k not in RESULT_NEUTRAL}
    return {"params": values, "corpus": sha256_file(Path(corpus) / MANIFEST), "code": code}


def _log_plan(params, num_chunks, rows_per_chunk, teacher) -> None:
    bytes_per = torch.finfo(DTYPES[params.storage_dtype]).bits // 8
    planned = num_chunks * rows_per_chunk * teacher.hidden_size * len(params.layers) * bytes_per
    log.info(
        "activations: %d chunks (%s tokens) through %s, layers %s of %d; planned shards "
        "at most %.1f MB",
        num_chunks,
        params.positions,
        params.model,
        list(params.layers),
        teacher.num_layers,
        planned / 1e6,
    )


def command(
    corpus: Annotated[Path, typer.Option(help="Folder written by the corpus stage.")],
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    params: Annotated[Path, typer.Option(help="Params file; its `activations` section.")] = PARAMS,
) -> None:
    """Dump token-level teacher activations over corpus chunks into safetensors shards."""
    stats = run(load_params(params, activations=ActivationsParams).activations, corpus, out)
    typer.echo(f"activations: {stats}")
