"""The downstream metric: the teacher's LM loss when one layer's window K/V cache is
replaced by a compressor's super-tokens.

A chunk is the trajectories' x_0 .. x_N (N = W*S + Q, `forces.py`): W*S window tokens,
Q future tokens, one label. The teacher reads x_0 .. x_{N-1}; the loss of a chunk is
the mean next-token cross-entropy (nats/token) at the Q future positions, as the
trajectories stage defines L. In the compressed pass, at decoder block `layer` only,
the future positions' queries attend to the W*S/window_size super-tokens of every KV
head plus the future tokens up to themselves (causal), instead of the W*S window
tokens; the window positions, every other block and every other position stay dense.
The super-tokens are built from the block's live K/V: the tensors the attention
function receives, after RoPE and per KV head, i.e. the space the trajectories stage
stores and the sidecar was trained in.

Mechanism: an attention function registered through transformers' AttentionInterface
(and the sdpa mask through AttentionMaskInterface) under SPLICE; it runs sdpa
everywhere and, in block `module.layer_idx == layer`, overwrites the future positions'
output with the compressed attention.

    losses = heldout_lm_losses(model, tokens, layer=1, window_tokens=64, window_size=16,
                               compressors=compressors, batch_size=8)
    losses.dense, losses.compressed["sidecar"]  # (C,) per chunk
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.common.bootstrap import paired_interval
from pipeline.common.progress import progress
from pipeline.kv_sidecar.compressors import Compressor
from pipeline.kv_sidecar.forces import chunk_losses, future_logits

SPLICE = "kv_sidecar_splice"
BOOTSTRAP_RESAMPLES = 10_000
INTERVAL_KIND = "paired bootstrap 95% (BCa, 10,000 resamples over held-out chunks)"


@dataclass
class Splice:
    """What the spliced attention does in block `layer`: dense (compressor None) or
    compressed; it leaves the window queries' attention mass of the last pass in `mass`."""

    layer: int
    window_tokens: int
    window_size: int
    compressor: Compressor | None = None
    mass: Tensor | None = field(default=None, repr=False)  # (B, H_kv, N)


_ACTIVE: contextvars.ContextVar[Splice | None] = contextvars.ContextVar(SPLICE, default=None)


def window_attention_mass(query: Tensor, key: Tensor, scale: float, window_size: int) -> Tensor:
    """Attention each window token receives from the queries of its own window, summed
    over those queries and over the query heads that read its KV head: query
    (B, H, N, d), key (B, H_kv, N, d) of the N window positions -> (B, H_kv, N). The
    probabilities are the model's own causal softmax over the whole prefix."""
    n, group = query.shape[2], query.shape[1] // key.shape[1]
    scores = query @ key.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, H, N, N)
    window = torch.arange(n, device=query.device) // window_size
    same = window[:, None] == window[None, :]  # (N queries, N keys): same window
    received = (probs * same).sum(-2)  # (B, H, N)
    return received.unflatten(1, (key.shape[1], group)).sum(2)


def compressed_future_attention(
    query: Tensor, key: Tensor, value: Tensor, splice: Splice, scale: float
) -> Tensor:
    """Output (B, Q, H, d) of the future queries over super-tokens + causal future tokens."""
    n, ws = splice.window_tokens, splice.window_size
    batch, kv_heads, _, dim = key.shape
    windows = n // ws

    def windowed(x: Tensor) -> Tensor:  # (B, H_kv, N, d) -> (B * H_kv, W, S, d)
        return x[:, :, :n].unflatten(2, (windows, ws)).flatten(0, 1).float()

    mass = splice.mass.flatten(0, 1).unflatten(1, (windows, ws))  # (B * H_kv, W, S)
    kc, vc = splice.compressor.apply(windowed(key), windowed(value), mass)
    kc, vc = (x.unflatten(0, (batch, kv_heads)).to(key.dtype) for x in (kc, vc))
    keys = torch.cat([kc, key[:, :, n:]], 2)  # (B, H_kv, W + Q, d)
    values = torch.cat([vc, value[:, :, n:]], 2)
    group = query.shape[1] // kv_heads
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    future = query.shape[2] - n
    mask = torch.ones(future, windows + future, dtype=torch.bool, device=query.device)
    mask[:, windows:] = torch.ones(future, future, dtype=torch.bool, device=query.device).tril()
    out = F.scaled_dot_product_attention(query[:, :, n:], keys, values, mask, scale=scale)
    return out.transpose(1, 2)


