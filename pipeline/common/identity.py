"""What a stage's inputs are, beyond its params: the identity of each model it loads, the
content of the local files it reads, and the compute dtype `auto` stands for here.

DVC sees params and files; a `model` param that names a hub id says nothing about which
commit of `main` loads, and one that names a local folder says nothing about the weights
in it. So each model resolves to an identity that changes exactly when its weights or
tokenizer can:

- a local folder: the sha256 of its files (`folder_sha256`: sorted relative paths, each
  file's own sha256), no revision;
- a hub id: the commit its `revision` param names (itself when it is a 40-hex commit;
  else resolved on the hub, or offline from the ref in the local Hugging Face cache).

Stage `identities` (`pipeline/inputs/identities.py`) writes them to small files the loading
stages depend on; each loading stage resolves its model the same way, loads that commit
and records the identity in its manifest.

    identity = model_identity("Qwen/Qwen3-0.6B", "main", "directions.model")
    identity.revision       # '6f1d...' (40 hex), the commit to load
    identity.manifest()     # {'revision': '6f1d...', 'model_sha256': None}
    resolve_compute_dtype("auto", torch.device("cpu"))  # 'bfloat16' on an AVX-512 BF16 CPU
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import repo_folder_name

from pipeline.common.devices import resolve_device
from pipeline.common.shards import sha256_file

HUB_PROBE_TIMEOUT_S = 10.0
"""Seconds the one probe of the hub may take before it counts as unreachable."""

_COMMIT = re.compile(r"[0-9a-f]{40}")

MODEL_KEYS = ("model", "revision", "model_sha256")
"""The keys of a manifest's `extra` that say which model computed it (`ModelIdentity.manifest`
gives the last two)."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of a CPU whose matmuls run bfloat16 natively (AVX-512 BF16, AMX)."""


@dataclass(frozen=True)
class ModelIdentity:
    model: str
    """The `model` param: a hub id or a local folder."""
    revision: str | None
    """The resolved commit of a hub id (what loads); None for a local folder."""
    sha256: str | None
    """The content hash of a local folder (`folder_sha256`); None for a hub id."""

    def manifest(self) -> dict[str, str | None]:
        """The keys a manifest's `extra` records beside `model`."""
        return {"revision": self.revision, "model_sha256": self.sha256}

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def looks_like_path(model_id: str) -> bool:
    """Whether a `model` param names a local folder rather than a hub id (`org/name`): it
    starts with `.`, `/` or `~`, has more than one `/`, or its parent folder exists."""
    parent = Path(model_id).parent
    return (
        model_id.startswith((".", "/", "~"))
        or model_id.count("/") > 1
        or (parent != Path(".") and parent.is_dir())
    )


def model_identity(model_id: str, revision: str | None, key: str) -> ModelIdentity:
    """The identity of the model `key` (a dotted params key) names; raises one line naming
    `key` and the model where it cannot be resolved."""
    if looks_like_path(model_id) or Path(model_id).exists():
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {model_id} ({key})")
        return ModelIdentity(model_id, None, folder_sha256(folder))
    return ModelIdentity(model_id, hub_commit(model_id, revision or "main", key), None)


def folder_sha256(folder: Path) -> str:
    """sha256 over the folder's files in sorted order of their relative paths: each
    contributes `<relative path>\\0<its sha256>\\n` (files streamed in chunks, so a GB
    folder costs one read). Hidden entries (`.cache`, `.git`) are skipped: tools write
    there without changing the model."""
    files = [
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    ]
    if not files:
        raise FileNotFoundError(f"model folder {folder} holds no file")
    return files_digest(folder, files)


