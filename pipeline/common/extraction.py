"""The runner of the extraction stages: resumable shards, split across ranks, one manifest.

`directions`, `trajectories` and `activations` each say how to compute one shard (from
the rows, concepts or chunks, that `ShardPlan` gives it) and what their manifest adds;
this module does the rest, the same way for all three:

- the resume fingerprint: the stage's params minus its result-neutral knobs, the
  sha256 of its input files and the code of its import closure (`code_deps.py`);
- resumption: a shard that a previous run finished intact is reused (`scratch.py`);
- one extractor per scratch folder: rank 0 locks it for the run, a second run with
  the same fingerprint stops at once naming the holder's PID;
- under torchrun each rank computes its own shards (`distributed.py`), all meet at a
  barrier, and rank 0 checks every rank's shards, writes the manifest and publishes
  exactly the files it lists. Shard contents do not depend on the world size;
- the planned disk use and the free space, logged before the first shard; a full
  disk stops the run with one line naming the file, the planned and the free bytes,
  and the re-run after freeing space resumes from the finished shards.

    EXTRACTION = ShardedExtraction("directions", KIND, __name__, result_neutral=("batch_size",))
    plan = ShardPlan(num_rows=8, rows_per_shard=3, planned_bytes=..., description="8 concepts")
    done = EXTRACTION.run(params, {"wordlist": wordlist}, out, plan, compute_shard, describe)
    # compute_shard(rows: range, progress) -> Shard; describe(CompletedShards) -> ManifestAdditions
    if not done.world.is_main:
        return done.rank_stats  # the manifest is rank 0's
    return {"concepts": 8} | done.stats(started)
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.common.code_deps import code_fingerprint
from pipeline.common.distributed import World, process_group
from pipeline.common.identity import ModelIdentity
from pipeline.common.params import to_dict
from pipeline.common.progress import progress
from pipeline.common.scratch import Scratch
from pipeline.common.shards import Manifest, ShardRecord, sha256_file

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of work units (prompts, chunks) just done, for the progress bar."""


@dataclass(frozen=True)
class Shard:
    """One computed shard: its tensors, and a small JSON summary the manifest aggregates."""

    tensors: dict[str, torch.Tensor]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardPlan:
    """How a run splits its rows (concepts, chunks) into shards, and what it will store."""

    num_rows: int
    rows_per_shard: int
    planned_bytes: int
    description: str
    """What is extracted, for the log line ("8 concepts x 2 templates through ...")."""
    unit: str = "chunk"
    """What the progress bar counts."""
    units_per_row: int = 1
    """Progress bar steps per row (directions: one prompt per template)."""

    @property
    def shard_rows(self) -> list[range]:
        """The rows of each shard, in order; the last shard may be shorter."""
        starts = range(0, self.num_rows, self.rows_per_shard)
        return [range(start, min(start + self.rows_per_shard, self.num_rows)) for start in starts]


@dataclass(frozen=True)
class CompletedShards:
    """Every shard of a run, verified in the scratch folder: what the manifest describes."""

    folder: Path
    """The scratch folder, published as the output: side files the manifest lists go here."""
    records: list[ShardRecord]
    summaries: list[dict[str, Any]]


