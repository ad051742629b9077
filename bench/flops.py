"""FLOP accounting of a decoder forward: what a method executes, what the task requires.

Executed work is recorded, not re-derived: `record_work(model)` hooks every decoder
layer and the LM head, so each method (the project, a peer, the plain baseline) is
charged for the shapes it actually ran (padding, cached-prefix context, layers past
the one read, the LM head) and nothing else.

    with record_work(model) as work:
        run(model, ...)
    work.flops(config)   # executed FLOPs of every forward inside the block

Counted: the matmuls (projections, MLP, LM head; 2 FLOPs per multiply-add) and the
attention scores and mixing over the full (new tokens x context) rectangle, which
is what the masked kernels compute. Norms, RoPE and activations are elementwise,
under 1% here, and not counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedConfig

from pipeline.common.teacher import decoder_blocks


def layer_weights(config: PreTrainedConfig) -> int:
    """Multiply-adds per token of one decoder layer's projections and gated MLP."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    # q and o: heads x head_dim each; k and v: kv heads x head_dim each; gate, up, down.
    return hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * config.intermediate_size


def layer_flops(config: PreTrainedConfig, batch: int, new: int, context: int) -> int:
    """One decoder layer over `batch` rows of `new` tokens attending to `context` keys."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    projections = 2 * layer_weights(config) * batch * new
    attention = 2 * 2 * heads * head_dim * batch * new * context  # QK^T and AV
    return projections + attention


def lm_head_flops(config: PreTrainedConfig, tokens: int) -> int:
    return 2 * config.hidden_size * config.vocab_size * tokens


def required_flops(config: PreTrainedConfig, lengths: list[int], layers: int) -> int:
    """The work the task needs: every real token through `layers` layers, causal, no head."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * layer_weights(config)
    # Token i (0-based) attends to i + 1 keys: sum over a prompt is n (n + 1) / 2.
    return layers * sum(
        per_token * n + 2 * 2 * heads * head_dim * n * (n + 1) // 2 for n in lengths
    )


@dataclass
class Work:
    """Shapes each hooked module ran: (batch, new tokens, context) per layer call."""

    layer_calls: list[tuple[int, int, int]] = field(default_factory=list)
    head_tokens: int = 0

    def clear(self) -> None:
        self.layer_calls.clear()
        self.head_tokens = 0

    def flops(self, config: PreTrainedConfig) -> int:
        layers = sum(layer_flops(config, *call) for call in self.layer_calls)
        return layers + lm_head_flops(config, self.head_tokens)


@contextmanager
def record_work(model: nn.Module) -> Iterator[Work]:
    """Record every decoder-layer and LM-head call of `model` (a HF causal LM or base model)."""
    work = Work()

    def on_layer(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # Before this layer appends its keys, the cache holds the earlier context.
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        batch, new = hidden.shape[0], hidden.shape[1]
        work.layer_calls.append((batch, new, past + new))

    def on_head(module, args):
        work.head_tokens += args[0].shape[:-1].numel()

    handles = [
        block.register_forward_pre_hook(on_layer, with_kwargs=True)
        for block in decoder_blocks(model)
    ]
    head = getattr(model, "lm_head", None)
    if head is not None:
        handles.append(head.register_forward_pre_hook(on_head))
    try:
        yield work
    finally:
        for handle in handles:
            handle.remove()


def matmul_rate(dtype: torch.dtype, device: str = "cpu", repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul in `dtype`: the machine's practical peak (2048^3
    on a CPU; 8192^3 on a GPU, which a smaller one leaves partly idle)."""
    size = 8192 if torch.device(device).type == "cuda" else 2048
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
