"""Teacher activations for every concept, in resumable shards: the extraction of stage
`directions` (the main teacher) and of stage `cross_teacher` (a second one).

Reads the concept table of `wordlist`; runs the teacher over each prompt template,
opened by the start token of `<section>.start_token` (`pipeline/common/sequence_start.py`:
a decoder without BOS gets its end-of-text token, so position 0's attention sink is never
the concept), pools the hidden state at each requested layer and writes:
shards (concept_id, split, layer_<L>), the train-split mean per layer, the
teacher's input-embedding rows for the tokens concepts use, each concept's
token ids as a template shows them to the teacher (`concept_token_table`: " paris", not
"paris") and its text as UTF-8 bytes (for the character-level student; layout:
`pipeline/concepts/layout.py`), plus `manifest.json`.
A killed run resumes from its finished shards; under torchrun each rank computes
its own shards and rank 0 writes the manifest (`pipeline/common/extraction.py`).

    EXTRACTION = ShardedExtraction("directions", KIND, __name__, result_neutral=RESULT_NEUTRAL)
    stats = extract(params, wordlist, out, EXTRACTION)  # params: DirectionsParams
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import torch

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
from pipeline.common.sequence_start import describe_start, start_ids
from pipeline.common.shards import layer_key, read_shard, sha256_file
from pipeline.common.teacher import DTYPES, Teacher, load_teacher, teacher_caveat
from pipeline.concepts.concept_vectors import (
    concept_activations,
    concept_token_table,
    encode_prompts,
    position_zero_prompts,
    token_template,
)
from pipeline.concepts.layout import SPLIT_CODES, write_side_files
from pipeline.concepts.params import DirectionsParams
from pipeline.inputs.words import read_concepts

log = logging.getLogger(__name__)

RESULT_NEUTRAL = ("batch_size", "device", "padding_side", "num_threads")
"""The DirectionsParams fields that do not change the stored vectors (not fingerprinted)."""


def extract(
    params: DirectionsParams,
    wordlist: Path,
    out: Path,
    extraction: ShardedExtraction,
    layers_key: str | None = None,
) -> dict:
    """Extract every concept of `wordlist` into `out`; returns the stage's stats.
    `extraction` is the calling stage's runner: its `name` is the params section the model,
    pooling and start token came from, named in messages with `layers_key` (default
    `<section>.layers`), and its module's code enters the resume fingerprint."""
    section = extraction.name
    layers_key = layers_key or f"{section}.layers"
    started = time.perf_counter()
    set_threads(params.num_threads)
    concepts = read_concepts(wordlist)
    if concepts.num_rows == 0:
        raise ValueError(f"{wordlist} holds no concepts: nothing to extract")
    params, identity = resolve_model_params(params, section)
    teacher = load_teacher(
        params.model,
        identity.revision,
        params.layers,
        params.compute_dtype,
        params.device,
        layers_key=layers_key,
        model_key=f"{section}.model",
    )
    teacher.tokenizer.padding_side = params.padding_side
    if params.pooling == "last" and not teacher.causal:
        log.warning(encoder_last_pooling(teacher, params.templates[0], section))
    start = prompt_start(params, teacher, concepts.column("text").to_pylist(), section)
    row_bytes = teacher.hidden_size * len(params.layers) * DTYPES[params.storage_dtype].itemsize
    plan = ShardPlan(
        num_rows=concepts.num_rows,
        rows_per_shard=params.shard_rows,
        planned_bytes=concepts.num_rows * row_bytes,
        description=f"{concepts.num_rows} concepts x {len(params.templates)} templates through "
        f"{params.model} (layers {list(params.layers)} of {teacher.num_layers})",
        unit="prompt",
        units_per_row=len(params.templates),
    )
    done = extraction.run(
        params,
        {"wordlist": wordlist},
        out,
        plan,
        lambda rows, progress: _concept_shard(params, teacher, concepts, start, rows, progress),
        lambda shards: _describe(params, teacher, identity, concepts, wordlist, start, shards),
        identity,
    )
    if not done.world.is_main:
        return done.rank_stats
    return {"concepts": concepts.num_rows} | done.stats(started)


def encoder_last_pooling(teacher: Teacher, template: str, section: str = "directions") -> str:
    """The warning for `pooling: last` on an encoder (blocks at `encoder.layer`, attention
    both ways: `Teacher.causal` is False): it names the token every prompt ends in, read
    from the tokenizer, e.g. BERT's `[SEP]`, the same special token for every concept."""
    tokenizer = teacher.tokenizer
    last = tokenizer(template.format(concept="x"))["input_ids"][-1]
    token = tokenizer.convert_ids_to_tokens(last)
    what = (
        f"the special token {token!r} that closes every prompt"
        if last in tokenizer.all_special_ids
        else f"each prompt's last token (here {token!r})"
    )
    return (
        f"{section}.pooling: last on an encoder ({teacher.model_id}, "
        f"{type(teacher.model).__name__}: it attends both ways and has no causal LM): each "
        f"direction is the hidden state of {what}; encoders want `pooling: mean`"
    )


