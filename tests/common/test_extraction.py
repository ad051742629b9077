"""The extraction runner, through each of its three stages: resumption, ranks, fingerprint, errors.

Each stage runs on tiny inputs built by the real upstream stages (wordlist, corpus).
A crash is simulated by a `Scratch.write` that raises once some shards are in place;
the slow tests kill a real subprocess instead, and run torchrun with gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.common.distributed import World
from pipeline.common.scratch import SCRATCH, Scratch
from pipeline.common.shards import MANIFEST, Manifest, read_shard
from pipeline.common.teacher import TeacherLoadError
from pipeline.concepts import directions
from pipeline.concepts.params import DirectionsParams
from pipeline.inputs import corpus, wordlist
from pipeline.inputs.params import CorpusParams, WordlistParams
from pipeline.inputs.words import CONCEPTS_FILE
from pipeline.kv_sidecar import trajectories
from pipeline.kv_sidecar.params import TrajectoriesParams
from pipeline.sparse_autoencoder import activations
from pipeline.sparse_autoencoder.params import ActivationsParams
from tests.tiny_teachers import tiny_teacher

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 17  # trajectories: 2 windows of 6 tokens + 4 future positions + 1
UNREACHABLE = "no-such-org/no-such-model"


@dataclass(frozen=True)
class Stage:
    """One extraction stage, with the tiny inputs and params its runs here use."""

    module: ModuleType
    params_class: type
    recipe: str
    """The tiny teacher it runs (`tiny_teacher(recipe)` is its model folder)."""
    settings: dict
    """With the teacher: params of a quick run with at least 3 shards."""
    many_shards: dict
    """Params of a run long enough (tens of shards) for a kill to land inside it."""
    neutral: dict
    """Result-neutral overrides: the same shards."""
    changed: dict
    """An override that changes the stored values."""
    too_deep: dict
    too_deep_error: str
    input_kind: str  # "wordlist" or "corpus"
    seeds: dict = field(default_factory=dict)

    @property
    def base(self) -> dict:
        return {"model": tiny_teacher(self.recipe)} | self.settings

    @property
    def name(self) -> str:
        return self.module.__name__.rpartition(".")[2]

    def params(self, **overrides):
        return self.params_class(**(self.base | overrides))

    def run(self, params, source: Path, out: Path) -> dict:
        return self.module.run(params, source, out)


GEOMETRY = dict(window_size=6, num_windows=2, num_queries=4)
STAGES = [
    Stage(
        directions,
        DirectionsParams,
        "qwen3",
        settings=dict(layers=(2, 4), compute_dtype="float32", shard_rows=3,
                  batch_size=4, templates=("{concept}", 'The word "{concept}" means')),
        many_shards=dict(layers=(2,), shard_rows=16,
                         templates=("{concept}", "The word {concept}", "A {concept}")),
        neutral=dict(batch_size=1, device="cpu", padding_side="right"),
        changed=dict(layers=(2,)),
        too_deep=dict(layers=(2, 9)),
        too_deep_error=r"directions\.layers holds \[9\] but \S*tiny-qwen3 has 4 layers",
        input_kind="wordlist",
    ),
    Stage(
        trajectories,
        TrajectoriesParams,
        "llama",
        settings=GEOMETRY | dict(layers=(0, 3), max_chunks=10, shard_rows=3,
                             compute_dtype="float32", batch_size=2),
        many_shards=dict(layers="all", max_chunks=48, shard_rows=2, batch_size=1),
        neutral=dict(batch_size=1, device="cpu"),
        changed=dict(layers=(0,)),
        too_deep=dict(layers=(1, 4)),
        too_deep_error=r"trajectories\.layers holds \[4\] but the model has 4 decoder blocks",
        input_kind="corpus",
    ),
    Stage(
        activations,
        ActivationsParams,
        "llama",
        settings=dict(layers=(2, 4), positions="all", compute_dtype="float32",
                  shard_rows=2 * CHUNK, batch_size=2, max_chunks=10),
        many_shards=dict(layers=(1, 2, 3, 4), max_chunks=48, shard_rows=CHUNK, batch_size=1),
        neutral=dict(batch_size=1, device="cpu"),
        changed=dict(layers=(2,)),
        too_deep=dict(layers=(2, 9)),
        too_deep_error=r"activations\.layers holds \[9\] but \S*tiny-llama has 4 layers",
        input_kind="corpus",
    ),
]  # fmt: skip
by_name = pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """inputs(stage, variant=0, size="small"): the stage's input, built once per variant."""
    built: dict[tuple, Path] = {}

    def get(stage: Stage, variant: int = 0, size: str = "small") -> Path:
        key = (stage.input_kind, variant, size)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{stage.input_kind}-{variant}-{size}")
            built[key] = make_input(stage.input_kind, folder, variant, size)
        return built[key]

    return get


