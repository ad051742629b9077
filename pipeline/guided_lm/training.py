"""One cell of the grid: train the LM (plus lambda x the aux loss) on a set of chunk rows,
then score it on the held-out rows.

    result = train_lm(lm, rows, split.tokens, steps=300, batch_size=8, lr=3e-3,
                      weight_decay=0.01, seed=0, aux=Aux(map, occ, targets, layer, 0.1))
    heldout_loss(lm, split.tokens[split.heldout_rows], batch_size=64)  # nats/token
    aux_cosine(lm, aux_map, tokens, occurrences, directions, layer)     # mean cos

The batch order comes from a generator seeded with `seed` alone (an epoch is a
permutation of `rows`), so at one corpus size every lambda sees the same batches. With
lambda = 0 the aux term is added as 0 x loss: the LM's gradients, and so its weights and
losses, equal those of training without any aux map, bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.progress import progress
from pipeline.guided_lm.data import Occurrences
from pipeline.guided_lm.model import cosine_loss


@dataclass(frozen=True)
class Aux:
    """The auxiliary supervision: a map, the supervising occurrences, their targets."""

    map: nn.Module
    occurrences: Occurrences  # rows index the token matrix; supervising concepts only
    directions: Tensor  # (C, D) by concept id
    layer: int  # hidden_states index
    weight: float  # lambda


@dataclass
class TrainResult:
    lm_losses: list[float]
    aux_losses: list[float]
    """Per step; nan where the batch held no supervised occurrence (or no aux)."""
    supervised: int
    """Occurrences the aux loss saw over all steps."""


def batch_order(rows: Tensor, steps: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """`steps` batches of `rows`, epoch after epoch of seeded permutations."""
    generator = torch.Generator().manual_seed(seed)
    queue = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while queue.numel() < batch_size:
            queue = torch.cat([queue, rows[torch.randperm(rows.numel(), generator=generator)]])
        yield queue[:batch_size]
        queue = queue[batch_size:]


def lm_loss(logits: Tensor, tokens: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy, logits (B, T, V) for tokens (B, T)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction=reduction
    )


def gather_hidden(hidden: Tensor, index: Tensor, occurrences: Occurrences) -> Tensor:
    """(M, d) hidden states at the occurrences; hidden (B, T, d), index (M,) batch rows."""
    return hidden[index, occurrences.position]


def train_lm(
    lm: nn.Module,
    rows: Tensor,
    tokens: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    aux: Aux | None = None,
    desc: str = "guided_lm",
) -> TrainResult:
    """AdamW on the LM (and the aux map, in a separate optimizer, so it cannot touch the
    LM's update), one batch of `rows` of `tokens` (R, T) per step; a progress bar named
    `desc` over the steps."""
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=weight_decay)
    aux_optimizer = (
        torch.optim.AdamW(aux.map.parameters(), lr=lr, weight_decay=weight_decay)
        if aux is not None
        else None
    )
    result = TrainResult([], [], 0)
    bar = progress(
        batch_order(rows, steps, batch_size, seed), total=steps, desc=desc, unit="step", leave=False
    )
    for batch_rows in bar:
        batch = tokens[batch_rows]  # (B, T)
        out = lm(input_ids=batch, output_hidden_states=aux is not None)
        loss = lm_loss(out.logits, batch)
        result.lm_losses.append(loss.item())
        aux_value = float("nan")
        if aux is not None:
            index, found = aux.occurrences.in_rows(batch_rows)
            if len(found):
                hidden = gather_hidden(out.hidden_states[aux.layer], index, found)  # (M, d)
                aux_term = cosine_loss(aux.map(hidden), aux.directions[found.concept])
                loss = loss + aux.weight * aux_term
                aux_value = aux_term.item()
                result.supervised += len(found)
        result.aux_losses.append(aux_value)
        optimizer.zero_grad(set_to_none=True)
        if aux_optimizer is not None:
            aux_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if aux_optimizer is not None:
            aux_optimizer.step()
        bar.set_postfix(lm_loss=f"{result.lm_losses[-1]:.3f}", refresh=False)
    lm.eval()
    return result


@torch.inference_mode()
def heldout_loss(lm: nn.Module, tokens: Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats/token) over every position of `tokens` (R, T)."""
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        total += float(lm_loss(lm(input_ids=batch).logits, batch, reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


@torch.inference_mode()
def hidden_at(
    lm: nn.Module, tokens: Tensor, occurrences: Occurrences, layer: int, batch_size: int
) -> Tensor:
    """(N, d) hidden states (layer `layer`) at every occurrence, rows of `tokens`."""
    parts = []
    rows = torch.unique(occurrences.row)
    for start in range(0, rows.numel(), batch_size):
        batch_rows = rows[start : start + batch_size]
        index, found = occurrences.in_rows(batch_rows)
        # The base model: hidden states without the LM head over every position.
        out = lm.base_model(input_ids=tokens[batch_rows], output_hidden_states=True)
        hidden = out.hidden_states[layer]
        parts.append(gather_hidden(hidden, index, found))
    return torch.cat(parts) if parts else torch.zeros(0, lm.config.hidden_size)


def mean_cosine(predicted: Tensor, target: Tensor) -> float | None:
    if predicted.shape[0] == 0:
        return None
    return float(F.cosine_similarity(predicted, target, dim=-1).mean())


def fit_probe(hidden: Tensor, target: Tensor, ridge: float = 1e-3) -> Tensor:
    """Least-squares affine map (d + 1, D) from hidden (N, d) to target (N, D), a small
    ridge for the rank-deficient case; float64 normal equations."""
    x = torch.cat([hidden.double(), torch.ones(hidden.shape[0], 1, dtype=torch.float64)], 1)
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ target.double()).float()


def apply_probe(weights: Tensor, hidden: Tensor) -> Tensor:
    return hidden @ weights[:-1] + weights[-1]
