"""Params of the guided-LM branch: section `guided_lm`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.common.params import positive


@dataclass(frozen=True)
class GuidedLmParams:
    """Section `guided_lm`: a tiny causal LM trained on the corpus with its LM loss plus
    lambda x a cosine loss pulling its hidden state at each concept word's last token,
    through a learned linear map, toward the teacher's direction for that word.

    The grid is lambdas x corpus_fractions x seeds; every cell trains `steps` steps of
    `batch_size` chunks, so at one corpus size every lambda sees the same tokens in the
    same order (per seed) for the same steps.
    """

    READS: ClassVar = ("distill",)
    """distill.train.layer: the directions layer that supervises."""

    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    ffn_dim: int = 2048
    layer: int = 4
    """hidden_states index the aux loss reads (0 = embeddings, num_layers = after the final
    norm), 1..num_layers."""
    lambdas: tuple[float, ...] = (0.0, 0.1)
    """Aux loss weights; 0.0 (the plain LM, the control) must be among them."""
    corpus_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Corpus sizes: nested prefixes (by block) of the train blocks, each in (0, 1]."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Each seed fixes the LM's init and the batch order; the same seeds for every cell."""
    eval_fraction: float = 0.1
    """Share of the corpus blocks held out (`pipeline.common.splits.is_heldout`)."""
    steps: int = 20000
    batch_size: int = 32
    """Chunks per step."""
    lr: float = 3e-4
    weight_decay: float = 0.01
    threads: int = 1
    """torch intra-op threads (results are bit-reproducible at a fixed count)."""
    eval_batch_size: int = 64
    min_rows: int = 30
    """The fewest held-out occurrences a cos in the table may rest on: below it the cell
    reads `n=10 < 30` instead of a number (the JSON keeps the value), here and in the
    summary."""

    def __post_init__(self) -> None:
        for name in ("d_model", "num_layers", "num_heads", "ffn_dim", "steps", "batch_size"):
            positive(f"guided_lm.{name}", getattr(self, name))
        positive("guided_lm.threads", self.threads)
        positive("guided_lm.eval_batch_size", self.eval_batch_size)
        positive("guided_lm.min_rows", self.min_rows)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"guided_lm.d_model={self.d_model} is not a multiple of "
                f"guided_lm.num_heads={self.num_heads}"
            )
        if not 1 <= self.layer <= self.num_layers:
            raise ValueError(
                f"guided_lm.layer={self.layer} must lie in 1..guided_lm.num_layers="
                f"{self.num_layers} (hidden_states index of a block's output)"
            )
        if not self.lambdas:
            raise ValueError("guided_lm.lambdas is empty: give 0.0 (the control) and a lambda > 0")
        for value in self.lambdas:
            if value < 0:
                raise ValueError(f"guided_lm.lambdas holds {value}: a lambda must be >= 0")
        if 0.0 not in self.lambdas:
            raise ValueError(
                f"guided_lm.lambdas={list(self.lambdas)} has no 0.0: the plain LM is the "
                "control every lambda > 0 is compared with"
            )
        if not any(value > 0 for value in self.lambdas):
            raise ValueError(f"guided_lm.lambdas={list(self.lambdas)} has no lambda > 0")
        if not self.corpus_fractions:
            raise ValueError("guided_lm.corpus_fractions is empty: give sizes in (0, 1]")
        for value in self.corpus_fractions:
            if not 0 < value <= 1:
                raise ValueError(
                    f"guided_lm.corpus_fractions holds {value}: each must lie in (0, 1]"
                )
        for key in ("lambdas", "corpus_fractions", "seeds"):
            values = list(getattr(self, key))
            if len(set(values)) != len(values):
                raise ValueError(f"guided_lm.{key} repeats a value: {values}")
        if not self.seeds:
            raise ValueError("guided_lm.seeds is empty: give at least one seed")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(
                f"guided_lm.eval_fraction must lie in (0, 1), got {self.eval_fraction}"
            )
        if self.lr <= 0:
            raise ValueError(f"guided_lm.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"guided_lm.weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def guided_lambdas(self) -> tuple[float, ...]:
        """The lambdas > 0, ascending."""
        return tuple(sorted(value for value in self.lambdas if value > 0))

    @property
    def sizes(self) -> tuple[float, ...]:
        """corpus_fractions, ascending."""
        return tuple(sorted(self.corpus_fractions))
