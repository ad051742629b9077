"""Stage `identities` on the tiny profile with the tiny teachers: one file per stage,
each holding exactly the inputs that stage reads; bad inputs stop it in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.common.identity import folder_sha256
from pipeline.common.params import load_params
from pipeline.common.shards import sha256_file
from pipeline.demo import ROOT, TEST_PROFILE
from pipeline.inputs import identities
from tests.tiny_teachers import tiny_teacher

PROFILE_TASKS = yaml.safe_load((ROOT / TEST_PROFILE).read_text())["mcdata"]["tasks"]


def write_params(tmp_path: Path, **sections) -> Path:
    """profiles/tiny.yaml on the tiny teachers, with `sections` updated key by key."""
    raw = yaml.safe_load((ROOT / TEST_PROFILE).read_text())
    raw["directions"]["model"] = raw["steering"]["model"] = tiny_teacher("qwen3")
    for name in ("corpus", "trajectories", "activations", "cross_teacher"):
        raw[name]["model"] = tiny_teacher("llama")
    for name, values in sections.items():
        raw[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}


def test_each_stage_gets_the_identities_of_what_it_loads_and_nothing_else(tmp_path):
    out = tmp_path / "identities"
    identities.run(load_params(write_params(tmp_path)), out)
    files = read(out)
    qwen3 = {
        "model": tiny_teacher("qwen3"),
        "revision": None,
        "sha256": folder_sha256(Path(tiny_teacher("qwen3"))),
    }
    llama = {"model": tiny_teacher("llama"), "revision": None,
             "sha256": folder_sha256(Path(tiny_teacher("llama")))}  # fmt: skip
    assert files == {
        "directions": {"directions.model": qwen3, "directions.compute_dtype": "float32"},
        "corpus": {"corpus.model": llama},
        "trajectories": {"trajectories.model": llama, "trajectories.compute_dtype": "float32"},
        "sidecar": {"trajectories.model": llama},
        "activations": {"activations.model": llama, "activations.compute_dtype": "float32"},
        "sae": {"activations.model": llama},
        "cross_teacher": {"cross_teacher.model": llama, "cross_teacher.compute_dtype": "float32"},
        "steering": {"steering.model": qwen3, "steering.dtype": "float32"},
        "guided_lm": {"corpus.model": llama},
        "mcdata": {},
    }


def test_files_corpus_jsonl_tasks_auto_dtype_and_a_directions_sae(tmp_path, monkeypatch):
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("b.txt", "a.txt"):
        (texts / name).write_text(f"text of {name}")
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text('{"context": "q", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    tasks = PROFILE_TASKS | {"quiz": {"source": "jsonl", "path": str(quiz)}}
    monkeypatch.setattr("pipeline.common.identity.cpu_flags", lambda: {"avx2"})
    path = write_params(
        tmp_path,
        corpus={"source": "files", "files": f"{texts}/*.txt"},
        mcdata={"tasks": tasks},
        directions={"compute_dtype": "auto", "device": "cpu"},
        sae={"input": "directions", "layer": 3},
    )
    identities.run(load_params(path), tmp_path / "out")
    files = read(tmp_path / "out")
    assert files["corpus"]["corpus.files"] == {
        str(texts / "a.txt"): sha256_file(texts / "a.txt"),
        str(texts / "b.txt"): sha256_file(texts / "b.txt"),
    }
    assert files["mcdata"] == {"mcdata.tasks.quiz.path": {str(quiz): sha256_file(quiz)}}
    assert files["directions"]["directions.compute_dtype"] == "float32"  # avx2 only
    assert files["sae"] == {}, "a directions SAE loads no model"


def test_a_skipped_cross_teacher_loads_no_model(tmp_path):
    identities.run(load_params(write_params(tmp_path, cross_teacher={"model": None})), tmp_path)
    assert read(tmp_path)["cross_teacher"] == {}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"corpus": {"source": "files", "files": "nowhere/*.txt"}},
         "corpus.files='nowhere/*.txt' matches no file"),
        ({"mcdata": {"tasks": PROFILE_TASKS | {"quiz": {"source": "jsonl",
                                                        "path": "nowhere.jsonl"}}}},
         "mcdata.tasks.quiz.path='nowhere.jsonl': multiple-choice JSONL file not found"),
        ({"steering": {"model": "./models/none"}},
         "model folder not found: ./models/none (steering.model)"),
    ],
)  # fmt: skip
def test_a_missing_input_names_its_key_and_path(tmp_path, sections, message):
    params = load_params(write_params(tmp_path, **sections))
    with pytest.raises(FileNotFoundError) as err:
        identities.run(params, tmp_path / "out")
    assert str(err.value) == message


def test_the_log_line_names_each_model_once_and_counts_hashed_files():
    commit, digest = "a" * 40, "b" * 64
    hub = {"model": "Qwen/Qwen3-0.6B", "revision": commit, "sha256": None}
    local = {"model": "models/tiny", "revision": None, "sha256": digest}
    inputs = {
        "directions": {"directions.model": hub, "directions.compute_dtype": "bfloat16"},
        "steering": {"steering.model": hub},
        "corpus": {"corpus.model": local, "corpus.files": {"a.txt": digest, "b.txt": digest}},
        "sae": {},
    }
    assert identities.described(inputs) == [
        "Qwen/Qwen3-0.6B commit aaaaaaaaaaaa",
        "directions.compute_dtype=bfloat16",
        "models/tiny sha256 bbbbbbbbbbbb",
        "corpus.files: 2 file(s) hashed",
    ]


QWEN = "Qwen/Qwen3-0.6B"


def run_stage_in_a_fresh_process(tmp_path: Path, hub_cache: Path) -> subprocess.CompletedProcess:
    """Stage `identities` as DVC runs it: a new interpreter, so no earlier import has loaded
    any huggingface_hub submodule for it; offline, against the cache `hub_cache`."""
    params = write_params(tmp_path, directions={"model": QWEN})
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    command = [sys.executable, "-m", "pipeline.cli", "identities", "--params", str(params),
               "--out", str(tmp_path / "out")]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_a_hub_id_resolves_from_the_cache_in_a_fresh_process(tmp_path):
    commit = "c1899de289a04d12100db370d81485cdf75e47ca"
    cache = tmp_path / "hub"
    snapshot = cache / "models--Qwen--Qwen3-0.6B" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "qwen3"}')
    (cache / "models--Qwen--Qwen3-0.6B" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-0.6B" / "refs" / "main").write_text(commit)
    done = run_stage_in_a_fresh_process(tmp_path, cache)
    assert done.returncode == 0, done.stderr[-2000:]
    found = read(tmp_path / "out")["directions"]["directions.model"]
    assert found == {"model": QWEN, "revision": commit, "sha256": None}


@pytest.mark.slow
def test_a_hub_id_missing_from_the_cache_fails_in_one_line_naming_the_key(tmp_path):
    (tmp_path / "empty-hub").mkdir()
    done = run_stage_in_a_fresh_process(tmp_path, tmp_path / "empty-hub")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: directions.model='{QWEN}': revision 'main' is not in the ")
    assert f"`hf download {QWEN} --local-dir models/qwen3-0.6b`" in line
