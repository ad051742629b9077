"""End to end through real DVC: `dvc repro`, then a one-param experiment and a metrics diff,
and params that DVC alone would not check: stage `params_check` fails on them first.

Runs the tiny profile (shrunk: fewer concepts, epochs and runs) in a temporary
git repository made the way `make demo` makes its workspace.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipeline.common.identity import folder_sha256
from pipeline.common.live import read_metric
from pipeline.common.shards import Manifest
from pipeline.demo import ROOT, TEST_PROFILE, offline_env, prepare_workspace
from tests.picture_checks import assert_picture
from tests.tables import squeeze

pytestmark = pytest.mark.slow

RUNS = {
    "frozen_h64": {"approach": "frozen_mlp", "hidden_dim": 64},
    "linear_probe": {"approach": "linear_probe"},
    "trainable_e32_h128": {"approach": "trainable", "embed_dim": 32, "hidden_dim": 128},
}


# The runs with the auxiliary analogy loss: the profile's own (a stage of their own).
AUX_RUNS = yaml.safe_load((ROOT / TEST_PROFILE).read_text())["distill"]["analogy_runs"]
AUX_STAGES = {f"distill_analogy@{n}" for n in AUX_RUNS}
# The pages over every branch: they re-run whenever a branch's results change.
PAGES = {"summary", "report"}
BRANCH_STAGES = {
    *("corpus", "trajectories", "sidecar", "activations", "sae", "mcdata", "steering"),
    "guided_lm",
}
ALL_STAGES = (
    {
        "params_check",
        "teachers",
        "wordlist",
        "directions",
        "analogies",
        "evaluate",
        "multilayer",
        "inverse",
        "cross_teacher",
    }
    | {f"distill@{n}" for n in RUNS}
    | AUX_STAGES
    | BRANCH_STAGES
    | PAGES
)


def small_profile(path: Path) -> Path:
    params = yaml.safe_load((ROOT / TEST_PROFILE).read_text())
    params["wordlist"]["num_concepts"] = 400
    params["directions"]["shard_rows"] = 128
    params["distill"]["train"]["epochs"] = 3
    params["distill"]["train"]["seeds"] = [0, 1]
    params["distill"]["runs"] = RUNS
    params["inverse"]["bootstrap_samples"] = 200
    params["cross_teacher"]["runs"] = ["linear_probe"]
    # The other branches, shrunk to seconds.
    params["corpus"]["max_chunks"] = params["trajectories"]["max_chunks"] = 32
    params["activations"]["max_chunks"] = 32
    params["sidecar"].update(max_steps=20, warmup_steps=5, eval_every=10)
    params["sae"].update(epochs=2, baselines=["pca"])
    params["mcdata"].update(max_train=64, max_val=32, max_test=32)
    params["steering"].update(bootstrap_samples=100)
    params["guided_lm"].update(steps=5, seeds=[0, 1])
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def dvc(workspace: Path, *args: str) -> str:
    done = subprocess.run(
        ["dvc", *args], cwd=workspace, env=offline_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc_fails(workspace: Path, *args: str) -> str:
    """stdout and stderr of a dvc command that must fail."""
    done = subprocess.run(
        ["dvc", *args], cwd=workspace, env=offline_env(), capture_output=True, text=True
    )
    assert done.returncode != 0, f"dvc {' '.join(args)} passed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def git(workspace: Path, *args: str) -> None:
    ident = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", *ident, *args], cwd=workspace, check=True, capture_output=True)


# `always_changed`: it runs on every repro (it resolves the model identities, local input
# files and `auto` dtypes) and `dvc status` always lists it; the stages after it re-run
# only when a file it writes changes, so the sets below leave it out.
IDENTITIES = "identities"


def stages_run(output: str) -> set[str]:
    """The stages a dvc command ran, but IDENTITIES."""
    return set(re.findall(r"Running stage '([^']+)'", output)) - {IDENTITIES}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The tiny DAG reproduced, committed, and pushed (with its run cache) to a local remote."""
    tmp = tmp_path_factory.mktemp("dag")
    workspace = prepare_workspace(tmp / "ws", small_profile(tmp / "tiny.yaml"))
    first = dvc(workspace, "repro")
    assert stages_run(first) == ALL_STAGES and f"Running stage '{IDENTITIES}'" in first
    dvc(workspace, "remote", "add", "-d", "store", str(tmp / "remote"))
    git(workspace, "add", "-A")
    git(workspace, "commit", "-q", "-m", "baseline")
    dvc(workspace, "push", "--run-cache")
    return workspace


