"""K, V, future Q and LM-loss forces of a causal LM over chunks: one forward, one backward.

A chunk x_0 .. x_{N} (N = P + W*S + Q) holds P start tokens (the corpus's
`start_tokens`, 0 or 1: positions 0..P-1), W windows of S tokens (positions
P..P+W*S-1), Q future tokens (positions P+W*S..P+W*S+Q-1) and one more token x_N that
is only a label. The model reads x_0 .. x_{N-1} (positions 0..N-1, no padding). The LM
loss of a chunk is the mean next-token cross-entropy at the future positions only:

    L = (1/Q) * sum_{t=P+W*S}^{P+W*S+Q-1} -log softmax(logits_t)[x_{t+1}]

Window positions carry no loss term; they matter through what the future positions
read from them. The start tokens are a dense prefix outside the windows: a decoder's
position 0 is an attention sink (a hidden-state norm ~100x the others'), which every
compressed cache keeps as it is (StreamingLLM), so nothing of it is stored. A batch's
backward pass runs on the sum of its chunks' losses, so each chunk's forces are the
gradients of its own L (chunks never interact).

Per stored layer L (decoder block index, 0-based; block L reads HF hidden_states[L]):
- keys, values: the window's K and V per KV head *after RoPE*, exactly the tensors the
  attention function consumes (captured by wrapping it), so a compressed K/V cache can
  be compared with them directly; queries: the future positions' Q per query head, also
  after RoPE.
- forces, `kv` space: dL/dK, dL/dV (window, per KV head) and dL/dQ (future, per query
  head), gradients w.r.t. those same post-RoPE tensors.
- forces, `hidden` space (seed 003): dL/d(hidden state entering block L) at the window
  tokens, and dL/d(q_proj output) at the future positions (before RoPE: the rotation is
  orthogonal, so it equals the kv-space dL/dQ rotated back).

    tensors, losses = trajectory_batch(model, chunks, layers=(0, 3), sizes=sizes, force_space="kv")
    tensors["layer3.force_keys"].shape  # (B, W*S, n_kv_heads, head_dim)
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.teacher import decoder_blocks
from pipeline.kv_sidecar.layout import trajectory_key

ForceSpace = Literal["hidden", "kv"]
FORCE_SPACES: tuple[ForceSpace, ...] = ("hidden", "kv")
_MISSING = object()

ROPE_NOTE = (
    "keys and queries are stored after the rotary position embedding: that is what the "
    "attention function consumes (scores = q . k / sqrt(head_dim)), so the positions of "
    "window and future tokens are part of the stored vectors"
)
LOSS_NOTE = (
    "L = mean over the num_queries future positions t = P+W*S .. P+W*S+Q-1 of the next-token "
    "cross-entropy -log p(x_{t+1} | x_0..x_t); a chunk is P + W*S + Q + 1 tokens, the last a "
    "label, P = start_tokens (a dense prefix before the windows)"
)


@dataclass(frozen=True)
class Sizes:
    """Chunk geometry and attention shape: everything the stored shapes depend on."""

    window_size: int
    num_windows: int
    num_queries: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    start_tokens: int = 0
    """The chunk's dense prefix before the windows (the corpus's start token, 0 or 1)."""

    @classmethod
    def of(
        cls, config, window_size: int, num_windows: int, num_queries: int, start_tokens: int = 0
    ) -> Sizes:
        """Attention shape from a transformers config (Llama, Qwen3, Mistral ...)."""
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return cls(window_size, num_windows, num_queries, n_heads, n_kv, head_dim,
                   config.hidden_size, start_tokens)  # fmt: skip

    @property
    def window_tokens(self) -> int:
        return self.window_size * self.num_windows

    @property
    def chunk_tokens(self) -> int:
        """Tokens per chunk: start tokens, windows, future tokens, the last one's label."""
        return self.start_tokens + self.window_tokens + self.num_queries + 1


