"""Train / val / test splits: their names and the fractions a split hash divides."""

from __future__ import annotations

import math
from dataclasses import dataclass

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        for name in SPLITS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"wordlist.splits.{name} must lie in [0, 1], got {getattr(self, name)}"
                )
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(
                f"wordlist.splits must sum to 1, got train={self.train} + val={self.val} "
                f"+ test={self.test} = {total}"
            )
