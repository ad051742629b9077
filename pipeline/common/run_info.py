"""Metrics JSON holds metrics only: what describes a run rather than measures it (its
layer, seed, model, revision, flags, hook names) goes to `info.json` in the stage's output
folder, a DVC out that `dvc exp show` and `dvc metrics diff` leave alone. The stage keeps
the whole dict in memory for its tables; only the written files are split. The `summary`
list stays in the metrics (DVC ignores lists there; stage `summary` reads it).

    metrics, info = split_info(result, ("layer", "seed", "splice.hook", "baselines.*.components"))
    write_json(metrics_path, metrics)
    write_json(out / INFO, info)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

INFO = "info.json"


def split_info(result: dict[str, Any], keys: Iterable[str]) -> tuple[dict, dict]:
    """(`result` without `keys`, the values of `keys`), both nested as in `result`.

    A key is a dotted path; `*` matches every key of a dict at that level. A path that
    `result` does not hold (an optional block that did not run) is skipped.
    """
    metrics, info = copy.deepcopy(result), {}
    for key in keys:
        _move(metrics, info, key.split("."))
    return metrics, info


def _move(source: dict, target: dict, path: list[str]) -> None:
    head, rest = path[0], path[1:]
    names = list(source) if head == "*" else [head]
    for name in names:
        if name not in source:
            continue
        if not rest:
            target[name] = source.pop(name)
        elif isinstance(source[name], dict):
            _move(source[name], target.setdefault(name, {}), rest)
            if not target[name]:
                del target[name]
