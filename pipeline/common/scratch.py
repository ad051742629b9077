"""Resumable shard production outside DVC's outputs.

DVC deletes a stage's outputs before it runs, so completed shards of a killed
run are kept in a scratch folder beside the output, named by a fingerprint of
everything that determines their content (params that change the result, input
file hashes, the stage's code). The next run with the same fingerprint reuses the
finished shards; any change gives a new fingerprint, so stale shards are never
reused. Beside each shard, its record may carry a small JSON summary that the
manifest aggregates later (trajectories: the summed LM loss of the shard's chunks).
`pipeline/common/extraction.py` drives it for the extraction stages.

- One extractor at a time: `locked()` holds an `fcntl.flock` on `<folder>.lock`
  for the run; a second one on the same folder stops at once, naming the holder.
- A record that cannot be read (empty, cut short) means "not finished": the shard
  is recomputed.
- `publish` moves exactly the files the manifest lists to the output (a copy when
  the scratch folder is on another filesystem), removes everything else, and frees
  the scratch folders of older fingerprints of the same output.

    scratch = Scratch.for_output(Path("data/directions"), {"params": ..., "wordlist": sha})
    with scratch.locked():
        if scratch.completed(i) is None: scratch.write(i, tensors, summary={"loss_sum": 3.5})
        records, summary = scratch.all_records(num_shards), scratch.summary(i)
        scratch.publish(manifest)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch

from pipeline.common.io import write_text
from pipeline.common.shards import (
    MANIFEST,
    Manifest,
    ShardRecord,
    sha256_file,
    shard_name,
    write_shard,
)

log = logging.getLogger(__name__)
SCRATCH = ".scratch"
INPUTS = "inputs.json"
_FINGERPRINT_CHARS = 16
_RECORD = r"shard-\d+\.safetensors\.json"

Rename = Callable[[Path, Path], None]
"""Moves a folder within one filesystem (`os.replace`); raises EXDEV across two."""


def fingerprint(inputs: dict[str, Any]) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_FINGERPRINT_CHARS]


class Scratch:
    def __init__(self, folder: Path, output: Path, inputs: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.output = Path(output)
        self.inputs = inputs

    @classmethod
    def for_output(cls, output: Path, inputs: dict[str, Any]) -> Scratch:
        """The scratch folder of `output` for `inputs`; `locked()` creates it."""
        output = Path(output)
        folder = output.parent / SCRATCH / f"{output.name}-{fingerprint(inputs)}"
        return cls(folder, output, inputs)

    @property
    def lock_path(self) -> Path:
        return _lock_path(self.folder)

    @contextmanager
    def locked(self) -> Iterator[Scratch]:
        """Hold the folder for this run: create it, and record its inputs.

        Raises RuntimeError at once if another live process holds it. The lock goes
        with the process (a `kill -9` frees it); its file is removed when the run ends.
        """
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        handle = _try_lock(self.lock_path)
        if handle is None:
            raise RuntimeError(
                f"{self.folder} is in use by another extractor (PID {_holder(self.lock_path)}): "
                "wait for it to finish or stop it, then re-run; a second run on the same "
                "scratch folder would compute the same shards twice"
            )
        try:
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self.folder.mkdir(exist_ok=True)
            if self.inputs is not None:
                text = json.dumps(self.inputs, indent=2, sort_keys=True, default=str)
                write_text(self.folder / INPUTS, text)
            yield self
        finally:
            self.lock_path.unlink(missing_ok=True)
            handle.close()
            _remove_if_empty(self.folder.parent)

    def _record_path(self, index: int) -> Path:
        return self.folder / f"{shard_name(index)}.json"

    def completed(self, index: int) -> ShardRecord | None:
        """The record of shard `index` if a previous run finished it intact."""
        record_path = self._record_path(index)
        shard_path = self.folder / shard_name(index)
        if not (record_path.is_file() and shard_path.is_file()):
            return None
        try:
            record = ShardRecord.from_dict(json.loads(record_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            # A record cut short (a full disk, a lost page cache) is an unfinished shard.
            log.warning(
                "scratch record %s is unreadable (%s); recomputing its shard", record_path, error
            )
            return None
        if sha256_file(shard_path) != record.sha256:
            log.warning("scratch shard %s does not match its record; recomputing it", shard_path)
            return None
        return record

    def all_records(self, num_shards: int) -> list[ShardRecord]:
        """Every shard's record, once all ranks are done; a missing shard is an error."""
        records = [self.completed(index) for index in range(num_shards)]
        missing = [index for index, record in enumerate(records) if record is None]
        if missing:
            raise RuntimeError(f"shards {missing} are missing from {self.folder} after all ranks")
        return records

    def summary(self, index: int) -> dict[str, Any]:
        """The summary written with shard `index` (empty if it was written without one)."""
        return json.loads(self._record_path(index).read_text()).get("summary", {})

    def write(
        self, index: int, tensors: dict[str, torch.Tensor], summary: dict[str, Any] | None = None
    ) -> ShardRecord:
        record = write_shard(self.folder / shard_name(index), tensors)
        # The record (with the summary) is written after the shard is renamed into
        # place, under a temporary name of this process: a record therefore always
        # describes a complete shard.
        write_text(
            self._record_path(index), json.dumps(asdict(record) | {"summary": summary or {}})
        )
        return record

    def publish(self, manifest: Manifest, rename: Rename = os.replace) -> Path:
        """Make the output exactly the files `manifest` lists plus the manifest itself.

        What a killed run left behind (temporary files, strays) is removed first and
        named in the log. The folder is renamed to the output and its records removed
        there, or, on another filesystem (`rename` raises EXDEV), the listed files are
        copied, so a failed copy keeps the records for the next run. Then the scratch
        folders of older fingerprints of this output are removed.
        """
        listed = {record.file for record in [*manifest.shards, *manifest.files.values()]}
        listed.add(MANIFEST)
        present = {path.name for path in self.folder.iterdir()}
        if missing := sorted(listed - present):
            raise RuntimeError(f"{self.folder} lacks {missing}, which its manifest lists")
        bookkeeping = re.compile(rf"^({_RECORD}|{re.escape(INPUTS)})$")
        strays = sorted(name for name in present - listed if not bookkeeping.match(name))
        for name in strays:
            _remove(self.folder / name)
        if strays:
            log.warning(
                "%s: removed %d files the manifest does not list: %s",
                self.folder,
                len(strays),
                ", ".join(strays),
            )
        if self.output.exists():
            shutil.rmtree(self.output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            rename(self.folder, self.output)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            log.info("%s is on another filesystem than %s: copying it", self.folder, self.output)
            _copy_folder(self.folder, self.output, sorted(listed))
        else:
            for path in self.output.iterdir():
                if path.name not in listed:
                    path.unlink()
        log.info("published %s (%d files)", self.output, len(listed))
        self._remove_older()
        return self.output

    def _remove_older(self) -> None:
        """Free the scratch folders of this output's other fingerprints, unless in use.

        A killed run leaves its lock file (the lock itself died with it): removed too.
        """
        pattern = re.compile(
            rf"^{re.escape(self.output.name)}-[0-9a-f]{{{_FINGERPRINT_CHARS}}}(\.lock)?$"
        )
        found = self.folder.parent.glob(f"{self.output.name}-*")
        names = {path.name.removesuffix(".lock") for path in found if pattern.match(path.name)}
        for folder in sorted(self.folder.parent / name for name in names - {self.folder.name}):
            handle = _try_lock(_lock_path(folder))
            if handle is None:
                log.info("kept %s: in use by PID %s", folder, _holder(_lock_path(folder)))
                continue
            with handle:
                files = [path for path in folder.rglob("*") if path.is_file()]
                freed = sum(path.stat().st_size for path in files)
                shutil.rmtree(folder, ignore_errors=True)
                _lock_path(folder).unlink(missing_ok=True)
            if files:
                log.info(
                    "freed %s bytes: removed %s, a scratch folder of older inputs",
                    f"{freed:,}",
                    folder,
                )


def _lock_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.lock")


def _try_lock(path: Path) -> TextIO | None:
    """The lock file, emptied and locked by this process; None if another process holds it."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        # The holder removes the file when it ends: a lock on a removed file holds nothing.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                handle.truncate(0)
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _copy_folder(source: Path, target: Path, names: list[str]) -> None:
    """Copy files `names` of `source` to `target` atomically (via a temporary beside it),
    then remove `source`. A failed copy (a full disk) names the file and leaves no copy."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        for name in names:
            try:
                shutil.copy2(source / name, tmp / name)
            except OSError as error:
                # shutil names the source of a copy that found the disk full.
                if error.errno != errno.ENOSPC:
                    raise
                raise OSError(error.errno, error.strerror, str(target / name)) from error
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(source)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
