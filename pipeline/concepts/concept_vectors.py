"""Concept activations from a teacher: templated prompts, length-bucketed batches, pooling.

acts = concept_activations(teacher, ["cat", "dog"], ("The word {concept}",), "last", 64, 32)
acts[14].shape  # (2, D) float32, averaged over templates
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.common.teacher import Teacher


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) hidden states -> (B, D): last real token, or mean over real tokens."""
    mask = mask.bool()
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    # The last real token, wherever padding sits (left or right).
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def concept_activations(
    teacher: Teacher,
    texts: list[str],
    templates: tuple[str, ...],
    pooling: str,
    max_length: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Pooled activations (N, D) float32 per layer, averaged over templates."""
    total = {layer: torch.zeros(len(texts), teacher.hidden_size) for layer in teacher.layers}
    for template in templates:
        prompts = [template.format(concept=text) for text in texts]
        acts = _one_template(teacher, prompts, pooling, max_length, batch_size, on_batch)
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


def _one_template(teacher, prompts, pooling, max_length, batch_size, on_batch):
    tokenizer = teacher.tokenizer
    encoded = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
    # A template's fixed start is computed once and reused through the KV cache
    # (exact: the same tokens at the same positions). Mean pooling needs its states.
    prefix = shared_prefix(encoded) if pooling == "last" and teacher.causal else []
    cached = teacher.prefix_cache(prefix) if prefix else None
    # Sorting by length keeps padding (wasted FLOPs) small within each batch.
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    out = {layer: torch.empty(len(prompts), teacher.hidden_size) for layer in teacher.layers}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        suffixes = [encoded[i][len(prefix) :] for i in rows]
        batch = tokenizer.pad({"input_ids": suffixes}, return_tensors="pt")
        ids = batch["input_ids"].to(teacher.device)
        mask = batch["attention_mask"].to(teacher.device)
        for layer, hidden in teacher.hidden_at(ids, mask, cached).items():
            out[layer][rows] = pool(hidden.float(), mask, pooling).cpu()
        if on_batch is not None:
            on_batch(len(rows))
    return out


def concept_token_table(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of each concept's own token ids (no template, no special tokens)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    empty = [texts[i] for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(
            f"the tokenizer gives no tokens for {len(empty)} concepts, e.g. {empty[:3]}"
        )
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    return offsets, flat
