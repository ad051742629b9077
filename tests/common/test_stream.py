"""Training streams shards through a bounded buffer: every row once, memory bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.common.shards import Manifest, shard_name
from pipeline.concepts.layout import KIND, DirectionSet, write_shard_rows, write_side_files

ROOT = Path(__file__).resolve().parents[2]


def big_direction_set(folder: Path, rows: int, dim: int, shard_rows: int, layer: int = 2) -> Path:
    """Random activations, one token per concept; splits: 3 of 4 rows train, the rest val."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    records = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        ids = torch.arange(start, min(start + shard_rows, rows))
        split = (ids % 4 == 3).to(torch.int8)  # 0 train, 1 val
        acts = torch.randn(len(ids), dim, generator=gen)
        records.append(write_shard_rows(folder / shard_name(index), ids, split, {layer: acts}))
    vocab = 16
    files = write_side_files(
        folder,
        means={layer: torch.zeros(dim)},
        embedding_token_ids=torch.arange(vocab),
        embedding_rows=torch.randn(vocab, 4, generator=gen),
        offsets=torch.arange(rows + 1),
        flat_tokens=torch.arange(rows) % vocab,
    )
    extra = {"layers": [layer], "vocab_size": vocab, "hidden_size": dim, "embedding_dim": 4}
    Manifest(kind=KIND, params={}, shards=records, files=files, extra=extra).save(folder)
    return folder


def test_every_row_once_per_pass_and_shuffle_depends_on_the_seed(tmp_path):
    data = DirectionSet(big_direction_set(tmp_path / "d", 1000, 8, 96), layer=2)
    seen = [b.concept_id for b in data.batches("train", 32, 100, shuffle=True, seed=1)]
    ids = torch.cat(seen)
    assert sorted(ids.tolist()) == [i for i in range(1000) if i % 4 != 3]
    again = torch.cat([b.concept_id for b in data.batches("train", 32, 100, True, seed=1)])
    other = torch.cat([b.concept_id for b in data.batches("train", 32, 100, True, seed=2)])
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    ordered = torch.cat([b.concept_id for b in data.batches("val", 32, 100, shuffle=False)])
    assert ordered.tolist() == [i for i in range(1000) if i % 4 == 3]


def test_targets_stay_aligned_with_their_concepts_under_shuffling(tmp_path):
    folder = big_direction_set(tmp_path / "d", 500, 8, 64)
    data = DirectionSet(folder, layer=2)
    truth = dict(zip(*[t.tolist() for t in data.load_split("train")], strict=True))
    for batch in data.batches("train", 16, 50, shuffle=True, seed=3):
        for concept, target in zip(batch.concept_id.tolist(), batch.target.tolist(), strict=True):
            assert truth[concept] == target


PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
from pipeline.common.params import sections_from_dict
from pipeline.concepts import distill
folder, out, buffer_rows = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
params = sections_from_dict({"directions": {"layers": [2]}, "distill": {
    "train": {"layer": 2, "epochs": 1, "buffer_rows": buffer_rows},
    "runs": {"lp": {"approach": "linear_probe"}}}})
import torch
torch.zeros(1).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
distill.run(params, "lp", folder, out)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after}))
"""


def peak_growth(folder: Path, out: Path, buffer_rows: int) -> int:
    """Bytes the peak RSS of one training epoch adds, measured in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(folder), str(out), str(buffer_rows)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        # A fixed mmap threshold makes glibc hand large freed blocks back, so the peak
        # RSS reflects live tensors rather than what the allocator chose to keep.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
    )
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    return peak["after"] - peak["before"]


@pytest.mark.slow
def test_peak_memory_of_training_does_not_grow_with_the_dump(tmp_path):
    """A dump 3x the buffer costs no more memory than one 1.5x the buffer.

    Both fill the buffer; holding the dump would add 1.5 x 64 MiB, and the
    allowance is a third of that. (Absolute RSS also counts autograd and thread
    pools, hence the differential measurement.)
    """
    dim, shard_rows, buffer_rows = 1024, 2048, 16_384
    small = big_direction_set(tmp_path / "small", buffer_rows * 3 // 2, dim, shard_rows)
    large = big_direction_set(tmp_path / "large", 3 * buffer_rows, dim, shard_rows)
    grown_small = peak_growth(small, tmp_path / "out_small", buffer_rows)
    grown_large = peak_growth(large, tmp_path / "out_large", buffer_rows)
    extra_dump = (3 * buffer_rows - buffer_rows * 3 // 2) * dim * 4
    assert grown_large - grown_small < extra_dump / 3, (
        f"peak growth {grown_small / 2**20:.0f} MiB (dump = 1.5 x buffer) vs "
        f"{grown_large / 2**20:.0f} MiB (dump = 3 x buffer)"
    )
