"""Params of the KV-sidecar branch: sections `trajectories` and `sidecar`."""

from __future__ import annotations

import typing
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

ForceSpace = Literal["hidden", "kv"]
ScaleNormalize = Literal["per_sample", "per_window", "none"]
SCALE_NORMALIZE: tuple[str, ...] = typing.get_args(ScaleNormalize)


@dataclass(frozen=True)
class TrajectoriesParams:
    """Section `trajectories`: K, V, future Q and LM-loss forces per layer over corpus chunks."""

    READS: ClassVar = ("corpus",)

    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    revision: str = "main"
    layers: tuple[int, ...] | Literal["all"] = "all"
    """Decoder block indices 0..num_layers-1 (block L reads HF hidden_states[L]), or `all`."""
    window_size: int = 64
    num_windows: int = 4
    num_queries: int = 16
    """Future positions after the windows: their queries are stored, their LM loss is L."""
    max_chunks: int = 2048
    compute_dtype: ComputeDType = "float32"
    """float32 by default: the forces are gradients, and bf16 backward passes are noisy."""
    storage_dtype: DType = "bfloat16"
    """bfloat16 keeps float32's range: small gradients do not underflow as in float16."""
    shard_rows: int = 32
    """Chunks per shard (all stored layers of a chunk live in one shard)."""
    force_space: ForceSpace = "kv"
    """`hidden`: dL/d(hidden state entering layer L) and dL/d(q_proj output), seed 003's
    layout; `kv`: dL/dK, dL/dV per KV head and dL/dQ per query head (after RoPE)."""
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    batch_size: int = 8
    device: str = "auto"
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    def __post_init__(self) -> None:
        thread_count("trajectories.num_threads", self.num_threads)
        if self.layers != "all":
            empty = "give block indices or `all`"
            layer_list("trajectories.layers", self.layers, empty, what="block indices")
        for name in ("window_size", "num_windows", "num_queries", "max_chunks", "shard_rows"):
            positive(f"trajectories.{name}", getattr(self, name))
        positive("trajectories.batch_size", self.batch_size)

    @property
    def window_tokens(self) -> int:
        return self.num_windows * self.window_size

    @property
    def chunk_tokens(self) -> int:
        """Window tokens, future tokens, and one more token: the label of the last future one."""
        return self.window_tokens + self.num_queries + 1

    def check(self, params: Sections) -> None:
        corpus = params.corpus
        if corpus.chunk_tokens != self.chunk_tokens:
            raise ValueError(
                f"corpus.chunk_tokens={corpus.chunk_tokens} but trajectories needs "
                f"trajectories.num_windows * window_size + num_queries + 1 = "
                f"{self.num_windows} * {self.window_size} + {self.num_queries} + 1 = "
                f"{self.chunk_tokens}"
            )
        if (corpus.model, corpus.revision) != (self.model, self.revision):
            raise ValueError(
                f"corpus.model={corpus.model!r}@{corpus.revision} and trajectories.model="
                f"{self.model!r}@{self.revision} differ: the chunks must be tokenized by the "
                "model that reads them"
            )


SIDECAR_TERMS = (
    "consistency",
    "force",
    "kv_norm",
    "anti_collapse",
    "diversity",
    "output_magnitude",
    "kv_match",
    "jacobian_ratio",
)
"""The sidecar's loss terms; each has a `<term>_weight` param."""


