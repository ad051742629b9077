"""The seed-003 KV sidecar: a Set Transformer that compresses each window of K/V tokens
into one super-token (k, v), and its training loop (step / evaluate / fit / load).

    tokens (B, W, S, 2d) = concat(K, V) per window
      -> Linear(2d, D) -> encoder (L pre-LN layers, H heads, FFN r*D; no positions:
         a window is a set, and K already carries RoPE)
      -> ISAB (m inducing points) -> PMA (1 seed) -> LayerNorm -> Linear(D, 2d)
      -> k_cg (B, W, d), v_cg (B, W, d)

Queries attend over the W super-tokens instead of the W*S dense tokens; the losses
(`pipeline.kv_sidecar.losses`) compare the two attentions; `evaluate` scores any set of
compressors (the sidecar and the training-free baselines of
`pipeline.kv_sidecar.compressors`) on the same held-out batches.

    model = build_sidecar(params, head_dim=64)
    result = fit(model, TrajectorySet(folder, params.layer, params.eval_fraction), params, w)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.common.checkpoints import load_weights, read_config
from pipeline.common.params import build
from pipeline.common.progress import progress
from pipeline.kv_sidecar.compressors import SIDECAR, Compressor, sidecar_compressor
from pipeline.kv_sidecar.losses import (
    TERMS,
    BatchEval,
    diagnostics,
    evaluate_batch,
    loss_terms,
    total_loss,
    windows_of,
    with_ratios,
)
from pipeline.kv_sidecar.params import SidecarParams
from pipeline.kv_sidecar.trajectory_set import KVBatch, TrajectorySet

log = logging.getLogger(__name__)


class MAB(nn.Module):
    """Multihead attention block (pre-LN): x + Attn(LN x, LN y), then x + FFN(LN x)."""

    def __init__(self, d_model: int, num_heads: int, ffn_ratio: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = (nn.LayerNorm(d_model) for _ in range(3))
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_ratio * d_model),
            nn.GELU(),
            nn.Linear(ffn_ratio * d_model, d_model),
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # x (B, n, D), y (B, m, D)
        context = self.norm_kv(y)
        x = x + self.attn(self.norm_q(x), context, context, need_weights=False)[0]
        return x + self.ffn(self.norm_ff(x))


class ISAB(nn.Module):
    """Induced set attention: m inducing points read the set, the set reads them back."""

    def __init__(self, d_model: int, num_heads: int, ffn_ratio: int, num_inducing: int):
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(num_inducing, d_model) / math.sqrt(d_model))
        self.read = MAB(d_model, num_heads, ffn_ratio)
        self.write = MAB(d_model, num_heads, ffn_ratio)

    def forward(self, x: Tensor) -> Tensor:  # (B, S, D) -> (B, S, D)
        summary = self.read(self.inducing.expand(x.shape[0], -1, -1), x)  # (B, m, D)
        return self.write(x, summary)


class PMA(nn.Module):
    """Pooling by multihead attention with one learned seed: (B, S, D) -> (B, D)."""

    def __init__(self, d_model: int, num_heads: int, ffn_ratio: int):
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, d_model) / math.sqrt(d_model))
        self.pool = MAB(d_model, num_heads, ffn_ratio)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.seed.expand(x.shape[0], -1, -1), x).squeeze(1)


class Sidecar(nn.Module):
    """Window of S (k, v) tokens -> one super-token (k, v); windows are independent."""

    def __init__(
        self,
        head_dim: int,
        d_model: int = 256,
        num_heads: int = 4,
        num_layers: int = 3,
        ffn_ratio: int = 4,
        num_inducing: int = 8,
        mean_residual: bool = False,
    ):
        super().__init__()
        self.head_dim, self.mean_residual = head_dim, mean_residual
        self.embed = nn.Linear(2 * head_dim, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            ffn_ratio * d_model,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.isab = ISAB(d_model, num_heads, ffn_ratio, num_inducing)
        self.pma = PMA(d_model, num_heads, ffn_ratio)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2 * head_dim)

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """keys, values (B, W, S, d) -> k_cg, v_cg (B, W, d)."""
        batch, windows = keys.shape[:2]
        tokens = torch.cat([keys, values], -1).flatten(0, 1)  # (B*W, S, 2d)
        pooled = self.pma(self.isab(self.encoder(self.embed(tokens))))  # (B*W, D)
        out = self.head(self.norm(pooled)).unflatten(0, (batch, windows))  # (B, W, 2d)
        k_cg, v_cg = out.split(self.head_dim, dim=-1)
        if self.mean_residual:
            k_cg, v_cg = k_cg + keys.mean(2), v_cg + values.mean(2)
        return k_cg, v_cg


def build_sidecar(params: SidecarParams, head_dim: int) -> Sidecar:
    return Sidecar(
        head_dim,
        params.d_model,
        params.num_heads,
        params.num_layers,
        params.ffn_ratio,
        params.num_inducing,
        params.mean_residual,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_batch(
    compressor: Compressor | nn.Module,
    batch: KVBatch,
    params: SidecarParams,
    window_size: int,
    mass: Tensor | None = None,
) -> tuple[BatchEval, dict[str, Tensor]]:
    """Compress a batch with `compressor` (a `Compressor`, or the sidecar module itself),
    then score it; the rescaling of `params.scale_normalize` happens in `evaluate_batch`.

    The batch tensors are detached: gradients reach the compressor's parameters, never
    whatever produced the dense K/V/Q.
    """
    keys, values = batch.keys.detach(), batch.values.detach()
    k_win, v_win = windows_of(keys, window_size), windows_of(values, window_size)
    if isinstance(compressor, Compressor):
        kc, vc = compressor.compress(k_win, v_win, mass)
    else:
        kc, vc = compressor(k_win, v_win)
    ev = evaluate_batch(batch.queries, keys, values, kc, vc, window_size, batch.force_norms, params)
    return ev, loss_terms(ev, params)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(
    model: nn.Module, params: SidecarParams
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.lr,
        weight_decay=params.weight_decay,
        foreach=True,  # one multi-tensor op per update step, also on the CPU
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, params.warmup_steps, params.max_steps)
    )
    return optimizer, schedule


def train_step(
    model: Sidecar,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    batch: KVBatch,
    params: SidecarParams,
    window_size: int,
) -> dict[str, float]:
    """One optimiser step; returns lr, loss, every unweighted term and the batch ratios."""
    model.train()
    ev, terms = forward_batch(model, batch, params, window_size)
    loss = total_loss(terms, params)
    if not torch.isfinite(loss):
        raise ValueError(
            f"sidecar loss is {loss.item()} (terms {_floats(terms)}): lower sidecar.lr"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if params.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    schedule.step()
    ratios = with_ratios({k: s / n for k, (s, n) in diagnostics(ev).items()})
    row = {"lr": lr, "loss": loss.item()} | _floats(terms)
    return row | {k: ratios[k] for k in ("jacobian_ratio", "k_norm_ratio", "v_norm_ratio")}


class Meter:
    """Exact means over batches of (sum, count) pairs."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, total: float, count: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + count

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