def test_repro_writes_metrics_table_and_plot_and_is_then_cached(repo):
    metrics = json.loads((repo / "metrics" / "distill.json").read_text())
    assert set(RUNS) <= set(metrics)
    assert metrics["linear_probe"]["test_cos"] > metrics["baseline_train_mean"]["test_cos"]
    assert_picture(repo / "metrics" / "plots" / "distill_val_curves.png")
    table = squeeze((repo / "metrics" / "comparison.md").read_text())
    assert "Linear Probe" in table and "Frozen+MLP h=64" in table
    assert "| Linear Probe | 2 | " in table and metrics["linear_probe"]["num_seeds"] == 2
    assert stages_run(dvc(repo, "repro")) == set(), "a second repro must be fully cached"


def test_fresh_clone_trains_from_the_remote_without_re_extracting(repo, tmp_path):
    subprocess.run(["git", "clone", "-q", str(repo), str(tmp_path / "clone")], check=True)
    clone = tmp_path / "clone"
    out = dvc(
        clone,
        "exp",
        "run",
        "-S",
        "distill.train.epochs=2",
        "--pull",
        "--allow-missing",
    )
    distill = {f"distill@{name}" for name in RUNS}
    # multilayer and cross_teacher train with distill.train's epochs too.
    assert stages_run(out) == (
        {"params_check"}
        | distill
        | AUX_STAGES
        | {"evaluate", "multilayer", "cross_teacher"}
        | PAGES
    )
    assert not (clone / "data" / ".scratch").exists()
    metrics = json.loads((clone / "metrics" / "distill.json").read_text())
    seeds = metrics["frozen_h64"]["seeds"]
    assert sorted(seeds) == ["0", "1"] and all(s["best_epoch"] <= 2 for s in seeds.values())


def test_one_param_experiment_reruns_only_its_branch(repo):
    workspace = repo
    experiment = dvc(workspace, "exp", "run", "-S", "distill.runs.frozen_h64.hidden_dim=16")
    # cross_teacher reads distill.runs and the main teacher's rows from evaluate's metrics.
    assert stages_run(experiment) == (
        {"params_check", "distill@frozen_h64", "evaluate", "cross_teacher"} | PAGES
    )

    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert lock["stages"]["distill@frozen_h64"]["params"]["params.yaml"][
        "distill.runs.frozen_h64"
    ] == {"approach": "frozen_mlp", "hidden_dim": 16}
    config = json.loads((workspace / "data/distill/frozen_h64/config.json").read_text())
    assert config["hidden_dim"] == 16

    diff = json.loads(dvc(workspace, "metrics", "diff", "--json"))
    changed = diff["metrics/distill.json"]
    assert "frozen_h64.trainable_params" in changed
    assert (
        changed["frozen_h64.trainable_params"]["new"]
        < changed["frozen_h64.trainable_params"]["old"]
    )
    assert not any(key.startswith("linear_probe.") for key in changed), "other runs must not move"


def test_an_analogy_set_edit_reruns_only_the_runs_with_the_analogy_loss(repo):
    assert AUX_STAGES, "the profile trains a run with the auxiliary analogy loss"
    out = dvc(repo, "exp", "run", "-S", "analogies.max_per_relation=5")
    assert stages_run(out) == (
        {"params_check", "analogies", "evaluate", "cross_teacher"} | AUX_STAGES | PAGES
    )