def layer_shapes(sizes: Sizes, force_space: ForceSpace) -> dict[str, tuple[int, ...]]:
    """Shape of one chunk's row of each tensor stored for one layer (`kv_sidecar/layout.py`)."""
    n, q = sizes.window_tokens, sizes.num_queries
    kv = (n, sizes.n_kv_heads, sizes.head_dim)
    shapes = {"keys": kv, "values": kv, "queries": (q, sizes.n_heads, sizes.head_dim)}
    if force_space == "hidden":
        shapes["force_hidden"] = (n, sizes.hidden_size)
        shapes["force_queries"] = (q, sizes.n_heads * sizes.head_dim)
    elif force_space == "kv":
        shapes["force_keys"] = kv
        shapes["force_values"] = kv
        shapes["force_queries"] = (q, sizes.n_heads, sizes.head_dim)
    else:
        raise ValueError(f"force_space must be one of {FORCE_SPACES}, got {force_space!r}")
    return shapes


def bytes_per_chunk(
    sizes: Sizes, force_space: ForceSpace, bytes_per_value: int, forces_only: bool = False
) -> int:
    """Bytes one chunk stores for one layer (K, V, future Q and forces, or the forces only)."""
    shapes = layer_shapes(sizes, force_space)
    if forces_only:
        shapes = {k: v for k, v in shapes.items() if k.startswith("force_")}
    return bytes_per_value * sum(math.prod(shape) for shape in shapes.values())


def bytes_per_window(
    sizes: Sizes, force_space: ForceSpace, bytes_per_value: int, forces_only: bool = False
) -> float:
    """Bytes per window of `window_size` tokens for one layer: a chunk's bytes over its
    `num_windows` windows (the future queries are shared by a chunk's windows)."""
    return bytes_per_chunk(sizes, force_space, bytes_per_value, forces_only) / sizes.num_windows


