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


@dataclass(frozen=True)
class Params:
    wordlist: WordlistParams = field(default_factory=WordlistParams)
    directions: DirectionsParams = field(default_factory=DirectionsParams)
    distill: DistillParams = field(default_factory=lambda: DistillParams(runs=_seed_runs()))
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def __post_init__(self) -> None:
        if self.distill.train.layer not in self.directions.layers:
            raise ValueError(
                f"distill.train.layer={self.distill.train.layer} is not cached: "
                f"directions.layers is {list(self.directions.layers)}"
            )


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
        return _coerce(inner[0], value, key)
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