def test_branch_params_rerun_only_their_own_stage(repo):
    out = dvc(
        repo,
        "exp",
        "run",
        "-S",
        "sidecar.force_weight=2.0",
        "-S",
        "sae.topk=8",
        "-S",
        "steering.layers=[1,2]",
    )
    assert stages_run(out) == {"params_check", "sidecar", "sae", "steering"} | PAGES
    steering = json.loads((repo / "data" / "steering" / "info.json").read_text())
    assert steering["layers"] == [1, 2]  # the run's description: beside the vectors
    sae = json.loads((repo / "data" / "sae" / "config.json").read_text())
    assert sae["topk"] == 8 and sae["sae"]["topk"] == 8


def changed_stages(workspace: Path) -> set[str]:
    """The stages `dvc status` lists, but IDENTITIES (which it always lists as such)."""
    status = json.loads(dvc(workspace, "status", "--json"))
    assert status.pop(IDENTITIES) == ["always changed"]
    return set(status)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("pipeline/kv_sidecar/losses.py", {"sidecar"}),
        (
            "pipeline/concepts/students.py",
            {f"distill@{n}" for n in RUNS}
            | AUX_STAGES
            | {"evaluate", "multilayer", "cross_teacher"},
        ),
        (
            "pipeline/common/scratch.py",
            {"directions", "trajectories", "activations", "cross_teacher"},
        ),
        ("pipeline/sparse_autoencoder/params.py", {"params_check", "activations", "sae"}),
    ],
)
def test_a_code_edit_invalidates_exactly_the_stages_that_run_it(repo, module, expected):
    before = changed_stages(repo)
    source = repo / module
    original = source.read_text()
    source.write_text(original + "\n# an edit\n")
    try:
        assert changed_stages(repo) - before == expected
    finally:
        source.write_text(original)
    assert changed_stages(repo) == before


def test_editing_the_tiny_builder_reruns_only_the_teachers_stage(repo):
    """The builder is no dep of any extraction: its edit re-runs `teachers`, whose model
    folders come out byte-identical, so DVC has nothing else to re-run."""
    source = repo / "pipeline/inputs/tiny_models.py"
    original = source.read_text()
    source.write_text(original + "\n# an edit that changes no weight\n")
    try:
        assert stages_run(dvc(repo, "repro")) == {"teachers"}
    finally:
        source.write_text(original)
    # Back to the committed code: DVC's run cache restores `teachers` without running it.
    assert stages_run(dvc(repo, "repro")) == set()
    assert changed_stages(repo) == set()


@contextmanager
def params_edited(workspace: Path, **values) -> Iterator[None]:
    """params.yaml with dotted keys set (`**{"directions.shard_rows": 0}`), then put back,
    with the params check's marker (which a failed check leaves removed)."""
    path = workspace / "params.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)
    for dotted, value in values.items():
        *parents, last = dotted.split(".")
        node = raw
        for name in parents:
            node = node[name]
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)
        dvc(workspace, "checkout", "params_check")


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_typo_in_a_key_no_stage_lists_fails_repro_in_one_line(repo):
    """DVC alone re-runs nothing for `foo: 1` ("Data and pipelines are up to date")."""
    before = changed_stages(repo)
    with params_edited(repo, foo=1):
        out = dvc_fails(repo, "repro")
        assert stages_run(out) == {"params_check"}
        (line,) = error_lines(out)
        assert line.startswith("error: params.yaml: unknown key 'foo' in the top level")
        assert line.endswith("none of them ran or lost outputs)")
    assert changed_stages(repo) == before


def test_an_invalid_value_fails_before_dvc_removes_any_output(repo):
    """Without the check, DVC removes data/directions, then the stage fails on the value."""
    directions = repo / "data" / "directions"
    files = sorted(directions.rglob("*"))
    assert files
    with params_edited(repo, **{"directions.shard_rows": 0}):
        out = dvc_fails(repo, "repro")
        assert stages_run(out) == {"params_check"}
        (line,) = error_lines(out)
        assert "params.yaml: directions.shard_rows must be > 0, got 0" in line
        assert sorted(directions.rglob("*")) == files


