"""Strict, typed loading of `params.yaml`: one frozen dataclass per section.

Each branch defines its sections' dataclasses in its own `params.py`; `SECTIONS`
below names them all. Loading is strict: an unknown key, a wrong type, a float that
is nan or inf, or an out-of-range value raises `ValueError` naming the file, the dotted
key and the value. Stage `params_check` (`params_check.py`) loads the whole file first
in the DAG, so a typo in `dvc exp run -S` fails before DVC removes any stage's outputs.

A stage loads the sections it reads, with their classes:

    params = load_params("params.yaml", directions=DirectionsParams)
    params.directions.layers  # (14,)

Every other section of the file is validated as well (unknown keys, types, ranges),
through `SECTIONS`, and then dropped. Those classes are imported by name: a section a
stage does not read can only make it fail, never change its result, so its code is
not among the stage's DVC deps. Cross-section checks run only for the sections a
stage loads: a section class may define `READS` (section names its `check` needs,
loaded alongside) and `check(self, params: Sections)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

DType = Literal["float32", "bfloat16", "float16"]
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]
"""A compute dtype param: `auto` is bfloat16 on CUDA or a CPU with native bfloat16 matmuls,
float32 otherwise (`pipeline.common.identity.resolve_compute_dtype`)."""

# Section name -> "module:Class". Every top-level key of params.yaml is one of these.
SECTIONS = {
    "teachers": "pipeline.inputs.params:TeachersParams",
    "wordlist": "pipeline.inputs.params:WordlistParams",
    "corpus": "pipeline.inputs.params:CorpusParams",
    "directions": "pipeline.concepts.params:DirectionsParams",
    "distill": "pipeline.concepts.params:DistillParams",
    "evaluate": "pipeline.concepts.params:EvaluateParams",
    "analogies": "pipeline.concepts.params:AnalogiesParams",
    "multilayer": "pipeline.concepts.params:MultilayerParams",
    "inverse": "pipeline.concepts.params:InverseParams",
    "cross_teacher": "pipeline.concepts.params:CrossTeacherParams",
    "trajectories": "pipeline.kv_sidecar.params:TrajectoriesParams",
    "sidecar": "pipeline.kv_sidecar.params:SidecarParams",
    "activations": "pipeline.sparse_autoencoder.params:ActivationsParams",
    "sae": "pipeline.sparse_autoencoder.params:SaeParams",
    "mcdata": "pipeline.steering_vectors.params:McDataParams",
    "steering": "pipeline.steering_vectors.params:SteeringParams",
    "guided_lm": "pipeline.guided_lm.params:GuidedLmParams",
}


class Sections:
    """The loaded sections, as attributes: `params.directions`, `params.sae`, ..."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to params section {name!r}")

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(
                f"section {name!r} was not loaded: pass it to load_params"
            ) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sections) and self._values == other._values

    def __repr__(self) -> str:
        return f"Sections({self._values!r})"


def section_class(name: str) -> type:
    module, _, cls = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def load_params(path: str | Path, **wanted: type) -> Sections:
    """Read and validate a params file; return the `wanted` sections (all when none given).

    Errors name the file and the dotted key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    try:
        return sections_from_dict(raw, **wanted)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (1-based)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark = err.problem_mark
    return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"


def sections_from_dict(raw: Any, **wanted: type) -> Sections:
    """Build the `wanted` sections (all when none given) from plain YAML data, strictly."""
    if not isinstance(raw, dict):
        raise ValueError(f"params must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        known = ", ".join(sorted(SECTIONS))
        raise ValueError(f"unknown key {unknown[0]!r} in the top level; known keys: {known}")
    for name in wanted:
        if name not in SECTIONS:
            raise KeyError(f"{name!r} is not a params section; known: {sorted(SECTIONS)}")
    classes = dict(wanted) or {name: section_class(name) for name in SECTIONS}
    # The sections the wanted ones' cross-checks read are loaded alongside (transitively).
    todo = list(classes.values())
    while todo:
        for name in getattr(todo.pop(), "READS", ()):
            if name not in classes:
                classes[name] = section_class(name)
                todo.append(classes[name])
    built = {name: _build_section(name, cls, raw) for name, cls in classes.items()}
    for name in [name for name in raw if name not in built]:
        _build_section(name, section_class(name), raw)  # validated, not returned
    params = Sections(built)
    for section in built.values():
        check = getattr(section, "check", None)
        if check is not None:
            check(params)
    return params


def _build_section(name: str, cls: type, raw: dict) -> Any:
    return build(cls, raw[name], name) if name in raw else cls()


def positive(key: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


def thread_count(key: str, value: int | None) -> None:
    """A `num_threads` knob: a positive count, or null (0 too) for torch's default."""
    if value is not None and value < 0:
        raise ValueError(
            f"{key} must be a positive thread count or null (torch's default), got {value}"
        )


def layer_list(
    key: str,
    layers: tuple[int, ...],
    empty: str = "give at least one layer index",
    what: str = "layer indices",
) -> None:
    """Layer indices as a params list takes them: at least one, each >= 0, each once."""
    if not layers:
        raise ValueError(f"{key} is empty: {empty}")
    for layer in layers:
        if layer < 0:
            raise ValueError(f"{key} holds {layer}: {what} are >= 0")
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(f"{key} repeats {repeated} in {list(layers)}: give each index once")


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
    if hint is float:
        return _finite(value, key)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _finite(value: Any, key: str) -> float:
    """A float param: a number, or a numeric string (YAML 1.1 reads `1e-3`, no dot, as one);
    nan and inf never make sense as a param and only fail later, far from the key."""
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{key} must be float, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite float, got {value!r}")
    return number


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(obj: Any) -> Any:
    """Plain-data view of a params dataclass (or of `Sections`), for manifests and checkpoints."""
    if isinstance(obj, Sections):
        return {name: dataclasses.asdict(value) for name, value in obj._values.items()}
    return dataclasses.asdict(obj)
