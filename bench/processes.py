"""Each benchmarked method in its own process, so no method's memory or caches help another.

The driver runs `python -m <module> --run-one METHOD ... --out DIR`; the child builds
its own model, times only the method, and leaves `result.json` (and its vectors) in
DIR. Peak memory is the child's own, from the moment the method starts (building the
model peaks higher and is not the method's doing): the kernel's VmHWM after a reset
through /proc/self/clear_refs on the CPU, the CUDA allocator's peak on a GPU; both
include the weights, whose size is recorded beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def run_child(module: str, args: list[str], out: Path) -> dict:
    """Run one method; its result, or {"error": last line of its stderr} if it failed."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads((out / "result.json").read_text())


def status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise ValueError(f"/proc/self/status has no {field} line")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # "5" resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")


def memory_gb(device: torch.device) -> dict[str, float | str]:
    """Peak memory since `reset_peak_memory`, and what measured it."""
    if device.type == "cuda":
        return {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9, "measure": "cuda"}
    return {"peak_gb": status_gb("VmHWM"), "measure": "VmHWM"}


def model_memory_gb(device: torch.device) -> float:
    """Memory held right after the model is built: the floor under every method's peak."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e9
    return status_gb("VmRSS")


def emit(results: dict, path: Path | None) -> None:
    """Print a benchmark's results; also write them to `path` (its JSON under bench/results/)."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
