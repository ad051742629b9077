"""The extraction runner, through each of its three stages: resumption, ranks, fingerprint, errors.

Each stage runs on tiny inputs built by the real upstream stages (wordlist, corpus).
A crash is simulated by a `Scratch.write` that raises once some shards are in place;
the slow tests kill a real subprocess instead, and run torchrun with gloo on the CPU.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from safetensors import SafetensorError

from pipeline.common import shards
from pipeline.common.code_deps import code_fingerprint, dvc_stage_deps, stage_closure
from pipeline.common.distributed import World
from pipeline.common.identity import ModelIdentity, folder_sha256
from pipeline.common.scratch import SCRATCH, Scratch
from pipeline.common.shards import MANIFEST, Manifest, read_shard
from pipeline.concepts import directions
from pipeline.concepts.params import DirectionsParams
from pipeline.demo import project_files
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
        neutral=dict(batch_size=1, device="cpu", padding_side="right", num_threads=1),
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
        neutral=dict(batch_size=1, device="cpu", num_threads=1),
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
        neutral=dict(batch_size=1, device="cpu", num_threads=1),
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
    before = set(scratch_folders(out))
    with monkeypatch.context() as patch:
        crash_after(patch, shards)
        with pytest.raises(Crash):
            stage.run(params, source, out)
    [folder] = set(scratch_folders(out)) - before
    assert len(list(folder.glob("shard-*.json"))) == shards
    return folder


def scratch_folders(out: Path) -> list[Path]:
    return sorted(p for p in (out.parent / SCRATCH).glob(f"{out.name}-*") if p.is_dir())


def dvc_listing(folder: Path) -> tuple[int, str]:
    """What `dvc add` hashes a folder by: its file count and the md5 of its (relpath, md5) list."""
    entries = [
        {
            "md5": hashlib.md5(path.read_bytes()).hexdigest(),
            "relpath": path.relative_to(folder).as_posix(),
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    return len(entries), hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def listed_files(folder: Path) -> list[str]:
    """What the manifest in `folder` lists, and the manifest itself."""
    manifest = Manifest.load(folder)
    return sorted([MANIFEST, *(r.file for r in [*manifest.shards, *manifest.files.values()])])


def project_copy(folder: Path) -> Path:
    """A copy of the project's files (tracked and untracked-but-not-ignored) in `folder`."""
    for rel in project_files(ROOT):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, folder / rel)
    return folder


def append_a_comment(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit that changes no behaviour\n")


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
def test_a_changed_param_or_input_file_never_reuses_a_shard(
    stage, inputs, tmp_path, monkeypatch, caplog
):
    source, out = inputs(stage), tmp_path / "out"
    crashed = crashed_run(stage, stage.params(), source, out, monkeypatch)
    with caplog.at_level(logging.INFO):
        assert stage.run(stage.params(**stage.changed), source, out)["reused_shards"] == 0
    # Publishing frees the scratch folders of this output's older inputs.
    assert not scratch_folders(out) and f"removed {crashed}, a scratch folder" in caplog.text
    assert crashed_run(stage, stage.params(), source, out, monkeypatch) == crashed
    assert stage.run(stage.params(), inputs(stage, variant=1), out)["reused_shards"] == 0
    assert not scratch_folders(out)
    # Its own params on its own input resume from its shards.
    crashed_run(stage, stage.params(), source, out, monkeypatch)
    crashed_run(stage, stage.params(**stage.changed), source, out, monkeypatch, shards=1)
    assert stage.run(stage.params(), source, out)["reused_shards"] == 2
    assert not scratch_folders(out)


@by_name
def test_rewritten_weights_never_reuse_a_shard_and_the_manifest_names_them(
    stage, inputs, tmp_path, monkeypatch
):
    """The model folder's content hash enters the fingerprint: a byte of the weights
    rewritten starts afresh, the same weights resume."""
    params, source, out = stage.params(), inputs(stage), tmp_path / "out"
    model = Path(params.model)
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    crashed_run(stage, params, source, out, monkeypatch)
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert stage.run(params, source, out)["reused_shards"] == 0
        extra = Manifest.load(out).extra
        assert extra["model_sha256"] == folder_sha256(model) and extra["revision"] is None
        crashed_run(stage, params, source, out, monkeypatch)
        assert stage.run(params, source, out)["reused_shards"] == 2
    finally:
        weights.write_bytes(original)


@by_name
def test_the_fingerprint_covers_the_stage_closure_and_nothing_else(stage, tmp_path):
    module = stage.module.__name__
    model = ModelIdentity(stage.base["model"], None, "0" * 64)
    inputs = stage.module.EXTRACTION.fingerprint_inputs(stage.params(), {}, model)
    assert inputs["model"] == model.as_dict()
    assert inputs["code"] == code_fingerprint(module)
    assert sorted(inputs["code"]) == stage_closure(module) == [
        d for d in dvc_stage_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text()), stage.name)
        if d.endswith(".py")
    ]  # fmt: skip
    copy = project_copy(tmp_path)
    before = code_fingerprint(module, copy)
    assert before == inputs["code"], "a copy of the project runs the same code"
    for outside in ("pipeline/steering_vectors/steering.py", "pipeline/demo.py", "README.md"):
        assert outside not in before
        append_a_comment(copy / outside)
        assert code_fingerprint(module, copy) == before, f"{outside} is not run by {stage.name}"
    for inside in ("pipeline/common/shards.py", stage.module.__file__):
        rel = str(Path(inside).relative_to(ROOT) if Path(inside).is_absolute() else inside)
        append_a_comment(copy / rel)
        after = code_fingerprint(module, copy)
        assert [name for name in after if after[name] != before[name]] == [rel]
        before = after


