"""Paired bootstrap confidence intervals through `scipy.stats.bootstrap`.

Paired: each resample draws the same items (questions, chunks) from every array, so a
difference or ratio keeps each item's own pair. BCa (bias-corrected and accelerated) by
default; percentile where BCa is undefined: its acceleration is 0/0 when every jackknife
value of the statistic is equal (e.g. a statistic that is constant on the data), and its
bias correction is infinite when every resample falls on one side of the estimate; scipy
then returns NaN and this module retries with the percentile interval. An interval of
data that is constant (every array one value) is that value, exactly.

    low, high = paired_interval((steered - base,), np.mean, samples=2000, seed=0)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def paired_interval(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    samples: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The `confidence` interval of `statistic(*data, axis=-1)` (vectorized, as scipy calls
    it) over `samples` seeded paired resamples of the items (axis 0 of every array)."""
    data = tuple(np.asarray(d, dtype=np.float64) for d in data)
    if data[0].shape[0] == 0:
        raise ValueError("a bootstrap interval needs at least one item, got none")
    if all(np.ptp(d) == 0.0 for d in data):  # one item, or all alike: every resample is the data
        value = float(statistic(*data, axis=-1))
        return value, value
    for method in ("BCa", "percentile"):
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            # BCa's NaN is handled below (the percentile retry), not an error to print.
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            result = stats.bootstrap(
                data,
                statistic,
                paired=True,
                vectorized=True,
                n_resamples=samples,
                confidence_level=confidence,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high)
    return float(low), float(high)  # the percentile interval of a statistic NaN on resamples
