"""Sparse autoencoder (seed 002): model, loss, one training step, `fit_sae`, save and load.

    z     = topk(ReLU(W_enc (x - b_dec) + b_enc))     (B, F); topk optional
    x_hat = W_dec z + b_dec                           (B, D); W_dec columns unit norm
    loss  = mean((x_hat - x)^2) + l1_strength * mean(|z|)

x is optionally layer-normed first (no learned scale). The decoder columns are
renormalized after every step, so the L1 term cannot be dodged by shrinking codes
and growing the decoder.

    model = SparseAutoencoder(dim=64, features=256, topk=16, layer_norm=True, seed=0)
    result = fit_sae(model, source, params, seed=0)  # source: pipeline.sparse_autoencoder.sources
    save_sae(model, config, Path("data/sae"))
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.checkpoints import load_weights, read_config, save_checkpoint
from pipeline.common.devices import resolve_device
from pipeline.common.progress import progress
from pipeline.sparse_autoencoder.params import SaeParams
from pipeline.sparse_autoencoder.sources import ActivationSource

log = logging.getLogger(__name__)
LN_EPS = 1e-5


@dataclass(frozen=True)
class SaeOutput:
    x: Tensor  # (B, D) the input as the SAE sees it (layer-normed if enabled)
    z: Tensor  # (B, F) codes, >= 0
    x_hat: Tensor  # (B, D)


def prepare_inputs(x: Tensor, layer_norm: bool) -> Tensor:
    """Per-row layer norm without a learned scale (or x unchanged)."""
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS) if layer_norm else x


class SparseAutoencoder(nn.Module):
    def __init__(self, dim: int, features: int, topk: int | None, layer_norm: bool, seed: int = 0):
        super().__init__()
        if topk is not None and topk > features:
            raise ValueError(f"sae.topk={topk} exceeds the dictionary size {features}")
        self.dim, self.features, self.topk, self.layer_norm = dim, features, topk, layer_norm
        generator = torch.Generator().manual_seed(seed)
        decoder = F.normalize(torch.randn(dim, features, generator=generator), dim=0)
        self.W_dec = nn.Parameter(decoder)  # (D, F), unit columns
        # Tied initialization: each feature starts reading the direction it writes.
        self.W_enc = nn.Parameter(decoder.T.clone())  # (F, D)
        self.b_enc = nn.Parameter(torch.zeros(features))
        self.b_dec = nn.Parameter(torch.zeros(dim))

    def prepare(self, x: Tensor) -> Tensor:
        """The input as the SAE sees it: layer-normed per row when enabled."""
        return prepare_inputs(x, self.layer_norm)

    def encode(self, x: Tensor) -> Tensor:
        """Codes (B, F) of prepared inputs (B, D)."""
        pre = F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)  # (B, F)
        if self.topk is None:
            return pre
        values, index = pre.topk(self.topk, dim=-1)  # (B, k)
        return torch.zeros_like(pre).scatter(-1, index, values)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec.T + self.b_dec  # (B, D)

    def forward(self, x: Tensor) -> SaeOutput:
        prepared = self.prepare(x)
        z = self.encode(prepared)
        return SaeOutput(prepared, z, self.decode(z))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def init_decoder_bias(self, sample: Tensor) -> None:
        """Start b_dec at the mean of a sample of raw inputs (in the prepared space)."""
        if sample.numel():
            self.b_dec.copy_(self.prepare(sample.to(self.b_dec.device)).mean(0))


def sae_loss(out: SaeOutput, l1_strength: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mse, l1): per-element means, as in the class docstring."""
    mse = (out.x_hat - out.x).pow(2).mean()
    l1 = out.z.abs().mean()
    return mse + l1_strength * l1, mse, l1


def train_step(
    model: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: Tensor, l1_strength: float
) -> tuple[dict[str, Tensor], Tensor]:
    """One optimizer step on batch x (B, D); returns its scalars (0-dim tensors, left on the
    device so a GPU never waits for a sync) and which features fired (F,) bool."""
    model.train()
    out = model(x)
    loss, mse, l1 = sae_loss(out, l1_strength)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.normalize_decoder()
    with torch.no_grad():
        centered = out.x - out.x.mean(0)
        total = centered.pow(2).sum().clamp(min=1e-12)
        r2 = 1.0 - (out.x_hat - out.x).pow(2).sum() / total
        active = out.z > 0  # (B, F)
        l0 = active.sum(1).float().mean()
    scalars = dict(loss=loss.detach(), mse=mse.detach(), l1=l1.detach(), r2=r2, l0=l0)
    return scalars, active.any(0)


