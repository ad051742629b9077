"""Cosine objectives: the students predict a direction, so only its angle is scored."""

from __future__ import annotations

from torch import Tensor

EPS = 1e-8


def cosine_similarity_rows(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """Row-wise cosine of (B, D) and (B, D) -> (B,); eps keeps a zero row finite."""
    dot = (pred * target).sum(-1)  # (B,)
    return dot / (pred.norm(dim=-1) * target.norm(dim=-1)).clamp_min(eps)


def cosine_loss(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """1 - mean cosine: 0 when aligned, 1 when orthogonal, 2 when opposite."""
    return 1.0 - cosine_similarity_rows(pred, target, eps).mean()
