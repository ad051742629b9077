"""Training loop for the distill students: one epoch, one evaluation, and `fit`.

`fit` trains with AdamW on the cosine loss, scores the val split after every
epoch and keeps the best-on-val weights (seed 000 reports the best checkpoint).

    torch.manual_seed(seed)
    model = build_model(...)
    result = fit(model, DirectionSet(folder, train.layer), train, seed)

With a `LayerStack` (targets (B, L, D)) and a model that predicts (B, L, D), the same loop
trains on the mean of the per-layer cosine losses and picks the epoch by the mean of the
per-layer val cosines (stage `multilayer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from pipeline.common.devices import resolve_device
from pipeline.common.progress import progress
from pipeline.concepts.analogy_set import AnalogySet
from pipeline.concepts.layout import Batch, DirectionSet
from pipeline.concepts.losses import cosine_loss, cosine_similarity_rows
from pipeline.concepts.params import TrainParams
from pipeline.concepts.students import forward_concepts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    state_dict: dict[str, Tensor]
    """Weights of the best epoch on val, on the CPU."""
    best_epoch: int
    """1-based, as in `curves`."""
    best_val_cos: float
    curves: list[dict[str, float]]
    """One {epoch, train_loss, train_cos, val_cos} per epoch."""


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directions: DirectionSet,
    batches: Iterable[Batch],
    aux: Callable[[nn.Module], Tensor] | None = None,
) -> tuple[float, float]:
    """One pass; returns the row-weighted mean loss (with `aux`, the auxiliary loss added
    to each step's, e.g. the analogy-offset loss) and mean cosine of the pass."""
    model.train()
    device = _model_device(model)
    loss_sum, cos_sum, rows = 0.0, 0.0, 0
    for batch in batches:
        pred = forward_concepts(model, directions, batch.concept_id)  # (B, D)
        distill_loss = cosine_loss(pred, batch.target.to(device))
        loss = distill_loss if aux is None else distill_loss + aux(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = batch.target.shape[0]
        # distill loss = 1 - mean cos, so the batch's cosine comes free of a second pass.
        loss_sum += loss.item() * n
        cos_sum += (1.0 - distill_loss.item()) * n
        rows += n
    if rows == 0:
        raise ValueError("the train split has no rows: nothing to train on")
    return loss_sum / rows, cos_sum / rows


@torch.no_grad()
def evaluate_cos(model: nn.Module, directions: DirectionSet, split: str, batch_size: int) -> float:
    """Mean cosine over every row of `split`, streamed in order; over every (row, layer)
    for targets (B, L, D) of a `LayerStack`, i.e. the mean of the per-layer means."""
    model.eval()
    device = _model_device(model)
    total, rows = 0.0, 0
    # buffer_rows=batch_size: without shuffling a larger buffer buys nothing.
    for batch in directions.batches(split, batch_size, batch_size, shuffle=False):
        pred = forward_concepts(model, directions, batch.concept_id)  # (B, D) or (B, L, D)
        cos = cosine_similarity_rows(pred, batch.target.to(device))  # (B,) or (B, L)
        total += cos.sum().item()
        rows += cos.numel()
    if rows == 0:
        raise ValueError(f"{directions.folder}: the {split} split has no rows to evaluate")
    return total / rows


class AnalogyOffsetLoss:
    """The auxiliary analogy loss: it pulls the student's offsets towards the teacher's on
    train analogies (every word a train concept). Per call, `batch_size` train analogies
    a:b::c:d drawn with replacement, and
        weight * 1/2 * [(1 - cos(p_b - p_a, t_b - t_a)) + (1 - cos(p_d - p_c, t_d - t_c))],
    p the student's predictions (through `forward_concepts`), t the teacher's directions:
    zero at the teacher's own solution, so it reweights what distillation fits rather than
    pulling elsewhere. The teacher directions of the analogies' concepts are read once,
    streamed shard by shard (only those rows are kept)."""

    def __init__(self, analogies: AnalogySet, data: DirectionSet, weight: float, batch_size: int):
        rows = analogies.select("train")
        if rows.numel() == 0:
            raise ValueError(
                "an analogy_weight > 0 needs train analogies, but the analogy set has none "
                "(raise analogies.max_per_relation or use more concepts)"
            )
        quads = analogies.ids[rows]  # (Q, 4)
        self.concept_ids, local = torch.unique(quads, return_inverse=True)  # (U,), (Q, 4)
        self.quads = local
        self.targets = torch.zeros(self.concept_ids.numel(), data.dim)
        found = torch.zeros(self.concept_ids.numel(), dtype=torch.bool)
        for ids, dirs in data.split_shards("train"):
            index = torch.searchsorted(self.concept_ids, ids).clamp(
                max=self.concept_ids.numel() - 1
            )
            hit = self.concept_ids[index] == ids
            self.targets[index[hit]] = dirs[hit]
            found[index[hit]] = True
        if not bool(found.all()):
            lost = self.concept_ids[~found][:10].tolist()
            raise ValueError(
                f"train analogies use concepts {lost} that are not train concepts of "
                f"{data.folder}: the analogy set and the directions come from different "
                "word lists or splits"
            )
        self.weight, self.batch_size = weight, batch_size

    def __call__(self, model: nn.Module, data: DirectionSet, generator: torch.Generator) -> Tensor:
        pick = torch.randint(self.quads.shape[0], (self.batch_size,), generator=generator)
        quads = self.quads[pick]  # (B, 4) local indices
        needed, inverse = torch.unique(quads, return_inverse=True)
        pred = forward_concepts(model, data, self.concept_ids[needed])[inverse]  # (B, 4, D)
        target = self.targets[quads].to(pred.device)  # (B, 4, D)
        first = cosine_loss(pred[:, 1] - pred[:, 0], target[:, 1] - target[:, 0])
        second = cosine_loss(pred[:, 3] - pred[:, 2], target[:, 3] - target[:, 2])
        return self.weight * 0.5 * (first + second)


FUSED_DEVICES = ("cpu", "cuda")
"""Where torch has a fused AdamW kernel: one pass per tensor, 4x faster than the default
on CPU for a trainable embedding of a 30K-token vocabulary (its step dominated training)."""


def make_optimizer(model: nn.Module, train: TrainParams) -> torch.optim.AdamW:
    # Frozen tables are buffers, but filter anyway so a frozen parameter is never decayed.
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in FUSED_DEVICES for p in trainable)
    return torch.optim.AdamW(
        trainable, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None
    )


def fit(
    model: nn.Module,
    directions: DirectionSet,
    train: TrainParams,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    analogy_loss: AnalogyOffsetLoss | None = None,
) -> FitResult:
    """Train for `train.epochs`, shuffling epoch e with seed `seed + e`; the model ends
    holding the best-on-val weights. `on_epoch` gets each row of the curves as it comes
    (the stage's dvclive logger). `analogy_loss` (the run's `analogy_weight` > 0) adds
    the analogy-offset loss on train analogies at every step, drawn by its own generator
    seeded with `seed`; without it, nothing else changes (no extra random draw)."""
    model.to(resolve_device(train.device))
    optimizer = make_optimizer(model, train)
    aux = None
    if analogy_loss is not None:
        generator = torch.Generator().manual_seed(seed)
        aux = partial(analogy_loss, data=directions, generator=generator)
    curves: list[dict[str, float]] = []
    best_state, best_epoch, best_cos = None, 0, -float("inf")
    bar = progress(range(1, train.epochs + 1), desc="distill", unit="epoch")
    for epoch in bar:
        batches = directions.batches(
            "train", train.batch_size, train.buffer_rows, shuffle=True, seed=seed + epoch
        )
        train_loss, train_cos = train_epoch(model, optimizer, directions, batches, aux)
        val_cos = evaluate_cos(model, directions, "val", train.batch_size)
        row = dict(epoch=epoch, train_loss=train_loss, train_cos=train_cos, val_cos=val_cos)
        curves.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if val_cos > best_cos:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best_epoch, best_cos = epoch, val_cos
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_cos=f"{val_cos:.4f}", best=best_epoch)
    if best_state is None:
        raise ValueError(f"val cosine was never finite over {train.epochs} epochs: {curves[-1]}")
    model.load_state_dict(best_state)
    log.info("best val cos %.4f at epoch %d of %d", best_cos, best_epoch, train.epochs)
    return FitResult(best_state, best_epoch, best_cos, curves)
