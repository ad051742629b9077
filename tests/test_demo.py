"""`make demo`: its second concept split (finding the experiment, the side-by-side table,
on hand-written DVC output), and its workspace as a user's repo (slow: a shrunk tiny
profile through real DVC): results committed, a second run commits nothing, a queued
experiment re-runs only the stages its param changes.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from pipeline.demo import (
    experiment_commit,
    offline_env,
    prepare_workspace,
    reproduce,
    split_comparison,
)

# A distill-only param: one run's width (re-runs that run and evaluate, nothing else).
RUN_PARAM = "distill.runs.frozen_h64.hidden_dim=16"

LISTING = "master:\n\tc01ff19 [split-by-stem]\n\t9ab12cd [other]\n"


def test_the_experiment_is_found_by_name_in_dvc_exp_list_output():
    assert experiment_commit(LISTING, "split-by-stem") == "c01ff19"
    assert experiment_commit(LISTING, "other") == "9ab12cd"
    assert experiment_commit(LISTING, "split-by") is None, "a prefix is not the name"
    assert experiment_commit("", "split-by-stem") is None


def test_split_comparison_puts_old_and_new_side_by_side_best_text_split_first():
    changes = {
        "baseline_knn.test_cos": {"old": 0.50, "new": 0.525, "diff": 0.025},
        "linear_probe.test_cos": {"old": 0.70, "new": 0.65, "diff": -0.05},
        "linear_probe.test_cos_ci95_low": {"old": 0.69, "new": 0.64},
        "linear_probe.test_cos_ci95_high": {"old": 0.71, "new": 0.66},
        "linear_probe.val_cos": {"old": 0.7, "new": 0.6},  # not a test cos: not shown
        "linear_probe.seeds.0.test_cos": {"old": 0.7, "new": 0.6},  # one seed's: not shown
        "counts.test": {"old": 298, "new": 318},
    }
    assert split_comparison(changes).splitlines() == [
        "| Row | Test cos_sim, split by text | Test cos_sim, split by stem | Stem - text |",
        "|---|---|---|---|",
        "| linear_probe | 0.7000 [0.6900, 0.7100] | 0.6500 [0.6400, 0.6600] | -0.0500 |",
        "| baseline_knn | 0.5000 | 0.5250 | +0.0250 |",
    ]


# The session's demo-like workspace: built once, shared by the slow tests here and in
# tests/test_readme.py (each leaves it with a clean git status).
_WORKSPACE: list[Path] = []


def demo_like_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shrunk tiny profile of tests/test_dvc_pipeline.py in a workspace made and
    reproduced the way `make demo` makes its own (project committed, `dvc repro`, results
    committed); one per session."""
    if not _WORKSPACE:
        from tests.test_dvc_pipeline import small_profile

        tmp = tmp_path_factory.mktemp("demo")
        workspace = prepare_workspace(tmp / "ws", small_profile(tmp / "tiny.yaml"))
        reproduce(workspace, offline_env())
        _WORKSPACE.append(workspace)
    return _WORKSPACE[0]


def dvc(workspace: Path, *args: str) -> str:
    done = subprocess.run(
        ["dvc", *args], cwd=workspace, env=offline_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def git_status(workspace: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain"], cwd=workspace, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return demo_like_workspace(tmp_path_factory)


@pytest.mark.slow
def test_the_workspace_commits_its_results_and_a_second_run_commits_nothing(workspace):
    assert git_status(workspace) == "", "dvc.lock and metrics/ are committed"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=workspace, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert {"dvc.lock", "metrics/distill.json", "metrics/summary.md", "data/.gitignore"} <= set(
        tracked
    )
    # What a second `make demo` does: the project copied again, `dvc repro`; the copy
    # commits only what changed in the project since (nothing, unless it was edited).
    prepare_workspace(workspace, workspace.parent / "tiny.yaml")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True
    ).stdout
    reproduce(workspace, offline_env())
    assert git_status(workspace) == ""
    after = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True
    ).stdout
    assert after == head, "nothing changed: no commit"


@pytest.mark.slow
def test_a_queued_distill_experiment_reruns_only_distill_and_diffs_only_its_metrics(workspace):
    dvc(workspace, "exp", "run", "--queue", "-n", "h64-16", "-S", RUN_PARAM)
    out = dvc(workspace, "exp", "run", "--run-all")
    logs = dvc(workspace, "queue", "logs", "h64-16")
    ran = set(re.findall(r"Running stage '([^']+)'", logs))
    # cross_teacher reads metrics/distill.json (the main teacher's rows of its table).
    expected = {"params_check", "identities", "distill@frozen_h64", "evaluate", "cross_teacher"}
    expected |= {"summary", "report"}
    assert ran == expected, logs
    assert "No file hash info found" not in out + logs
    assert git_status(workspace) == "", "a queued experiment leaves the workspace as it was"

    diff = json.loads(dvc(workspace, "metrics", "diff", "HEAD", "h64-16", "--json"))
    # The run's own dvclive curves (its last epoch) change with it, no other run's.
    live = "metrics/live/distill/frozen_h64/metrics.json"
    assert set(diff) <= {"metrics/distill.json", "metrics/summary.json", live}
    changed = diff["metrics/distill.json"]
    assert (
        changed["frozen_h64.trainable_params"]["new"]
        < changed["frozen_h64.trainable_params"]["old"]
    )
    entries = [entry for metrics in diff.values() for entry in metrics.values()]
    assert all(entry["old"] != entry["new"] for entry in entries), "only changed ones"
    assert not any(key.startswith(("linear_probe.", "baseline_")) for key in changed)
    params = json.loads(dvc(workspace, "params", "diff", "HEAD", "h64-16", "--json"))
    assert params == {
        "params.yaml": {
            "distill.runs.frozen_h64.hidden_dim": {"old": 64, "new": 16, "diff": -48},
        }
    }
