"""The spliced-in evaluation: the hook point, known answers (identity, mean, a failing
reconstruction), the paired bootstrap, chance of the cross-seed matching, the summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.summary import check_entry
from pipeline.common.teacher import RANDOM_WEIGHTS_CAVEAT, load_causal_lm, load_teacher
from pipeline.sparse_autoencoder.alignment import match_features, random_matching
from pipeline.sparse_autoencoder.model import prepare_inputs
from pipeline.sparse_autoencoder.report import summary
from pipeline.sparse_autoencoder.splice import (
    ChunkLosses,
    chunk_losses,
    constant,
    hook_point,
    identity,
    loss_recovered,
    model_space,
)
from tests.tables import squeeze


@pytest.fixture(scope="module")
def lm(tiny_llama_path):
    model, _ = load_causal_lm(tiny_llama_path, None, "float32", "cpu")
    return model


def _tokens(lm, chunks: int = 6, length: int = 20, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.config.vocab_size, (chunks, length), generator=gen)


@pytest.mark.parametrize("layer", [0, 1, 2, 4])
def test_the_hook_sees_the_hidden_state_the_activations_stage_stores(lm, tiny_llama_path, layer):
    tokens = _tokens(lm, 3)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    out = chunk_losses(lm, tokens, mask, 8, hook_point(lm, layer), identity, capture=True)
    teacher = load_teacher(tiny_llama_path, None, (layer,) if layer else (0, 1))
    stored = teacher.hidden_at(tokens, mask.long())[layer].reshape(-1, 64)
    assert torch.allclose(out.captured, stored, atol=1e-5)
    if layer == 2:  # a neighbouring state is far from it: the check can fail
        other = load_teacher(tiny_llama_path, None, (3,)).hidden_at(tokens, mask.long())[3]
        assert not torch.allclose(out.captured, other.reshape(-1, 64), atol=1e-2)


def test_clean_loss_is_the_models_own_loss_and_identity_changes_nothing(lm):
    tokens = _tokens(lm)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    clean = chunk_losses(lm, tokens, mask, 4)
    with torch.no_grad():
        own = lm(input_ids=tokens, labels=tokens).loss.item()  # HF shifts the labels itself
    assert clean.loss == pytest.approx(own, rel=1e-6)
    assert clean.counts.tolist() == [19] * 6
    spliced = chunk_losses(lm, tokens, mask, 4, hook_point(lm, 2), identity)
    assert np.array_equal(spliced.sums, clean.sums) and spliced.recon.r2 == 1.0


def test_padding_is_neither_predicted_nor_replaced(lm):
    tokens = _tokens(lm, 2, 10)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 6:] = False
    seen = []
    out = chunk_losses(lm, tokens, mask, 4, hook_point(lm, 2), lambda x: seen.append(x) or x)
    assert out.counts.tolist() == [9, 5] and seen[0].shape == (16, 64)
    alone = chunk_losses(lm, tokens[1:, :6], mask[1:, :6], 4)
    assert out.sums[1] == pytest.approx(alone.sums[0], rel=1e-5)  # right padding changes nothing


def test_start_rows_are_neither_replaced_nor_scored_as_predictors(lm):
    tokens = _tokens(lm, 3, 10)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    replaced = mask.clone()
    replaced[:, :2] = False  # two start rows per chunk
    seen = []
    out = chunk_losses(
        lm, tokens, mask, 4, hook_point(lm, 2), lambda x: seen.append(x) or x, False, replaced
    )
    with torch.no_grad():
        run = lm(input_ids=tokens, output_hidden_states=True)
    # Replaced: positions 2.. only, chunk-major.
    assert torch.allclose(seen[0], run.hidden_states[2][:, 2:].reshape(-1, 64), atol=1e-5)
    # Scored: the 7 predictions made from positions 2..8, not the whole chunk's 9.
    ce = torch.nn.functional.cross_entropy(
        run.logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
    )
    assert out.counts.tolist() == [7] * 3
    assert out.sums == pytest.approx(ce[:, 2:].sum(1).double().numpy(), rel=1e-5)
    assert not np.allclose(out.sums, ce.sum(1).double().numpy(), rtol=1e-3)


def test_known_answers_identity_one_mean_zero_and_a_zero_reconstruction_fails(lm):
    tokens = _tokens(lm, 8, 24, seed=1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    module = hook_point(lm, 2)
    clean = chunk_losses(lm, tokens, mask, 4, module, identity, capture=True)
    mean = clean.captured.mean(0)

    def losses(replace):
        return chunk_losses(lm, tokens, mask, 4, module, replace)

    ablated = losses(constant(mean))
    # Identity in the SAE's layer-normed space, mapped back: the model's own rows.
    same = loss_recovered(clean, ablated, losses(model_space(identity, True)), 200, 0)
    assert same["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert same["loss_increase"] == pytest.approx(0.0, abs=1e-5)
    assert same["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert same["loss_recovered_ci"] == pytest.approx([1.0, 1.0], abs=1e-3)
    none = loss_recovered(clean, ablated, ablated, 200, 0)
    assert none["loss_recovered"] == 0.0 and none["loss_recovered_ci"] == [0.0, 0.0]
    assert ablated.loss > clean.loss  # the mean ablation hurts: the denominator is not 0
    # A reconstruction that throws the layer away is far from recovering the loss. (The
    # teacher's weights are random, so zeroing the layer may even lower its loss: recovered
    # lands far from 1 on either side.)
    zero = loss_recovered(clean, ablated, losses(lambda x: torch.zeros_like(x)), 200, 0)
    assert abs(zero["loss_recovered"] - 1) > 0.3 and abs(zero["loss_increase"]) > 1e-3
    assert zero["explained_variance"] < 0


def test_model_space_undoes_the_layer_norm():
    x = torch.randn(5, 16) * 3 + 2
    assert torch.allclose(model_space(identity, True)(x), x, atol=1e-5)
    assert torch.equal(model_space(identity, False)(x), x)
    halved = model_space(lambda p: p / 2, True)(x)  # x_hat = p / 2 -> mu + (x - mu) / 2 ...
    mu = x.mean(-1, keepdim=True)
    assert torch.allclose(halved, mu + (x - mu) / 2, atol=1e-4)
    assert torch.allclose(prepare_inputs(halved, True), prepare_inputs(x, True), atol=1e-4)


def _losses(sums, counts=None) -> ChunkLosses:
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.full(sums.shape, 10) if counts is None else np.asarray(counts)
    return ChunkLosses(sums, counts)


def test_loss_recovered_arithmetic_and_a_paired_interval():
    clean, ablated = _losses([10.0, 20.0, 30.0, 40.0]), _losses([30.0, 40.0, 50.0, 60.0])
    half = loss_recovered(clean, ablated, _losses([20.0, 30.0, 40.0, 50.0]), 500, 0)
    assert half["loss_recovered"] == 0.5 and half["loss_increase"] == pytest.approx(1.0)
    # Every chunk loses the same 10 nats: paired resampling sees no spread at all.
    assert half["loss_recovered_ci"] == pytest.approx([0.5, 0.5])
    assert half["loss_increase_ci"] == pytest.approx([1.0, 1.0])  # 10 nats / 10 tokens
    worse = loss_recovered(clean, ablated, _losses([40.0, 50.0, 60.0, 70.0]), 500, 0)
    assert worse["loss_recovered"] == -0.5  # worse than the mean ablation: below 0
    noisy = loss_recovered(clean, ablated, _losses([12.0, 38.0, 31.0, 59.0]), 2000, 0)
    low, high = noisy["loss_recovered_ci"]
    assert low < noisy["loss_recovered"] < high and high - low > 0.3
    assert (
        loss_recovered(_losses([1.0]), _losses([2.0]), _losses([1.5]), 100, 0)["loss_recovered_ci"]
        is None
    )  # one chunk: no interval


# Independent Monte Carlo of the same matching on random unit-Gaussian dictionaries
# (alignment.py's docstring): (64, 256) 0.3281, sd 0.0028 over 300 draws; (256, 1024)
# 0.1935, sd 0.0007. A single draw lies within 5 sd of the mean, the mean of k draws
# within 5 sd / sqrt(k); the extreme-value bound sqrt(2 ln F / D) (0.416, 0.233) lies
# above both, since it ignores the one-to-one constraint.
CHANCE = {(64, 256): (0.3281, 0.0028), (256, 1024): (0.1935, 0.0007)}


def _chance_band(shape, draws=1):
    mean, sd = CHANCE[shape]
    return mean - 5 * sd / draws**0.5, mean + 5 * sd / draws**0.5


@pytest.mark.parametrize(("shape", "draws"), [((64, 256), 4), ((256, 1024), 1)])
def test_random_dictionaries_match_at_the_chance_level_of_their_shape(shape, draws):
    scores = random_matching(*shape, draws=draws, seed=11)
    assert len(scores) == draws and scores == random_matching(*shape, draws=draws, seed=11)
    low, high = _chance_band(shape)
    assert all(low < score < high for score in scores), scores
    low, high = _chance_band(shape, draws)
    assert low < np.mean(scores) < high
    assert np.mean(scores) < np.sqrt(2 * np.log(shape[1]) / shape[0])


def test_non_random_dictionaries_fall_outside_the_chance_band():
    gen = torch.Generator().manual_seed(2)
    low, high = _chance_band((64, 256))
    first = torch.randn(64, 256, generator=gen)
    noisy_copy = first + 1.5 * torch.randn(64, 256, generator=gen)
    assert match_features(first, noisy_copy).mean_cos > high + 0.2
    # Both dictionaries inside one 16-dim subspace: far more alike than chance in 64 dims.
    basis = torch.linalg.qr(torch.randn(64, 16, generator=gen)).Q
    a = basis @ torch.randn(16, 256, generator=gen)
    b = basis @ torch.randn(16, 256, generator=gen)
    assert match_features(a, b).mean_cos > high + 0.1
    assert not low < match_features(a, b).mean_cos < high


def _metrics(splice: dict | None, cross: dict | None = None) -> dict:
    def method(recovered, interval, increase):
        return {
            "lm_loss": 5.0,
            "loss_recovered": recovered,
            "loss_recovered_ci": interval,
            "loss_increase": increase,
            "loss_increase_ci": [increase - 0.1, increase + 0.1],
            "explained_variance": 0.5,
        }

    metrics = {
        "layer": 2,
        "code_dims": 256,
        "eval_rows": 511,
        "reconstruction_r2": 0.8,
        "baselines": {"pca": {"reconstruction_r2": 0.5}, "nmf": {"reconstruction_r2": 0.4}},
        "splice": {"applies": False, "reason": "directions"},
    }
    if splice is not None:
        metrics["splice"] = {
            "applies": True,
            "chunks": 7,
            "methods": {
                "sae": method(0.9, [0.8, 0.95], 0.2),
                "pca": method(0.4, [0.3, 0.5], 1.0),
                "ica": method(0.6, [0.5, 0.7], 0.8),
            },
        }
    if cross is not None:
        metrics["cross_seed"] = cross
    return metrics


def test_summary_of_a_hand_built_metrics_dict():
    cross = {"mean_matched_cos": 0.39, "chance_mean_matched_cos": 0.33}
    cross["chance_draws"] = [0.32, 0.34]
    entries = summary(_metrics({}, cross), "data/teachers/tiny-llama")
    head, second = entries
    assert head["branch"] == "sae" and head["value"] == 0.9 and head["interval"] == [0.8, 0.95]
    assert head["control"] == "best baseline at equal L0: ICA top-L0"
    assert head["control_value"] == 0.6 and head["control_interval"] == [0.5, 0.7]
    assert head["downstream_value"] == 0.2 and head["n"] == 7
    assert head["teacher"] == "data/teachers/tiny-llama"
    assert second["value"] == 0.39 and second["control_value"] == 0.33
    assert second["control_interval"] == [0.32, 0.34] and second["n"] == 256
    keys = {"branch", "metric", "value", "interval", "interval_kind", "control"}
    keys |= {"control_value", "control_interval", "downstream", "downstream_value"}
    assert all(set(e) == keys | {"teacher", "n", "caveat"} for e in entries)
    assert all(check_entry(e, "sae") for e in entries)
    assert all(e["caveat"] is None for e in entries)
    tiny = summary(_metrics({}, cross), "data/teachers/tiny-llama", RANDOM_WEIGHTS_CAVEAT)
    assert all(e["caveat"] == RANDOM_WEIGHTS_CAVEAT for e in tiny)
    # No token stream, no twin: the reconstruction R^2 against the best baseline's.
    (only,) = summary(_metrics(None), "synthetic")
    assert only["value"] == 0.8 and only["control_value"] == 0.5 and "PCA" in only["control"]


def test_the_table_flags_a_mean_ablation_that_costs_nothing():
    from pipeline.sparse_autoencoder.report import comparison_table

    def scores(loss, increase, interval):
        return {
            "lm_loss": loss,
            "loss_recovered": 0.5,
            "loss_recovered_ci": [0.1, 0.9],
            "loss_increase": increase,
            "loss_increase_ci": interval,
            "explained_variance": 0.5,
        }

    metrics = {
        "eval_rows": 10,
        "baseline_rows": 20,
        "seed": 1,
        "code_dims": 8,
        "topk": 2,
        "layer": 2,
        "splice": {
            "applies": True,
            "chunks": 4,
            "predicted_tokens": 40,
            "hook": "model.layers.1",
            "hook_check_rel_error": 0.0,
            "bootstrap_samples": 100,
            "clean_loss": 5.0,
            "clean_explained_variance": 1.0,
            "methods": {"sae": scores(5.1, 0.1, [0.05, 0.15])},
            "mean_ablation": scores(5.2, 0.2, [0.1, 0.3]),
        },
    }
    table = squeeze(comparison_table(metrics, "t"))
    assert "| SAE (seed 1) | its top-2 code | 5.1000 | +0.500 [+0.100, +0.900] |" in table
    assert "not interpretable" not in table
    metrics["splice"]["mean_ablation"]["loss_increase_ci"] = [-0.01, 0.3]
    assert "its interval reaches 0" in comparison_table(metrics, "t")
