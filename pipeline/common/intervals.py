"""Intervals of a mean: the Student-t interval over seeds, for any branch's per-seed
numbers, and the normal one over many rows (concepts, questions).

t_interval([0.70, 0.72, 0.71])              # (lo, hi) of the mean, 95%
half_width(torch.tensor([1.0, 2.0, 3.0]))   # Z95 standard errors of the mean
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

Z95 = 1.959963984540054
"""The normal 97.5% quantile: a 95% interval is mean -/+ Z95 standard errors."""


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean of `values` (one per seed): mean -/+ t * s / sqrt(n),
    t the (1 + confidence) / 2 quantile with n - 1 degrees of freedom; None below 2 values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def half_width(values: Tensor) -> float | None:
    """Z95 standard errors of the mean of `values` (N,): the half width of its normal 95%
    interval over the rows; None below two rows."""
    if values.numel() < 2:
        return None
    return Z95 * float(values.double().std()) / math.sqrt(values.numel())
