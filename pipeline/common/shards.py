"""Safetensors shards with a JSON manifest: atomic writes, verified reads.

A shard is written under a temporary name and renamed when complete, so a
killed process leaves either a whole shard or none. Its record (file name,
sha256, rows, dtype and shape per tensor) goes into `manifest.json` beside the
shards; `read_shard` refuses a file whose hash, shape or dtype disagrees.

    record = write_shard(out / "shard-00000.safetensors", {"x": x})
    Manifest(kind="directions", params={...}, shards=[record]).save(out)
    x = read_shard(out, Manifest.load(out).shards[0])["x"]
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 22


def layer_key(layer: int) -> str:
    """Name of the tensor holding hidden states of layer `layer` (HF hidden_states index)."""
    return f"layer_{layer}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class ShardRecord:
    file: str
    sha256: str
    rows: int
    tensors: dict[str, TensorSpec]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        tensors = {k: TensorSpec(v["dtype"], list(v["shape"])) for k, v in data["tensors"].items()}
        return cls(data["file"], data["sha256"], int(data["rows"]), tensors)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], rowwise: bool = True) -> ShardRecord:
    """Write `tensors` atomically and return its record.

    `rowwise`: all tensors share their first dimension, the shard's row count.
    """
    path = Path(path)
    rows = {t.shape[0] for t in tensors.values() if t.dim() > 0} if rowwise else set()
    if len(rows) > 1:
        raise ValueError(f"{path.name}: tensors disagree on their row count: {sorted(rows)}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp)
        record = ShardRecord(
            file=path.name,
            sha256=sha256_file(tmp),
            rows=rows.pop() if rows else 0,
            tensors={
                k: TensorSpec(_dtype_name(v.dtype), list(v.shape)) for k, v in tensors.items()
            },
        )
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:
        # safetensors reports a full disk as SafetensorError("... (os error 28)").
        no_space = f"(os error {errno.ENOSPC})" in str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or no_space:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise
    finally:
        # A failed write (a full disk) leaves no half file behind.
        tmp.unlink(missing_ok=True)
    return record


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` to `path` and flush it to disk: where `write_shard` writes bytes."""
    save_file(tensors, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_shard(
    folder: Path, record: ShardRecord, names: list[str] | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Load a shard's tensors (all, or `names`), after checking it against `record`."""
    path = Path(folder) / record.file
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is listed in the manifest but missing")
    if verify:
        found = sha256_file(path)
        if found != record.sha256:
            raise ValueError(
                f"shard {path} is corrupt or was modified: sha256 {found[:12]}... "
                f"but the manifest expects {record.sha256[:12]}...; re-run the stage that wrote it"
            )
    out = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in names or list(record.tensors):
            if name not in record.tensors:
                raise KeyError(
                    f"shard {path} has no tensor {name!r}; it has {sorted(record.tensors)}"
                )
            tensor = handle.get_tensor(name)
            spec = record.tensors[name]
            found = f"{_dtype_name(tensor.dtype)}{list(tensor.shape)}"
            if found != f"{spec.dtype}{spec.shape}":
                raise ValueError(
                    f"shard {path} tensor {name!r} is {found}, "
                    f"the manifest expects {spec.dtype}{spec.shape}"
                )
            out[name] = tensor
    return out


@dataclass
class Manifest:
    kind: str
    params: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)
    files: dict[str, ShardRecord] = field(default_factory=dict)
    """Named single-file artifacts beside the shards (a mean vector, a token table)."""
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: library_versions())

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: Path, kind: str | None = None) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {folder} is not a complete stage output (re-run `dvc repro`)"
            )
        data = json.loads(path.read_text())
        manifest = cls(
            kind=data["kind"],
            params=data["params"],
            shards=[ShardRecord.from_dict(s) for s in data["shards"]],
            files={k: ShardRecord.from_dict(v) for k, v in data.get("files", {}).items()},
            extra=data.get("extra", {}),
            versions=data.get("versions", {}),
        )
        if kind is not None and manifest.kind != kind:
            raise ValueError(f"{path} describes a {manifest.kind!r} output, expected {kind!r}")
        return manifest


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
