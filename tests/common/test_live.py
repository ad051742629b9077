"""dvclive as the stages use it: a hand-built loop logs known values, read back exactly."""

from __future__ import annotations

import json

import pytest

from pipeline.common.live import log_row, metric_path, open_live, read_metric


def test_a_short_loop_logs_each_value_at_its_step(tmp_path):
    folder = tmp_path / "live"
    rows = [{"step": s, "loss": 1.0 / s, "acc": 0.25 * s} for s in (1, 2, 3)]
    with open_live(folder) as live:
        for row in rows:
            log_row(live, row, prefix="train/")
        log_row(live, {"step": 3, "loss": 0.125}, prefix="heldout/")
    assert read_metric(folder, "train/loss") == ([1, 2, 3], [1.0, 0.5, 1.0 / 3])
    assert read_metric(folder, "train/acc") == ([1, 2, 3], [0.25, 0.5, 0.75])
    assert metric_path(folder, "train/loss").read_text().splitlines() == [
        "step\tloss",
        "1\t1.0",
        "2\t0.5",
        f"3\t{1.0 / 3!r}",
    ]
    assert read_metric(folder, "heldout/loss") == ([3], [0.125])
    # metrics.json: the latest value of each metric and the step, for `dvc exp show`.
    assert json.loads((folder / "metrics.json").read_text()) == {
        "train": {"loss": 1.0 / 3, "acc": 0.75},
        "heldout": {"loss": 0.125},
        "step": 3,
    }
    # dvclive wrote no dvc.yaml, report or experiment files of its own.
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == [
        "metrics.json",
        "plots/metrics/heldout/loss.tsv",
        "plots/metrics/train/acc.tsv",
        "plots/metrics/train/loss.tsv",
    ]
    assert not (tmp_path / "dvc.yaml").exists()


def test_another_step_column_and_a_fresh_logger_start_over(tmp_path):
    folder = tmp_path / "live"
    with open_live(folder) as live:
        log_row(live, {"epoch": 1, "val_cos": 0.5, "rows": 7}, step="epoch")
        log_row(live, {"epoch": 2, "val_cos": float("nan"), "rows": 14}, step="epoch")
    steps, values = read_metric(folder, "val_cos")
    assert steps == [1, 2] and values[0] == 0.5 and values[1] != values[1]  # NaN kept
    assert metric_path(folder, "rows").read_text().splitlines()[1:] == ["1\t7", "2\t14"]
    with open_live(folder) as live:  # a re-run: the earlier curves are gone
        log_row(live, {"epoch": 1, "val_cos": 0.75}, step="epoch")
    assert read_metric(folder, "val_cos") == ([1], [0.75])
    assert not metric_path(folder, "rows").exists()


def test_a_missing_or_foreign_curve_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dvclive metric 'val_cos' not found: .*val_cos"):
        read_metric(tmp_path, "val_cos")
    path = metric_path(tmp_path, "val_cos")
    path.parent.mkdir(parents=True)
    path.write_text("epoch\tcos\n1\t0.5\n")
    with pytest.raises(ValueError, match=r"lacks columns \['step', 'val_cos'\]"):
        read_metric(tmp_path, "val_cos")
