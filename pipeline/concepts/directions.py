"""Stage `directions`: teacher activations for every concept, in resumable shards.

Reads the concept table of `wordlist`; runs the teacher over each prompt template,
pools the hidden state at each requested layer and writes:
shards (concept_id, split, layer_<L>), the train-split mean per layer, the
teacher's input-embedding rows for the tokens concepts use, and each concept's
token ids (layout: `pipeline/data.py`), plus `manifest.json`.
A killed run resumes from its finished shards (`pipeline/resume.py`).

    python -m pipeline.cli directions --params params.yaml \
        --wordlist data/wordlist/concepts.parquet --out data/directions
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
from pipeline.common.shards import Manifest, layer_key, read_shard, sha256_file
from pipeline.common.teacher import DTYPES, Teacher, load_teacher
from pipeline.concepts.concept_vectors import concept_activations, concept_token_table
from pipeline.concepts.layout import KIND, SPLIT_CODES, write_side_files
from pipeline.concepts.params import DirectionsParams
from pipeline.inputs.words import read_concepts

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")

# Params that do not change the stored values; kept out of the resume fingerprint.
RESULT_NEUTRAL = ("batch_size", "device", "padding_side")


def run(params: DirectionsParams, wordlist: Path, out: Path) -> dict:
    started = time.perf_counter()
    table = read_concepts(wordlist)
    texts = table.column("text").to_pylist()
    if not texts:
        raise ValueError(f"{wordlist} holds no concepts: nothing to extract")
    concept_ids = torch.tensor(table.column("id").to_pylist(), dtype=torch.long)
    splits = torch.tensor(
        [SPLIT_CODES[s] for s in table.column("split").to_pylist()], dtype=torch.int8
    )

    teacher = load_teacher(
        params.model,
        params.revision,
        params.layers,
        params.compute_dtype,
        params.device,
        layers_key="directions.layers",
    )
    teacher.tokenizer.padding_side = params.padding_side
    _log_plan(params, len(texts), teacher)

    with process_group() as world:
        scratch = Scratch.for_output(out, _fingerprint_inputs(params, wordlist))
        num_shards = math.ceil(len(texts) / params.shard_rows)
        owned = owned_shards(num_shards, world.rank, world.size)
        reused = _extract_shards(params, teacher, texts, concept_ids, splits, scratch, owned)
        # The manifest is written once every rank's shards are in place.
        world.barrier()
        if not world.is_main:
            return {"rank": world.rank, "shards": len(owned), "reused_shards": reused}
    records = scratch.all_records(num_shards)

    offsets, flat = concept_token_table(teacher.tokenizer, texts)
    used = torch.unique(flat)
    files = write_side_files(
        scratch.folder,
        means=_train_means(scratch.folder, records, params.layers),
        embedding_token_ids=used,
        embedding_rows=teacher.embedding_rows(used),
        offsets=offsets,
        flat_tokens=flat,
    )
    manifest = Manifest(
        kind=KIND,
        params=to_dict(params),
        shards=records,
        files=files,
        extra={
            "model": params.model,
            "revision": teacher.revision,
            "layers": list(params.layers),
            "num_layers": teacher.num_layers,
            "hidden_size": teacher.hidden_size,
            "vocab_size": teacher.vocab_size,
            "embedding_dim": teacher.embedding_dim,
            "pooling": params.pooling,
            "storage_dtype": params.storage_dtype,
            "wordlist_sha256": sha256_file(wordlist),
        },
    )
    manifest.save(scratch.folder)
    scratch.publish()
    seconds = time.perf_counter() - started
    return {
        "concepts": len(texts),
        "shards": num_shards,
        "reused_shards": reused,
        "world_size": world.size,
        "seconds": round(seconds, 2),
    }


def _extract_shards(params, teacher, texts, concept_ids, splits, scratch, owned) -> int:
    """Compute the shards in `owned` that a previous run did not finish; return reused count."""
    reused = 0
    rows_of = [
        slice(i * params.shard_rows, min((i + 1) * params.shard_rows, len(texts))) for i in owned
    ]
    total = sum(r.stop - r.start for r in rows_of) * len(params.templates)
    with tqdm(total=total, unit="prompt", desc="directions") as bar:
        for index, rows in zip(owned, rows_of, strict=True):
            if scratch.completed(index) is not None:
                reused += 1
                bar.update((rows.stop - rows.start) * len(params.templates))
                continue
            acts = concept_activations(
                teacher,
                texts[rows],
                params.templates,
                params.pooling,
                params.max_length,
                params.batch_size,
                on_batch=bar.update,
            )
            storage = DTYPES[params.storage_dtype]
            tensors = {"concept_id": concept_ids[rows], "split": splits[rows]}
            tensors |= {layer_key(layer): a.to(storage) for layer, a in acts.items()}
            scratch.write(index, tensors)
    return reused


def _fingerprint_inputs(params: DirectionsParams, wordlist: Path) -> dict:
    code = code_fingerprint(__name__)
    values = {k: v for k, v in to_dict(params).items() if k not in RESULT_NEUTRAL}
    return {"params": values, "wordlist": sha256_file(wordlist), "code": code}


def _train_means(folder: Path, records, layers) -> dict[int, torch.Tensor]:
    """Train-split mean activation per layer, streamed shard by shard in float64."""
    sums = {layer: None for layer in layers}
    count = 0
    for record in records:
        shard = read_shard(folder, record)
        keep = shard["split"] == SPLIT_CODES["train"]
        count += int(keep.sum())
        for layer in layers:
            part = shard[layer_key(layer)][keep].double().sum(0)
            sums[layer] = part if sums[layer] is None else sums[layer] + part
    if count == 0:
        raise ValueError("no concept falls in the train split: cannot compute the train mean")
    return {layer: (total / count).float() for layer, total in sums.items()}


def _log_plan(params: DirectionsParams, num_concepts: int, teacher: Teacher) -> None:
    bytes_per = torch.finfo(DTYPES[params.storage_dtype]).bits // 8
    planned = num_concepts * teacher.hidden_size * len(params.layers) * bytes_per
    log.info(
        "directions: %d concepts x %d templates through %s (layers %s of %d); "
        "planned shards %.1f MB",
        num_concepts,
        len(params.templates),
        params.model,
        list(params.layers),
        teacher.num_layers,
        planned / 1e6,
    )


def command(
    wordlist: Annotated[Path, typer.Option(help="Concept table written by the wordlist stage.")],
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    params: Annotated[Path, typer.Option(help="Params file; its `directions` section.")] = PARAMS,
) -> None:
    """Extract per-concept teacher activations into safetensors shards (resumable)."""
    stats = run(load_params(params, directions=DirectionsParams).directions, wordlist, out)
    typer.echo(f"directions: {stats}")
