"""Tiny teachers as model folders, the way stage `teachers` writes them: built once per
test process (seconds: the tokenizer is trained) and loaded by path like any local model."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from pipeline.inputs.tiny_models import save_tiny


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tiny-teachers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def tiny_teacher(recipe: str) -> str:
    """The folder of recipe `qwen3` or `llama`, as a model id (a path string)."""
    return str(save_tiny(recipe, _root() / f"tiny-{recipe}"))