def test_an_edit_that_changes_no_param_reruns_the_check_alone(repo):
    """The check's output never changes, so nothing downstream sees a changed dep."""
    path = repo / "params.yaml"
    original = path.read_text()
    path.write_text(original + "\n# a note, no param\n")
    try:
        assert stages_run(dvc(repo, "repro")) == {"params_check"}
    finally:
        path.write_text(original)
    assert stages_run(dvc(repo, "repro")) == set(), "the run cache restores the check"


PICTURES = ("distill_val_curves", "sidecar_training", "sidecar_lm_loss", "sae_training")
PICTURES += ("sae_feature_density", "steering_accuracy")


def test_dvclive_folders_pictures_and_plots_of_every_branch(repo):
    live = repo / "metrics" / "live"
    for run in RUNS:  # 3 epochs, seeds 0 and 1, and their mean
        for folder in (
            live / "distill" / run,
            *(live / "distill" / run / "seeds" / s for s in "01"),
        ):
            for name in ("train_loss", "train_cos", "val_cos"):
                assert read_metric(folder, name)[0] == [1, 2, 3], (folder, name)
            assert json.loads((folder / "metrics.json").read_text())["step"] == 3
    assert read_metric(live / "sidecar", "train/loss")[0] == list(range(1, 21))
    assert read_metric(live / "sidecar", "heldout/jacobian_ratio")[0] == [10, 20]
    sae = json.loads((repo / "metrics" / "sae.json").read_text())
    assert read_metric(live / "sae", "dead_window")[0][-1] == sae["steps"]
    assert json.loads((live / "steering" / "metrics.json").read_text())["step"] >= 1
    for name in PICTURES:
        assert_picture(repo / "metrics" / "plots" / f"{name}.png")
    # `dvc plots show`: every chart renders; the only files it misses are the distill
    # overlay's runs that this shrunk profile does not train.
    shown = json.loads(dvc(repo, "plots", "show", "--json"))
    missing = {error["source"] for error in shown.get("errors", [])}
    trained = {f"metrics/live/distill/{run}/plots/metrics/val_cos.tsv" for run in RUNS}
    assert all(path.startswith("metrics/live/distill/") for path in missing), missing
    assert not missing & trained
    assert len(shown["data"]) >= 6 and all(shown["data"].values())
    # `dvc metrics show` (and so `dvc exp show`) reads each dvclive folder's step.
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]
    for folder in ("sidecar", "sae", "steering", *(f"distill/{run}" for run in RUNS)):
        assert files[f"metrics/live/{folder}/metrics.json"]["data"]["step"] >= 1


# Inputs that no param names by content: stage `identities` writes them to one file per
# stage (data/identities/<stage>.json), so after `dvc repro identities` (or as the first
# step of any `dvc repro`), `dvc status` lists exactly the stages that read a changed one.


def status_after_identities(workspace: Path) -> set[str]:
    """What a user sees: `dvc repro identities`, then `dvc status` (but IDENTITIES)."""
    dvc(workspace, "repro", IDENTITIES)
    return changed_stages(workspace)


def changed_deps(workspace: Path, stage: str) -> list:
    return json.loads(dvc(workspace, "status", "--json"))[stage]


