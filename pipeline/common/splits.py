"""Splits by a stable hash: train / val / test names, their fractions, and the one hash.

`unit_hash(key)` is a uniform draw in [0, 1) that depends on `key` alone, so growing
a dataset never moves an item to another split. Each use keys it its own way:

    split_of(text, fractions, salt)       concepts, questions: unit_hash(f"{salt}\0{text}")
    unit_hash(f"block:{block}") < f       sidecar and guided-LM held-out chunks, by corpus block
                                          (`is_heldout`; block = chunk_id // block_chunks)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


def unit_hash(key: str) -> float:
    """Uniform in [0, 1): the first 8 bytes of sha256(key), big-endian, over 2^64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(text: str, fractions: SplitFractions, salt: str = "") -> str:
    """train / val / test from a hash of the text alone, so it never depends on the other items."""
    u = unit_hash(f"{salt}\0{text}")
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"


def is_heldout(chunk_ids: torch.Tensor, fraction: float, block_chunks: int) -> torch.Tensor:
    """(R,) bool: a chunk is held out when a stable hash of its block (chunk_id //
    block_chunks, the corpus's split unit, which no document spans) falls below `fraction`."""
    import torch  # here, not at the top: params_check imports this module and needs no torch

    blocks = torch.div(chunk_ids.long(), block_chunks, rounding_mode="floor")
    draws = [unit_hash(f"block:{int(b)}") for b in blocks.tolist()]
    return torch.tensor(draws, dtype=torch.float64) < fraction
