"""Where a stage computes: its `device` param (`auto`, `cpu`, `cuda:1` ...) as a torch device.

One rule for every stage: under torchrun, `auto` is the GPU of the process's LOCAL_RANK.

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