@dataclass(frozen=True)
class ManifestAdditions:
    """What a stage adds to its manifest: `extra` values and named side files."""

    extra: dict[str, Any]
    files: dict[str, ShardRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractionResult:
    """The outcome of a run on one rank; `manifest` only on rank 0, which published it."""

    world: World
    num_shards: int
    owned: list[int]
    reused: int
    """Shards of `owned` that a previous run had finished."""
    manifest: Manifest | None

    @property
    def rank_stats(self) -> dict:
        """What a rank other than 0 reports: its own shards."""
        return {"rank": self.world.rank, "shards": len(self.owned), "reused_shards": self.reused}

    def stats(self, started: float) -> dict:
        """The run's stats common to every extraction stage; `started`: its perf_counter."""
        return {
            "shards": self.num_shards,
            "reused_shards": self.reused,
            "world_size": self.world.size,
            "seconds": round(time.perf_counter() - started, 2),
        }


@dataclass(frozen=True)
class ShardedExtraction:
    """An extraction stage whose output is resumable shards plus a manifest."""

    name: str
    """The params section; names the log line and the progress bar."""
    kind: str
    """The manifest kind of the output."""
    module: str
    """The stage module: the code of its import closure enters the fingerprint."""
    result_neutral: tuple[str, ...]
    """Params that do not change the stored values; kept out of the fingerprint."""

    def fingerprint_inputs(
        self, params: Any, input_files: dict[str, Path], model: ModelIdentity
    ) -> dict[str, Any]:
        """Everything that determines the shards' content; the scratch folder is named by it.
        `params` hold the resolved compute dtype (never `auto`), `model` the identity of the
        weights that compute them."""
        values = {k: v for k, v in to_dict(params).items() if k not in self.result_neutral}
        hashes = {name: sha256_file(path) for name, path in input_files.items()}
        code = code_fingerprint(self.module)
        return {"params": values, **hashes, "model": model.as_dict(), "code": code}

    def scratch(
        self, params: Any, input_files: dict[str, Path], out: Path, model: ModelIdentity
    ) -> Scratch:
        """The scratch folder a run of `params` on `input_files` into `out` resumes from."""
        return Scratch.for_output(out, self.fingerprint_inputs(params, input_files, model))

    def run(
        self,
        params: Any,
        input_files: dict[str, Path],
        out: Path,
        plan: ShardPlan,
        compute_shard: Callable[[range, Progress], Shard],
        describe: Callable[[CompletedShards], ManifestAdditions],
        model: ModelIdentity,
    ) -> ExtractionResult:
        """Compute this rank's missing shards; on rank 0, then write the manifest and publish.

        `input_files`: name -> file whose sha256 enters the fingerprint (a corpus folder
        by its manifest). `compute_shard(rows, progress)` computes the shard of those rows.
        `describe` runs on rank 0 once every rank's shards are in place. `model`: the
        identity of the loaded model (`pipeline.common.identity.model_identity`).
        """
        free = shutil.disk_usage(_existing(out.parent)).free
        log.info(
            "%s: %s; planned shards %s bytes (%s), %s free there",
            self.name,
            plan.description,
            f"{plan.planned_bytes:,}",
            _size(plan.planned_bytes),
            _size(free),
        )
        if plan.planned_bytes > free:
            log.warning("%s: the planned shards do not fit in the free space", self.name)
        scratch = self.scratch(params, input_files, out, model)
        try:
            return self._run(scratch, params, plan, compute_shard, describe)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise self._disk_full(error, plan, scratch) from error

    def _run(
        self, scratch: Scratch, params, plan: ShardPlan, compute_shard, describe
    ) -> ExtractionResult:
        num_shards = len(plan.shard_rows)
        with ExitStack() as held:
            with process_group() as world:
                if world.is_main:  # one extractor per scratch folder: rank 0 holds it
                    held.enter_context(scratch.locked())
                world.barrier()  # the other ranks start once the folder exists
                owned = world.owned_shards(num_shards)
                reused = self._compute(scratch, plan, owned, compute_shard)
                # The manifest is written once every rank's shards are in place.
                world.barrier()
            if not world.is_main:
                return ExtractionResult(world, num_shards, owned, reused, manifest=None)
            records = scratch.all_records(num_shards)
            summaries = [scratch.summary(index) for index in range(num_shards)]
            additions = describe(CompletedShards(scratch.folder, records, summaries))
            manifest = Manifest(
                kind=self.kind,
                params=to_dict(params),
                shards=records,
                files=additions.files,
                extra=additions.extra,
            )
            manifest.save(scratch.folder)
            scratch.publish(manifest)
        return ExtractionResult(world, num_shards, owned, reused, manifest)

    def _disk_full(self, error: OSError, plan: ShardPlan, scratch: Scratch) -> RuntimeError:
        """One line: the file being written, the planned bytes, the free bytes there."""
        where = Path(error.filename) if error.filename else scratch.folder
        free = shutil.disk_usage(_existing(where)).free
        return RuntimeError(
            f"{self.name}: no space left on device writing {where}: the run planned "
            f"{plan.planned_bytes:,} bytes of shards and {free:,} bytes are free on that "
            "filesystem; free some space and re-run (finished shards are kept and reused)"
        )

    def _compute(self, scratch: Scratch, plan: ShardPlan, owned: list[int], compute_shard) -> int:
        """Compute the shards in `owned` no previous run finished; return how many one had."""
        reused = 0
        rows = plan.shard_rows
        with progress(
            total=sum(len(rows[index]) for index in owned) * plan.units_per_row,
            unit=plan.unit,
            desc=self.name,
        ) as bar:
            for index in owned:
                if scratch.completed(index) is not None:
                    reused += 1
                    bar.update(len(rows[index]) * plan.units_per_row)
                    continue
                shard = compute_shard(rows[index], bar.update)
                scratch.write(index, shard.tensors, shard.summary)
        return reused


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent: where `shutil.disk_usage` can look."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
