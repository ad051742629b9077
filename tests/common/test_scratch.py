"""The scratch folder alone: records, the lock, an exact publish, other filesystems, a full disk.

What the three extraction stages do with it is tested in `test_extraction.py`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from pipeline.common import shards
from pipeline.common.scratch import SCRATCH, Scratch
from pipeline.common.shards import MANIFEST, Manifest, read_shard, shard_name

ROOT = Path(__file__).resolve().parents[2]
INPUTS = {"params": {"layers": [2]}, "wordlist": "ab12"}


def tensors(index: int) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(6.0).reshape(3, 2) + index}


def fill(scratch: Scratch, num_shards: int = 2) -> Manifest:
    """Write every shard into the (locked) `scratch` and save its manifest there."""
    records = [scratch.write(index, tensors(index)) for index in range(num_shards)]
    manifest = Manifest(kind="test", params=INPUTS["params"], shards=records)
    manifest.save(scratch.folder)
    return manifest


def names(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# --- records ---


@pytest.mark.parametrize("text", ["", '{"file": "shard-00000.saf', '{"sha256": "ab"}', "[1]"])
def test_an_unreadable_record_means_not_finished(tmp_path, caplog, text):
    scratch = Scratch.for_output(tmp_path / "out", INPUTS)
    with scratch.locked():
        record = scratch.write(0, tensors(0))
        assert scratch.completed(0) == record
        (scratch.folder / f"{shard_name(0)}.json").write_text(text)
        with caplog.at_level(logging.WARNING):
            assert scratch.completed(0) is None
        assert f"{shard_name(0)}.json is unreadable" in caplog.text
        with pytest.raises(RuntimeError, match=r"shards \[0\] are missing"):
            scratch.all_records(1)
        assert scratch.write(0, tensors(0)) == record
        assert scratch.all_records(1) == [record]


def test_records_are_written_under_a_temporary_name_of_the_writer(tmp_path, monkeypatch):
    renamed = []
    replace = os.replace

    def spy(source, target):
        renamed.append((Path(source).name, Path(target).name))
        replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    scratch = Scratch.for_output(tmp_path / "out", INPUTS)
    with scratch.locked():
        scratch.write(3, tensors(3), summary={"loss_sum": 1.5})
    pid = os.getpid()
    assert (f".{shard_name(3)}.tmp-{pid}", shard_name(3)) in renamed
    assert (f".{shard_name(3)}.json.tmp-{pid}", f"{shard_name(3)}.json") in renamed
    assert all(source.endswith(f".tmp-{pid}") for source, _ in renamed)


# --- the lock ---


def test_a_second_holder_stops_at_once_naming_the_first(tmp_path):
    first = Scratch.for_output(tmp_path / "out", INPUTS)
    with first.locked():
        with pytest.raises(
            RuntimeError, match=rf"out-\w+ is in use by another extractor \(PID {os.getpid()}\)"
        ):
            with Scratch.for_output(tmp_path / "out", INPUTS).locked():
                pass
        # Other inputs: another folder, another lock.
        with Scratch.for_output(tmp_path / "out", INPUTS | {"wordlist": "cd34"}).locked():
            pass
    with Scratch.for_output(tmp_path / "out", INPUTS).locked() as again:
        assert again.folder == first.folder
    assert not (tmp_path / SCRATCH / f"{first.folder.name}.lock").exists()


HOLD = """
import json, sys, time
from pathlib import Path
from pipeline.common.scratch import Scratch
with Scratch.for_output(Path(sys.argv[1]), json.loads(sys.argv[2])).locked():
    print("held", flush=True)
    time.sleep(600)