def resolve_layers(layers: Sequence[int] | str, num_layers: int) -> tuple[int, ...]:
    """`all` -> every block; otherwise the given block indices, checked against the depth."""
    if layers == "all":
        return tuple(range(num_layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(
            f"trajectories.layers holds {bad} but the model has {num_layers} decoder blocks "
            f"(valid block indices: 0..{num_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"trajectories.layers repeats a layer: {list(layers)}")
    return tuple(layers)


def chunk_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, Q, V) logits at the future positions, (B, Q) next tokens -> (B,) mean CE, computed
    in float32 at least (bf16 log-softmax over 32k logits is coarse)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return ce.view(labels.shape).mean(1)


@contextmanager
def record_attention(
    model: nn.Module, layers: Sequence[int]
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Within the block, every forward records (query, key, value) as the attention
    function of each block in `layers` receives them: (B, H, T, D), (B, H_kv, T, D) x 2,
    after RoPE. Works by wrapping the model's attention implementation in the
    `AttentionInterface` its modeling file dispatches through; restored on exit."""
    blocks = decoder_blocks(model)
    if not all(hasattr(block, "self_attn") for block in blocks):
        raise ValueError(
            f"{type(model).__name__}'s decoder blocks have no `self_attn`: "
            "trajectories support Llama-style causal LMs (Llama, Qwen, Mistral)"
        )
    layer_of = {id(blocks[layer].self_attn): layer for layer in layers}
    modeling = sys.modules[type(blocks[0].self_attn).__module__]
    registry = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    eager = getattr(modeling, "eager_attention_forward", None)
    if registry is None or eager is None:
        raise ValueError(
            f"{type(model).__name__}'s attention does not dispatch through transformers' "
            "AttentionInterface: cannot read the K/V/Q it consumes"
        )
    impl = model.config._attn_implementation or "eager"
    inner = registry.get_interface(impl, eager)
    records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def recording(module, query, key, value, *args, **kwargs):
        layer = layer_of.get(id(module))
        if layer is not None:
            records[layer] = (query, key, value)
        return inner(module, query, key, value, *args, **kwargs)

    previous = registry._local_mapping.get(impl, _MISSING)
    registry[impl] = recording
    try:
        yield records
    finally:
        if previous is _MISSING:
            del registry[impl]
        else:
            registry[impl] = previous


def trajectory_batch(
    model: nn.Module,
    chunks: torch.Tensor,
    layers: Sequence[int],
    sizes: Sizes,
    force_space: ForceSpace,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stored tensors of a batch of chunks (B, chunk_tokens) for each layer, named as in
    `pipeline/kv_sidecar/layout.py` (detached, compute dtype, on the model's device), and the (B,)
    per-chunk LM losses. One forward and one backward for the whole batch."""
    if chunks.dim() != 2 or chunks.shape[1] != sizes.chunk_tokens:
        raise ValueError(
            f"chunks must be (B, {sizes.chunk_tokens}) = start_tokens + window_size * "
            f"num_windows + num_queries + 1 tokens, got {tuple(chunks.shape)}"
        )
    p, n, q = sizes.start_tokens, sizes.window_tokens, sizes.num_queries
    window, future = slice(p, p + n), slice(p + n, None)  # the prefix 0..p-1 is not stored
    device = model.get_input_embeddings().weight.device
    chunks = chunks.to(device)
    inputs, labels = chunks[:, :-1], chunks[:, p + n + 1 :]  # (B, P+N+Q), (B, Q)
    with (
        torch.enable_grad(),
        record_attention(model, layers) as attention,
        _capture_hidden_space(model, layers, force_space) as (hidden_in, q_proj_out),
    ):
        # Parameters are frozen: a leaf input that requires grad builds the graph.
        embeds = model.get_input_embeddings()(inputs).detach().requires_grad_(True)
        logits = future_logits(model, embeds, q)  # (B, Q, V)
        losses = chunk_losses(logits, labels)  # (B,)
        missing = sorted(set(layers) - set(attention))
        if missing:
            raise RuntimeError(f"attention of layers {missing} was not captured")
        if force_space == "kv":
            targets = [t for layer in layers for t in attention[layer]]
        else:
            targets = [t for layer in layers for t in (hidden_in[layer], q_proj_out[layer])]
        grads = torch.autograd.grad(losses.sum(), targets)

    out = {}
    for i, layer in enumerate(layers):
        query, key, value = attention[layer]
        named = {
            "keys": key[:, :, window],
            "values": value[:, :, window],
            "queries": query[:, :, future],
        }
        if force_space == "kv":
            grad_q, grad_k, grad_v = grads[3 * i : 3 * i + 3]
            named |= {
                "force_keys": grad_k[:, :, window],
                "force_values": grad_v[:, :, window],
                "force_queries": grad_q[:, :, future],
            }
        # (B, H, T, D) -> (B, T, H, D), the stored layout.
        named = {k: v.transpose(1, 2) for k, v in named.items()}
        if force_space == "hidden":
            grad_h, grad_qp = grads[2 * i : 2 * i + 2]
            named |= {"force_hidden": grad_h[:, window], "force_queries": grad_qp[:, future]}
        out |= {trajectory_key(layer, k): v.detach().contiguous() for k, v in named.items()}
    return out, losses.detach()


@contextmanager
def _capture_hidden_space(model, layers, force_space) -> Iterator[tuple[dict, dict]]:
    """Within the block, forwards record each block's input hidden state (B, T, hidden)
    and its q_proj output (B, T, n_heads * head_dim); only for the `hidden` force space."""
    hidden_in, q_proj_out, handles = {}, {}, []
    if force_space == "hidden":
        blocks = decoder_blocks(model)
        for layer in layers:

            def grab_input(module, args, kwargs, layer=layer):
                hidden_in[layer] = args[0] if args else kwargs["hidden_states"]

            def grab_q(module, args, output, layer=layer):
                q_proj_out[layer] = output

            block = blocks[layer]
            handles.append(block.register_forward_pre_hook(grab_input, with_kwargs=True))
            handles.append(block.self_attn.q_proj.register_forward_hook(grab_q))
    try:
        yield hidden_in, q_proj_out
    finally:
        for handle in handles:
            handle.remove()


def future_logits(model, embeds: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Logits (B, Q, V) at the last `num_queries` input positions only."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=num_queries)
        return out.logits
    return model(inputs_embeds=embeds, use_cache=False).logits[:, -num_queries:]
