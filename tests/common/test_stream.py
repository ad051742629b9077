"""Training streams shards through one bounded buffer: every row once, aligned, memory bounded.

The stream itself (`pipeline/common/stream.py`) on hand cases, then each of its three
readers (DirectionSet, the SAE's ActivationSource, TrajectorySet) on a dump of its kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from pipeline.common.shards import Manifest, layer_key, shard_name, write_shard
from pipeline.common.stream import stream_batches
from pipeline.concepts.layout import KIND, DirectionSet, write_shard_rows, write_side_files
from pipeline.kv_sidecar.trajectory_set import TrajectorySet
from pipeline.sparse_autoencoder.layout import ACTIVATIONS
from pipeline.sparse_autoencoder.sources import DirectionsSource, TokenSource
from tests.kv_sidecar.test_sidecar import make_trajectories

ROOT = Path(__file__).resolve().parents[2]
LAYER = 2


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
        texts=[f"w{i}" for i in range(rows)],
    )
    extra = {"layers": [layer], "vocab_size": vocab, "hidden_size": dim, "embedding_dim": 4}
    Manifest(kind=KIND, params={}, shards=records, files=files, extra=extra).save(folder)
    return folder


def token_activations(folder: Path, rows: int, dim: int, shard_rows: int) -> Path:
    """A token-level activations dump: chunks of 8 positions, random hidden states."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    records = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        row = torch.arange(start, min(start + shard_rows, rows))
        tensors = {
            "chunk_id": row // 8,
            "position": row % 8,
            "token_id": (row * 7) % 50,
            layer_key(LAYER): torch.randn(len(row), dim, generator=gen),
        }
        records.append(write_shard(folder / shard_name(index), tensors))
    extra = {"layers": [LAYER], "model": "synthetic", "hidden_size": dim, "block_chunks": 1}
    Manifest(kind=ACTIVATIONS, params={}, shards=records, extra=extra).save(folder)
    return folder


def trajectories(folder: Path, rows: int, dim: int, shard_rows: int) -> Path:
    """A trajectories dump of `rows` samples: rows / 2 chunks of 2 KV heads of width `dim`."""
    return make_trajectories(
        folder,
        num_chunks=rows // 2,
        layers=(LAYER,),
        force_space="hidden",
        shard_rows=shard_rows // 2,
        head_dim=dim,
    )


@dataclass(frozen=True)
class Reader:
    """One training reader: how to write a dump for it, open it, and read its rows unstreamed."""

    make: Callable[[Path, int, int, int], Path]  # folder, rows, dim, shard_rows
    open: Callable[[Path], object]
    keys: tuple[str, ...]  # the batch fields that name a row
    stored: Callable[[object], Iterator[dict[str, torch.Tensor]]]  # train rows per shard


READERS = {
    "DirectionSet": Reader(
        big_direction_set,
        lambda folder: DirectionSet(folder, layer=LAYER),
        ("concept_id",),
        lambda data: (
            {"concept_id": ids, "target": target} for ids, target in data.split_shards("train")
        ),
    ),
    "DirectionsSource": Reader(
        big_direction_set,
        lambda folder: DirectionsSource(folder, layer=LAYER),
        ("items",),
        lambda data: (
            {"items": items, "x": x, "is_eval": is_eval}
            for items, x, is_eval in data.shards("train")
        ),
    ),
    "TokenSource": Reader(
        token_activations,
        lambda folder: TokenSource(folder, layer=LAYER, eval_fraction=0.25),
        ("items",),
        lambda data: (
            {"items": items, "x": x, "is_eval": is_eval}
            for items, x, is_eval in data.shards("train")
        ),
    ),
    "TrajectorySet": Reader(
        trajectories,
        lambda folder: TrajectorySet(folder, layer=LAYER, eval_fraction=0.25),
        ("chunk_id", "kv_head"),
        lambda data: (
            {f.name: getattr(samples, f.name) for f in fields(samples)}
            for record in data.manifest.shards
            if (samples := data.shard_samples(record, "train")) is not None
        ),
    ),
}


