"""Stage `corpus`: documents tokenized into fixed-length chunks for the token-level branches.

Reads the `corpus` section of params.yaml and its source (builtin text, a Hugging Face
dataset, local files, or a package's text files; `pipeline/inputs/text_chunks.py`), cuts
its texts into documents (`document_split`, `max_document_tokens`) and packs them into
blocks of chunks, each chunk led by the start token (`start_token`). Writes
`<out>/shard-*.safetensors` (chunk_id int64 (R,), token_ids int64 (R, chunk_tokens),
first_document, last_document; layout: `pipeline/inputs/text_chunks.py`) and
`manifest.json` whose `extra` holds model, its identity (the resolved revision, or a local
folder's model_sha256), chunk_tokens, num_chunks, block_chunks, num_blocks, start_tokens
(0 or 1: the consumers drop those rows), source, the files read with their sha256 (`files`,
`packaged`) and the document/token counts; the counts go to `--metrics` (JSON) too, tokens
read vs used among them. A source that runs out before `max_chunks` is named in a warning
with the documents, blocks and the share skipped at block seams. Everything is written into
a temporary folder renamed to `<out>` when complete, so a killed run leaves no partial corpus.

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

from pipeline.common.identity import files_sha256, model_identity
from pipeline.common.io import write_json
from pipeline.common.params import load_params, to_dict
from pipeline.common.sequence_start import describe_start, end_of_text_id, stream_start_ids
from pipeline.common.shards import Manifest, shard_name, write_shard
from pipeline.inputs.params import CorpusParams
from pipeline.inputs.text_chunks import (
    CORPUS,
    START_TOKENS,
    Chunk,
    ChunkStats,
    cut_chunks,
    documents,
    load_tokenizer,
    source_files,
)

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")


def run(params: CorpusParams, out: Path, metrics: Path | None = None) -> dict:
    """Write the chunked corpus into `out` (and its counts into `metrics`); returns the
    stats also stored in the manifest."""
    started = time.perf_counter()
    model = model_identity(params.model, params.revision, "corpus.model")
    tokenizer = load_tokenizer(params.model, model.revision)
    start = stream_start_ids(tokenizer, params.start_token, "corpus.start_token")
    log.info("corpus: %s", describe_start(tokenizer, start))
    files = files_sha256(source_files(params)) if params.source in ("files", "packaged") else None
    stats = ChunkStats()
    chunks = cut_chunks(
        documents(params),
        tokenizer,
        params.chunk_tokens,
        params.max_chunks,
        params.block_chunks,
        stats,
        start,
        params.max_document_tokens,
        params.seed if params.shuffle_parts else None,
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
                f"corpus source {params.source!r} gave {stats.tokens_read} tokens, fewer than one "
                f"chunk of corpus.chunk_tokens={params.chunk_tokens}"
            )
        num_chunks = sum(r.rows for r in records)
        if num_chunks < params.max_chunks:
            log.warning("corpus: %s", shortfall(params, num_chunks, stats))
        extra = {
            "model": params.model,
            **model.manifest(),
            "chunk_tokens": params.chunk_tokens,
            "num_chunks": num_chunks,
            "block_chunks": params.block_chunks,
            "num_blocks": stats.blocks,
            START_TOKENS: len(start),
            "start_token_ids": start,
            "end_of_text_id": end_of_text_id(tokenizer),
            "source": params.source,
            "files_sha256": files,
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
    counts = {
        "chunks": num_chunks,
        "block_chunks": params.block_chunks,
        START_TOKENS: len(start),
        **asdict(stats),
        "used_fraction": round(stats.used_fraction, 6),
    }
    if metrics is not None:
        write_json(Path(metrics), counts, sort_keys=False)
    return counts | {"shards": len(records), "seconds": round(time.perf_counter() - started, 2)}


def shortfall(params: CorpusParams, num_chunks: int, stats: ChunkStats) -> str:
    """The warning of a source that ran out: what it held, where its tokens went, the keys
    that change it."""
    skipped = stats.seam_skipped_tokens / stats.tokens_read if stats.tokens_read else 0.0
    fix = (
        "lower corpus.max_document_tokens (a divisor of a block's text tokens skips least)"
        if params.max_document_tokens
        else "set corpus.max_document_tokens (and corpus.document_split) to cut long documents"
    )
    return (
        f"the source ran out after {num_chunks} of corpus.max_chunks={params.max_chunks} "
        f"chunks: {stats.documents} documents ({stats.parts} after the "
        f"max_document_tokens={params.max_document_tokens} cut) in {stats.blocks} blocks of "
        f"corpus.block_chunks={params.block_chunks}; {stats.tokens_used} of "
        f"{stats.tokens_read} tokens read were used ({stats.used_fraction:.1%}), "
        f"{skipped:.1%} skipped at block seams (a block holds whole documents): {fix}, "
        "or raise corpus.block_chunks, or give the source more text"
    )


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
