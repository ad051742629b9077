"""Stage `inverse`: least squares direction -> input embedding recovers an invertible planted
map exactly and a rank-deficient one not; nearest-token accuracy on hand-built tables."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.common.summary import check_entry
from pipeline.concepts import inverse
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.scores import row_cosine
from tests.conftest import build_params, make_direction_set
from tests.tables import squeeze


def _params(**section):
    return build_params(
        directions={"layers": [2]},
        distill={"train": {"layer": 2}, "runs": {"probe": {"approach": "linear_probe"}}},
        inverse={"bootstrap_samples": 200, **section},
    )


def test_fit_affine_recovers_an_invertible_map_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64) + 3 * torch.eye(6)  # invertible
    y = x @ a + torch.arange(6.0, dtype=torch.float64)
    back = inverse.fit_affine(y, x)
    assert torch.allclose(back(y), x, atol=1e-9)
    assert torch.allclose(back.weight, torch.linalg.inv(a), atol=1e-9)
    assert float(row_cosine(back(y), x).min()) == pytest.approx(1.0, abs=1e-12)


def test_fit_affine_cannot_invert_a_rank_deficient_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a[:, 4:] = 0.0  # rank 4: two input directions never reach y
    y = x @ a
    recon = inverse.fit_affine(y, x)(y)
    assert float(row_cosine(recon, x).mean()) < 0.95


def test_ridge_shrinks_the_weight_not_the_intercept():
    x = torch.randn(100, 3, dtype=torch.float64)
    y = x @ torch.eye(3, dtype=torch.float64) + 5.0
    plain, shrunk = inverse.fit_affine(x, y), inverse.fit_affine(x, y, ridge=1e6)
    assert shrunk.weight.norm() < 0.01 * plain.weight.norm()
    # With the weight near 0, the prediction is the output mean: the intercept is kept.
    assert torch.allclose(shrunk(x), y.mean(0).expand_as(y), atol=0.05)


def test_nearest_token_hits_on_a_hand_built_table(direction_set):
    data = DirectionSet(direction_set, 2)
    ids = torch.tensor([0, 1, 2])
    first = torch.stack([tokens_of(data, i)[0] for i in ids.tolist()])
    exact = data.embedding_rows[torch.searchsorted(data.embedding_token_ids, first)] * 3.0
    assert inverse.nearest_token_hits(data, ids, exact).tolist() == [True, True, True]
    # The row of a token that concept 0 does not use: a miss.
    own = set(tokens_of(data, 0).tolist())
    foreign = next(t for t in data.embedding_token_ids.tolist() if t not in own)
    row = data.embedding_rows[data.embedding_token_ids == foreign]  # (1, E)
    assert inverse.nearest_token_hits(data, ids[:1], row).tolist() == [False]


def tokens_of(data: DirectionSet, concept: int) -> torch.Tensor:
    return data.flat_tokens[data.offsets[concept] : data.offsets[concept + 1]]


def test_most_common_token_and_distinct_counts(direction_set):
    data = DirectionSet(direction_set, 2)
    ids = torch.arange(40)
    counts = torch.zeros(data.vocab_size, dtype=torch.long)
    for i in ids.tolist():
        counts[torch.unique(tokens_of(data, i))] += 1
    assert inverse.most_common_token(data, ids) == int(counts.argmax())
    expected = [len(set(tokens_of(data, i).tolist())) for i in ids.tolist()]
    assert inverse.distinct_tokens(data, ids).tolist() == expected


def test_stage_inverts_a_planted_injective_map_exactly(direction_set, tmp_path):
    # make_direction_set: direction = W @ mean embedding, W (16, 8) of full column rank.
    metrics, table = tmp_path / "inverse.json", tmp_path / "inverse.md"
    results = inverse.run(_params(), direction_set, metrics, table)
    assert json.loads(metrics.read_text()) == results
    assert results["reconstruction_cos"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert results["forward_cos"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert results["train_mean_cos"]["value"] < 0.9
    hits = results["nearest_token"]
    # The reconstruction IS the concept embedding: exactly the ceiling's accuracy, 1 on
    # single-token concepts.
    assert hits["reconstruction"]["value"] == hits["true_embedding"]["value"]
    assert results["nearest_token_single"]["reconstruction"]["value"] == 1.0
    check_entry(results["summary"][0], "summary[0]")
    assert results["summary"][0]["downstream_value"] == hits["reconstruction"]["value"]
    text = squeeze(table.read_text())
    assert "| Inverse: direction -> embedding | 1.0000 [" in text
    counts = results["counts"]
    assert f"| Map (test) | cos_sim [95%] (n={counts['test']}) |" in text
    assert f"Single-token concepts [95%] (n={counts['test_single_token']}) |" in text
    assert "does not reproduce it" in text


def test_stage_cannot_invert_a_rank_deficient_map(tmp_path):
    # dim 3 < emb_dim 8: five embedding directions never reach the direction.
    folder = make_direction_set(tmp_path / "directions", dim=3, emb_dim=8)
    results = inverse.run(_params(), folder, tmp_path / "m.json", tmp_path / "t.md")
    assert results["reconstruction_cos"]["value"] < 0.8
    assert results["forward_cos"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert results["nearest_token_single"]["reconstruction"]["value"] < 0.6


def test_bad_inverse_params_fail_naming_the_key():
    with pytest.raises(
        ValueError, match=r"inverse.layer=9 is not cached: directions.layers is \[2\]"
    ):
        _params(layer=9)
    with pytest.raises(ValueError, match="inverse.ridge must be >= 0, got -1.0"):
        _params(ridge=-1.0)
    assert _params().inverse.inverted_layer(_params().distill) == 2
