"""dvc.yaml's dvclive folders and top-level plots: every charted file is a stage's declared
output, the distill overlay names every run of both profiles, and each PNG is an output."""

from __future__ import annotations

import re

import yaml

from pipeline.demo import PROFILE, ROOT, TEST_PROFILE
from pipeline.guided_lm.report import column

SPEC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
DISTILL = yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]
FOREACH = {"${distill.runs}": DISTILL["runs"], "${distill.analogy_runs}": DISTILL["analogy_runs"]}
"""Each foreach stage of dvc.yaml -> the dict of runs it expands over."""
TABLE_CURVES = {"metrics/plots/guided_lm_data_efficiency.tsv"}
"""Charted files a stage writes itself (a table of points, not a dvclive curve)."""


def declared(section: str) -> dict[str, str]:
    """Path -> stage for every entry of `section` (outs, metrics, plots), foreach resolved."""
    found = {}
    for name, stage in SPEC["stages"].items():
        body = stage.get("do", stage)
        keys = FOREACH[stage["foreach"]] if "foreach" in stage else [None]
        for entry in body.get(section, []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            for key in keys:
                found[path.replace("${key}", key) if key else path] = name
    return found


def charted() -> dict[str, list[str]]:
    """Top-level plot title -> the files (or folder) it reads."""
    plots = {}
    for entry in SPEC["plots"]:
        ((title, props),) = entry.items()
        y = (props or {}).get("y")
        plots[title] = list(y) if isinstance(y, dict) else [title]
    return plots


def test_every_charted_file_lies_in_a_declared_dvclive_output_of_its_stage():
    outs = declared("outs")
    for title, files in charted().items():
        for path in files:
            owners = [out for out in outs if path == out or path.startswith(out + "/")]
            assert owners, f"{title!r}: {path} is in no stage's outs"
            live = r"metrics/live/[^ ]+/plots(/metrics)?(/.+\.tsv)?"
            assert re.fullmatch(live, path) or path in TABLE_CURVES, path


def test_each_dvclive_folder_has_its_metrics_file_for_exp_show():
    metrics = declared("metrics")
    plot_outs = [out for out in declared("outs") if out.endswith("/plots")]
    assert {out.split("/")[2] for out in plot_outs} == {"distill", "sidecar", "sae", "steering"}
    for out in plot_outs:
        assert out.removesuffix("plots") + "metrics.json" in metrics


def test_the_distill_overlay_names_each_run_of_both_profiles():
    (title,) = [t for t in charted() if t.startswith("distill")]
    files = charted()[title]
    for profile in (ROOT / "params.yaml", ROOT / PROFILE, ROOT / TEST_PROFILE):
        distill = yaml.safe_load(profile.read_text())["distill"]
        runs = [*distill["runs"], *distill["analogy_runs"]]
        expected = [f"metrics/live/distill/{run}/plots/metrics/val_cos.tsv" for run in runs]
        assert sorted(files) == sorted(expected), profile


def test_the_guided_lm_curve_names_each_lambda_of_both_profiles():
    (title,) = [t for t in charted() if t.startswith("guided LM")]
    (entry,) = [e for e in SPEC["plots"] if title in e]
    (fields,) = entry[title]["y"].values()
    for profile in (ROOT / "params.yaml", ROOT / PROFILE, ROOT / TEST_PROFILE):
        lambdas = yaml.safe_load(profile.read_text())["guided_lm"]["lambdas"]
        assert sorted(fields) == sorted(column(lam) for lam in lambdas), profile


def test_each_branch_has_a_chart_and_its_pictures_are_uncached_outputs():
    titles = " ".join(charted())
    for words in ("distill", "sidecar loss", "sidecar Jacobian", "SAE reconstruction", "SAE dead"):
        assert words in titles
    assert "metrics/live/steering/plots/metrics" in charted()
    pictures = {path: stage for path, stage in declared("outs").items() if path.endswith(".png")}
    assert pictures == {
        "metrics/plots/distill_val_curves.png": "evaluate",
        "metrics/plots/sidecar_training.png": "sidecar",
        "metrics/plots/sidecar_lm_loss.png": "sidecar",
        "metrics/plots/sae_training.png": "sae",
        "metrics/plots/sae_feature_density.png": "sae",
        "metrics/plots/steering_accuracy.png": "steering",
        "metrics/plots/guided_lm_data_efficiency.png": "guided_lm",
    }
    for name, stage in SPEC["stages"].items():
        for entry in stage.get("do", stage).get("outs", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            if path.startswith("metrics/live/"):
                # Cached: a `cache: false` plain output would cost the stage its run cache.
                assert isinstance(entry, str), (name, entry)
            elif path.startswith("metrics/"):
                assert next(iter(entry.values())) == {"cache": False}, (name, entry)
        for path in pictures:
            if pictures[path] == name:
                assert path in stage["cmd"]


def test_a_chart_of_a_file_no_stage_writes_is_caught(monkeypatch):
    """The check above fails on a plot of a path outside every output."""
    bad = {"plots": [{"x": {"y": {"metrics/live/nowhere/plots/metrics/a.tsv": "a"}}}]}
    monkeypatch.setitem(SPEC, "plots", bad["plots"])
    try:
        test_every_charted_file_lies_in_a_declared_dvclive_output_of_its_stage()
    except AssertionError as error:
        assert "is in no stage's outs" in str(error)
    else:
        raise AssertionError("a plot of an undeclared file passed")