@dataclass(frozen=True)
class FitResult:
    steps: int
    rows: int
    curves: list[dict[str, float]]
    """Every `log_every` steps: step, epoch, rows, loss, mse, l1, r2, l0, dead_window
    (means over the steps since the previous row)."""
    dead_window: float
    """Share of features that fired on none of the last `dead_window_rows` training rows."""


def fit_sae(
    model: SparseAutoencoder,
    source: ActivationSource,
    params: SaeParams,
    seed: int,
    on_log: Callable[[dict[str, float]], None] | None = None,
    label: str = "",
) -> FitResult:
    """Train on the train rows of `source` for `params.epochs`, streaming shuffled batches;
    the progress bar counts steps (its total known after the first epoch), named by layer,
    seed and `label` (e.g. "cross-seed twin")."""
    device = resolve_device(params.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    last_fired = torch.full((model.features,), -1, dtype=torch.long, device=device)
    curves: list[dict[str, float]] = []
    pending: list[dict[str, Tensor]] = []
    step = rows = 0
    desc = f"sae layer {params.layer} seed {seed}" + (f" ({label})" if label else "")
    bar = progress(desc=desc, unit="step")
    for epoch in range(1, params.epochs + 1):
        batches = source.batches(
            "train",
            params.batch_size,
            params.buffer_rows,
            shuffle=True,
            seed=seed * 100_003 + epoch,
        )
        for batch in batches:
            scalars, fired = train_step(model, optimizer, batch.x.to(device), params.l1_strength)
            step += 1
            rows += batch.x.shape[0]
            last_fired = torch.where(fired, rows, last_fired)
            pending.append(scalars)
            bar.update(1)
            if step % params.log_every == 0:
                curves.append(_curve_row(pending, step, epoch, rows, last_fired, params))
                pending = []
                row = curves[-1]
                bar.set_postfix(epoch=epoch, mse=f"{row['mse']:.4g}", l0=f"{row['l0']:.1f}")
                if on_log is not None:
                    on_log(row)
        if epoch == 1:  # every epoch streams the same train rows: the total is now known
            bar.total = step * params.epochs
    bar.close()
    if step == 0:
        raise ValueError(f"{source.folder}: no train rows to fit the SAE on")
    if pending:
        curves.append(_curve_row(pending, step, params.epochs, rows, last_fired, params))
        if on_log is not None:
            on_log(curves[-1])
    return FitResult(step, rows, curves, dead_in_window(last_fired, rows, params))


def dead_in_window(last_fired: Tensor, rows: int, params: SaeParams) -> float:
    """Share of features that did not fire in the last `params.dead_window_rows` training rows.

    `last_fired` (F,): training rows seen when each feature last fired (-1: never).
    """
    dead = (last_fired < 0) | (last_fired <= rows - params.dead_window_rows)
    return dead.float().mean().item()


def _curve_row(pending, step, epoch, rows, last_fired, params) -> dict[str, float]:
    row: dict[str, float] = {"step": step, "epoch": epoch, "rows": rows}
    for name in ("loss", "mse", "l1", "r2", "l0"):
        row[name] = torch.stack([p[name] for p in pending]).double().mean().item()
    row["dead_window"] = dead_in_window(last_fired, rows, params)
    return row


SIZE_KEYS = ("dim", "features", "topk", "layer_norm")
"""What `load_sae` rebuilds the model from; `save_sae` puts them in every config."""


def save_sae(model: SparseAutoencoder, config: dict[str, Any], out: Path) -> None:
    """`model.safetensors` + `config.json`: `config` plus the model's sizes."""
    sizes = {key: getattr(model, key) for key in SIZE_KEYS}
    save_checkpoint(out, model.state_dict(), {**sizes, **config})


def load_sae(folder: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE written by `save_sae`, in eval mode, and its config."""
    config = read_config(folder, SIZE_KEYS)
    model = SparseAutoencoder(*(config[key] for key in SIZE_KEYS))
    return load_weights(model, folder), config