@by_name
def test_publish_leaves_exactly_what_the_manifest_lists(
    stage, inputs, tmp_path, monkeypatch, caplog
):
    source = inputs(stage)
    stage.run(stage.params(), source, tmp_path / "clean")
    out = tmp_path / "out"
    folder = crashed_run(stage, stage.params(), source, out, monkeypatch)
    # What a kill can leave: a shard and a record cut short, a side file half-written.
    (folder / ".shard-00002.safetensors.tmp-999999").write_bytes(b"half a shard")
    (folder / ".shard-00001.safetensors.json.tmp-999999").write_text('{"fi')
    (folder / ".manifest.json.tmp-999999").write_text("{")
    (folder / "notes.txt").write_text("left by hand")
    (folder / "stray").mkdir()
    (folder / "stray" / "x.bin").write_bytes(b"x")
    with caplog.at_level(logging.INFO):
        assert stage.run(stage.params(), source, out)["reused_shards"] == 2
    assert sorted(p.name for p in out.iterdir()) == listed_files(out)
    assert "5 files the manifest does not list" in caplog.text and "notes.txt" in caplog.text
    assert dvc_listing(out) == dvc_listing(tmp_path / "clean")
    assert not (tmp_path / SCRATCH).exists()


@by_name
def test_a_second_extractor_on_the_same_scratch_folder_stops_at_once(
    stage, inputs, tmp_path, monkeypatch
):
    source, out = inputs(stage), tmp_path / "out"
    folder = crashed_run(stage, stage.params(), source, out, monkeypatch)
    with Scratch(folder, out).locked():
        with pytest.raises(RuntimeError, match=rf"{folder.name} is in use by another extractor "
                           rf"\(PID {os.getpid()}\)"):  # fmt: skip
            stage.run(stage.params(), source, out)
        assert len(list(folder.glob("shard-*.json"))) == 2 and not out.exists()
    assert stage.run(stage.params(), source, out)["reused_shards"] == 2


def full_disk_at(monkeypatch, name: str) -> None:
    """From now on, saving the tensors of `name` writes half a file, then finds the disk full."""
    save = shards.save_tensors

    def save_or_fail(tensors, path: Path) -> None:
        if not path.name.startswith(f".{name}.tmp-"):
            return save(tensors, path)
        path.write_bytes(b"half a shard")
        raise SafetensorError(
            f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})"
        )

    monkeypatch.setattr(shards, "save_tensors", save_or_fail)


FULL = (
    r"^{stage}: no space left on device writing (?P<file>\S+): the run planned "
    r"(?P<planned>[\d,]+) bytes of shards and (?P<free>[\d,]+) bytes are free on that "
    r"filesystem; free some space and re-run \(finished shards are kept and reused\)$"
)
PLANNED = r"planned shards (?P<planned>[\d,]+) bytes"


def assert_nothing_half_written(out: Path) -> None:
    [folder] = scratch_folders(out)
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert all(
        Scratch(folder, out).completed(int(p.name[6:11])) for p in folder.glob("shard-*.json")
    )


