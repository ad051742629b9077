"""Params of the sparse-autoencoder branch: sections `activations` and `sae`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline.common.params import (
    ComputeDType,
    DType,
    Sections,
    layer_list,
    positive,
    thread_count,
)

SaeInput = Literal["directions", "activations"]
Baseline = Literal["pca", "pca_top_l0", "nmf", "ica"]


@dataclass(frozen=True)
class ActivationsParams:
    """Section `activations`: token-level activations over corpus chunks."""

    READS: ClassVar = ("corpus",)

    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    """Teacher run over the chunks: a hub id or a local model folder. Must equal
    `corpus.model`: the chunks are token ids of that model's tokenizer."""
    revision: str = "main"
    layers: tuple[int, ...] = (11, 22)
    """HF `hidden_states` indices (0 = embedding output; the last one is after the final norm)."""
    positions: Literal["all", "last"] = "all"
    """`all`: one row per non-padding token; `last`: the last non-padding token of each chunk
    (seed 002's choice: one vector per text; 2,048 chunks give only 2,048 rows)."""
    max_chunks: int | None = None
    """Use the first this-many corpus chunks; None: all of them."""
    compute_dtype: ComputeDType = "bfloat16"
    storage_dtype: DType = "bfloat16"
    """bfloat16 halves the dump: 2,048 chunks x 273 tokens x 2,048 dims = 2.3 GB per layer."""
    shard_rows: int = 16_384
    """Target rows per shard; a shard holds whole chunks (at least one)."""
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    batch_size: int = 16
    """Chunks per teacher forward."""
    device: str = "auto"
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    def __post_init__(self) -> None:
        layer_list("activations.layers", self.layers)
        if self.max_chunks is not None:
            positive("activations.max_chunks", self.max_chunks)
        positive("activations.shard_rows", self.shard_rows)
        positive("activations.batch_size", self.batch_size)
        thread_count("activations.num_threads", self.num_threads)

    def check(self, params: Sections) -> None:
        corpus_model = params.corpus.model
        if corpus_model != self.model:
            raise ValueError(
                f"activations.model={self.model!r} differs from corpus.model={corpus_model!r}: "
                "the corpus chunks are token ids of corpus.model's tokenizer"
            )


