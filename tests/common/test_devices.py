"""`device` params: `auto` follows CUDA and torchrun's LOCAL_RANK; other names pass through.
`num_threads` params: a count, or null for torch's default."""

from __future__ import annotations

import torch

from pipeline.common.devices import resolve_device, set_threads


def test_auto_is_the_local_rank_gpu_or_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda:1")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda:0")


def test_other_names_are_read_by_torch():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_set_threads_applies_a_count_and_leaves_null_or_zero_to_torch():
    before = torch.get_num_threads()
    try:
        set_threads(3)
        assert torch.get_num_threads() == 3
        set_threads(None)
        set_threads(0)
        assert torch.get_num_threads() == 3  # null and 0 keep what torch has
    finally:
        torch.set_num_threads(before)