@by_name
def test_a_full_disk_names_the_file_and_the_space_and_the_rerun_resumes(
    stage, inputs, tmp_path, monkeypatch, caplog
):
    source, out = inputs(stage), tmp_path / "out"
    stage.run(stage.params(), source, tmp_path / "clean")
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
        full_disk_at(patch, "shard-00002.safetensors")
        with pytest.raises(RuntimeError) as raised:
            stage.run(stage.params(), source, out)
    found = re.match(FULL.format(stage=stage.name), str(raised.value))
    assert found, str(raised.value)
    [folder] = scratch_folders(out)
    assert found["file"] == str(folder / "shard-00002.safetensors")
    assert found["planned"] == re.search(PLANNED, caplog.text)["planned"]
    free = shutil.disk_usage(tmp_path).free
    assert abs(int(found["free"].replace(",", "")) - free) < 0.01 * free
    assert_nothing_half_written(out)
    assert sorted(p.name for p in folder.glob("shard-*.json")) == [
        "shard-00000.safetensors.json", "shard-00001.safetensors.json"
    ]  # fmt: skip
    assert stage.run(stage.params(), source, out)["reused_shards"] == 2
    assert dvc_listing(out) == dvc_listing(tmp_path / "clean")


@by_name
def test_a_real_full_filesystem_stops_cleanly_and_resumes(
    stage, inputs, tmp_path, small_filesystem, fill_up
):
    source, out = inputs(stage), small_filesystem / "out"
    stage.run(stage.params(), source, tmp_path / "clean")
    # Room for shard 0, its record, the lock and the inputs, and not for every shard.
    shard_0 = (tmp_path / "clean" / "shard-00000.safetensors").stat().st_size
    filler = fill_up(small_filesystem, leave_bytes=-(-shard_0 // 4096) * 4096 + 4 * 4096)
    with pytest.raises(RuntimeError) as raised:
        stage.run(stage.params(), source, out)
    found = re.match(FULL.format(stage=stage.name), str(raised.value))
    assert found and found["file"].startswith(str(small_filesystem)), str(raised.value)
    assert not out.exists()
    assert_nothing_half_written(out)
    filler.unlink()
    stats = stage.run(stage.params(), source, out)
    assert stats["shards"] >= 3 and stats["reused_shards"] >= 1
    assert dvc_listing(out) == dvc_listing(tmp_path / "clean")


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
    key = f"{stage.name}.model={UNREACHABLE!r}"
    with pytest.raises(OSError, match=f"(?s)^{re.escape(key)}.*make demo"):
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
stats = importlib.import_module(stage).run(params, Path(source), Path(out))
root = Path(importlib.import_module("pipeline").__file__).resolve().parents[1]
ran = [Path(m.__file__).resolve() for n, m in sys.modules.items() if n.split(".")[0] == "pipeline"]
# One write per line: torchrun's ranks share the pipe, unbuffered.
sys.stdout.write(json.dumps(stats) + "\\n")
sys.stdout.write("ran " + json.dumps(sorted(str(path.relative_to(root)) for path in ran)) + "\\n")
"""


def script_args(stage: Stage, params: dict, source: Path) -> list[str]:
    """The SCRIPT's arguments but the output folder: it prints the stats as JSON."""
    params_class = f"{stage.params_class.__module__}:{stage.params_class.__name__}"
    raw = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})
    return [stage.module.__name__, params_class, stage.name, raw, str(source)]


