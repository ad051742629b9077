"""The spliced-in evaluation of an SAE (and of its baselines): the teacher's LM loss with
layer L's activations replaced by a reconstruction, the standard SAE evaluation.

The replaced tensor is `hidden_states[L]` in HF's convention, the one the activations
stage stores: L = 0 the embedding output, 0 < L < depth the output of decoder block
L - 1, L = depth the output of the final norm. A forward hook on that module
(`hook_point`) replaces it at every non-padding token of the held-out chunks.

Definitions (per-token next-token cross-entropy in nats, averaged over every predicted
token of the chunks: positions 0..T-2 predicting 1..T-1, non-padding both sides):

Only the rows `replaced` marks are replaced (the SAE leaves start rows out: attention
sinks it never saw), and only the predictions made from them are scored: the others do
not depend on any replaced row.

- L_clean: nothing replaced; L_mean: every row replaced by the train mean activation
  (mean ablation); L_method: every row x replaced by the method's reconstruction in the
  model's space (with `layer_norm`, the SAE sees (x - mu) / sigma, so its output is mapped
  back as x_hat * sigma + mu, as SAELens does for its `layer_norm` normalization)
- fraction of loss recovered = (L_mean - L_method) / (L_mean - L_clean): 1 = as good as
  the clean model, 0 = no better than the mean. SAELens's `ce_loss_score` is the same ratio
  with zero ablation in place of mean ablation.
- loss increase = L_method - L_clean
- explained variance in the model's space = 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2
  over the replaced rows, around their own mean (sparsify's 1 - FVU)
- 95% intervals: BCa bootstrap over chunks, paired (each resample takes the same
  chunks for every method), `scipy.stats.bootstrap(paired=True)` via
  `pipeline.common.bootstrap` (percentile where BCa is undefined)

    module = hook_point(model, layer)
    clean = chunk_losses(model, tokens, mask, 8)
    spliced = chunk_losses(model, tokens, mask, 8, module, model_space(sae_fn, True))
    recovered = loss_recovered(clean, ablated, spliced, samples=2000, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.bootstrap import paired_interval
from pipeline.common.teacher import decoder_blocks
from pipeline.sparse_autoencoder.metrics import ReconstructionStats
from pipeline.sparse_autoencoder.model import LN_EPS, prepare_inputs

Replacement = Callable[[Tensor], Tensor]
"""Rows (N, D) float32 of hidden_states[L] -> their replacements (N, D)."""
CONFIDENCE = 0.95


def hook_point(model: nn.Module, layer: int) -> nn.Module:
    """The module of a causal LM whose output is `hidden_states[layer]`."""
    blocks = decoder_blocks(model)
    if layer == 0:
        return model.get_input_embeddings()
    if 0 < layer < len(blocks):
        return blocks[layer - 1]
    if layer == len(blocks):
        norm = getattr(getattr(model, "base_model", model), "norm", None)
        if isinstance(norm, nn.Module):
            return norm
        raise ValueError(
            f"sae.layer={layer} is hidden_states[{layer}], after the final norm, but "
            f"{type(model).__name__} keeps no `norm` module to hook"
        )
    raise ValueError(f"sae.layer={layer} is outside the teacher's 0..{len(blocks)} hidden states")


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of `module` inside `model` (`model.layers.1`)."""
    return next(name for name, found in model.named_modules() if found is module)