def rewrite_a_byte(path: Path) -> None:
    """Flip the last byte of `path`, written as a new file: never through a link into
    DVC's cache."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.unlink()
    path.write_bytes(bytes(data))


def test_a_byte_of_a_local_models_weights_reruns_exactly_the_stages_that_load_it(repo, tmp_path):
    """steering.model points at a folder outside DVC (a model the user downloaded)."""
    model = tmp_path / "tiny-qwen3"
    shutil.copytree(repo / "data" / "teachers" / "tiny-qwen3", model)
    with params_edited(repo, **{"steering.model": str(model)}):
        dvc(repo, "repro", "steering")
        config = json.loads((repo / "data" / "steering" / "config.json").read_text())
        assert config["model_sha256"] == folder_sha256(model) and config["revision"] is None
        before = status_after_identities(repo)
        assert "steering" not in before
        # Must fail to re-run anything: the same weights, hashed again.
        assert status_after_identities(repo) == before
        rewrite_a_byte(model / "model.safetensors")
        assert status_after_identities(repo) - before == {"steering"}
        assert changed_deps(repo, "steering") == [
            {"changed deps": {"data/identities/steering.json": "modified"}}
        ]
    # Back to the profile's model: steering runs again (it keeps no run-cache entry: its
    # table is a `cache: false` out), to the same results.
    assert stages_run(dvc(repo, "repro")) <= {"steering"} | PAGES
    assert changed_stages(repo) == set()


def test_an_edited_file_of_a_files_corpus_reruns_the_corpus(repo, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for index in range(3):
        (texts / f"doc{index}.txt").write_text(f"document {index}: " + "the cat sat. " * 300)
    with params_edited(repo, **{"corpus.source": "files", "corpus.files": f"{texts}/*.txt"}):
        dvc(repo, "repro", "corpus")
        extra = Manifest.load(repo / "data" / "corpus").extra
        assert sorted(extra["files_sha256"]) == [str(p) for p in sorted(texts.glob("*.txt"))]
        before = status_after_identities(repo)
        assert "corpus" not in before
        assert status_after_identities(repo) == before  # must fail: no file changed
        (texts / "doc1.txt").write_text("document 1, edited: " + "a dog ran. " * 300)
        assert status_after_identities(repo) - before == {"corpus"}
        assert changed_deps(repo, "corpus") == [
            {"changed deps": {"data/identities/corpus.json": "modified"}}
        ]
    assert stages_run(dvc(repo, "repro")) == set(), "the run cache restores the corpus"
    assert changed_stages(repo) == set()


def test_an_edited_jsonl_task_file_reruns_mcdata(repo, tmp_path):
    tasks = tmp_path / "quiz.jsonl"
    rows = [
        {"context": f"question {i}:", "endings": ["one", "two", "three", "four"],
         "label": i % 4, "split": ("train", "val", "test")[i % 3]}
        for i in range(30)
    ]  # fmt: skip
    tasks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    quiz = {"source": "jsonl", "path": str(tasks), "config": None, "revision": None}
    with params_edited(repo, **{"mcdata.tasks.quiz": quiz | {"format": "hellaswag"}}):
        dvc(repo, "repro", "mcdata")
        before = status_after_identities(repo)
        assert "mcdata" not in before
        assert status_after_identities(repo) == before  # must fail: the file is unchanged
        rewrite_a_byte(tasks)
        assert status_after_identities(repo) - before == {"mcdata"}
        assert changed_deps(repo, "mcdata") == [
            {"changed deps": {"data/identities/mcdata.json": "modified"}}
        ]
    assert stages_run(dvc(repo, "repro")) == set(), "the run cache restores mcdata"
    assert changed_stages(repo) == set()


# The other missing inputs (a glob that matches nothing, a missing JSONL task file) stop
# `identities` with their own line in tests/inputs/test_identities.py; here the one real
# DVC run shows that such a stop happens before any stage but the check, and recovers.
def test_a_missing_input_file_stops_identities_in_one_line(repo):
    message = "error: model folder not found: ./models/none (steering.model)"
    with params_edited(repo, **{"steering.model": "./models/none"}):
        out = dvc_fails(repo, "repro")
        assert stages_run(out) == {"params_check"} and f"Running stage '{IDENTITIES}'" in out
        (line,) = error_lines(out)
        assert line.startswith(message), line
    # The params passed the check (DVC locked it) and identities lost its outputs: the
    # run cache restores the check, identities runs again, nothing else.
    assert stages_run(dvc(repo, "repro")) == set()
    assert changed_stages(repo) == set()