def files_digest(root: Path, names: list[str]) -> str:
    """sha256 over the files `names` (posix paths relative to `root`) in sorted order: each
    contributes `<relative path>\\0<its sha256>\\n`."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{sha256_file(root / name)}\n".encode())
    return digest.hexdigest()


def hub_commit(model_id: str, revision: str, key: str) -> str:
    """The commit `revision` (a branch, tag or commit) of hub model `model_id` names: a
    40-hex commit as given; else the hub's answer, or, offline or unreachable, the ref of
    the local Hugging Face cache."""
    if _COMMIT.fullmatch(revision):
        return revision
    cached = cached_commit(model_id, revision)
    if huggingface_hub.is_offline_mode():
        if cached is None:
            raise OSError(
                f"{key}={model_id!r}: revision {revision!r} is not in the local Hugging Face "
                f"cache ({hub_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                + way_out(model_id)
            )
        return cached
    try:
        info = huggingface_hub.model_info(model_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError as err:  # the hub answered: no such repo or revision, gated ...
        raise OSError(
            f"{key}={model_id!r}: the hub cannot resolve revision {revision!r}: {err}"
        ) from err
    except Exception as err:  # the hub client's transport errors (DNS, connect, timeout)
        if cached is None:
            raise OSError(
                f"{key}={model_id!r}: the hub ({hub_constants.ENDPOINT}) is "
                f"unreachable ({type(err).__name__}) and revision {revision!r} is not in the "
                "local Hugging Face cache: " + way_out(model_id)
            ) from err
        return cached
    return info.sha


def way_out(model_id: str) -> str:
    """How to run without the hub: the end of an unresolvable model's error line."""
    name = model_id.rpartition("/")[2].lower()
    return (
        "point the key at a local copy (a folder with config.json, weights and tokenizer "
        f"files, e.g. made by `hf download {model_id} --local-dir models/{name}`), or run "
        "`make demo` for the offline tiny profile"
    )


def cached_commit(model_id: str, revision: str) -> str | None:
    """The commit the local Hugging Face cache's ref `revision` of `model_id` points at."""
    # Submodules imported by name: the package's lazy attributes do not include them, so
    # `huggingface_hub.file_download` works only once some other import has loaded it.
    folder = repo_folder_name(repo_id=model_id, repo_type="model")
    ref = Path(hub_constants.HF_HUB_CACHE) / folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else ""
    return commit if _COMMIT.fullmatch(commit) else None


def files_sha256(paths: list[Path]) -> dict[str, str]:
    """{path: sha256} of local input files, in sorted order of their paths."""
    return {str(path): sha256_file(path) for path in sorted(paths)}


def corpus_files(pattern: str) -> list[Path]:
    """The files `corpus.files` matches, sorted: the documents of `source: files`, in order."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise FileNotFoundError(f"corpus.files={pattern!r} matches no file")
    return paths


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The flags of this machine's CPU, from its first `flags` line (none without the file)."""
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def resolve_compute_dtype(
    value: str, device: torch.device, flags: set[str] | None = None, key: str = "compute_dtype"
) -> str:
    """`auto`: bfloat16 on a CUDA device or a CPU with native bfloat16 matmuls
    (BF16_CPU_FLAGS among `flags`, default this CPU's), float32 otherwise; any other
    value as given. bfloat16 elsewhere (AVX2 only) is emulated, tens of times slower."""
    if value not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"{key} must be auto, float32, bfloat16 or float16, got {value!r}")
    if value != "auto":
        return value
    if device.type == "cuda":
        return "bfloat16"
    if device.type == "cpu":
        native = set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags)
        return "bfloat16" if native else "float32"
    return "float32"


def resolve_model_params(params: Any, section: str, dtype_field: str = "compute_dtype"):
    """(`params` with `dtype_field` resolved, the identity of `params.model`): what a stage
    that loads `params.model` on `params.device` computes with. `section` is the params
    section (`directions`, `steering` ...), named in errors. Stage `identities` records the
    same values, so DVC re-runs the stage exactly when one of them changes."""
    model = model_identity(params.model, params.revision, f"{section}.model")
    dtype = resolve_compute_dtype(
        getattr(params, dtype_field), resolve_device(params.device), key=f"{section}.{dtype_field}"
    )
    return replace(params, **{dtype_field: dtype}), model
