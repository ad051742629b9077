"""The one shard stream of the training readers: shards through a bounded shuffle buffer.

A reader hands over how to load shard i (named tensors whose rows align) and an
upper bound on each shard's rows; it gets back batches of the same names. Rows go
into one preallocated buffer of max(buffer_rows, batch_size) + the largest shard,
so memory stays bounded whatever the size of the dump, and one permutation
indexes every tensor, so a row never parts from its id or item.

    def load(index):  # {"concept_id": (R,), "target": (R, D)}, or None when empty
        ...
    for batch in stream_batches(load, [r.rows for r in shards], 256, 65_536, True, seed=0):
        batch["target"]  # (256, D)

With `shuffle`, the shard order is one permutation and, each time the buffer
holds `buffer_rows` or more, the whole buffer (the previous tail first, then the
new shards) is permuted; whole batches are emitted and the partial tail stays,
in permuted order, to be mixed with the next shard. The last fill is emitted in
full (its final batch may be short, or dropped with `drop_last`). Without
`shuffle` rows come in storage order. The draws depend on the seed and the row
counts alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

Rows = dict[str, Tensor]


def stream_batches(
    load: Callable[[int], Rows | None],
    shard_rows: Sequence[int],
    batch_size: int,
    buffer_rows: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[Rows]:
    """Batches of `batch_size` aligned rows from shards `0..len(shard_rows)-1`.

    `load(i)` returns shard i's rows (at most `shard_rows[i]` of them; None or
    zero rows when it has none). Every row comes once per pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    order = list(range(len(shard_rows)))
    if shuffle:
        order = [order[i] for i in torch.randperm(len(order), generator=generator)]
    # Before a shard arrives the buffer holds < buffer_rows rows or a tail < batch_size.
    buffer = _Buffer(max(buffer_rows, batch_size) + max(shard_rows, default=0))
    for index in order:
        rows = load(index)
        if rows is not None:
            buffer.append(rows, shard_rows[index], index)
        del rows  # copied into the buffer: not a second shard held while batches go out
        if buffer.held >= buffer_rows:
            yield from buffer.drain(batch_size, shuffle, generator, keep_tail=True)
    for batch in buffer.drain(batch_size, shuffle, generator, keep_tail=False):
        if not drop_last or len(next(iter(batch.values()))) == batch_size:
            yield batch


class _Buffer:
    """Preallocated storage of `capacity` rows per name, allocated at the first rows."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        self.tensors: Rows = {}

    def append(self, rows: Rows, bound: int, index: int) -> None:
        count = _row_count(rows, index)
        if count > bound:
            raise ValueError(f"shard {index} gave {count} rows, more than its bound of {bound}")
        if count == 0:
            return
        if not self.tensors:
            self.tensors = {
                name: torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype)
                for name, t in rows.items()
            }
        if rows.keys() != self.tensors.keys():
            raise ValueError(
                f"shard {index} has tensors {sorted(rows)}, earlier ones {sorted(self.tensors)}"
            )
        for name, tensor in rows.items():
            self.tensors[name][self.held : self.held + count] = tensor
        self.held += count

    def drain(self, batch_size, shuffle, generator, keep_tail) -> Iterator[Rows]:
        """Batches from the held rows, in one permutation; the partial tail moves to the front."""
        if self.held == 0:
            return
        held = self.held
        order = torch.randperm(held, generator=generator) if shuffle else torch.arange(held)
        full = (held // batch_size) * batch_size if keep_tail else held
        for start in range(0, full, batch_size):
            rows = order[start : start + batch_size]
            yield {name: tensor[rows] for name, tensor in self.tensors.items()}
        tail = order[full:]
        for tensor in self.tensors.values():
            tensor[: len(tail)] = tensor[tail]
        self.held = len(tail)


def _row_count(rows: Rows, index: int) -> int:
    counts = {name: t.shape[0] for name, t in rows.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"shard {index}: tensors of unequal row counts {counts}")
    return next(iter(counts.values()), 0)