def keyed(rows: dict[str, torch.Tensor], keys: tuple[str, ...]) -> list[tuple[tuple, dict]]:
    """(row key, {field: that row's tensor}) for every row of aligned `rows`."""
    count = rows[keys[0]].shape[0]
    names = [name for name in rows if rows[name].shape[:1] == (count,)]
    return [
        (
            tuple(torch.cat([rows[k][i].flatten() for k in keys]).tolist()),
            {name: rows[name][i] for name in names},
        )
        for i in range(count)
    ]


def batch_fields(batch) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}


# --- the stream on hand cases ---------------------------------------------------------


def hand_shards(sizes: list[int]) -> tuple[Callable[[int], dict], list[int]]:
    """Shard i holds rows numbered on from the previous shard; `value` = 10 x `id`."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def load(index: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(starts[index], starts[index] + sizes[index])
        return {"id": ids, "value": torch.stack([10 * ids, -ids], dim=1)}

    return load, sizes


def test_unshuffled_stream_keeps_storage_order_and_emits_the_tail_last():
    load, sizes = hand_shards([3, 0, 4, 2])
    batches = list(stream_batches(load, sizes, batch_size=2, buffer_rows=4, shuffle=False))
    assert [b["id"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert all(torch.equal(b["value"][:, 0], 10 * b["id"]) for b in batches)
    dropped = stream_batches(load, sizes, 2, 4, shuffle=False, drop_last=True)
    assert [b["id"].tolist() for b in dropped] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_shuffled_stream_draws_shard_order_then_one_permutation_per_fill():
    """The draws the demo tables rest on: shard order, then each fill's whole buffer."""
    load, sizes = hand_shards([5, 3, 6])
    got = [b["id"] for b in stream_batches(load, sizes, 4, 7, shuffle=True, seed=11)]
    gen = torch.Generator().manual_seed(11)
    order = torch.randperm(3, generator=gen).tolist()
    shards = [load(i)["id"] for i in order]
    # The same draws, by concatenation instead of a preallocated buffer.
    expected, buffer = [], torch.zeros(0, dtype=torch.long)
    for shard in shards:
        buffer = torch.cat([buffer, shard])
        if len(buffer) >= 7:
            buffer = buffer[torch.randperm(len(buffer), generator=gen)]
            full = (len(buffer) // 4) * 4
            expected += list(buffer[:full].split(4))
            buffer = buffer[full:]
    if len(buffer):
        expected += list(buffer[torch.randperm(len(buffer), generator=gen)].split(4))
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    assert sorted(torch.cat(got).tolist()) == list(range(14))


def test_a_batch_larger_than_the_buffer_still_fits():
    # The tail left by a batch_size > buffer_rows fill must not overflow the buffer.
    load, sizes = hand_shards([7, 7, 7, 7])
    batches = list(stream_batches(load, sizes, batch_size=10, buffer_rows=3, shuffle=True))
    assert [len(b["id"]) for b in batches] == [10, 10, 8]
    assert sorted(torch.cat([b["id"] for b in batches]).tolist()) == list(range(28))


def test_a_shard_past_its_bound_or_with_unaligned_tensors_is_refused():
    load, _ = hand_shards([3, 3])
    with pytest.raises(ValueError, match="shard 1 gave 3 rows, more than its bound of 2"):
        list(stream_batches(load, [3, 2], 2, 4, shuffle=False))
    ragged = {"id": torch.arange(3), "value": torch.zeros(2)}
    with pytest.raises(ValueError, match="unequal row counts"):
        list(stream_batches(lambda _: ragged, [3], 2, 4, shuffle=False))


# --- each reader -------------------------------------------------------------------------


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


@pytest.mark.parametrize("name", READERS)
def test_rows_stay_aligned_with_their_ids_under_shuffling(tmp_path, name):
    reader = READERS[name]
    data = reader.open(reader.make(tmp_path / "d", 400, 8, 64))
    truth = dict(row for shard in reader.stored(data) for row in keyed(shard, reader.keys))
    assert len(truth) > 200, "the dump's train split is too small to test anything"
    seen = []
    for batch in data.batches("train", 16, 50, True, 3):
        rows = keyed(batch_fields(batch), reader.keys)
        assert 0 < len(rows) <= 16
        seen += rows
    assert sorted(key for key, _ in seen) == sorted(truth), "not every row exactly once"
    assert [key for key, _ in seen] != list(truth), "the stream did not shuffle"
    for key, row in seen:
        for field, stored in truth[key].items():
            assert torch.equal(row[field], stored), f"{name} row {key}: {field} misaligned"


@pytest.mark.parametrize("name", READERS)
def test_a_tampered_shard_is_refused_by_name_while_streaming(tmp_path, name):
    reader = READERS[name]
    folder = reader.make(tmp_path / "d", 200, 8, 64)
    shard = folder / "shard-00001.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-1] ^= 0xFF  # the last byte of the last tensor: the header still parses
    shard.write_bytes(bytes(payload))
    data = reader.open(folder)
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is corrupt or was modified"):
        for _ in data.batches("train", 16, 50, True, 3):
            pass


PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from tests.common.test_stream import READERS
name, folder, out, buffer_rows = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
torch.zeros(1).sum()

def kib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])