def prompt_start(
    params: DirectionsParams, teacher: Teacher, texts: list[str], section: str = "directions"
) -> list[int]:
    """The ids that open every prompt; logs what position 0 holds, and warns (one line)
    where pooling would still read position 0 as a text token."""
    start = start_ids(teacher.tokenizer, params.start_token, f"{section}.start_token")
    log.info(
        "%s: %s (%s.start_token=%s)",
        section,
        describe_start(teacher.tokenizer, start),
        section,
        params.start_token,
    )
    sink = sink_warning(params, teacher, texts, start, section)
    if sink is not None:
        log.warning(sink)
    return start


def sink_warning(
    params: DirectionsParams,
    teacher: Teacher,
    texts: list[str],
    start: list[int],
    section: str = "directions",
) -> str | None:
    """The one line for prompts whose pooling reads position 0 as a text token (the
    attention sink of a decoder), or None when no prompt does."""
    lengths = [
        len(ids)
        for template in params.templates
        for ids in encode_prompts(
            teacher.tokenizer,
            [template.format(concept=text) for text in texts],
            start,
            params.max_length,
        )
    ]
    count = position_zero_prompts(teacher, lengths, start, params.pooling)
    if count == 0:
        return None
    read = "averages in" if params.pooling == "mean" else "is"
    return (
        f"{section}.start_token={params.start_token}: {count} of {len(lengths)} prompts have "
        f"no start token and their {params.pooling}-pooled state {read} position 0, the "
        f"attention sink of a decoder; set {section}.start_token: auto"
    )


def _concept_shard(
    params: DirectionsParams,
    teacher: Teacher,
    concepts: pa.Table,
    start: list[int],
    rows: range,
    progress: Progress,
) -> Shard:
    part = concepts.slice(rows.start, len(rows))
    acts = concept_activations(
        teacher,
        part.column("text").to_pylist(),
        params.templates,
        params.pooling,
        params.max_length,
        params.batch_size,
        start,
        on_batch=progress,
    )
    storage = DTYPES[params.storage_dtype]
    split_codes = [SPLIT_CODES[s] for s in part.column("split").to_pylist()]
    tensors = {
        "concept_id": torch.tensor(part.column("id").to_pylist(), dtype=torch.long),
        "split": torch.tensor(split_codes, dtype=torch.int8),
    }
    return Shard(tensors | {layer_key(layer): a.to(storage) for layer, a in acts.items()})


def _describe(
    params: DirectionsParams,
    teacher: Teacher,
    identity: ModelIdentity,
    concepts: pa.Table,
    wordlist: Path,
    start: list[int],
    shards: CompletedShards,
) -> ManifestAdditions:
    """The side files (train means, embedding rows, token table) and the model's facts."""
    texts = concepts.column("text").to_pylist()
    offsets, flat = concept_token_table(teacher.tokenizer, texts, params.templates)
    used = torch.unique(flat)
    files = write_side_files(
        shards.folder,
        means=_train_means(shards, params.layers),
        embedding_token_ids=used,
        embedding_rows=teacher.embedding_rows(used),
        offsets=offsets,
        flat_tokens=flat,
        texts=texts,
    )
    extra = {
        "model": params.model,
        **identity.manifest(),
        "layers": list(params.layers),
        "num_layers": teacher.num_layers,
        "hidden_size": teacher.hidden_size,
        "vocab_size": teacher.vocab_size,
        "embedding_dim": teacher.embedding_dim,
        "pooling": params.pooling,
        "start_ids": start,
        "token_template": token_template(params.templates),
        "teacher_caveat": teacher_caveat(teacher.model.config),
        "storage_dtype": params.storage_dtype,
        "wordlist_sha256": sha256_file(wordlist),
    }
    return ManifestAdditions(extra, files)


def _train_means(shards: CompletedShards, layers) -> dict[int, torch.Tensor]:
    """Train-split mean activation per layer, streamed shard by shard in float64."""
    sums = {layer: None for layer in layers}
    count = 0
    for record in shards.records:
        shard = read_shard(shards.folder, record)
        keep = shard["split"] == SPLIT_CODES["train"]
        count += int(keep.sum())
        for layer in layers:
            part = shard[layer_key(layer)][keep].double().sum(0)
            sums[layer] = part if sums[layer] is None else sums[layer] + part
    if count == 0:
        raise ValueError("no concept falls in the train split: cannot compute the train mean")
    return {layer: (total / count).float() for layer, total in sums.items()}