def make_input(kind: str, folder: Path, variant: int, size: str) -> Path:
    """A wordlist or corpus; another `variant`: another file, as many shards."""
    if kind == "wordlist":
        count = {"small": 8, "large": 640}[size] + variant
        params = WordlistParams(source="wordfreq", num_concepts=count)
        wordlist.run(params, folder)
        return folder / CONCEPTS_FILE
    count = {"small": 12, "large": 48}[size]
    params = CorpusParams(
        source="builtin",
        model=tiny_teacher("llama"),
        chunk_tokens=CHUNK,
        max_chunks=count,
        seed=variant,
    )
    corpus.run(params, folder / "corpus")
    return folder / "corpus"


class Crash(Exception):
    pass


def crash_after(monkeypatch, shards: int) -> None:
    """From now on, a scratch write raises once `shards` shards are in its folder."""
    write = Scratch.write

    def write_then_crash(self, *args, **kwargs):
        record = write(self, *args, **kwargs)
        if len(list(self.folder.glob("shard-*.json"))) >= shards:
            raise Crash(f"simulated crash after {shards} shards")
        return record

    monkeypatch.setattr(Scratch, "write", write_then_crash)


def crashed_run(stage: Stage, params, source: Path, out: Path, monkeypatch, shards=2) -> Path:
    """Run until `shards` shards are done, crash, and return the scratch folder left behind."""
    with monkeypatch.context() as patch:
        crash_after(patch, shards)
        with pytest.raises(Crash):
            stage.run(params, source, out)
    assert not out.exists()
    [folder] = scratch_folders(out)
    assert len(list(folder.glob("shard-*.json"))) == shards
    return folder


def scratch_folders(out: Path) -> list[Path]:
    return sorted((out.parent / SCRATCH).glob(f"{out.name}-*"))


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def assert_same_output(a: Path, b: Path) -> None:
    """Byte-identical shards and side files, the same manifest apart from library versions."""
    one, two = Manifest.load(a), Manifest.load(b)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert {k: v.sha256 for k, v in one.files.items()} == {
        k: v.sha256 for k, v in two.files.items()
    }
    assert (one.kind, one.params, one.extra) == (two.kind, two.params, two.extra)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def with_model(source: Path, model: str, folder: Path) -> Path:
    """A copy of a corpus whose manifest says it was tokenized for `model`."""
    copy = shutil.copytree(source, folder / "corpus")
    manifest = Manifest.load(copy)
    manifest.extra["model"] = model
    manifest.save(copy)
    return copy


def test_each_shard_has_exactly_one_owner():
    for size in (1, 2, 3, 5):
        owned = [World(rank, size).owned_shards(7) for rank in range(size)]
        assert sorted(i for shards in owned for i in shards) == list(range(7))
    assert World(1, 3).owned_shards(7) == [1, 4]


@by_name
def test_a_tampered_scratch_shard_is_recomputed_not_reused(stage, inputs, tmp_path, monkeypatch):
    source = inputs(stage)
    stage.run(stage.params(), source, tmp_path / "clean")
    out = tmp_path / "out"
    folder = crashed_run(stage, stage.params(), source, out, monkeypatch)
    flip_a_byte(folder / "shard-00001.safetensors")
    # A shard write that a kill cut short leaves a file under its temporary name.
    (folder / ".shard-00002.safetensors.tmp-999999").write_bytes(b"half a shard")
    stats = stage.run(stage.params(), source, out)
    assert stats["reused_shards"] == 1 and stats["shards"] >= 3
    assert_same_output(out, tmp_path / "clean")
    assert not scratch_folders(out) and not (tmp_path / SCRATCH).exists()
    # The published shard is verified on every read.
    flip_a_byte(out / "shard-00001.safetensors")
    with pytest.raises(ValueError, match="shard-00001.safetensors is corrupt"):
        read_shard(out, Manifest.load(out).shards[1])