"""


def test_another_process_holding_the_folder_is_named_and_a_kill_frees_it(tmp_path):
    cmd = [sys.executable, "-c", HOLD, str(tmp_path / "out"), json.dumps(INPUTS)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            RuntimeError, match=rf"in use by another extractor \(PID {holder.pid}\)"
        ):
            with Scratch.for_output(tmp_path / "out", INPUTS).locked():
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with Scratch.for_output(tmp_path / "out", INPUTS).locked() as scratch:
        assert scratch.folder.is_dir()


# --- publish ---


def test_publish_keeps_exactly_the_listed_files_and_logs_the_rest(tmp_path, caplog):
    out = tmp_path / "out"
    scratch = Scratch.for_output(out, INPUTS)
    with scratch.locked():
        manifest = fill(scratch)
        folder = scratch.folder
        (folder / f".{shard_name(2)}.tmp-999999").write_bytes(b"half a shard")
        (folder / f".{shard_name(1)}.json.tmp-999999").write_text('{"fi')
        (folder / "notes.txt").write_text("left by hand")
        (folder / "stray").mkdir()
        (folder / "stray" / "x.bin").write_bytes(b"x")
        with caplog.at_level(logging.INFO):
            assert scratch.publish(manifest) == out
    assert names(out) == sorted([shard_name(0), shard_name(1), MANIFEST])
    assert "published" in caplog.text
    assert (f"removed 4 files the manifest does not list: .{shard_name(1)}.json.tmp-999999, "
            f".{shard_name(2)}.tmp-999999, notes.txt, stray") in caplog.text  # fmt: skip
    assert read_shard(out, Manifest.load(out).shards[1])["x"].equal(tensors(1)["x"])
    assert not (tmp_path / SCRATCH).exists()


def test_publish_refuses_a_manifest_listing_a_missing_file(tmp_path):
    with Scratch.for_output(tmp_path / "out", INPUTS).locked() as scratch:
        manifest = fill(scratch)
        (scratch.folder / shard_name(1)).unlink()
        with pytest.raises(RuntimeError, match=rf"lacks \['{shard_name(1)}'\], which its manifest"):
            scratch.publish(manifest)
    assert not (tmp_path / "out").exists()


def cross_device(source: Path, target: Path) -> None:
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), None, str(target))


def test_a_scratch_folder_on_another_filesystem_is_copied(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("a previous output")
    with Scratch.for_output(out, INPUTS).locked() as scratch:
        manifest = fill(scratch)
        with caplog.at_level(logging.INFO):
            scratch.publish(manifest, rename=cross_device)
        assert not scratch.folder.exists()
    assert "is on another filesystem" in caplog.text
    assert names(out) == sorted([shard_name(0), shard_name(1), MANIFEST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no copy left half-way

    def refused(source: Path, target: Path) -> None:
        raise PermissionError(errno.EACCES, "refused", str(source))

    with Scratch.for_output(out, INPUTS).locked() as scratch:
        manifest = fill(scratch)
        with pytest.raises(PermissionError, match="refused"):
            scratch.publish(manifest, rename=refused)


def test_a_scratch_folder_on_a_real_second_filesystem_is_copied(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm: no second filesystem to put the scratch folder on")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip(f"/dev/shm and {tmp_path} are one filesystem here")
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        (tmp_path / SCRATCH).symlink_to(elsewhere)
        out = tmp_path / "out"
        with Scratch.for_output(out, INPUTS).locked() as scratch:
            manifest = fill(scratch)
            assert os.stat(scratch.folder).st_dev != os.stat(tmp_path).st_dev
            scratch.publish(manifest)
        assert names(out) == sorted([shard_name(0), shard_name(1), MANIFEST])
        assert os.listdir(elsewhere) == []
        assert read_shard(out, Manifest.load(out).shards[0])["x"].equal(tensors(0)["x"])


def test_a_copy_that_finds_the_disk_full_leaves_no_copy_and_keeps_the_shards(
    tmp_path, small_filesystem, fill_up
):
    # The output on a small filesystem, its scratch folder on the disk of tmp_path.
    (tmp_path / "elsewhere").mkdir()
    (small_filesystem / SCRATCH).symlink_to(tmp_path / "elsewhere")
    out = small_filesystem / "out"
    with Scratch.for_output(out, INPUTS).locked() as scratch:
        manifest = fill(scratch)
        filler = fill_up(small_filesystem)
        with pytest.raises(OSError) as raised:
            scratch.publish(manifest)
        assert raised.value.errno == errno.ENOSPC
        assert Path(raised.value.filename).parent == out
        assert sorted(p.name for p in small_filesystem.iterdir()) == [SCRATCH, "filler"]
        assert scratch.all_records(2) == manifest.shards
        filler.unlink()
        scratch.publish(manifest)
    assert names(out) == sorted([shard_name(0), shard_name(1), MANIFEST])


def test_publish_frees_older_fingerprints_of_its_output_but_not_one_in_use(tmp_path, caplog):
    out = tmp_path / "out"
    old = Scratch.for_output(out, INPUTS | {"wordlist": "old1"})
    with old.locked():
        old.write(0, tensors(0))
    size = sum(p.stat().st_size for p in old.folder.iterdir())
    busy = Scratch.for_output(out, INPUTS | {"wordlist": "busy"})
    other_output = Scratch.for_output(tmp_path / "out-big", INPUTS)
    with other_output.locked():
        other_output.write(0, tensors(0))
    # A killed run's lock file, without its folder: the lock died with the run.
    (tmp_path / SCRATCH / "out-0123456789abcdef.lock").write_text("999999\n")
    with busy.locked(), Scratch.for_output(out, INPUTS).locked() as scratch:
        manifest = fill(scratch)
        with caplog.at_level(logging.INFO):
            scratch.publish(manifest)
    assert not old.folder.exists() and busy.folder.is_dir() and other_output.folder.is_dir()
    assert f"freed {size:,} bytes: removed {old.folder}" in caplog.text
    assert f"kept {busy.folder}: in use by PID {os.getpid()}" in caplog.text
    assert sorted(p.name for p in (tmp_path / SCRATCH).iterdir()) == sorted(
        [busy.folder.name, other_output.folder.name]
    )


# --- a full disk ---


def no_space_in(kind: str):
    """A `save_tensors` that writes half a file, then fails as a full disk does."""

    def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
        path.write_bytes(b"half a shard")
        if kind == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  f"(os error {errno.ENOSPC})")  # fmt: skip
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_names_the_shard_and_leaves_nothing_half_written(tmp_path, monkeypatch, kind):
    scratch = Scratch.for_output(tmp_path / "out", INPUTS)
    with scratch.locked():
        scratch.write(0, tensors(0))
        with monkeypatch.context() as patch:
            patch.setattr(shards, "save_tensors", no_space_in(kind))
            with pytest.raises(OSError) as raised:
                scratch.write(1, tensors(1))
        assert raised.value.errno == errno.ENOSPC
        assert raised.value.filename == str(scratch.folder / shard_name(1))
        assert sorted(p.name for p in scratch.folder.iterdir()) == sorted(
            ["inputs.json", shard_name(0), f"{shard_name(0)}.json"]
        )
        assert scratch.completed(1) is None
        scratch.write(1, tensors(1))
        assert [r.file for r in scratch.all_records(2)] == [shard_name(0), shard_name(1)]


def test_other_save_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def broken(tensors, path):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(shards, "save_tensors", broken)
    with pytest.raises(SafetensorError, match="something else"):
        shards.write_shard(tmp_path / shard_name(0), tensors(0))
    assert list(tmp_path.iterdir()) == []
