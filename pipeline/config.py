"""Typed, validated views of `params.yaml`: one frozen dataclass per section.

Every section of `params.yaml` maps to a dataclass below with the same field
names. Loading is strict: an unknown key, a wrong type or an out-of-range value
raises `ValueError` naming the dotted key, so a typo in `dvc exp run -S` fails
before any stage touches its outputs.

    params = load_params("params.yaml")
    params.directions.layers  # (14,)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DType = Literal["float32", "bfloat16", "float16"]
Approach = Literal["trainable", "frozen_mlp", "linear_probe"]
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


@dataclass(frozen=True)
class WordlistParams:
    source: Literal["nltk", "wordfreq"] = "nltk"
    """`nltk`: the NLTK `words` corpus with WordNet POS/category (downloads);
    `wordfreq`: the English list shipped by the wordfreq package (offline)."""
    num_concepts: int = 50_000
    """How many concepts to keep, most frequent first."""
    min_length: int = 3
    max_length: int = 20
    splits: SplitFractions = field(default_factory=SplitFractions)
    split_salt: str = ""
    """Mixed into the split hash; change it to draw a different, still stable split."""

    def __post_init__(self) -> None:
        _positive("wordlist.num_concepts", self.num_concepts)
        _positive("wordlist.min_length", self.min_length)
        if self.max_length < self.min_length:
            raise ValueError(
                f"wordlist.max_length ({self.max_length}) is below wordlist.min_length "
                f"({self.min_length})"
            )


@dataclass(frozen=True)
class DirectionsParams:
    model: str = "Qwen/Qwen3-0.6B"
    """A Hugging Face hub id, a local directory, or `tiny:qwen3` (built offline)."""
    revision: str = "main"
    layers: tuple[int, ...] = (14,)
    """HF `hidden_states` indices: 0 is the embedding output, L the output of layer L."""
    templates: tuple[str, ...] = ("{concept}",)
    """Prompt templates with a `{concept}` slot; vectors are averaged over templates."""
    pooling: Literal["last", "mean"] = "last"
    """`last`: last non-padding token (decoders); `mean`: mean over tokens (encoders)."""
    compute_dtype: DType = "bfloat16"
    storage_dtype: DType = "float32"
    shard_rows: int = 8192
    """Concepts per shard: few large files hash faster in DVC than many small ones."""
    max_length: int = 64
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    batch_size: int = 64
    device: str = "auto"
    padding_side: Literal["left", "right"] = "right"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("directions.layers is empty: give at least one layer index")
        for layer in self.layers:
            if layer < 0:
                raise ValueError(f"directions.layers holds {layer}: layer indices are >= 0")
        if not self.templates:
            raise ValueError("directions.templates is empty: give at least one template")
        for template in self.templates:
            if "{concept}" not in template:
                raise ValueError(
                    f"directions.templates entry {template!r} lacks a {{concept}} slot"
                )
        _positive("directions.shard_rows", self.shard_rows)
        _positive("directions.max_length", self.max_length)
        _positive("directions.batch_size", self.batch_size)

    @property
    def deepest_layer(self) -> int:
        return max(self.layers)


@dataclass(frozen=True)
class TrainParams:
    layer: int = 14
    """Which cached layer's directions to learn; must be one of directions.layers."""
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    buffer_rows: int = 65_536
    """Shuffle buffer: at most this many target rows are held in memory at once."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        _positive("distill.train.epochs", self.epochs)
        _positive("distill.train.batch_size", self.batch_size)
        _positive("distill.train.buffer_rows", self.buffer_rows)
        if self.lr <= 0:
            raise ValueError(f"distill.train.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class RunParams:
    """One row of the seed-000 comparison table."""

    approach: Approach
    embed_dim: int | None = None
    """Trainable embedding width (`trainable` only)."""
    hidden_dim: int | None = None
    """MLP hidden width (`trainable`, `frozen_mlp`)."""

    def __post_init__(self) -> None:
        needs = {"trainable": ("embed_dim", "hidden_dim"), "frozen_mlp": ("hidden_dim",)}
        for name in ("embed_dim", "hidden_dim"):
            value = getattr(self, name)
            if name in needs.get(self.approach, ()):
                if value is None or value <= 0:
                    raise ValueError(
                        f"approach {self.approach} needs a positive {name}, got {value}"
                    )
            elif value is not None:
                raise ValueError(f"approach {self.approach} takes no {name} (got {value})")


@dataclass(frozen=True)
class DistillParams:
    train: TrainParams = field(default_factory=TrainParams)
    runs: dict[str, RunParams] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("distill.runs is empty: give at least one run")


@dataclass(frozen=True)
class EvaluateParams:
    knn_k: int = 10
    """Neighbours averaged by the nearest-neighbour baseline."""
    retrieval_k: tuple[int, ...] = (1, 10)

    def __post_init__(self) -> None:
        _positive("evaluate.knn_k", self.knn_k)
        for k in self.retrieval_k:
            _positive("evaluate.retrieval_k", k)


# >>> corpus + trajectories (KV sidecar branch, issue 3)
ForceSpace = Literal["hidden", "kv"]


@dataclass(frozen=True)
class CorpusParams:
    """Section `corpus`: text tokenized into fixed-length chunks for the token-level branches."""

    source: Literal["builtin", "hf", "files"] = "hf"
    """`builtin`: English-like sentences drawn from wordfreq with a seeded RNG (offline);
    `hf`: a Hugging Face dataset, streamed (needs `pip install datasets` and the hub);
    `files`: local UTF-8 text files matched by `files`, one document per file."""
    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    """Whose tokenizer: a hub id, a local directory, or `tiny:llama`."""
    revision: str = "main"
    dataset: str = "HuggingFaceFW/fineweb-edu"
    dataset_config: str | None = "sample-10BT"
    dataset_split: str = "train"
    text_field: str = "text"
    files: str = "data/text/*.txt"
    """Glob for `source: files`, relative to the working directory, read in sorted order."""
    seed: int = 0
    """Seed of the `builtin` text generator."""
    chunk_tokens: int = 273
    """Tokens per chunk; trajectories need num_windows * window_size + num_queries + 1."""
    max_chunks: int = 2048
    """Stop after this many chunks (fewer if the source runs out)."""
    shard_rows: int = 65_536

    def __post_init__(self) -> None:
        _positive("corpus.max_chunks", self.max_chunks)
        _positive("corpus.shard_rows", self.shard_rows)
        if self.chunk_tokens < 2:
            raise ValueError(f"corpus.chunk_tokens must be >= 2, got {self.chunk_tokens}")


@dataclass(frozen=True)
class TrajectoriesParams:
    """Section `trajectories`: K, V, future Q and LM-loss forces per layer over corpus chunks."""

    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    revision: str = "main"
    layers: tuple[int, ...] | Literal["all"] = "all"
    """Decoder block indices 0..num_layers-1 (block L reads HF hidden_states[L]), or `all`."""
    window_size: int = 64
    num_windows: int = 4
    num_queries: int = 16
    """Future positions after the windows: their queries are stored, their LM loss is L."""
    max_chunks: int = 2048
    compute_dtype: DType = "float32"
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

    def __post_init__(self) -> None:
        if self.layers != "all":
            if not self.layers:
                raise ValueError("trajectories.layers is empty: give layer indices or `all`")
            for layer in self.layers:
                if layer < 0:
                    raise ValueError(f"trajectories.layers holds {layer}: block indices are >= 0")
        for name in ("window_size", "num_windows", "num_queries", "max_chunks", "shard_rows"):
            _positive(f"trajectories.{name}", getattr(self, name))
        _positive("trajectories.batch_size", self.batch_size)

    @property
    def window_tokens(self) -> int:
        return self.num_windows * self.window_size

    @property
    def chunk_tokens(self) -> int:
        """Window tokens, future tokens, and one more token: the label of the last future one."""
        return self.window_tokens + self.num_queries + 1

    def check(self, params: Params) -> None:
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


# <<< corpus + trajectories

# >>> sidecar (issue 3)
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
    (`pipeline.sidecar_losses.PRESETS`); the defaults are v3.
    """

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
    scale_normalize: bool = True
    """Rescale each k_cg, v_cg to its window's mean dense norm before attention (v3)."""
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
    """Steps between held-out evaluations on the curves (eval_curves.csv)."""
    eval_batches: int = 8
    """Held-out batches per curve point; the final metrics use every held-out chunk."""
    # Not DVC deps: they do not change the result beyond float rounding.
    device: str = "auto"
    num_threads: int = 0
    """CPU threads for torch; 0 keeps torch's default. 1 suits tiny models on shared cores."""

    def __post_init__(self) -> None:
        if self.num_threads < 0:
            raise ValueError(f"sidecar.num_threads must be >= 0, got {self.num_threads}")
        for key in ("d_model", "num_heads", "num_layers", "ffn_ratio", "num_inducing"):
            _positive(f"sidecar.{key}", getattr(self, key))
        for key in ("max_steps", "batch_size", "buffer_samples", "eval_every", "eval_batches"):
            _positive(f"sidecar.{key}", getattr(self, key))
        if self.window_size is not None:
            _positive("sidecar.window_size", self.window_size)
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

    def check(self, params: Params) -> None:
        layers = params.trajectories.layers
        if layers != "all" and self.layer not in layers:
            raise ValueError(
                f"sidecar.layer={self.layer} is not stored: trajectories.layers is {list(layers)}"
            )


