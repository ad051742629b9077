"""Paired bootstrap intervals (scipy, BCa): known answers, pairing, the degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.common.bootstrap import paired_interval


def test_the_interval_of_a_mean_approaches_the_normal_one():
    values = np.random.default_rng(0).normal(2.0, 1.0, size=400)
    low, high = paired_interval((values,), np.mean, samples=4000, seed=1)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.02)
    assert high == pytest.approx(values.mean() + half, abs=0.02)
    # Seeded: the same seed resamples the same items.
    assert paired_interval((values,), np.mean, samples=4000, seed=1) == (low, high)


def test_pairs_are_resampled_together():
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 5.0, size=200)  # items differ a lot ...
    steered = base + 1.0 + rng.normal(0.0, 0.1, size=200)  # ... but each pair by ~1

    def gain(b, s, axis=-1):
        return s.mean(axis) - b.mean(axis)

    low, high = paired_interval((base, steered), gain, samples=2000, seed=0)
    assert 0.97 < low < 1.0 < high < 1.03  # unpaired, the item spread would give +-0.7


def test_constant_data_and_a_constant_statistic_give_a_point_not_nan():
    assert paired_interval((np.full(5, 0.25),), np.mean, samples=100, seed=0) == (0.25, 0.25)
    assert paired_interval((np.array([1.0]),), np.mean, samples=100, seed=0) == (1.0, 1.0)

    def zero(x, axis=-1):  # BCa's acceleration is 0/0 here: the percentile interval
        return np.zeros_like(x.sum(axis))

    assert paired_interval((np.arange(6.0),), zero, samples=100, seed=0) == (0.0, 0.0)


def test_no_items_is_refused():
    with pytest.raises(ValueError, match="at least one item"):
        paired_interval((np.array([]),), np.mean, samples=10, seed=0)