MassOf = Callable[[KVBatch], Tensor]
"""(B, N) attention mass of each sample's window tokens (see `lm_loss.window_attention_mass`)."""


@torch.no_grad()
def evaluate(
    compressors: Mapping[str, Compressor],
    batches: Iterable[KVBatch],
    params: SidecarParams,
    window_size: int,
    mass_of: MassOf | None = None,
) -> dict[str, dict[str, float | None]]:
    """Held-out diagnostics and loss terms of each compressor on the same batches.

    The sidecar's super-tokens are rescaled as `sidecar.scale_normalize` says (inside
    `evaluate_batch`); every other compressor keeps its own scale (a fixed reference).
    """
    meters = {name: Meter() for name in compressors}
    modules = [c.module for c in compressors.values() if c.module is not None]
    for module in modules:
        module.eval()
    device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
    for batch in batches:
        mass = None
        if mass_of is not None and any(c.needs_mass for c in compressors.values()):
            mass = windows_of(mass_of(batch).unsqueeze(-1), window_size).squeeze(-1)
        batch = batch.to(device)
        for name, compressor in compressors.items():
            setup = replace(params, scale_normalize=compressor.scale_normalize)
            ev, terms = forward_batch(
                compressor, batch, setup, window_size, None if mass is None else mass.to(device)
            )
            for key, (total, count) in diagnostics(ev).items():
                meters[name].add(key, total, count)
            terms["total"] = total_loss(terms, params)
            for key, value in terms.items():
                meters[name].add(f"loss_{key}", value.item() * len(batch), len(batch))
    if not all(meter.counts for meter in meters.values()):
        raise ValueError("no held-out samples to evaluate: raise sidecar.eval_fraction")
    return {name: with_ratios(meter.means()) for name, meter in meters.items()}