# <<< sidecar

# >>> sae (issue 4)
SaeInput = Literal["directions", "activations"]
Baseline = Literal["pca", "nmf", "ica"]


@dataclass(frozen=True)
class ActivationsParams:
    """Section `activations`: token-level activations over corpus chunks."""

    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    """Teacher run over the chunks: a hub id, a local directory, or `tiny:llama`. Must equal
    `corpus.model`: the chunks are token ids of that model's tokenizer."""
    revision: str = "main"
    layers: tuple[int, ...] = (11, 22)
    """HF `hidden_states` indices (0 = embedding output; the last one is after the final norm)."""
    positions: Literal["all", "last"] = "all"
    """`all`: one row per non-padding token; `last`: the last non-padding token of each chunk
    (seed 002's choice: one vector per text; 2,048 chunks give only 2,048 rows)."""
    max_chunks: int | None = None
    """Use the first this-many corpus chunks; None: all of them."""
    compute_dtype: DType = "bfloat16"
    storage_dtype: DType = "bfloat16"
    """bfloat16 halves the dump: 2,048 chunks x 273 tokens x 2,048 dims = 2.3 GB per layer."""
    shard_rows: int = 16_384
    """Target rows per shard; a shard holds whole chunks (at least one)."""
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    batch_size: int = 16
    """Chunks per teacher forward."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("activations.layers is empty: give at least one layer index")
        for layer in self.layers:
            if layer < 0:
                raise ValueError(f"activations.layers holds {layer}: layer indices are >= 0")
        if self.max_chunks is not None:
            _positive("activations.max_chunks", self.max_chunks)
        _positive("activations.shard_rows", self.shard_rows)
        _positive("activations.batch_size", self.batch_size)

    def check(self, params: Params) -> None:
        corpus_model = params.corpus.model
        if corpus_model != self.model:
            raise ValueError(
                f"activations.model={self.model!r} differs from corpus.model={corpus_model!r}: "
                "the corpus chunks are token ids of corpus.model's tokenizer"
            )


@dataclass(frozen=True)
class SaeParams:
    """Section `sae`: a sparse autoencoder over cached activations (seed 002)."""

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
    baselines: tuple[Baseline, ...] = ("pca", "nmf", "ica")
    """scikit-learn baselines at the SAE's L0; NMF factorizes [relu(x), relu(-x)]."""
    baseline_rows: int = 20_000
    """Train rows (a seeded sample) the baselines and cross-model alignment are fit on."""
    compare_layer: int | None = None
    """Layer of the optional second dump (`--compare`) for CKA / Procrustes; None: its deepest."""
    # Not a DVC dep: it does not change the result.
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("code_dims_multiplier", "epochs", "batch_size", "buffer_rows"):
            _positive(f"sae.{name}", getattr(self, name))
        for name in ("dead_window_rows", "log_every", "top_exemplars", "baseline_rows"):
            _positive(f"sae.{name}", getattr(self, name))
        if self.topk is not None:
            _positive("sae.topk", self.topk)
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

    def check(self, params: Params) -> None:
        cached = getattr(params, self.input).layers
        if self.layer not in cached:
            raise ValueError(
                f"sae.layer={self.layer} is not cached: sae.input={self.input} and "
                f"{self.input}.layers is {list(cached)}"
            )