def printed_stats(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def printed_modules(stdout: str) -> list[str]:
    """The project files whose modules the SCRIPT's run imported."""
    [line] = [line for line in stdout.splitlines() if line.startswith("ran ")]
    return json.loads(line.removeprefix("ran "))


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def killed_after_shard_1(cmd: list[str], out: Path, root: Path = ROOT) -> int:
    """Run `cmd` (the SCRIPT into `out`) from `root`, SIGKILL it once shard 1 is done.

    Returns how many shards it had finished; their scratch folder is left behind.
    """
    env = ENV | {"PYTHONPATH": str(root)}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    scratch = out.parent / SCRATCH
    deadline = time.time() + 300
    while not list(scratch.glob("*/shard-00001.safetensors.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before shard 1"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    return len(list(scratch.glob("*/shard-*.json")))


def dvc_add(repo: Path, *folders: Path) -> list[dict]:
    """What real `dvc add` records for each folder (md5, nfiles, size), in a new repo `repo`."""
    dvc = [str(Path(sys.executable).parent / "dvc")]
    env = ENV | {"DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=repo, env=env, check=True)
    subprocess.run([*dvc, "add", "-q", *map(str, folders)], cwd=repo, env=env, check=True)
    outs = [
        yaml.safe_load(folder.with_name(f"{folder.name}.dvc").read_text()) for folder in folders
    ]
    return [{k: out["outs"][0][k] for k in ("md5", "nfiles", "size")} for out in outs]


@pytest.mark.slow
@by_name
def test_sigkill_then_rerun_matches_an_uninterrupted_run(stage, inputs, tmp_path):
    params = stage.base | stage.many_shards
    args = script_args(stage, params, inputs(stage, size="large"))

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-c", SCRIPT, *args, str(out)]

    out = tmp_path / "killed" / stage.name
    finished = killed_after_shard_1(cmd(out), out)
    clean = tmp_path / "clean" / stage.name
    done = subprocess.run(cmd(clean), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [reference] = printed_stats(done.stdout)
    assert 0 < finished < reference["shards"], (
        f"the kill landed after {finished} of {reference['shards']} shards"
    )
    # Besides what the kill left, what a kill in mid-write leaves: a shard under its
    # temporary name, a record cut short, a stray file.
    [folder] = scratch_folders(out)
    (folder / f".shard-{finished:05d}.safetensors.tmp-999999").write_bytes(b"half a shard")
    (folder / f".shard-{finished - 1:05d}.safetensors.json.tmp-999999").write_text('{"fi')
    (folder / "core").write_bytes(b"\0" * 100)

    rerun = subprocess.run(cmd(out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    [stats] = printed_stats(rerun.stdout)
    assert stats["reused_shards"] == finished
    assert not (out.parent / SCRATCH).exists()
    assert_same_output(out, clean)
    assert sorted(p.name for p in out.iterdir()) == listed_files(out)
    [killed_hash, clean_hash] = dvc_add(tmp_path, out, clean)
    assert killed_hash == clean_hash
    count, md5 = dvc_listing(out)
    assert (killed_hash["nfiles"], killed_hash["md5"]) == (count, f"{md5}.dir")


@pytest.mark.slow
@by_name
def test_a_code_change_after_a_kill_reuses_no_shard(stage, inputs, tmp_path):
    copy = project_copy(tmp_path / "project")
    params = stage.base | stage.many_shards
    out = tmp_path / "data" / stage.name
    cmd = [sys.executable, "-c", SCRIPT, *script_args(stage, params, inputs(stage, size="large")),
           str(out)]  # fmt: skip
    assert killed_after_shard_1(cmd, out, root=copy) > 0
    [killed] = scratch_folders(out)
    append_a_comment(copy / "pipeline/common/shards.py")
    env = ENV | {"PYTHONPATH": str(copy)}
    rerun = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    [stats] = printed_stats(rerun.stdout)
    assert stats["reused_shards"] == 0 and stats["shards"] > 2
    assert not killed.exists(), "publishing frees the scratch folder of the old code"
    # The fingerprint covers every project module the run executed.
    ran = printed_modules(rerun.stdout)
    assert "pipeline/common/shards.py" in ran
    assert set(ran) <= set(stage_closure(stage.module.__name__, copy))


@pytest.mark.slow
@by_name
def test_torchrun_world_size_three_equals_world_size_one(stage, inputs, tmp_path):
    """Three ranks (the README's rule: shard i is rank i % 3's), on a shard count that 3
    need not divide: any world size gives the shards of world size one."""
    nproc = 3
    script = tmp_path / "run_stage.py"
    script.write_text(SCRIPT)
    args = [str(script), *script_args(stage, stage.base, inputs(stage))]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(nproc)]  # fmt: skip
    many = subprocess.run([*torchrun, *args, str(tmp_path / "many")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    assert many.returncode == 0, many.stderr[-2000:]
    [alone] = printed_stats(one.stdout)
    ranks = sorted(printed_stats(many.stdout), key=lambda stats: stats.get("rank", 0))
    assert alone["world_size"] == 1 and alone["shards"] >= 3
    # Rank 0 reports the whole run; the others, the shards they computed.
    assert [stats.get("rank", 0) for stats in ranks] == list(range(nproc))
    assert [stats.get("world_size") for stats in ranks] == [nproc] + [None] * (nproc - 1)
    owned = [len(World(rank, nproc).owned_shards(alone["shards"])) for rank in range(nproc)]
    assert [stats["shards"] for stats in ranks[1:]] == owned[1:], many.stdout
    assert_same_output(tmp_path / "one", tmp_path / "many")
    assert MANIFEST in {p.name for p in (tmp_path / "many").iterdir()}
