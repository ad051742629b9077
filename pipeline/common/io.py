"""Atomic writes of small stage outputs: text and JSON.

Each file is written under a temporary name beside its target and renamed into place
once complete (as shards are), so a killed stage leaves the previous file or the new
one, never half of one. Parent folders are created.

    write_json(Path("metrics/sae.json"), result)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write; renamed to `path` when the block exits without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is not None:
            raise
        # A failed write or close (a full disk) says which file it was writing.
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        # A failed write (a full disk) leaves no half file behind.
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(data: Any, sort_keys: bool = True) -> str:
    """Indented JSON with a final newline, as every JSON output of the pipeline is written."""
    return json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"


def write_json(path: Path, data: Any, sort_keys: bool = True) -> None:
    write_text(path, json_text(data, sort_keys))