# <<< sae

# >>> steering (issue 5)
McSource = Literal["hf", "jsonl", "category", "arithmetic"]
COEFFICIENTS = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 2.0)
"""Seed 004 section 2.2."""


@dataclass(frozen=True)
class McTaskParams:
    """One multiple-choice task of `mcdata.tasks` (HellaSwag format: context, 4 endings, label)."""

    source: McSource
    """`hf`: a Hugging Face dataset (needs `pip install datasets` and the hub); `jsonl`: a
    local file; `category` / `arithmetic`: built offline (from the word list / number words)."""
    path: str | None = None
    """The HF dataset id (`hf`) or the JSONL file (`jsonl`); none for the built-in tasks."""
    config: str | None = None
    """HF dataset config name, e.g. `main` for openai/gsm8k."""
    revision: str | None = None
    """HF dataset revision (branch, tag or commit); None = the default branch."""
    format: Literal["hellaswag", "gsm8k"] = "hellaswag"
    """Record layout of `hf` / `jsonl` rows: HellaSwag (ctx, endings, label) or GSM8K
    (question, answer `... #### 42`; 3 numeric distractors are generated)."""

    def __post_init__(self) -> None:
        needs_path = self.source in ("hf", "jsonl")
        if needs_path and not self.path:
            raise ValueError(f"source {self.source} needs a path (dataset id or JSONL file)")
        if not needs_path and (self.path or self.config or self.revision):
            raise ValueError(f"source {self.source} is built offline: it takes no path/config")


