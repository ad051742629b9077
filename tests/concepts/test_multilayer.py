"""Stage `multilayer`: the several-layer reader, the equal-parameter width, the multi-head
student on planted targets (layer 5 = a fixed linear map of layer 2), the stage itself."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.common.summary import check_entry
from pipeline.concepts import multilayer
from pipeline.concepts.layout import DirectionSet, LayerStack
from pipeline.concepts.params import RunParams, TrainParams
from pipeline.concepts.students import build_model, count_trainable
from pipeline.concepts.training import evaluate_cos, fit
from tests.conftest import build_params, make_direction_set
from tests.tables import squeeze

DIM = 16


@pytest.fixture
def two_layers(tmp_path):
    """Layer 2 as make_direction_set plants it; layer 5 = layer 2 @ M.T, M fixed."""
    mix = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(7))
    return make_direction_set(tmp_path / "directions", dim=DIM, layer_maps={5: mix}), mix


def test_layer_stack_returns_each_layers_rows_in_order(two_layers):
    folder, mix = two_layers
    stack = LayerStack(folder, (5, 2))
    ids, targets = stack.load_split("test")  # (N,), (N, 2, D)
    for index, layer in enumerate((5, 2)):
        own_ids, own = DirectionSet(folder, layer).load_split("test")
        assert torch.equal(ids, own_ids)
        assert torch.equal(targets[:, index], own)
    # Centring is linear, so layer 5's direction is layer 2's direction through M.
    assert torch.allclose(targets[:, 0], targets[:, 1] @ mix.T, atol=1e-4)
    batch = next(stack.batches("train", 8, 64, shuffle=True, seed=0))
    assert batch.target.shape == (8, 2, DIM) and batch.concept_id.shape == (8,)


def test_layer_stack_refuses_a_layer_not_cached(two_layers):
    with pytest.raises(ValueError, match=r"layers \[7\] are not cached; it holds layers \[2, 5\]"):
        LayerStack(two_layers[0], (2, 7))


def test_equal_param_width_known_answers():
    # MiniLM-sized, 2 heads of h=128: 128*385 + 2*(128*384 + 384) = 148,352 parameters;
    # widths 192 (148,032) and 193 (148,801): 192 is nearer.
    assert multilayer.multi_head_params(384, 128, 384, 2) == 148_352
    assert multilayer.equal_param_width(384, 128, 384, 2) == 192
    assert multilayer.single_layer_params(384, 192, 384) == 148_032
    # E=8, h=8, D=16, 2 heads: 360; 13 gives 341, 14 gives 366: rounds up to 14.
    assert multilayer.multi_head_params(8, 8, 16, 2) == 360
    assert multilayer.equal_param_width(8, 8, 16, 2) == 14
    # One head is a frozen_mlp already: its own width.
    assert multilayer.equal_param_width(384, 128, 384, 1) == 128
    assert multilayer.equal_param_width(8, 8, 16, 2) != 13


def test_parameter_counts_are_the_models_own(two_layers):
    data = DirectionSet(two_layers[0], 2)
    multi = multilayer.build_multi_head(data, 8, 2)
    assert count_trainable(multi) == multilayer.multi_head_params(8, 8, DIM, 2)
    single = build_model(
        RunParams("frozen_mlp", hidden_dim=14),
        data.vocab_size,
        data.dim,
        data.embedding_token_ids,
        data.embedding_rows,
    )
    assert count_trainable(single) == multilayer.single_layer_params(8, 14, DIM)


def test_the_multi_head_student_learns_both_planted_layers(two_layers):
    folder, _ = two_layers
    stack = LayerStack(folder, (2, 5))
    per_layer = [DirectionSet(folder, layer) for layer in (2, 5)]
    torch.manual_seed(0)
    multi = multilayer.build_multi_head(stack, 32, 2)
    before = [
        evaluate_cos(multilayer.HeadView(multi, i), d, "val", 64) for i, d in enumerate(per_layer)
    ]
    train = TrainParams(
        layer=2, epochs=40, batch_size=16, lr=0.01, weight_decay=0.0, buffer_rows=64
    )
    result = fit(multi, stack, train, seed=0)
    after = [
        evaluate_cos(multilayer.HeadView(multi, i), d, "val", 64) for i, d in enumerate(per_layer)
    ]
    assert max(before) < 0.5, "an untrained head must not already fit"
    assert min(after) > 0.95, after
    # The epoch is picked by the mean of the per-layer val cosines, and that is what fit reports.
    assert result.best_val_cos == pytest.approx(sum(after) / 2, abs=1e-5)


def _params(**multi):
    train = {"layer": 2, "epochs": 3, "batch_size": 32, "lr": 0.01, "buffer_rows": 64}
    return build_params(
        directions={"layers": [2, 5]},
        distill={
            "train": {**train, "seeds": [0, 1]},
            "runs": {"probe": {"approach": "linear_probe"}},
        },
        multilayer={"hidden_dim": 8, **multi},
    )


def test_stage_writes_per_layer_scores_summary_and_table(two_layers, tmp_path):
    metrics, table = tmp_path / "multilayer.json", tmp_path / "multilayer.md"
    results = multilayer.run(_params(), two_layers[0], metrics, table)
    assert json.loads(metrics.read_text()) == results
    assert results["layers"] == [2, 5] and results["single_hidden_dim"] == 14
    assert (results["multi_head_params"], results["single_layer_params"]) == (
        multilayer.multi_head_params(8, 8, DIM, 2),
        multilayer.single_layer_params(8, 14, DIM),
    )
    for layer in ("2", "5"):
        scores = results["per_layer"][layer]
        seeds = [results["seeds"][s] for s in ("0", "1")]
        multi = [s["multi_head"][layer]["test_cos"] for s in seeds]
        single = [s["single_layer"][layer]["test_cos"] for s in seeds]
        assert scores["multi_head"]["test_cos"] == pytest.approx(sum(multi) / 2)
        assert scores["difference"]["test_cos"] == pytest.approx((sum(multi) - sum(single)) / 2)
        low, high = (
            scores["single_layer"]["test_cos_ci95_low"],
            scores["single_layer"]["test_cos_ci95_high"],
        )
        assert low <= scores["single_layer"]["test_cos"] <= high
    assert len(results["summary"]) == 2
    for i, entry in enumerate(results["summary"]):
        check_entry(entry, f"summary[{i}]")
        assert entry["n"] == 2 and "equal parameters" in entry["control"]
    text = squeeze(table.read_text())
    assert "| hidden_states[2] |" in text and "| hidden_states[5] |" in text
    assert f"{results['single_layer_params']:,} (h=14)" in text
    test = results["counts"]["test"]
    assert f"| Layer | Multi-head test cos_sim [95%] (n={test}) | Single-layer test" in text


def test_one_layer_is_refused_naming_the_keys(tmp_path):
    folder = make_direction_set(tmp_path / "one", dim=DIM)
    params = build_params(
        directions={"layers": [2]},
        distill={"train": {"layer": 2}, "runs": {"probe": {"approach": "linear_probe"}}},
    )
    with pytest.raises(ValueError, match=r"multilayer needs at least two layers, got \[2\]"):
        multilayer.run(params, folder, tmp_path / "m.json", tmp_path / "m.md")


def test_a_head_layer_that_is_not_cached_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"multilayer.layers=\[2, 9\] holds \[9\], not cached"):
        _params(layers=[2, 9])
    with pytest.raises(ValueError, match="multilayer.hidden_dim must be > 0"):
        _params(hidden_dim=0)
