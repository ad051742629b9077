"""Safetensors shards with a JSON manifest: atomic writes, verified reads.

A shard is written under a temporary name and renamed when complete, so a
killed process leaves either a whole shard or none. Its record (file name,
sha256, rows, dtype and shape per tensor) goes into `manifest.json` beside the
shards. A manifest is verified, not trusted: `Manifest.load` refuses a file name
that is not a plain name inside the folder and a record whose rows, dtypes or
shapes disagree with its file's own safetensors header (one small read per file),
so readers may use the records' numbers at once; `read_shard` also refuses a file
whose sha256 disagrees.

    record = write_shard(out / "shard-00000.safetensors", {"x": x})
    Manifest(kind="directions", params={...}, shards=[record]).save(out)
    x = read_shard(out, Manifest.load(out).shards[0])["x"]
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 22
# safetensors refuses longer headers too; a length beyond this is not a header.
_HEADER_LIMIT = 100_000_000
# safetensors dtype code -> (torch dtype name as records store it, bytes per element)
_HEADER_DTYPES = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}


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
    def from_dict(cls, data: Any) -> ShardRecord:
        """A record as stored in JSON; a malformed one is a ValueError saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
        missing = [k for k in ("file", "sha256", "rows", "tensors") if k not in data]
        if missing:
            raise ValueError(f"the record lacks {missing}")
        sha256, tensors = data["sha256"], data["tensors"]
        if not isinstance(sha256, str) or not re.fullmatch("[0-9a-f]{64}", sha256):
            raise ValueError(f"sha256 {sha256!r} is not 64 hex digits")
        if not isinstance(tensors, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("dtype"), str) for v in tensors.values()
        ):
            raise ValueError(f"tensors {tensors!r} is not a map of name -> {{dtype, shape}}")
        specs = {
            k: TensorSpec(v["dtype"], _counts(v.get("shape"), f"tensor {k!r} shape"))
            for k, v in tensors.items()
        }
        rows = _counts([data["rows"]], "rows")[0]
        return cls(check_file_name(data["file"]), sha256, rows, specs)


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
    """Load a shard's tensors (all, or `names`), after checking it against `record`:
    its sha256 (when `verify`), then its header's dtypes and shapes, before any tensor."""
    path = Path(folder) / check_file_name(record.file)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is listed in the manifest but missing")
    if verify:
        found = sha256_file(path)
        if found != record.sha256:
            raise ValueError(
                f"shard {path} is corrupt or was modified: sha256 {found[:12]}... "
                f"but the manifest expects {record.sha256[:12]}...; re-run the stage that wrote it"
            )
    _check_tensors(path, record, read_header(path), "the manifest")
    wanted = names or list(record.tensors)
    for name in wanted:
        if name not in record.tensors:
            raise KeyError(f"shard {path} has no tensor {name!r}; it has {sorted(record.tensors)}")
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in wanted}


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
        """The manifest of `folder`, every record checked against the file it names.

        Each file name is a plain name inside `folder`, and each record's rows, dtypes
        and shapes are those of its file's safetensors header (the header alone is
        read); every reader may then use the records' numbers. A file's sha256 is
        checked when it is read (`read_shard`).
        """
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {folder} is not a complete stage output (re-run `dvc repro`)"
            )
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or not all(k in data for k in ("kind", "params", "shards")):
            raise ValueError(f"{path} is not a manifest: it needs kind, params and shards")
        files = data.get("files", {})
        manifest = cls(
            kind=data["kind"],
            params=data["params"],
            shards=[_record(path, f"shards[{i}]", s) for i, s in enumerate(data["shards"])],
            files={k: _record(path, f"files[{k!r}]", v, key=k) for k, v in files.items()},
            extra=data.get("extra", {}),
            versions=data.get("versions", {}),
        )
        if kind is not None and manifest.kind != kind:
            raise ValueError(f"{path} describes a {manifest.kind!r} output, expected {kind!r}")
        manifest._check_files(Path(folder), path)
        return manifest

    def _check_files(self, folder: Path, source: Path) -> None:
        entries = [(f"shards[{i}]", record, False) for i, record in enumerate(self.shards)]
        entries += [(f"files[{key!r}]", record, True) for key, record in self.files.items()]
        seen: dict[str, str] = {}
        for entry, record, side_file in entries:
            if record.file in seen:
                raise ValueError(f"{source}: {seen[record.file]} and {entry} name {record.file}")
            seen[record.file] = entry
            path = folder / record.file
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} is listed in {source} but missing")
            check_record(path, record, str(source), side_file)