@dataclass(frozen=True)
class SidecarParams:
    """Section `sidecar`: the seed-003 KV sidecar, its losses and its training.

    Every loss term is a weight, so the seed's v1, v2 and v3 are param presets
    (`pipeline.kv_sidecar.losses.PRESETS`); the defaults are v3.
    """

    READS: ClassVar = ("trajectories",)

    layer: int = 11
    """Which stored trajectories layer to train on (must be in the trajectories manifest)."""
    window_size: int | None = None
    """Dense tokens per super-token; None: the trajectories' window_size (64 -> 64x).
    Smaller values (e.g. 16) split each stored window for milder compression."""
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 3
    """Encoder layers over each window's concatenated (k, v) tokens."""
    ffn_ratio: int = 4
    num_inducing: int = 8
    """Inducing points of the Set-Transformer ISAB aggregator (a PMA with 1 seed follows)."""
    mean_residual: bool = False
    """Add the window's mean K/V to the output: the sidecar learns a correction of the
    training-free baseline instead of the super-token itself (not in the seed)."""
    # Loss weights: 0 switches a term off (it is still computed and reported).
    consistency_weight: float = 1.0
    consistency: Literal["mse", "cosine"] = "cosine"
    """`mse`: ||y_dense - y_cg||^2 (v1, v2); `cosine`: 1 - cos(y_dense, y_cg) (v3 fix)."""
    force_weighted: bool = True
    """Weight each query by ||dL/dq_i|| / sum_j ||dL/dq_j|| (else uniformly)."""
    force_weight: float = 1.0
    """Jacobian matching ||J_dense - J_cg||_F^2 / ||J_dense||_F^2, J = dy/dq."""
    kv_norm_weight: float = 1.0
    """(||k_cg|| - mu_K)^2 + (||v_cg|| - mu_V)^2, mu = the window's mean dense norm."""
    anti_collapse_weight: float = 0.01
    """relu(1 - PR(cg) / PR(baseline)): PR = participation ratio (effective rank) of the
    batch's super-tokens; penalises outputs of lower rank than the window means."""
    diversity_weight: float = 0.01
    """Mean cosine between the super-tokens of different windows of one sample."""
    output_magnitude_weight: float = 1.0
    """(||y_cg|| - ||y_dense||)^2 per query."""
    kv_match_weight: float = 1.0
    """Direction only: (1 - cos(k_cg, mean k)) + (1 - cos(v_cg, mean v)) per window."""
    jacobian_ratio_weight: float = 1.0
    """beta in beta * (||J_cg||_F / ||J_dense||_F - 1)^2 (v3)."""
    scale_normalize: ScaleNormalize = "per_sample"
    """How the sidecar's super-tokens are rescaled before attention (never the baselines):
    `per_sample`: seed 003's fix 4, one scalar per sample (chunk x KV head) for K,
    mean dense K norm / mean super-token K norm, and one for V (v3); `per_window`: each
    super-token to its own window's mean dense norm (the norm ratios and the kv_norm
    loss are then 1 and 0 by construction); `none`."""
    # Optimisation.
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    """Linear warmup, then cosine decay to 0 at max_steps."""
    max_steps: int = 5000
    batch_size: int = 64
    """Samples per step; a sample is one (chunk, KV head) pair."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    seed: int = 0
    buffer_samples: int = 4096
    """Shuffle buffer: at most this many samples (plus one shard) are held in memory."""
    eval_fraction: float = 0.05
    """Share of chunks held out (by a stable hash of chunk_id) for evaluation."""
    eval_every: int = 250
    """Steps between held-out evaluations on the curves (dvclive `heldout/` metrics)."""
    eval_batches: int = 8
    """Held-out batches per curve point; the final metrics use every held-out chunk."""
    # Not DVC deps: they do not change the result beyond float rounding.
    device: str = "auto"
    """Also where the teacher runs for the held-out LM loss (`pipeline/kv_sidecar/lm_loss.py`)."""
    lm_batch_size: int = 8
    """Held-out chunks per teacher forward in the LM-loss evaluation."""
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null or 0: torch's
    default. 1 suits tiny models on shared cores."""

    def __post_init__(self) -> None:
        if self.scale_normalize not in SCALE_NORMALIZE:
            was = " (booleans were the old form: true meant per_window)" * isinstance(
                self.scale_normalize, bool
            )
            raise ValueError(
                f"sidecar.scale_normalize must be one of {list(SCALE_NORMALIZE)}, "
                f"got {self.scale_normalize!r}{was}"
            )
        thread_count("sidecar.num_threads", self.num_threads)
        for key in ("d_model", "num_heads", "num_layers", "ffn_ratio", "num_inducing"):
            positive(f"sidecar.{key}", getattr(self, key))
        for key in (
            "max_steps",
            "batch_size",
            "buffer_samples",
            "eval_every",
            "eval_batches",
            "lm_batch_size",
        ):
            positive(f"sidecar.{key}", getattr(self, key))
        if self.window_size is not None:
            positive("sidecar.window_size", self.window_size)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"sidecar.d_model ({self.d_model}) is not a multiple of "
                f"sidecar.num_heads ({self.num_heads})"
            )
        if self.layer < 0:
            raise ValueError(f"sidecar.layer must be >= 0, got {self.layer}")
        for key in self.loss_weights:
            if getattr(self, f"{key}_weight") < 0:
                raise ValueError(
                    f"sidecar.{key}_weight must be >= 0, got {getattr(self, f'{key}_weight')}"
                )
        if not any(self.loss_weights.values()):
            raise ValueError("sidecar: every *_weight is 0, so there is nothing to train")
        if self.lr <= 0:
            raise ValueError(f"sidecar.lr must be > 0, got {self.lr}")
        for key in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"sidecar.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"sidecar.eval_fraction must lie in (0, 1), got {self.eval_fraction}")

    @property
    def loss_weights(self) -> dict[str, float]:
        """Term name -> weight, in the order of `SIDECAR_TERMS`."""
        return {name: getattr(self, f"{name}_weight") for name in SIDECAR_TERMS}

    def check(self, params: Sections) -> None:
        trajectories = params.trajectories
        layers = trajectories.layers
        if layers != "all" and self.layer not in layers:
            raise ValueError(
                f"sidecar.layer={self.layer} is not stored: trajectories.layers is {list(layers)}"
            )
        dense = trajectories.window_tokens
        if self.window_size is not None and dense % self.window_size:
            raise ValueError(
                f"sidecar.window_size={self.window_size} does not divide the {dense} dense "
                f"tokens of a chunk (trajectories.num_windows x window_size = "
                f"{trajectories.num_windows} x {trajectories.window_size})"
            )
