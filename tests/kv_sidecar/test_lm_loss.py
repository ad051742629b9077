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
    compressed_future_attention,
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


@pytest.fixture(scope="module")
def sink_chunks(model) -> torch.Tensor:
    """12 chunks of 1 + N + Q + 1 tokens: <|endoftext|> (id 0) at position 0, as
    corpus.start_token: auto puts it, then random window tokens and the dense model's own
    greedy continuation."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(1, model.config.vocab_size, (12, N), generator=gen)
    x = torch.cat([torch.zeros(12, 1, dtype=torch.long), x], 1)
    with torch.no_grad():
        for _ in range(Q + 1):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


def test_the_start_token_stays_dense_so_one_token_windows_change_nothing(model, sink_chunks):
    """The windows begin after the start token: the dense loss is the plain forward's at
    positions 1+N..N+Q, and a super-token per window token (window size 1) is the cache
    itself, with the start token kept as it is."""
    lm = heldout_lm_losses(model, tokens_of(sink_chunks), 2, N, 1, baseline_compressors(), 5,
                           start_tokens=1)  # fmt: skip
    with torch.no_grad():
        logits = model(sink_chunks[:, :-1]).logits[:, 1 + N :]
    labels = sink_chunks[:, 2 + N :]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    assert torch.allclose(lm.dense, ce.view(12, Q).mean(1).double(), atol=1e-5, rtol=0)
    assert lm.mass.shape == (12, 2, N)  # window tokens only
    for name, losses in lm.compressed.items():
        assert torch.allclose(losses, lm.dense, atol=1e-5, rtol=0), name


def test_compressing_the_start_token_away_changes_the_loss(model, sink_chunks):
    """Must fail: the same one-token windows, but position 0 counted as the first window
    and replaced by a zero super-token, as every window is, give another loss; with the
    prefix kept dense, zeroing the windows alone gives a third."""
    zeroing = {"zero": Compressor("zero", zero)}
    tokens = tokens_of(sink_chunks)
    kept = heldout_lm_losses(model, tokens, 2, N, 1, zeroing, 12, start_tokens=1)
    lost = heldout_lm_losses(model, tokens, 2, 1 + N, 1, zeroing, 12, start_tokens=0)
    assert torch.equal(kept.dense, lost.dense)  # the same dense pass
    gap = (kept.compressed["zero"] - lost.compressed["zero"]).abs()
    assert float(gap.mean()) > 1e-3 and bool((gap > 0).all())


def test_the_future_queries_read_the_prefix_dense_then_the_super_tokens():
    """Known answer: with one start token, 2 windows of 2 and 3 future positions, future
    query i attends over [k_0, mean(k_1, k_2), mean(k_3, k_4), k_5 .. k_{5+i}]."""
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(1, 2, 8, 4, generator=gen)  # 2 query heads share 1 KV head
    key, value = torch.randn(1, 1, 8, 4, generator=gen), torch.randn(1, 1, 8, 4, generator=gen)
    splice = Splice(0, 4, 2, baseline_compressors()["window_mean"], start_tokens=1)
    splice.mass = torch.ones(1, 1, 4)
    out = compressed_future_attention(query, key, value, splice, 0.5)  # (1, 3, 2, 4)
    k, v = key[0, 0], value[0, 0]

    def attend(keys, values, q):
        return (q @ keys.T * 0.5).softmax(-1) @ values

    means = [(k[1:3].mean(0), v[1:3].mean(0)), (k[3:5].mean(0), v[3:5].mean(0))]
    for i in range(3):
        keys = torch.stack([k[0], means[0][0], means[1][0], *k[5 : 6 + i]])
        values = torch.stack([v[0], means[0][1], means[1][1], *v[5 : 6 + i]])
        without = keys[1:], values[1:]  # the prefix dropped
        for head in range(2):
            q = query[0, head, 5 + i]
            assert torch.allclose(out[0, i, head], attend(keys, values, q), atol=1e-6)
            assert not torch.allclose(out[0, i, head], attend(*without, q), atol=1e-3)


@pytest.mark.parametrize("prefix", [0, 1])
def test_window_attention_mass_is_the_softmax_mass_from_the_windows_own_queries(prefix):
    gen = torch.Generator().manual_seed(1)
    total = prefix + 6  # the start token (a softmax entry, never a window token), 2 windows
    query = torch.randn(1, 4, total, 3, generator=gen)
    key = torch.randn(1, 2, total, 3, generator=gen)
    mass = window_attention_mass(query, key, 0.5, window_size=3, start_tokens=prefix)
    assert mass.shape == (1, 2, 6)
    for kv in range(2):
        for j in range(6):
            start = j // 3 * 3
            expected = 0.0
            for head in (2 * kv, 2 * kv + 1):  # the query heads of this KV head
                for i in range(max(j, start), start + 3):  # causal queries of j's window
                    p = prefix + i  # positions count the start token
                    scores = query[0, head, p] @ key[0, kv, : p + 1].T * 0.5
                    expected += float(scores.softmax(-1)[prefix + j])
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