def _record(source: Path, entry: str, data: Any, key: Any = None) -> ShardRecord:
    try:
        if key is not None:
            check_file_name(key)  # a side file's key is a name too
        return ShardRecord.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{source}: {entry}: {err}") from None


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


def check_file_name(name: Any) -> str:
    """`name` if it is a plain file name inside an artifact folder, else a ValueError."""
    if not isinstance(name, str) or not name or "\0" in name:
        why = "is not a file name"
    elif os.path.isabs(name):
        why = "is an absolute path"
    elif ".." in re.split(r"[/\\]", name):
        why = "climbs out of the folder with '..'"
    elif re.search(r"[/\\]", name) or (os.altsep and os.altsep in name):
        why = "holds a path separator"
    elif name.startswith("."):
        why = "is hidden"
    else:
        return name
    raise ValueError(f"{name!r} {why}: a file must be named plainly, inside the artifact folder")


def read_header(path: Path) -> dict[str, TensorSpec]:
    """Dtype and shape of each tensor of a safetensors file, from its header alone.

    The header is an 8-byte little-endian length, then that much JSON. A length beyond
    the file (or absurd), JSON that does not parse, or tensor offsets that do not tile
    the rest of the file exactly is refused here, naming the file, so that safetensors
    is never handed it.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, _HEADER_LIMIT):
            _not_safetensors(path, f"its header claims {length} bytes, the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # ValueError: JSONDecodeError, bad UTF-8
        _not_safetensors(path, f"its header is not valid JSON ({err})")
    if not isinstance(header, dict):
        _not_safetensors(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        _not_safetensors(path, "its __metadata__ is not a map of strings")
    specs, spans = {}, []
    for name, entry in header.items():
        entry = entry if isinstance(entry, dict) else {}
        dtype, itemsize = _HEADER_DTYPES.get(str(entry.get("dtype")), (None, 0))
        shape, span = entry.get("shape"), entry.get("data_offsets")
        if not (dtype and _are_counts(shape) and _are_counts(span) and len(span) == 2):
            _not_safetensors(path, f"tensor {name!r} has no valid dtype, shape and offsets")
        if span[1] - span[0] != math.prod(shape) * itemsize:
            _not_safetensors(path, f"tensor {name!r} spans bytes {span}, not {dtype}{shape}")
        specs[name] = TensorSpec(dtype, list(shape))
        spans.append((span[0], span[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            _not_safetensors(path, f"tensor {name!r} starts at byte {start}, expected {end}")
        end = stop
    if end != size - 8 - length:
        _not_safetensors(path, f"its tensors fill {end} of the {size - 8 - length} data bytes")
    return specs


def check_record(path: Path, record: ShardRecord, source: str, side_file: bool = False) -> None:
    """Refuse a record (from `source`) whose rows, dtypes or shapes are not `path`'s own.

    A shard's rows are its tensors' shared first dimension; a side file (`side_file`)
    may also have 0 rows, when written with `rowwise=False`.
    """
    header = read_header(path)
    _check_tensors(path, record, header, source)
    firsts = sorted({spec.shape[0] for spec in header.values() if spec.shape})
    if len(firsts) > 1 and not side_file:
        raise ValueError(f"shard {path}: its tensors disagree on their row count: {firsts}")
    rows = firsts[0] if len(firsts) == 1 else 0
    if record.rows != rows and not (side_file and record.rows == 0):
        _disagrees(path, source, "rows", record.rows, rows)


def _check_tensors(
    path: Path, record: ShardRecord, header: dict[str, TensorSpec], source: str
) -> None:
    if sorted(record.tensors) != sorted(header):
        _disagrees(path, source, "tensors", sorted(record.tensors), sorted(header))
    for name, spec in record.tensors.items():
        for field_name in ("dtype", "shape"):
            claimed, found = getattr(spec, field_name), getattr(header[name], field_name)
            if claimed != found:
                _disagrees(path, source, f"tensor {name!r} {field_name}", claimed, found)


def _disagrees(path: Path, source: str, field_name: str, claimed: Any, found: Any) -> NoReturn:
    raise ValueError(
        f"shard {path}: {source} says {field_name} = {claimed}, its safetensors header says "
        f"{found}; the manifest does not describe this file (re-run the stage that wrote it)"
    )


def _not_safetensors(path: Path, why: str) -> NoReturn:
    raise ValueError(f"shard {path} is not a readable safetensors file: {why}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # safetensors refuses a repeated field; a repeated tensor name is no better.
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"a key repeats in {keys}")
    return dict(pairs)


def _are_counts(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )


def _counts(values: Any, what: str) -> list[int]:
    if not _are_counts(values):
        raise ValueError(f"{what} {values!r} is not a list of non-negative integers")
    return list(values)
