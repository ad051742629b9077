"""The downstream metric (`kv_sidecar/lm_loss.py`) and the baselines (`compressors.py`) on
the tiny Llama (GQA: 8 query heads, 2 KV heads), against plain forwards and known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.inputs.tiny_models import build_tiny
from pipeline.kv_sidecar.compressors import (
    Compressor,
    attention_mass,
    baseline_compressors,
    key_norm_min,
    sidecar_compressor,
    window_mean,
)
from pipeline.kv_sidecar.lm_loss import (
    Splice,
    heldout_lm_losses,
    paired_increase,
    splice_attention,
    window_attention_mass,
)

N, Q, WINDOW = 32, 8, 8  # 4 windows of 8 tokens, 8 future positions


@pytest.fixture(scope="module")
def model():
    model, _ = build_tiny("llama")
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def chunks(model) -> torch.Tensor:
    """12 chunks of N + Q + 1 tokens: random window tokens, then the dense model's own
    greedy continuation, so the labels are what the dense model predicts and a cache that
    changes its predictions raises the loss (a random-weight teacher's loss is otherwise
    almost flat)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (12, N), generator=gen)
    with torch.no_grad():
        for _ in range(Q + 1):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


def tokens_of(chunks: torch.Tensor) -> dict[int, torch.Tensor]:
    return {100 + i: row for i, row in enumerate(chunks)}


def plain_losses(model, chunks: torch.Tensor) -> torch.Tensor:
    """The model's own loss: a plain forward, cross-entropy of positions N..N+Q-1."""
    with torch.no_grad():
        logits = model(chunks[:, :-1]).logits[:, N:]
    ce = F.cross_entropy(logits.flatten(0, 1), chunks[:, N + 1 :].flatten(), reduction="none")
    return ce.view(len(chunks), Q).mean(1).double()


def zero(keys, values, mass):
    return torch.zeros_like(keys[..., 0, :]), torch.zeros_like(values[..., 0, :])


def test_dense_loss_is_the_models_own_loss(model, chunks, capsys):
    lm = heldout_lm_losses(model, tokens_of(chunks), 1, N, WINDOW, {}, 5, desc="sidecar layer 1")
    assert capsys.readouterr().err.splitlines()[-1].startswith("sidecar layer 1: 3/3 [")
    assert lm.chunk_ids == list(range(100, 112))
    assert torch.allclose(lm.dense, plain_losses(model, chunks), atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("layer", [0, 3])
def test_one_token_windows_give_zero_increase_for_every_baseline(model, chunks, layer):
    # Window size 1: each super-token is its window's only token (mean, selection alike).
    lm = heldout_lm_losses(model, tokens_of(chunks), layer, N, 1, baseline_compressors(), 4)
    for name, losses in lm.compressed.items():
        increase, interval = paired_increase(losses, lm.dense, seed=0)
        assert abs(increase) < 1e-5, name
        assert interval[0] <= increase <= interval[1] and interval[1] - interval[0] < 1e-5


def test_zeroed_or_shuffled_super_tokens_clearly_raise_the_loss(model, chunks):
    def shuffled(keys, values, mass):  # another chunk's window means
        kc, vc = window_mean(keys, values)
        return kc.roll(2, 0), vc.roll(2, 0)

    bad = {"zero": Compressor("zero", zero), "shuffled": Compressor("shuffled", shuffled)}
    lm = heldout_lm_losses(model, tokens_of(chunks), 3, N, WINDOW, bad, batch_size=12)
    for name, losses in lm.compressed.items():
        increase, (low, high) = paired_increase(losses, lm.dense, seed=0)
        assert low > 0 and increase > 0.01, (name, increase, low)


def test_the_splice_changes_only_the_future_positions_of_its_layer(model, chunks):
    inputs = chunks[:4, :-1]
    with torch.no_grad():
        dense = model(inputs, output_hidden_states=True).hidden_states
        with splice_attention(model, Splice(2, N, WINDOW, Compressor("zero", zero))):
            spliced = model(inputs, output_hidden_states=True).hidden_states
    for layer in range(3):  # hidden_states[i] enters block i: blocks 0, 1 are untouched
        assert torch.equal(dense[layer], spliced[layer])
    assert torch.allclose(dense[3][:, :N], spliced[3][:, :N], atol=1e-6)  # window positions
    assert not torch.allclose(dense[3][:, N:], spliced[3][:, N:], atol=1e-3)


def test_window_attention_mass_is_the_softmax_mass_from_the_windows_own_queries():
    gen = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 4, 6, 3, generator=gen), torch.randn(1, 2, 6, 3, generator=gen)
    mass = window_attention_mass(query, key, 0.5, window_size=3)  # (1, 2, 6)
    for kv in range(2):
        for j in range(6):
            start = j // 3 * 3
            expected = 0.0
            for head in (2 * kv, 2 * kv + 1):  # the query heads of this KV head
                for i in range(max(j, start), start + 3):  # causal queries of j's window
                    scores = query[0, head, i] @ key[0, kv, : i + 1].T * 0.5
                    expected += float(scores.softmax(-1)[j])
            assert mass[0, kv, j].item() == pytest.approx(expected, rel=1e-5)


