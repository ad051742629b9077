"""Where a stage computes: its `device` param (`auto`, `cpu`, `cuda:1` ...) as a torch
device, and on how many CPU threads (its `num_threads` param).

One rule for every stage: under torchrun, `auto` is the GPU of the process's LOCAL_RANK.

    set_threads(params.num_threads)  # first thing in the stage's run()
    model.to(resolve_device(params.device))
"""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """`auto`: this process's GPU (under torchrun, the one of its LOCAL_RANK) when CUDA is
    available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(num_threads: int | None) -> None:
    """torch's intra-op CPU threads for the rest of the process; None or 0 keeps torch's
    default (one per core). On cores other jobs share, fewer threads can be much faster
    (SmolLM2 extraction: one thread 2-3x faster than two on two loaded cores). The count
    does not change results beyond float summation order, so it is no DVC dep."""
    if num_threads:
        torch.set_num_threads(num_threads)
