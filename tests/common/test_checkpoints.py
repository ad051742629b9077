"""Checkpoint folders: model.safetensors + config.json round trip, strict loads, named errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.common.checkpoints import (
    CONFIG,
    WEIGHTS,
    load_weights,
    read_config,
    read_weights,
    save_checkpoint,
)


def test_round_trip_writes_the_same_tensors_and_a_sorted_config(tmp_path):
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"b": 1, "a": 2})
    assert (tmp_path / "ckpt" / CONFIG).read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG, WEIGHTS]
    weights = read_weights(tmp_path / "ckpt")
    assert weights.keys() == {"weight", "bias"}
    assert torch.equal(weights["weight"], model.weight.detach())

    fresh = nn.Linear(3, 2).train()
    assert not torch.equal(fresh.weight, model.weight)
    loaded = load_weights(fresh, tmp_path / "ckpt")
    assert loaded is fresh and not loaded.training
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)
    assert read_config(tmp_path / "ckpt", required=("a", "b")) == {"a": 2, "b": 1}


def test_errors_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint config not found: .*{CONFIG}"):
        read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"checkpoint weights not found: .*{WEIGHTS}"):
        read_weights(tmp_path)
    save_checkpoint(tmp_path, nn.Linear(3, 2).state_dict(), {"dim": 3})
    with pytest.raises(ValueError, match=r"config.json: missing keys \['features'\]"):
        read_config(tmp_path, required=("dim", "features"))
    with pytest.raises(ValueError, match=f"{WEIGHTS}: does not fit the model {CONFIG} describes"):
        load_weights(nn.Linear(4, 2), tmp_path)  # wrong shape
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(nn.Sequential(nn.Linear(3, 2)), tmp_path)  # other names: strict
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_weights(tmp_path)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"x": torch.ones(2)}, {"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, {"x": torch.zeros(2)}, {"step": object()})
    # The config is encoded before anything is written: the old checkpoint stays whole.
    assert torch.equal(read_weights(tmp_path)["x"], torch.ones(2))
    assert json.loads((tmp_path / CONFIG).read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