def test_selection_baselines_keep_the_chosen_token():
    keys = torch.tensor([[[[3.0, 0.0], [0.0, 1.0], [2.0, 2.0]]]])  # (1, 1 window, 3, 2)
    values = torch.tensor([[[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]]])
    kc, vc = key_norm_min(keys, values)  # norms 3, 1, 2.83: the lowest is token 1
    assert kc.tolist() == [[[0.0, 1.0]]] and vc.tolist() == [[[2.0, 2.0]]]
    kc, vc = attention_mass(keys, values, torch.tensor([[[0.2, 0.1, 0.7]]]))
    assert kc.tolist() == [[[2.0, 2.0]]] and vc.tolist() == [[[3.0, 3.0]]]
    with pytest.raises(ValueError, match="attention mass"):
        baseline_compressors()["attention_mass"].apply(keys, values, None)


def test_baselines_are_never_rescaled_and_the_sidecar_is():
    keys, values = 5.0 * torch.randn(3, 4, 8, 6), torch.randn(3, 4, 8, 6)
    for compressor in baseline_compressors().values():
        assert compressor.scale_normalize == "none"
    kc, _ = baseline_compressors()["window_mean"].apply(keys, values, None)
    assert torch.allclose(kc, keys.mean(2))

    class Halve(torch.nn.Module):
        def forward(self, k, v):
            return 0.5 * k.mean(2), 0.5 * v.mean(2)

    kc, vc = sidecar_compressor(Halve(), "per_sample").apply(keys, values, None)
    # One scalar per sample: mean super-token norm = mean dense norm, relative norms kept.
    assert torch.allclose(kc.norm(dim=-1).mean(-1), keys.norm(dim=-1).flatten(1).mean(-1))
    ratio = kc.norm(dim=-1) / keys.mean(2).norm(dim=-1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)
    kc, _ = sidecar_compressor(Halve(), "none").apply(keys, values, None)
    assert torch.allclose(kc, 0.5 * keys.mean(2))


def test_paired_interval_on_a_known_sample():
    dense = torch.zeros(40, dtype=torch.float64)
    diffs = torch.tensor([0.1, 0.3] * 20, dtype=torch.float64)  # mean 0.2, sd 0.1
    increase, (low, high) = paired_increase(dense + diffs, dense, seed=0)
    assert increase == pytest.approx(0.2)
    half = 1.96 * 0.1 / math.sqrt(40)  # the normal interval the bootstrap approximates
    assert low == pytest.approx(0.2 - half, abs=0.006) and high == pytest.approx(
        0.2 + half, abs=0.006
    )
    # Pairing: a shift shared by both sides changes nothing (but the rounding of the
    # differences, which can move an end by one step of the discrete means, 0.1 / 20).
    shift = torch.linspace(0, 5, 40, dtype=torch.float64)
    assert paired_increase(dense + diffs + shift, dense + shift, seed=0)[1] == pytest.approx(
        [low, high], abs=0.0051
    )
    assert paired_increase(diffs[:1], dense[:1], seed=0) == (pytest.approx(0.1), None)