@dataclass(frozen=True)
class FitResult:
    curves: list[dict[str, float]]
    """One row per step: step, lr, loss, each term, jacobian/k/v norm ratios of the batch."""
    eval_curves: list[dict[str, float]]
    """Every eval_every steps: held-out loss and headline diagnostics on eval_batches."""
    seconds: float


EVAL_CURVE_KEYS = ("loss_total", "jacobian_ratio", "k_norm_ratio", "v_norm_ratio", "output_cosine")


def endless(data: TrajectorySet, params: SidecarParams) -> Iterator[KVBatch]:
    """Shuffled train batches, epoch after epoch (epoch e shuffles with seed + e)."""
    epoch = 0
    while True:
        empty = True
        for batch in data.batches(
            "train",
            params.batch_size,
            params.buffer_samples,
            shuffle=True,
            seed=params.seed + epoch,
        ):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{data.folder}: no train chunks (sidecar.eval_fraction too high?)")
        epoch += 1


def fit(
    model: Sidecar,
    data: TrajectorySet,
    params: SidecarParams,
    window_size: int,
    device: torch.device,
    on_log: Callable[[str, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train for params.max_steps; curves every step, held-out curves every eval_every.
    `on_log(kind, row)` gets each row as it comes, kind "train" or "heldout" (the stage's
    dvclive logger)."""
    model.to(device)
    optimizer, schedule = make_optimizer(model, params)
    curves, eval_curves = [], []
    start = time.perf_counter()
    stream = endless(data, params)
    desc = f"sidecar layer {data.layer} seed {params.seed}"
    bar = progress(range(1, params.max_steps + 1), desc=desc, unit="step")
    for step in bar:
        row = train_step(model, optimizer, schedule, next(stream).to(device), params, window_size)
        curves.append({"step": step} | row)
        if on_log is not None:
            on_log("train", curves[-1])
        if step % params.eval_every == 0 or step == params.max_steps:
            heldout = data.batches("heldout", params.batch_size, params.batch_size, shuffle=False)
            first = (b for _, b in zip(range(params.eval_batches), heldout, strict=False))
            sidecar = {SIDECAR: sidecar_compressor(model, params.scale_normalize)}
            scores = evaluate(sidecar, first, params, window_size)[SIDECAR]
            eval_curves.append({"step": step} | {k: scores[k] for k in EVAL_CURVE_KEYS})
            if on_log is not None:
                on_log("heldout", eval_curves[-1])
        bar.set_postfix(loss=f"{row['loss']:.4g}", jac_ratio=f"{row['jacobian_ratio']:.3g}")
    return FitResult(curves, eval_curves, time.perf_counter() - start)


def load_sidecar(folder: Path) -> tuple[Sidecar, dict[str, Any]]:
    """Rebuild a sidecar saved by the sidecar stage from its config.json and weights; eval mode."""
    config = read_config(folder, required=("params", "head_dim"))
    params = build(SidecarParams, config["params"], "sidecar")
    model = build_sidecar(params, int(config["head_dim"]))
    return load_weights(model, folder), config


def _floats(terms: dict[str, Tensor]) -> dict[str, float]:
    return {name: terms[name].item() for name in TERMS}