def spliced_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """sdpa; in the active splice's block, the future positions read compressed K/V."""
    out, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )
    splice = _ACTIVE.get()
    if splice is None or module.layer_idx != splice.layer:
        return out, weights
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n = splice.window_tokens
    splice.mass = window_attention_mass(query[:, :, :n], key[:, :, :n], scale, splice.window_size)
    if splice.compressor is None:
        return out, weights
    out = out.clone()
    out[:, n:] = compressed_future_attention(query, key, value, splice, scale)
    return out, None


AttentionInterface.register(SPLICE, spliced_attention)
AttentionMaskInterface.register(SPLICE, sdpa_mask)


@contextmanager
def splice_attention(model: nn.Module, splice: Splice) -> Iterator[Splice]:
    """Within the block, `model` runs the spliced attention; its implementation is restored."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(SPLICE)
    token = _ACTIVE.set(splice)
    try:
        yield splice
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)


@dataclass(frozen=True)
class LMLosses:
    chunk_ids: list[int]
    dense: Tensor  # (C,) float64, nats/token at the future positions
    compressed: dict[str, Tensor]  # name -> (C,)
    mass: Tensor  # (C, H_kv, N) window queries' attention mass in the dense pass


@torch.no_grad()
def heldout_lm_losses(
    model: nn.Module,
    tokens: Mapping[int, Tensor],
    layer: int,
    window_tokens: int,
    window_size: int,
    compressors: Mapping[str, Compressor],
    batch_size: int,
    desc: str = "LM loss",
) -> LMLosses:
    """Per-chunk LM loss at the future positions, dense and with each compressor; `tokens`:
    chunk id -> (N + 1,) ids (x_0 .. x_N, as `CorpusChunks.tokens_of` gives them). A
    progress bar named `desc` counts the teacher's forward passes."""
    ids = sorted(tokens)
    if window_tokens % window_size:
        raise ValueError(f"window_size {window_size} does not divide {window_tokens} tokens")
    device = model.get_input_embeddings().weight.device
    splice = Splice(layer, window_tokens, window_size)
    dense, masses = [], []
    compressed: dict[str, list[Tensor]] = {name: [] for name in compressors}
    batches = range(0, len(ids), batch_size)
    bar = progress(total=len(batches) * (1 + len(compressors)), desc=desc, unit="forward")
    with splice_attention(model, splice), bar:
        for start in batches:
            chunk = torch.stack([tokens[i] for i in ids[start : start + batch_size]]).to(device)
            inputs, labels = chunk[:, :-1], chunk[:, window_tokens + 1 :]
            if labels.shape[1] < 1:
                raise ValueError(f"chunks of {chunk.shape[1]} tokens have no future positions")

            def loss(inputs=inputs, labels=labels) -> Tensor:
                embeds = model.get_input_embeddings()(inputs)
                logits = future_logits(model, embeds, labels.shape[1])
                return chunk_losses(logits, labels).double().cpu()

            splice.compressor = None
            dense.append(loss())
            masses.append(splice.mass.float().cpu())
            bar.update(1)
            for name, compressor in compressors.items():
                splice.compressor = compressor
                compressed[name].append(loss())
                bar.update(1)
    return LMLosses(
        chunk_ids=ids,
        dense=torch.cat(dense),
        compressed={name: torch.cat(parts) for name, parts in compressed.items()},
        mass=torch.cat(masses),
    )


def paired_increase(
    compressed: Tensor, dense: Tensor, seed: int
) -> tuple[float, list[float] | None]:
    """Mean over chunks of compressed - dense loss and its paired bootstrap 95% interval
    (BCa, `paired_interval`; the chunks are resampled, each keeping its own pair). None
    with < 2 chunks."""
    diffs = (compressed - dense).double().numpy()
    mean = float(diffs.mean())
    if diffs.size < 2:
        return mean, None
    return mean, list(paired_interval((diffs,), np.mean, BOOTSTRAP_RESAMPLES, seed))