@by_name
def test_result_neutral_knobs_resume_from_the_same_shards(stage, inputs, tmp_path, monkeypatch):
    source, out = inputs(stage), tmp_path / "out"
    crashed_run(stage, stage.params(), source, out, monkeypatch)
    stats = stage.run(stage.params(**stage.neutral), source, out)
    assert stats["reused_shards"] == 2
    assert Manifest.load(out).params["batch_size"] == stage.neutral["batch_size"]
    assert not scratch_folders(out)


@by_name
def test_a_changed_param_or_input_file_never_reuses_a_shard(stage, inputs, tmp_path, monkeypatch):
    source, out = inputs(stage), tmp_path / "out"
    crashed = crashed_run(stage, stage.params(), source, out, monkeypatch)
    assert stage.run(stage.params(**stage.changed), source, out)["reused_shards"] == 0
    assert stage.run(stage.params(), inputs(stage, variant=1), out)["reused_shards"] == 0
    assert scratch_folders(out) == [crashed], "the crashed run's shards are kept for their params"
    # Its own params on its own input resume from them.
    assert stage.run(stage.params(), source, out)["reused_shards"] == 2
    assert not scratch_folders(out)


@by_name
def test_a_layer_beyond_the_depth_names_the_key_before_writing(stage, inputs, tmp_path):
    with pytest.raises(ValueError, match=stage.too_deep_error):
        stage.run(stage.params(**stage.too_deep), inputs(stage), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / SCRATCH).exists()


@by_name
def test_an_unreachable_model_names_it_and_the_way_out(stage, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = inputs(stage)
    if stage.input_kind == "corpus":  # the corpus must have been tokenized for that model
        source = with_model(source, UNREACHABLE, tmp_path)
    with pytest.raises(TeacherLoadError, match=f"(?s){UNREACHABLE}.*make demo"):
        stage.run(stage.params(model=UNREACHABLE), source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / SCRATCH).exists()


# --- slow: a real SIGKILL, and torchrun with two processes ---

SCRIPT = """
import importlib, json, sys
from pathlib import Path
from pipeline.common.params import build
stage, params_class, section, raw, source, out = sys.argv[1:]
module, _, name = params_class.partition(":")
params = build(getattr(importlib.import_module(module), name), json.loads(raw), section)
print(json.dumps(importlib.import_module(stage).run(params, Path(source), Path(out))))
"""


def script_args(stage: Stage, params: dict, source: Path) -> list[str]:
    """The SCRIPT's arguments but the output folder: it prints the stats as JSON."""
    params_class = f"{stage.params_class.__module__}:{stage.params_class.__name__}"
    raw = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})
    return [stage.module.__name__, params_class, stage.name, raw, str(source)]


def printed_stats(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
@by_name
def test_sigkill_then_rerun_matches_an_uninterrupted_run(stage, inputs, tmp_path):
    params = stage.base | stage.many_shards
    args = script_args(stage, params, inputs(stage, size="large"))

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-c", SCRIPT, *args, str(out)]

    out = tmp_path / "killed" / stage.name
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    scratch = out.parent / SCRATCH
    deadline = time.time() + 300
    while not list(scratch.glob("*/shard-00001.safetensors.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before shard 1"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(scratch.glob("*/shard-*.json")))
    clean = tmp_path / "clean" / stage.name
    done = subprocess.run(cmd(clean), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [reference] = printed_stats(done.stdout)
    assert not out.exists() and 0 < finished < reference["shards"], (
        f"the kill landed after {finished} of {reference['shards']} shards"
    )

    rerun = subprocess.run(cmd(out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    [stats] = printed_stats(rerun.stdout)
    assert stats["reused_shards"] == finished
    assert not scratch.exists()
    assert_same_output(out, clean)


@pytest.mark.slow
@by_name
def test_torchrun_world_size_two_equals_world_size_one(stage, inputs, tmp_path):
    script = tmp_path / "run_stage.py"
    script.write_text(SCRIPT)
    args = [str(script), *script_args(stage, stage.base, inputs(stage))]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]  # fmt: skip
    two = subprocess.run([*torchrun, *args, str(tmp_path / "two")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    [alone] = printed_stats(one.stdout)
    ranks = sorted(printed_stats(two.stdout), key=lambda stats: stats.get("rank", 0))
    assert alone["world_size"] == 1 and alone["shards"] >= 3
    assert [stats.get("world_size") for stats in ranks] == [2, None]
    assert ranks[1]["rank"] == 1 and ranks[1]["shards"] == alone["shards"] // 2
    assert_same_output(tmp_path / "one", tmp_path / "two")
    assert MANIFEST in {p.name for p in (tmp_path / "two").iterdir()}