def _mc_default_tasks() -> dict[str, McTaskParams]:
    return {
        "reasoning": McTaskParams("hf", "Rowan/hellaswag"),
        "math": McTaskParams("hf", "openai/gsm8k", config="main", format="gsm8k"),
    }


@dataclass(frozen=True)
class McDataParams:
    """Section `mcdata`: multiple-choice tasks (HellaSwag format)."""

    tasks: dict[str, McTaskParams] = field(default_factory=_mc_default_tasks)
    """Task name -> source (seed 004: `reasoning` = HellaSwag, `math` = GSM8K). Two or more
    tasks give the steering stage vectors to combine."""
    max_train: int = 2000
    """At most this many questions per task in train (a seeded sample of the source)."""
    max_val: int = 500
    max_test: int = 1000
    seed: int = 0
    """Sampling of questions and of distractors (built-in tasks, GSM8K)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("mcdata.tasks is empty: give at least one task")
        for name in self.tasks:
            if not name.isidentifier():
                raise ValueError(f"mcdata.tasks key {name!r} must be a plain identifier")
        for key in ("max_train", "max_val", "max_test"):
            _positive(f"mcdata.{key}", getattr(self, key))


def _steering_default_keywords() -> dict[str, tuple[str, ...]]:
    return {"math": ("calculate", "solve", "math", "how many", "how much")}


@dataclass(frozen=True)
class SteeringParams:
    """Section `steering`: one learned vector v (d_model) + per-layer scales on a frozen LM."""

    model: str = "Qwen/Qwen3-0.6B"
    """A causal LM: Hugging Face hub id, local directory, or `tiny:qwen3`."""
    revision: str = "main"
    dtype: DType = "bfloat16"
    """Compute dtype of the frozen model; v and the scales stay float32."""
    layers: tuple[int, ...] | None = None
    """Decoder-layer indices (0-based) whose output receives scale_i * v (multi-layer
    training). None = 10%, 50%, 80% of depth (seed 004 section 2.1): 2, 14, 22 on 28 layers."""
    single_layers: tuple[int, ...] | None = None
    """Candidates of the single-layer baseline (README7: one vector per layer, best on
    val). None = the same as `layers`."""
    position: int = 0
    """First token index that receives the vector: 0 = every position (`all`), k = from
    token k of the sequence on."""
    epochs: int = 3
    batch_size: int = 8
    """Questions per step (4 sequences each)."""
    lr: float = 1e-2
    """Adam learning rate of v and the scales."""
    seed: int = 0
    coefficients: tuple[float, ...] = COEFFICIENTS
    """Multipliers of the trained vector swept on val (seed 004 section 2.2)."""
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Weights of the first task's vector in the weighted average (the rest share 1 - alpha)."""
    keywords: dict[str, tuple[str, ...]] = field(default_factory=_steering_default_keywords)
    """Keyword routing: a question whose context (lower-cased) holds one of a task's
    keywords gets that task's vector (first match in this order); otherwise the first task
    without keywords, or the equal-weight average when every task has keywords."""
    bootstrap_samples: int = 2000
    """Resamples of the questions for the 95% confidence interval of each gain."""
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    eval_batch_size: int = 32
    device: str = "auto"
    num_threads: int = 0
    """CPU threads of torch (0 = torch's default); 1 is fastest for tiny models."""

    def __post_init__(self) -> None:
        if self.num_threads < 0:
            raise ValueError(f"steering.num_threads must be >= 0, got {self.num_threads}")
        for key in ("layers", "single_layers"):
            value = getattr(self, key)
            if value is None:
                continue
            if not value:
                raise ValueError(f"steering.{key} is empty: give layer indices or null")
            if min(value) < 0 or len(set(value)) != len(value):
                raise ValueError(f"steering.{key} must be distinct indices >= 0, got {value}")
        if self.position < 0:
            raise ValueError(f"steering.position must be >= 0 (0 = all), got {self.position}")
        for key in ("epochs", "batch_size", "bootstrap_samples", "eval_batch_size"):
            _positive(f"steering.{key}", getattr(self, key))
        if not self.lr > 0:
            raise ValueError(f"steering.lr must be > 0, got {self.lr}")
        if not self.coefficients or not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError(
                f"steering.coefficients must be finite numbers, got {self.coefficients}"
            )
        if not self.alphas or not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"steering.alphas must lie in [0, 1], got {self.alphas}")

    def check(self, params: Params) -> None:
        unknown = sorted(set(self.keywords) - set(params.mcdata.tasks))
        if unknown:
            raise ValueError(
                f"steering.keywords names {unknown}, which are not mcdata.tasks "
                f"({sorted(params.mcdata.tasks)})"
            )

    def depth_layers(self, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(layers, single_layers) resolved for `depth` decoder layers; checked in range."""
        layers = self.layers or tuple(sorted({int(depth * f) for f in (0.1, 0.5, 0.8)}))
        single = self.single_layers or layers
        for key, value in (("layers", layers), ("single_layers", single)):
            bad = [layer for layer in value if layer >= depth]
            if bad:
                raise ValueError(
                    f"steering.{key} holds {bad} but {self.model} has {depth} decoder layers "
                    f"(valid indices 0..{depth - 1})"
                )
        return layers, single


# <<< steering


@dataclass(frozen=True)
class Params:
    wordlist: WordlistParams = field(default_factory=WordlistParams)
    directions: DirectionsParams = field(default_factory=DirectionsParams)
    distill: DistillParams = field(default_factory=lambda: DistillParams(runs=_seed_runs()))
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    corpus: CorpusParams = field(default_factory=CorpusParams)
    trajectories: TrajectoriesParams = field(default_factory=TrajectoriesParams)
    sidecar: SidecarParams = field(default_factory=SidecarParams)
    activations: ActivationsParams = field(default_factory=ActivationsParams)
    sae: SaeParams = field(default_factory=SaeParams)
    mcdata: McDataParams = field(default_factory=McDataParams)
    steering: SteeringParams = field(default_factory=SteeringParams)

    def __post_init__(self) -> None:
        if self.distill.train.layer not in self.directions.layers:
            raise ValueError(
                f"distill.train.layer={self.distill.train.layer} is not cached: "
                f"directions.layers is {list(self.directions.layers)}"
            )
        # Cross-section checks of the other branches: a section may define
        # `check(self, params: Params) -> None` raising ValueError naming both keys.
        for section in dataclasses.fields(self):
            check = getattr(getattr(self, section.name), "check", None)
            if check is not None:
                check(self)


def _seed_runs() -> dict[str, RunParams]:
    return {
        "frozen_h256": RunParams("frozen_mlp", hidden_dim=256),
        "linear_probe": RunParams("linear_probe"),
        "trainable_e32_h128": RunParams("trainable", embed_dim=32, hidden_dim=128),
    }


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


def load_params(path: str | Path) -> Params:
    """Read and validate a params file; errors name the file and the dotted key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return build(Params, raw, "")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from plain YAML data, recursively and strictly."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'params'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        where = prefix or "the top level"
        raise ValueError(
            f"unknown key {_dotted(prefix, unknown[0])!r} in {where}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"missing key {_dotted(prefix, missing[0])!r}")
    kwargs = {
        name: _coerce(hints[name], value, _dotted(prefix, name)) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as err:
        # Checks inside a dataclass cannot know its key (e.g. which distill run).
        if prefix and prefix not in str(err):
            raise ValueError(f"{prefix}: {err}") from None
        raise


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        # e.g. `tuple[int, ...] | Literal["all"]`: the first member that accepts the value.
        errors = []
        for member in inner:
            try:
                return _coerce(member, value, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(" or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, _dotted(key, str(k))) for k, v in value.items()}
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(obj: Any) -> Any:
    """Plain-data view of a params dataclass, for manifests and checkpoints."""
    return dataclasses.asdict(obj)
