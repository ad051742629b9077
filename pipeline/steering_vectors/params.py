"""Params of the steering branch: sections `mcdata` and `steering`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pipeline.common.params import ComputeDType, Sections, layer_list, positive

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
            positive(f"mcdata.{key}", getattr(self, key))


MATH_KEYWORDS = (
    "calculate",
    "solve",
    "math",
    "arithmetic",
    "altogether",
    "total",
    "percent",
    "remainder",
)
"""Whole words of word problems that everyday text (HellaSwag's contexts) rarely uses;
no phrase like "how much", which routes "how much flour" in a recipe to math."""


def _steering_default_keywords() -> dict[str, tuple[str, ...]]:
    return {"math": MATH_KEYWORDS}


@dataclass(frozen=True)
class SteeringParams:
    """Section `steering`: one learned vector v (d_model) + per-layer scales on a frozen LM."""

    READS: ClassVar = ("mcdata",)

    model: str = "Qwen/Qwen3-0.6B"
    """A causal LM: Hugging Face hub id or local model folder."""
    revision: str = "main"
    dtype: ComputeDType = "bfloat16"
    """Compute dtype of the frozen model; v and the scales stay float32."""
    layers: tuple[int, ...] | None = None
    """Decoder-layer indices (0-based) whose output receives scale_i * v (multi-layer
    training). None = 10%, 50%, 80% of depth (seed 004 section 2.1): 2, 14, 22 on 28 layers,
    3, 15, 24 on SmolLM2's 30."""
    single_layers: tuple[int, ...] | Literal["all"] | None = None
    """Candidates of the single-layer baseline (README7: one vector per layer, best on
    val). None = the same as `layers`; `all` = every decoder layer."""
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
    """Keyword routing: a question whose context holds one of a task's keywords (whole
    words or a whole phrase, any case: `math` is not in "aftermath") gets that task's vector
    (first match in this order); otherwise the first task without keywords, or the
    equal-weight average when every task has keywords."""
    bootstrap_samples: int = 2000
    """Resamples of the questions for the 95% confidence interval of each gain."""
    min_rows: int = 30
    """The fewest questions a table's score may rest on: below it the cell reads
    `n=10 < 30` instead of a number (the JSON keeps the value), here and in the summary."""
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
            if value is not None and value != "all":
                layer_list(f"steering.{key}", value, "give layer indices, all or null")
        if self.position < 0:
            raise ValueError(f"steering.position must be >= 0 (0 = all), got {self.position}")
        for key in ("epochs", "batch_size", "bootstrap_samples", "min_rows", "eval_batch_size"):
            positive(f"steering.{key}", getattr(self, key))
        if not self.lr > 0:
            raise ValueError(f"steering.lr must be > 0, got {self.lr}")
        if not self.coefficients or not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError(
                f"steering.coefficients must be finite numbers, got {self.coefficients}"
            )
        if not self.alphas or not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"steering.alphas must lie in [0, 1], got {self.alphas}")

    def check(self, params: Sections) -> None:
        unknown = sorted(set(self.keywords) - set(params.mcdata.tasks))
        if unknown:
            raise ValueError(
                f"steering.keywords names {unknown}, which are not mcdata.tasks "
                f"({sorted(params.mcdata.tasks)})"
            )

    def depth_layers(self, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(layers, single_layers) resolved for `depth` decoder layers; checked in range."""
        layers = self.layers or tuple(sorted({int(depth * f) for f in (0.1, 0.5, 0.8)}))
        if self.single_layers == "all":
            single: tuple[int, ...] = tuple(range(depth))
        else:
            single = self.single_layers or layers
        for key, value in (("layers", layers), ("single_layers", single)):
            bad = [layer for layer in value if layer >= depth]
            if bad:
                raise ValueError(
                    f"steering.{key} holds {bad} but {self.model} has {depth} decoder layers "
                    f"(valid indices 0..{depth - 1})"
                )
        return layers, single
