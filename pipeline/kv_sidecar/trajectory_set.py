"""Streaming reader of one layer of a trajectories folder, as sidecar samples.

A sample is one (chunk, KV head) pair (layout: `pipeline/kv_sidecar/layout.py`):

    keys, values  (N, d)       N = num_windows * window_size dense tokens of that KV head
    queries       (M, d)       M = num_queries * group: the future queries of every query
                               head that reads this KV head (GQA), query-major
    force_norms   (M,)         ||dL/dq|| per query and head, for force-weighted consistency

Held-out chunks are chosen by a stable hash of their corpus block (chunk_id //
block_chunks, `pipeline/inputs/text_chunks.py`), so no document has tokens on both
sides and adding chunks never moves one between train and held-out. Training streams
shards through the bounded shuffle buffer of `pipeline/common/stream.py`; each shard's
sha256 is checked the first time it is read.

    data = TrajectorySet(Path("data/trajectories"), layer=11, eval_fraction=0.05)
    for batch in data.batches("train", batch_size=64, buffer_samples=4096, shuffle=True):
        batch.keys  # (B, N, d) float32
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from pipeline.common.shards import Manifest, ShardRecord, read_shard
from pipeline.common.splits import is_heldout
from pipeline.common.stream import stream_batches
from pipeline.kv_sidecar.layout import TRAJECTORIES, trajectory_key

Split = Literal["train", "heldout"]
SIZE_KEYS = ("n_heads", "n_kv_heads", "head_dim", "window_size", "num_windows", "num_queries")


@dataclass(frozen=True)
class KVBatch:
    chunk_id: Tensor  # (B,) int64
    kv_head: Tensor  # (B,) int64
    keys: Tensor  # (B, N, d) float32
    values: Tensor  # (B, N, d) float32
    queries: Tensor  # (B, M, d) float32
    force_norms: Tensor  # (B, M) float32

    def to(self, device: torch.device | str) -> KVBatch:
        return KVBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.chunk_id.numel()


class TrajectorySet:
    """One stored layer of a trajectories folder, split into train / held-out chunks."""

    def __init__(self, folder: Path, layer: int, eval_fraction: float, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder, kind=TRAJECTORIES)
        self.layer, self.eval_fraction, self.verify = layer, eval_fraction, verify
        extra = self.manifest.extra
        missing = [
            key for key in (*SIZE_KEYS, "layers", "kv_head_of_query_head") if key not in extra
        ]
        if missing:
            raise ValueError(f"{self.folder}/manifest.json: extra lacks {missing}")
        if "block_chunks" not in extra:
            raise ValueError(
                f"{self.folder}/manifest.json has no block_chunks: it was written before "
                "held-out chunks followed documents; re-run the corpus and trajectories stages"
            )
        self.block_chunks = int(extra["block_chunks"])
        if layer not in extra["layers"]:
            raise ValueError(
                f"{self.folder}: layer {layer} is not stored (sidecar.layer); "
                f"it holds layers {extra['layers']}"
            )
        self.sizes = {key: int(extra[key]) for key in SIZE_KEYS}
        self.start_tokens = int(extra.get("start_tokens", 0))
        """The chunks' dense prefix before the windows (not stored; 0 in older dumps)."""
        self.force_space = str(extra.get("force_space", "kv"))
        self.head_groups = _head_groups(extra["kv_head_of_query_head"], self.sizes)
        self._verified: set[str] = set()

    @property
    def head_dim(self) -> int:
        return self.sizes["head_dim"]

    @property
    def dense_tokens(self) -> int:
        return self.sizes["num_windows"] * self.sizes["window_size"]

    @property
    def queries_per_sample(self) -> int:
        return self.sizes["num_queries"] * self.head_groups.shape[1]

    def _read(self, record: ShardRecord, names: list[str]) -> dict[str, Tensor]:
        verify = self.verify and record.file not in self._verified
        tensors = read_shard(self.folder, record, names, verify)
        self._verified.add(record.file)
        return tensors

    def chunk_counts(self) -> dict[str, int]:
        """Chunks per split (reads only chunk_id)."""
        heldout = total = 0
        for record in self.manifest.shards:
            ids = self._read(record, ["chunk_id"])["chunk_id"]
            heldout += int(is_heldout(ids, self.eval_fraction, self.block_chunks).sum())
            total += ids.numel()
        return {"train": total - heldout, "heldout": heldout}

    def shard_samples(self, record: ShardRecord, split: Split) -> KVBatch | None:
        """Every (chunk, KV head) sample of one shard's `split` chunks, or None if none."""
        names = [trajectory_key(self.layer, n) for n in ("keys", "values", "queries")]
        names.append(trajectory_key(self.layer, "force_queries"))
        shard = self._read(record, ["chunk_id", *names])
        keep = is_heldout(shard["chunk_id"], self.eval_fraction, self.block_chunks) == (
            split == "heldout"
        )
        if not bool(keep.any()):
            return None
        keys, values, queries, force_q = (shard[n][keep].float() for n in names)
        rows, n_kv = keys.shape[0], self.sizes["n_kv_heads"]
        heads = self.head_groups  # (n_kv, group) query heads per KV head
        # force_queries is (R, Q, n_heads * d) in hidden space and (R, Q, n_heads, d) in kv
        # space: both hold dL/dq per head, so the per-head norm is the same reshape.
        force = force_q.reshape(rows, self.sizes["num_queries"], self.sizes["n_heads"], -1)
        force_norms = force.norm(dim=-1)[:, :, heads]  # (R, Q, n_kv, group)
        grouped_q = queries[:, :, heads]  # (R, Q, n_kv, group, d)
        return KVBatch(
            chunk_id=shard["chunk_id"][keep].repeat_interleave(n_kv),
            kv_head=torch.arange(n_kv).repeat(rows),
            keys=keys.transpose(1, 2).flatten(0, 1),  # (R * n_kv, N, d)
            values=values.transpose(1, 2).flatten(0, 1),
            queries=grouped_q.permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1),
            force_norms=force_norms.permute(0, 2, 1, 3).flatten(2, 3).flatten(0, 1),
        )

    def batches(
        self,
        split: Split,
        batch_size: int,
        buffer_samples: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[KVBatch]:
        """Stream batches of `split` through the bounded shuffle buffer (`stream_batches`)."""
        shards, group = self.manifest.shards, self.sizes["n_kv_heads"]

        def load(index: int) -> dict[str, Tensor] | None:
            samples = self.shard_samples(shards[index], split)
            if samples is None:
                return None
            return {f.name: getattr(samples, f.name) for f in fields(KVBatch)}

        bounds = [record.rows * group for record in shards]  # one sample per chunk and KV head
        batches = stream_batches(load, bounds, batch_size, buffer_samples, shuffle, seed, drop_last)
        for rows in batches:
            yield KVBatch(**rows)


def _head_groups(mapping: list[int], sizes: dict[str, int]) -> Tensor:
    """(n_kv, group) query-head indices per KV head, from kv_head_of_query_head."""
    n_heads, n_kv = sizes["n_heads"], sizes["n_kv_heads"]
    if len(mapping) != n_heads or sorted(set(mapping)) != list(range(n_kv)):
        raise ValueError(
            f"kv_head_of_query_head {mapping} does not map {n_heads} query heads onto "
            f"{n_kv} KV heads"
        )
    groups = [[h for h, g in enumerate(mapping) if g == kv] for kv in range(n_kv)]
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"kv_head_of_query_head {mapping}: KV heads serve unequal query groups")
    return torch.tensor(groups, dtype=torch.long)
