"""dvclive for the training loops, as DVC documents it inside `dvc repro` stages.

Each loop logs into its own dvclive folder, which the stage declares in dvc.yaml:
`<folder>/metrics.json` (the latest value of each metric and `step`) as a metric, for
`dvc exp show` and `dvc metrics diff`, and `<folder>/plots/` as an output, which the
top-level `plots:` of dvc.yaml chart. dvclive neither writes dvc.yaml (`dvcyaml=None`:
the stage declares its outputs by hand) nor makes experiments of its own
(`save_dvc_exp=False`: `dvc exp run` records them). A metric `name` has one TSV,
`<folder>/plots/metrics/<name>.tsv`, with the columns `step` and the last part of `name`.

    with open_live(Path("metrics/live/sidecar")) as live:
        log_row(live, {"step": 1, "loss": 0.5}, prefix="train/")
    steps, values = read_metric(Path("metrics/live/sidecar"), "train/loss")
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from dvclive import Live

METRICS_FILE = "metrics.json"


def open_live(folder: Path) -> Live:
    """A fresh dvclive logger in `folder` (its earlier dvclive files removed)."""
    return Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None)


def log_row(live: Live, row: Mapping[str, float], step: str = "step", prefix: str = "") -> None:
    """One TSV row per metric of `row` (but `row[step]`) at step `row[step]`."""
    live.step = int(row[step])
    for name, value in row.items():
        if name != step:
            live.log_metric(f"{prefix}{name}", value if isinstance(value, int) else float(value))


def metric_path(folder: Path, name: str) -> Path:
    return Path(folder) / "plots" / "metrics" / f"{name}.tsv"


def read_metric(folder: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric `name` in the dvclive folder `folder`."""
    path = metric_path(folder, name)
    if not path.is_file():
        raise FileNotFoundError(
            f"dvclive metric {name!r} not found: {path}; run `dvc repro` to train"
        )
    column = name.rsplit("/", 1)[-1]
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"step", column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: lacks columns {sorted(missing)}; has {reader.fieldnames}")
        rows = list(reader)
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]
