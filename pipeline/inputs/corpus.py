"""Stage `corpus`: documents tokenized into fixed-length chunks for the token-level branches.

Reads the `corpus` section of params.yaml and its source (builtin text, a Hugging
Face dataset, or local files; `pipeline/inputs/text_chunks.py`). Writes `<out>/shard-*.safetensors`
(chunk_id int64 (R,), token_ids int64 (R, chunk_tokens), first_document, last_document;
layout: `pipeline/inputs/text_chunks.py`) and `manifest.json` whose `extra` holds model,
its identity (the resolved revision, or a local folder's model_sha256), chunk_tokens,
num_chunks, block_chunks, num_blocks, source, the files read (`source: files`) and the
document/token counts (tokens skipped at block seams included); the same counts go to
`--metrics` (JSON). Everything is written into a temporary folder renamed to `<out>`
when complete, so a killed run leaves no partial corpus.

    python -m pipeline.cli corpus --params params.yaml --out data/corpus \
        --metrics metrics/corpus.json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer

from pipeline.common.identity import corpus_files, files_sha256, model_identity
from pipeline.common.io import write_json
from pipeline.common.params import load_params, to_dict
from pipeline.common.shards import Manifest, shard_name, write_shard
from pipeline.inputs.params import CorpusParams
from pipeline.inputs.text_chunks import (
    CORPUS,
    Chunk,
    ChunkStats,
    cut_chunks,
    documents,
    load_tokenizer,
)

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")


def run(params: CorpusParams, out: Path, metrics: Path | None = None) -> dict:
    """Write the chunked corpus into `out` (and its counts into `metrics`); returns the
    stats also stored in the manifest."""
    started = time.perf_counter()
    model = model_identity(params.model, params.revision, "corpus.model")
    tokenizer = load_tokenizer(params.model, model.revision)
    stats = ChunkStats()
    chunks = cut_chunks(
        documents(params),
        tokenizer,
        params.chunk_tokens,
        params.max_chunks,
        params.block_chunks,
        stats,
    )
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        records, rows = [], []
        for chunk in chunks:
            rows.append(chunk)
            if len(rows) == params.shard_rows:
                records.append(_write(tmp, len(records), rows, params.shard_rows))
                rows = []
        if rows:
            records.append(_write(tmp, len(records), rows, params.shard_rows))
        if not records:
            raise ValueError(
                f"corpus source {params.source!r} gave {stats.tokens} tokens, fewer than one "
                f"chunk of corpus.chunk_tokens={params.chunk_tokens}"
            )
        num_chunks = sum(r.rows for r in records)
        if num_chunks < params.max_chunks:
            log.warning(
                "corpus: the source ran out after %d of corpus.max_chunks=%d chunks",
                num_chunks,
                params.max_chunks,
            )
        extra = {
            "model": params.model,
            **model.manifest(),
            "chunk_tokens": params.chunk_tokens,
            "num_chunks": num_chunks,
            "block_chunks": params.block_chunks,
            "num_blocks": stats.blocks,
            "source": params.source,
            "files_sha256": files_sha256(corpus_files(params.files))
            if params.source == "files"
            else None,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer),
            **asdict(stats),
        }
        Manifest(kind=CORPUS, params=to_dict(params), shards=records, extra=extra).save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {"chunks": num_chunks, "block_chunks": params.block_chunks, **asdict(stats)}
    if metrics is not None:
        write_json(Path(metrics), counts, sort_keys=False)
    return counts | {"shards": len(records), "seconds": round(time.perf_counter() - started, 2)}


def _write(folder: Path, index: int, rows: list[Chunk], shard_rows: int):
    first = index * shard_rows
    return write_shard(
        folder / shard_name(index),
        {
            "chunk_id": torch.arange(first, first + len(rows), dtype=torch.long),
            "token_ids": torch.tensor([r.tokens for r in rows], dtype=torch.long),
            "first_document": torch.tensor([r.first_document for r in rows], dtype=torch.long),
            "last_document": torch.tensor([r.last_document for r in rows], dtype=torch.long),
        },
    )


def command(
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    metrics: Annotated[
        Path | None, typer.Option(help="JSON of the document, chunk, block and token counts.")
    ] = None,
    params: Annotated[Path, typer.Option(help="Params file; its `corpus` section.")] = PARAMS,
) -> None:
    """Tokenize the corpus source into blocks of fixed-length chunks (safetensors shards)."""
    stats = run(load_params(params, corpus=CorpusParams).corpus, out, metrics)
    typer.echo(f"corpus: {json.dumps(stats)}")


if __name__ == "__main__":
    typer.run(command)
