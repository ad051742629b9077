"""Splitting what describes a run from what measures it."""

from __future__ import annotations

from pipeline.common.run_info import split_info


def test_keys_move_out_nested_as_they_were_and_the_rest_stays():
    result = {
        "layer": 2,
        "mse": 0.5,
        "summary": [{"value": 0.5}],
        "splice": {"hook": "model.layers.1", "loss": 7.0},
        "baselines": {"pca": {"components": 16, "mse": 0.4}, "nmf": {"components": 8}},
    }
    metrics, info = split_info(result, ("layer", "splice.hook", "baselines.*.components", "gone"))
    assert metrics == {
        "mse": 0.5,
        "summary": [{"value": 0.5}],
        "splice": {"loss": 7.0},
        "baselines": {"pca": {"mse": 0.4}, "nmf": {}},
    }
    assert info == {
        "layer": 2,
        "splice": {"hook": "model.layers.1"},
        "baselines": {"pca": {"components": 16}, "nmf": {"components": 8}},
    }
    assert result["layer"] == 2 and result["splice"]["hook"] == "model.layers.1"  # untouched


def test_a_path_through_a_missing_or_non_dict_block_moves_nothing():
    metrics, info = split_info({"cross_seed": None, "a": 1}, ("cross_seed.twin_seed", "a.b"))
    assert (metrics, info) == ({"cross_seed": None, "a": 1}, {})
