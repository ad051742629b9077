"""The machine a benchmark ran on, as its tables state it: CPU model and flags, threads, GPU."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# The flags that decide which matmul kernels run (bf16 needs AVX-512 BF16 or AMX).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe(device: str) -> dict:
    flags = cpu_flags()
    machine = {
        "cpu": cpu_model(),
        "cpu_flags": [flag for flag in FLAGS if flag in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return machine
