"""Data-parallel extraction: which process am I, and wait for the others.

Under `torchrun --nproc-per-node N` (or `accelerate launch`) each process gets
RANK and WORLD_SIZE from the environment. Extraction stages compute only the
shards `world.owned_shards(num_shards)` gives them, then meet at a barrier; rank 0
writes the manifest (`pipeline/common/extraction.py`). Shard contents do not
depend on the world size, so any N gives the same artifact.

    with process_group() as world:
        for index in world.owned_shards(num_shards): ...
        world.barrier()
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned_shards(self, num_shards: int) -> list[int]:
        """Shards this rank computes: a pure function of (index, rank, world size)."""
        return [index for index in range(num_shards) if index % self.size == self.rank]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world_from_env() -> World:
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank, size)


@contextmanager
def process_group() -> Iterator[World]:
    """Join the torchrun process group when there is one (gloo: only barriers travel)."""
    world = world_from_env()
    joined = world.size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        if joined:
            dist.destroy_process_group()
