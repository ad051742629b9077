"""Concept activations from a teacher: templated prompts, length-bucketed batches, pooling;
and the concept tokens the students read.

Every prompt is `start` (the ids of `pipeline/common/sequence_start.start_ids`, e.g.
`<|endoftext|>` for a decoder without BOS) followed by the template filled with the concept
and encoded with the tokenizer's own special tokens, so the attention sink of position 0
sits on the start token, not on the concept.

acts = concept_activations(teacher, ["cat", "dog"], ("The word {concept}",), "last", 64, 32, [0])
acts[14].shape  # (2, D) float32, averaged over templates
offsets, flat = concept_token_table(tokenizer, ["paris"], ("{concept}", "The word: {concept}"))
# flat: the ids of " paris" as "The word: paris" shows it to the teacher
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import torch

from pipeline.common.sequence_start import adds_start_token
from pipeline.common.teacher import Teacher
from pipeline.concepts.params import SLOT


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, skip: int = 0) -> torch.Tensor:
    """(B, T, D) hidden states -> (B, D): last real token, or mean over real tokens after
    each row's first `skip` real tokens (its start tokens)."""
    mask = mask.bool()
    if pooling == "mean":
        rank = mask.long().cumsum(-1) - 1  # (B, T) index among the row's real tokens
        weights = (mask & (rank >= skip)).to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    # The last real token, wherever padding sits (left or right).
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def encode_prompts(
    tokenizer, prompts: list[str], start: Sequence[int], max_length: int
) -> list[list[int]]:
    """`start` + each prompt encoded with the tokenizer's special tokens, at most
    `max_length` ids in all."""
    encoded = tokenizer(prompts, truncation=True, max_length=max_length - len(start))
    return [[*start, *ids] for ids in encoded["input_ids"]]


def mean_skip(teacher: Teacher, start: Sequence[int]) -> int:
    """Leading positions that mean pooling leaves out: on a decoder, the start token (ours
    or the tokenizer's BOS), the attention sink whose norm would swamp the mean; an
    encoder's [CLS] stays in, as in its own (sentence-transformers) mean pooling."""
    if not teacher.causal:
        return 0
    return len(start) or int(adds_start_token(teacher.tokenizer))


def position_zero_prompts(
    teacher: Teacher, lengths: Sequence[int], start: Sequence[int], pooling: str
) -> int:
    """How many prompts of these token counts (start included) pool position 0 while it
    holds a text token (the sink of a decoder): none once a start token opens every
    prompt; otherwise every prompt under mean pooling, one-token prompts under last."""
    if start or adds_start_token(teacher.tokenizer):
        return 0
    return len(lengths) if pooling == "mean" else sum(1 for n in lengths if n == 1)


def concept_activations(
    teacher: Teacher,
    texts: list[str],
    templates: tuple[str, ...],
    pooling: str,
    max_length: int,
    batch_size: int,
    start: Sequence[int] = (),
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Pooled activations (N, D) float32 per layer, averaged over templates; each prompt
    opens with the `start` ids."""
    total = {layer: torch.zeros(len(texts), teacher.hidden_size) for layer in teacher.layers}
    for template in templates:
        prompts = [template.format(concept=text) for text in texts]
        encoded = encode_prompts(teacher.tokenizer, prompts, start, max_length)
        skip = mean_skip(teacher, start)
        acts = _one_template(teacher, encoded, pooling, skip, batch_size, on_batch)
        for layer, values in acts.items():
            total[layer] += values
    return {layer: acts / len(templates) for layer, acts in total.items()}


def shared_prefix(encoded: list[list[int]]) -> list[int]:
    """The longest token prefix all prompts share, leaving each at least one token."""
    if not encoded:
        return []
    first = encoded[0]
    length = min(len(ids) for ids in encoded) - 1
    for ids in encoded[1:]:
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    return first[: max(length, 0)]


def _one_template(teacher, encoded, pooling, skip, batch_size, on_batch):
    tokenizer = teacher.tokenizer
    # A template's fixed start (the start token, the text before the slot) is computed
    # once and reused through the KV cache (exact: the same tokens at the same
    # positions). Mean pooling needs its states.
    prefix = shared_prefix(encoded) if pooling == "last" and teacher.causal else []
    cached = teacher.prefix_cache(prefix) if prefix else None
    # Sorting by length keeps padding (wasted FLOPs) small within each batch.
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out = {layer: torch.empty(len(encoded), teacher.hidden_size) for layer in teacher.layers}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        suffixes = [encoded[i][len(prefix) :] for i in rows]
        batch = tokenizer.pad({"input_ids": suffixes}, return_tensors="pt")
        ids = batch["input_ids"].to(teacher.device)
        mask = batch["attention_mask"].to(teacher.device)
        for layer, hidden in teacher.hidden_at(ids, mask, cached).items():
            out[layer][rows] = pool(hidden.float(), mask, pooling, skip).cpu()
        if on_batch is not None:
            on_batch(len(rows))
    return out


def token_template(templates: Sequence[str]) -> str:
    """The template whose tokens of the concept the students read: the last one with text
    before its first `{concept}` slot (inside a sentence a word carries its leading space:
    " paris", not "paris"), else the first."""
    framed = [t for t in templates if _slot_start(t) > 0]
    return framed[-1] if framed else templates[0]


def _slot_start(template: str) -> int:
    """Characters of the filled template before its first slot (`{{` counts as one)."""
    before = ""
    for text, name, _, _ in string.Formatter().parse(template):
        before += text
        if name == SLOT:
            return len(before)
    raise ValueError(f"template {template!r} lacks a {{{SLOT}}} slot")


def concept_token_table(
    tokenizer, texts: list[str], templates: Sequence[str] = ("{concept}",)
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of each concept's token ids as the teacher sees them inside `token_template`:
    the tokens whose characters overlap the concept's (no special tokens; a token that
    straddles the slot's edge, as " paris" does, is the concept's)."""
    template = token_template(templates)
    begin = _slot_start(template)
    prompts = [template.format(concept=text) for text in texts]
    encoded = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    rows = zip(encoded["input_ids"], encoded["offset_mapping"], texts, strict=True)
    ids = [
        [t for t, (a, b) in zip(row, spans, strict=True) if a < begin + len(text) and b > begin]
        for row, spans, text in rows
    ]
    empty = [texts[i] for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(
            f"the tokenizer gives no tokens for {len(empty)} concepts in template "
            f"{template!r}, e.g. {empty[:3]}"
        )
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    return offsets, flat
