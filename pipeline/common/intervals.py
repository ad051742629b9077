"""Intervals over seeds: the Student-t interval of a mean, for any branch's per-seed numbers.

t_interval([0.70, 0.72, 0.71])  # (lo, hi) of the mean, 95%
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
