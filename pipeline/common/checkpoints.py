"""A trained model on disk: one folder with `model.safetensors` (tensors) + `config.json`.

The config carries what rebuilds the model; each branch decides its keys and checks
them. Both files are written under temporary names and renamed (`pipeline.common.io`),
so a killed run leaves no half file. Readers name the file and what was expected.

    save_checkpoint(out, model.state_dict(), config)
    config = read_config(out, required=("head_dim", "params"))
    model = load_weights(build(config), out)  # strict, eval mode
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.common.io import atomic_path, json_text, write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(folder: Path, tensors: Mapping[str, Tensor], config: dict[str, Any]) -> None:
    """`folder/model.safetensors` (`tensors`, detached, on the CPU) + `folder/config.json`."""
    folder = Path(folder)
    # Encoded first: a config that cannot be written fails before the weights are replaced.
    text = json_text(config)
    state = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_text(folder / CONFIG, text)


def read_config(folder: Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """`folder/config.json`, checked to hold every key of `required`."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected at least {list(required)}")
    return config


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of `folder/model.safetensors`, on the CPU."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from err


def load_weights(model: nn.Module, folder: Path) -> nn.Module:
    """`model` holding the weights of `folder` (every tensor, no other), in eval mode."""
    weights = read_weights(folder)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        path = Path(folder) / WEIGHTS
        raise ValueError(f"{path}: does not fit the model {CONFIG} describes: {err}") from err
    return model.eval()