@dataclass(frozen=True)
class SaeParams:
    """Section `sae`: a sparse autoencoder over cached activations (seed 002)."""

    READS: ClassVar = (
        "activations",
        "directions",
    )

    input: SaeInput = "activations"
    """`activations`: token-level rows of the `activations` stage (exemplars are text spans);
    `directions`: one direction per concept (exemplars are concepts)."""
    layer: int = 22
    """Which cached layer to train on; must be in activations.layers or directions.layers."""
    code_dims_multiplier: int = 4
    """Dictionary size = multiplier * input width (seed: codeDimsMultiplier)."""
    topk: int | None = 150
    """Keep the k largest codes per row (after ReLU); None: ReLU codes, sparse by L1 only."""
    l1_strength: float = 1e-3
    """loss = mean((x_hat - x)^2) + l1_strength * mean(|z|), both means over all elements."""
    layer_norm: bool = True
    """Layer-norm each input row (no learned scale) before encoding; metrics are measured in
    that normalized space. Seed 002 found it separated features."""
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 4738
    """Init and shuffling; the cross-seed twin uses seed + 1."""
    buffer_rows: int = 65_536
    """Shuffle buffer: at most this many rows (plus one shard) are held in memory."""
    eval_fraction: float = 0.1
    """`activations` input: share of corpus chunks held out for the metrics (stable hash of
    chunk_id, so all tokens of a chunk fall on one side). `directions` uses val + test."""
    keep_start_rows: bool = False
    """`activations` input: keep the start rows. False (default) leaves out attention sinks,
    rows ~100x the norm of the others that would dominate explained variance and the
    exemplars: each chunk's first max(start_tokens, 1) positions, rows holding a start token,
    and rows above 5x their shard's median norm (`sources.StartRows`), from training, every
    metric, the baselines, the exemplars and the splice (there they stay unreplaced and
    predict nothing scored)."""
    dead_window_rows: int = 100_000
    """Training curves: a feature is dead-in-window if it fired on none of the last this-many
    training rows. The headline dead_feature_rate uses the whole eval pass instead."""
    log_every: int = 50
    """Optimizer steps per row of the training curves."""
    top_exemplars: int = 5
    """Top-activating items kept per feature (seed: printTopN)."""
    report_features: int = 5
    """Features shown in the exemplar report, each of the most and least coherent (showFeatures)."""
    context_tokens: int = 16
    """Text-span exemplars: tokens of context shown before the activating token."""
    cross_seed: bool = True
    """Also train seed + 1 and match the two dictionaries one to one (Hungarian, decoder cosine)."""
    baselines: tuple[Baseline, ...] = ("pca", "pca_top_l0", "nmf", "ica")
    """scikit-learn baselines at the SAE's L0 (k): `pca` and `nmf` have k components (NMF
    factorizes [relu(x), relu(-x)]); `pca_top_l0` and `ica` have `basis_components` and keep,
    per row, the k codes of largest contribution |code_j| * ||component_j||."""
    basis_components: int | None = None
    """Components of the top-L0 baselines (`pca_top_l0`, `ica`); None: the input width (a
    complete basis). Must exceed the SAE's L0, or every code would be kept."""
    baseline_rows: int = 20_000
    """Train rows (a seeded sample) the baselines and cross-model alignment are fit on."""
    compare_layer: int | None = None
    """Layer of the optional second dump (`--compare`) for CKA / Procrustes; None: its deepest."""
    chance_draws: int = 5
    """Cross-seed chance level: pairs of random unit-Gaussian dictionaries of the SAE's shape
    matched the same way (mean and spread over this many draws)."""
    same_seed_rerun: bool = True
    """Cross-seed ceiling: train `seed` a second time and match it to the first."""
    splice_chunks: int | None = None
    """`activations` input: held-out chunks (the first this-many by chunk id) the spliced-in
    LM-loss evaluation runs on; None: all of them."""
    bootstrap_samples: int = 2000
    """Resamples of the paired bootstrap over held-out chunks (95% intervals)."""
    # Not DVC deps: they do not change the result.
    splice_batch_size: int = 8
    """Chunks per teacher forward in the spliced-in evaluation."""
    device: str = "auto"
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    def __post_init__(self) -> None:
        for name in ("code_dims_multiplier", "epochs", "batch_size", "buffer_rows"):
            positive(f"sae.{name}", getattr(self, name))
        for name in ("dead_window_rows", "log_every", "top_exemplars", "baseline_rows"):
            positive(f"sae.{name}", getattr(self, name))
        for name in ("chance_draws", "bootstrap_samples", "splice_batch_size"):
            positive(f"sae.{name}", getattr(self, name))
        for name in ("basis_components", "splice_chunks"):
            if getattr(self, name) is not None:
                positive(f"sae.{name}", getattr(self, name))
        if self.topk is not None:
            positive("sae.topk", self.topk)
        thread_count("sae.num_threads", self.num_threads)
        if self.l1_strength < 0:
            raise ValueError(f"sae.l1_strength must be >= 0, got {self.l1_strength}")
        if self.lr <= 0:
            raise ValueError(f"sae.lr must be > 0, got {self.lr}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"sae.eval_fraction must lie in (0, 1), got {self.eval_fraction}")
        if self.report_features < 0 or self.context_tokens < 0:
            raise ValueError(
                f"sae.report_features and sae.context_tokens must be >= 0, got "
                f"{self.report_features} and {self.context_tokens}"
            )
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"sae.baselines repeats an entry: {list(self.baselines)}")

    def check(self, params: Sections) -> None:
        cached = getattr(params, self.input).layers
        if self.layer not in cached:
            raise ValueError(
                f"sae.layer={self.layer} is not cached: sae.input={self.input} and "
                f"{self.input}.layers is {list(cached)}"
            )