@contextmanager
def spliced(module: nn.Module, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, `module`'s output h (B, T, D) is replaced by replace(h)."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_space(reconstruct: Replacement, layer_norm: bool) -> Replacement:
    """A reconstruction made in the SAE's input space, as a map of raw rows in the model's."""
    if not layer_norm:
        return reconstruct

    def replace(x: Tensor) -> Tensor:
        mu = x.mean(-1, keepdim=True)
        sigma = (x.var(-1, unbiased=False, keepdim=True) + LN_EPS).sqrt()
        return reconstruct(prepare_inputs(x, True)) * sigma + mu

    return replace


@dataclass
class ChunkLosses:
    """Per chunk: summed next-token cross-entropy (nats) and predicted tokens."""

    sums: np.ndarray  # (C,) float64
    counts: np.ndarray  # (C,) int64
    recon: ReconstructionStats | None = None
    """x vs its replacement over the replaced rows (None: nothing replaced)."""
    captured: Tensor | None = None
    """The first batch's hooked rows (R, D), when asked for: to check the hook point."""

    @property
    def loss(self) -> float:
        return float(self.sums.sum() / max(int(self.counts.sum()), 1))


@torch.no_grad()
def chunk_losses(
    model: nn.Module,
    tokens: Tensor,
    mask: Tensor,
    batch_size: int,
    module: nn.Module | None = None,
    replace: Replacement | None = None,
    capture: bool = False,
    replaced: Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ChunkLosses:
    """Next-token losses of chunks tokens (C, T) (mask: non-padding, (C, T) bool), with
    `module`'s output replaced by `replace` when given, at the rows `replaced` marks ((C, T)
    bool within `mask`; default: every non-padding row); only predictions made from those
    rows are scored. `on_batch(1)` after each batch (a progress bar's `update`)."""
    replaced = mask if replaced is None else replaced
    device = model.get_input_embeddings().weight.device
    sums, counts = [], []
    recon = ReconstructionStats(model.config.hidden_size) if replace is not None else None
    captured: list[Tensor] = []
    for start in range(0, tokens.shape[0], batch_size):
        ids = tokens[start : start + batch_size].to(device)
        real = mask[start : start + batch_size].to(device)
        scored = replaced[start : start + batch_size].to(device)

        def swap(hidden: Tensor, scored: Tensor = scored) -> Tensor:
            rows = hidden[scored].float()
            new = replace(rows)
            recon.update(rows, new)
            if capture and not captured:
                captured.append(rows.cpu())
            out = hidden.clone()
            out[scored] = new.to(hidden.dtype)
            return out

        hooked = spliced(module, swap) if replace is not None else nullcontext()
        # Positions as the activations stage gave them: real tokens counted from 0.
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        with hooked:
            logits = model(input_ids=ids, attention_mask=real.long(), position_ids=positions).logits
        predicted = real[:, 1:] & scored[:, :-1]  # (b, T - 1)
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        sums.append((ce.double() * predicted).sum(1).cpu())
        counts.append(predicted.sum(1).cpu())
        if on_batch is not None:
            on_batch(1)
    return ChunkLosses(
        torch.cat(sums).numpy(),
        torch.cat(counts).numpy(),
        recon,
        captured[0] if captured else None,
    )


def identity(x: Tensor) -> Tensor:
    return x


def constant(row: Tensor) -> Replacement:
    """Every row replaced by `row` (D,): mean ablation with the train mean."""
    return lambda x: row.to(x.device, x.dtype).expand_as(x)


def loss_recovered(
    clean: ChunkLosses, ablated: ChunkLosses, method: ChunkLosses, samples: int, seed: int
) -> dict[str, float | list[float] | None]:
    """Fraction of loss recovered and loss increase, each with its paired 95% interval."""
    c, a, s, n = clean.sums, ablated.sums, method.sums, clean.counts.astype(np.float64)

    def recovered(c, a, s, axis=-1):
        return (a.sum(axis) - s.sum(axis)) / (a.sum(axis) - c.sum(axis))

    def increase(c, s, n, axis=-1):
        return (s.sum(axis) - c.sum(axis)) / n.sum(axis)

    return {
        "lm_loss": method.loss,
        "loss_recovered": float(recovered(c, a, s)),
        "loss_recovered_ci": _interval((c, a, s), recovered, samples, seed),
        "loss_increase": float(increase(c, s, n)),
        "loss_increase_ci": _interval((c, s, n), increase, samples, seed),
        "explained_variance": method.recon.r2 if method.recon is not None else None,
    }


def _interval(data: tuple[np.ndarray, ...], statistic, samples: int, seed: int):
    """Paired BCa bootstrap over chunks (`paired_interval`); None with fewer than 2 chunks."""
    if data[0].shape[0] < 2:
        return None
    return list(paired_interval(data, statistic, samples, seed, confidence=CONFIDENCE))