def start():
    # Reset the high-water mark, so imports' transient peaks do not hide the pass's.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return kib("VmRSS")

if name == "distill":
    from pipeline.common.params import sections_from_dict
    from pipeline.concepts import distill
    params = sections_from_dict({"directions": {"layers": [2]}, "distill": {
        "train": {"layer": 2, "epochs": 1, "buffer_rows": buffer_rows},
        "runs": {"lp": {"approach": "linear_probe"}}}})
    before = start()
    distill.run(params, "lp", folder, out, out.parent / (out.name + "_live"))
else:
    data = READERS[name].open(folder)
    before = start()
    for batch in data.batches("train", 256, buffer_rows, True, 0):
        pass
print(json.dumps({"before": before * 1024, "after": kib("VmHWM") * 1024}))
"""


def peak_growth(name: str, folder: Path, out: Path, buffer_rows: int) -> int:
    """Bytes the peak RSS of one pass (or distill's training epoch) adds, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, name, str(folder), str(out), str(buffer_rows)],
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


def row_bytes(data) -> int:
    """Bytes one streamed row takes, all its aligned tensors together."""
    batch = batch_fields(next(iter(data.batches("train", 1, 1, False))))
    return sum(t.element_size() * t.numel() for t in batch.values())


# Per reader: (dump dim, buffer rows); a buffer's worth of rows is some 64 MiB in each.
PEAK_SIZES = {
    "distill": (1024, 16_384),
    "DirectionSet": (1024, 16_384),
    "TokenSource": (1024, 16_384),
    "TrajectorySet": (64, 4096),  # a sample: keys, values (32, 64), queries (8, 64)
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PEAK_SIZES)
def test_peak_memory_of_a_pass_does_not_grow_with_the_dump(tmp_path, name):
    """A dump 3x the buffer costs no more memory than one 1.5x the buffer.

    Both fill the buffer; holding the dump would add 1.5 buffers of rows, and the
    allowance is a third of that. (Absolute RSS also counts autograd and thread
    pools, hence the differential measurement.)
    """
    reader = READERS["DirectionSet" if name == "distill" else name]
    dim, buffer_rows = PEAK_SIZES[name]
    shard_rows = buffer_rows // 8
    small = reader.make(tmp_path / "small", buffer_rows * 3 // 2, dim, shard_rows)
    large = reader.make(tmp_path / "large", 3 * buffer_rows, dim, shard_rows)
    grown_small = peak_growth(name, small, tmp_path / "out_small", buffer_rows)
    grown_large = peak_growth(name, large, tmp_path / "out_large", buffer_rows)
    extra_dump = (3 * buffer_rows - buffer_rows * 3 // 2) * row_bytes(reader.open(small))
    assert grown_large - grown_small < extra_dump / 3, (
        f"{name}: peak growth {grown_small / 2**20:.0f} MiB (dump = 1.5 x buffer) vs "
        f"{grown_large / 2**20:.0f} MiB (dump = 3 x buffer); holding the difference "
        f"would add {extra_dump / 2**20:.0f} MiB"
    )
