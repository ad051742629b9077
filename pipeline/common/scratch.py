"""Resumable shard production outside DVC's outputs.

DVC deletes a stage's outputs before it runs, so completed shards of a killed
run are kept in a scratch folder beside the output, named by a fingerprint of
everything that determines their content (params that change the result, input
file hashes). The next run with the same fingerprint reuses the finished shards;
any param or input change gives a new fingerprint, so stale shards are never
reused. When every shard is done the scratch folder is renamed to the output.
Beside each shard, its record may carry a small JSON summary that the manifest
aggregates later (trajectories: the summed LM loss of the shard's chunks).
`pipeline/common/extraction.py` drives it for the extraction stages.

    scratch = Scratch.for_output(Path("data/directions"), {"params": ..., "wordlist": sha})
    if scratch.completed(i) is None: scratch.write(i, tensors, summary={"loss_sum": 3.5})
    records, summary = scratch.all_records(num_shards), scratch.summary(i)
    scratch.publish()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.common.shards import ShardRecord, sha256_file, shard_name, write_shard

log = logging.getLogger(__name__)
SCRATCH = ".scratch"


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Scratch:
    def __init__(self, folder: Path, output: Path):
        self.folder = folder
        self.output = output

    @classmethod
    def for_output(cls, output: Path, inputs: dict[str, Any]) -> Scratch:
        output = Path(output)
        folder = output.parent / SCRATCH / f"{output.name}-{fingerprint(inputs)}"
        folder.mkdir(parents=True, exist_ok=True)
        # Several ranks may start at once: write the record of inputs atomically.
        tmp = folder / f".inputs.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
        os.replace(tmp, folder / "inputs.json")
        return cls(folder, output)

    def _record_path(self, index: int) -> Path:
        return self.folder / f"{shard_name(index)}.json"

    def completed(self, index: int) -> ShardRecord | None:
        """The record of shard `index` if a previous run finished it intact."""
        record_path = self._record_path(index)
        shard_path = self.folder / shard_name(index)
        if not (record_path.is_file() and shard_path.is_file()):
            return None
        record = ShardRecord.from_dict(json.loads(record_path.read_text()))
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
        # place: a record therefore always describes a complete shard.
        tmp = self._record_path(index).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record) | {"summary": summary or {}}))
        os.replace(tmp, self._record_path(index))
        return record

    def publish(self) -> Path:
        """Move the finished scratch folder to the output path (replacing it)."""
        for path in self.folder.glob("*.json"):
            if path.name.startswith("shard-"):
                path.unlink()
        # A killed run may have left a half-written file under its temporary name.
        for path in self.folder.glob("*.tmp*"):
            path.unlink()
        (self.folder / "inputs.json").unlink(missing_ok=True)
        if self.output.exists():
            shutil.rmtree(self.output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.folder, self.output)
        _remove_if_empty(self.folder.parent)
        return self.output


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
