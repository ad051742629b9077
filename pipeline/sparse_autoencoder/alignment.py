"""Comparing representations: SAE dictionaries across seeds, activation spaces across models.

- `match_features`: one-to-one matching of two dictionaries' decoder columns by cosine
  (Hungarian assignment, `scipy.optimize.linear_sum_assignment`), seed 002 session 10.
- `random_matching`: the chance level of that score, the same matching on pairs of random
  dictionaries of the same shape (unit-norm Gaussian columns). Independent Monte Carlo
  (300 / 30 / 4 draws): 0.3281 (sd 0.0028) at (D, F) = (64, 256), 0.1935 (sd 0.0007) at
  (256, 1024), 0.1334 (sd 0.0003) at (640, 2560); the extreme-value bound sqrt(2 ln F / D)
  on each column's best cosine (0.416, 0.233, 0.157) lies above it, the one-to-one
  constraint costing the rest.
- `linear_cka`: linear centered kernel alignment of two row-aligned activation
  matrices; invariant to rotation and isotropic scaling, 1 for identical spaces.
- `orthogonal_procrustes`: the orthogonal map R minimizing ||X R - Y||_F after centering
  and scaling both to unit Frobenius norm, and the disparity left, 1 - (sum of singular
  values)^2, in [0, 1] (0: Y is a rotation of X), as `scipy.spatial.procrustes` defines it
  (the map from `scipy.linalg.orthogonal_procrustes`).

    matched = match_features(sae_a.W_dec, sae_b.W_dec)    # columns are features
    linear_cka(x_qwen, x_llama), orthogonal_procrustes(x_qwen, x_llama).disparity
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from pipeline.common.progress import progress

MATCH_THRESHOLD = 0.9


@dataclass(frozen=True)
class FeatureMatch:
    rows: Tensor  # (M,) column index in the first dictionary
    cols: Tensor  # (M,) matched column index in the second
    cosine: Tensor  # (M,) cosine of each matched pair, float64

    @property
    def mean_cos(self) -> float:
        return self.cosine.mean().item()

    def fraction_above(self, threshold: float = MATCH_THRESHOLD) -> float:
        return (self.cosine > threshold).double().mean().item()


def match_features(first: Tensor, second: Tensor) -> FeatureMatch:
    """Match the columns of first (D, F1) to those of second (D, F2), maximizing total cosine.

    Every column of the smaller dictionary gets one distinct partner.
    """
    from scipy.optimize import linear_sum_assignment

    if first.shape[0] != second.shape[0]:
        raise ValueError(
            f"dictionaries live in different spaces: {first.shape[0]} vs {second.shape[0]} dims"
        )
    a = torch.nn.functional.normalize(first.detach().double().cpu(), dim=0)
    b = torch.nn.functional.normalize(second.detach().double().cpu(), dim=0)
    cos = (a.T @ b).numpy()  # (F1, F2)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return FeatureMatch(
        torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(cos[rows, cols])
    )


def random_matching(
    dim: int, features: int, draws: int, seed: int, desc: str = "cross-seed chance"
) -> list[float]:
    """Mean matched cosine of `draws` pairs of random (dim, features) dictionaries, seeded;
    a progress bar named `desc` counts the draws (a minute each at 8,192 features)."""
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in progress(range(draws), desc=desc, unit="draw"):
        first = torch.randn(dim, features, generator=generator, dtype=torch.float64)
        second = torch.randn(dim, features, generator=generator, dtype=torch.float64)
        scores.append(match_features(first, second).mean_cos)
    return scores


def linear_cka(x: Tensor, y: Tensor) -> float:
    """||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) for row-aligned x (N, D1), y (N, D2)."""
    xc, yc = _centered(x, y)
    cross = (yc.T @ xc).pow(2).sum()
    norm = (xc.T @ xc).pow(2).sum().sqrt() * (yc.T @ yc).pow(2).sum().sqrt()
    return (cross / norm).item() if norm > 0 else float("nan")


@dataclass(frozen=True)
class Procrustes:
    rotation: Tensor  # (D1, D2) float64, orthonormal rows or columns
    disparity: float
    """Squared residual of the normalized fit: 1 - (sum singular values)^2, in [0, 1]."""


def orthogonal_procrustes(x: Tensor, y: Tensor) -> Procrustes:
    """Best orthogonal map of centered, unit-Frobenius x (N, D1) onto y (N, D2), by
    `scipy.linalg.orthogonal_procrustes`.

    With D1 != D2 the narrower side is zero-padded to the wider width (scipy wants equal
    shapes) and the map is cut back to (D1, D2): a partial isometry into the common span.
    """
    xc, yc = _centered(x, y)
    xn, yn = (xc / xc.norm()).numpy(), (yc / yc.norm()).numpy()
    width = max(xn.shape[1], yn.shape[1])
    rotation, scale = linalg.orthogonal_procrustes(_pad(xn, width), _pad(yn, width))
    disparity = max(0.0, 1.0 - float(scale) ** 2)  # scale: the sum of singular values
    return Procrustes(torch.from_numpy(rotation[: xn.shape[1], : yn.shape[1]]), disparity)


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def _centered(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"row counts differ: {x.shape[0]} vs {y.shape[0]}; rows must align")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 aligned rows, got {x.shape[0]}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return x - x.mean(0), y - y.mean(0)
