"""Seed-003 losses: the closed-form attention Jacobian, each term's zeros and values, presets."""

from __future__ import annotations

import pytest
import torch
import yaml

from pipeline.kv_sidecar.losses import (
    PRESETS,
    TERMS,
    anti_collapse_loss,
    attention,
    attention_jacobian,
    consistency_loss,
    diagnostics,
    diversity_loss,
    evaluate_batch,
    force_matching_loss,
    jacobian_ratio_loss,
    kv_match_loss,
    kv_norm_loss,
    loss_terms,
    participation_ratio,
    preset_command,
    query_weights,
    scale_to,
    total_loss,
    windows_of,
)
from pipeline.kv_sidecar.params import SidecarParams
from tests.conftest import build_params


def autograd_jacobian(q, k, v):
    """(B, M, d_v, d) by torch.autograd.functional.jacobian, one query at a time."""
    rows = []
    for b in range(q.shape[0]):
        per_query = []
        for m in range(q.shape[1]):

            def f(x, b=b):
                return attention(x[None], k[b], v[b])[0][0]

            per_query.append(torch.autograd.functional.jacobian(f, q[b, m]))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


@pytest.mark.parametrize(("tokens", "key_scale"), [(7, 1.0), (4, 1.0), (64, 6.0)])
def test_attention_jacobian_matches_autograd(tokens, key_scale):
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    k = key_scale * torch.randn(2, tokens, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(2, tokens, 4, generator=gen, dtype=torch.float64)  # d_v != d_k on purpose
    closed = attention_jacobian(q, k, v)
    reference = autograd_jacobian(q, k, v)
    assert closed.shape == (2, 3, 4, 5)
    rel = (closed - reference).norm() / reference.norm()
    assert rel <= 1e-5
    assert rel <= 1e-12  # in float64 the two agree to rounding


def dense_batch(window_size=1, windows=4, queries=6, d=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    n = windows * window_size
    q = torch.randn(3, queries, d, generator=gen, dtype=dtype)
    k = 2.0 * torch.randn(3, n, d, generator=gen, dtype=dtype)
    v = 0.5 * torch.randn(3, n, d, generator=gen, dtype=dtype)
    forces = torch.rand(3, queries, generator=gen, dtype=dtype)
    return q, k, v, forces


@pytest.mark.parametrize("scale_normalize", ["none", "per_window", "per_sample"])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_losses_vanish_when_compressed_equals_dense_with_one_token_windows(kind, scale_normalize):
    q, k, v, forces = dense_batch(window_size=1)
    params = SidecarParams(consistency=kind, scale_normalize=scale_normalize)
    ev = evaluate_batch(q, k, v, k.clone(), v.clone(), 1, forces, params)
    terms = loss_terms(ev, params)
    for name in (
        "consistency",
        "force",
        "kv_norm",
        "output_magnitude",
        "kv_match",
        "jacobian_ratio",
    ):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-12), name
    assert torch.allclose(ev.y_cg, ev.y_dense, atol=1e-14)


def test_consistency_values_and_force_weights():
    y = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # (1, 2, 2)
    y_cg = torch.tensor([[[1.0, 1.0], [0.0, 4.0]]], dtype=torch.float64)
    weights = query_weights(torch.tensor([[3.0, 1.0]], dtype=torch.float64), True)
    assert weights.tolist() == [[0.75, 0.25]]
    # squared errors 1 and 4 -> 0.75 * 1 + 0.25 * 4
    assert consistency_loss(y, y_cg, weights, "mse").item() == pytest.approx(1.75)
    # cosines 1/sqrt(2) and 1 -> only the first query pays
    expected = 0.75 * (1 - 2**-0.5)
    assert consistency_loss(y, y_cg, weights, "cosine").item() == pytest.approx(expected)
    uniform = query_weights(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), False)
    assert uniform.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    # all-zero forces: uniform, not NaN
    assert query_weights(torch.tensor([[0.0, 0.0]]), True).tolist() == [[0.5, 0.5]]
    with pytest.raises(ValueError, match="sidecar.consistency"):
        consistency_loss(y, y_cg, weights, "l1")


def test_norm_matching_is_zero_at_matched_norms_and_symmetric():
    _, k, v, _ = dense_batch(window_size=16)
    k_win, v_win = windows_of(k, 16), windows_of(v, 16)  # (3, 4, 16, 8)
    mu_k, mu_v = k_win.norm(dim=-1).mean(-1), v_win.norm(dim=-1).mean(-1)
    directions = torch.randn(3, 4, 8, dtype=torch.float64)
    kc, vc = scale_to(directions, mu_k), scale_to(-directions, mu_v)
    assert kv_norm_loss(kc, vc, mu_k, mu_v).item() == pytest.approx(0.0, abs=1e-20)
    # Bidirectional: one unit too long or too short costs the same, 1 per token.
    longer = scale_to(directions, mu_k + 1.0)
    shorter = scale_to(directions, mu_k - 1.0)
    assert kv_norm_loss(longer, vc, mu_k, mu_v).item() == pytest.approx(1.0)
    assert kv_norm_loss(shorter, vc, mu_k, mu_v).item() == pytest.approx(1.0)


def test_scale_normalize_per_window_sets_each_window_mean_norm():
    q, k, v, forces = dense_batch(window_size=16)
    tiny = 1e-3 * torch.randn(3, 4, 8, dtype=torch.float64)  # a v1-style collapsed output
    params = SidecarParams(scale_normalize="per_window")
    ev = evaluate_batch(q, k, v, tiny, tiny.flip(-1), 16, forces, params)
    assert torch.allclose(ev.kc.norm(dim=-1), ev.mu_k) and torch.allclose(
        ev.vc.norm(dim=-1), ev.mu_v
    )
    # The tautology of issue 11: per window, the kv_norm term is 0 whatever the sidecar does.
    assert loss_terms(ev, params)["kv_norm"].item() == pytest.approx(0.0, abs=1e-20)
    off = evaluate_batch(q, k, v, tiny, tiny, 16, forces, SidecarParams(scale_normalize="none"))
    assert loss_terms(off, params)["kv_norm"].item() > 1.0


def test_scale_normalize_per_sample_is_one_scalar_per_sample_for_k_and_one_for_v():
    q, k, v, forces = dense_batch(window_size=16)
    gen = torch.Generator().manual_seed(3)
    kc = 1e-3 * torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    vc = 5.0 * torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    params = SidecarParams(scale_normalize="per_sample")
    ev = evaluate_batch(q, k, v, kc, vc, 16, forces, params)
    for raw, scaled, dense in ((kc, ev.kc, k), (vc, ev.vc, v)):
        # s = mean dense norm / mean compressed norm of the sample (seed 003, fix 4)
        s = dense.norm(dim=-1).mean(-1) / raw.norm(dim=-1).mean(-1)  # (3,)
        assert torch.allclose(scaled, raw * s[:, None, None], rtol=1e-12)
        assert torch.allclose(scaled.norm(dim=-1).mean(-1), dense.norm(dim=-1).mean(-1))
    # Unlike per_window, each super-token keeps its own norm relative to the others, so
    # the kv_norm term still sees how far each one is from its window's mean norm.
    assert loss_terms(ev, params)["kv_norm"].item() > 0.1


def test_boolean_scale_normalize_is_refused_naming_key_value_and_choices():
    for value in (True, False):
        with pytest.raises(ValueError) as err:
            build_params(sidecar={"scale_normalize": value})
        message = str(err.value)
        assert "sidecar.scale_normalize" in message and str(value) in message
        assert "'per_sample', 'per_window', 'none'" in message and "\n" not in message
    with pytest.raises(ValueError, match="true meant per_window"):
        SidecarParams(scale_normalize=True)


def test_jacobian_terms():
    j = torch.randn(2, 3, 4, 4)
    assert force_matching_loss(j, j).item() == 0.0 and jacobian_ratio_loss(j, j).item() == 0.0
    # v1's collapse: J_cg = 0 costs 1 on both terms; v2's explosion J_cg = 3 J costs 4 and 4.
    assert force_matching_loss(j, torch.zeros_like(j)).item() == pytest.approx(1.0)
    assert jacobian_ratio_loss(j, torch.zeros_like(j)).item() == pytest.approx(1.0)
    assert force_matching_loss(j, 3 * j).item() == pytest.approx(4.0)
    assert jacobian_ratio_loss(j, 3 * j).item() == pytest.approx(4.0)


def test_geometric_terms():
    kb = torch.randn(8, 4, 6, dtype=torch.float64)
    vb = torch.randn(8, 4, 6, dtype=torch.float64)
    assert kv_match_loss(2 * kb, 0.5 * vb, kb, vb).item() == pytest.approx(0.0, abs=1e-12)
    assert kv_match_loss(-kb, vb, kb, vb).item() == pytest.approx(2.0)
    assert anti_collapse_loss(kb, vb, kb, vb).item() == 0.0
    same = kb[:1, :1].expand(8, 4, 6)  # every super-token identical: rank 0
    assert anti_collapse_loss(same, same, kb, vb).item() == pytest.approx(2.0)
    plus_minus = torch.cat([torch.eye(6), -torch.eye(6)]).double()  # isotropic, centred
    assert participation_ratio(plus_minus).item() == pytest.approx(6.0)
    assert participation_ratio(7.0 * plus_minus).item() == pytest.approx(6.0)  # scale-free
    identical = torch.ones(2, 3, 4)
    assert diversity_loss(identical, identical).item() == pytest.approx(1.0)
    orthogonal = torch.eye(3).expand(2, 3, 3)
    assert diversity_loss(orthogonal, orthogonal).item() == pytest.approx(0.0)
    assert diversity_loss(identical[:, :1], identical[:, :1]).item() == 0.0


def test_total_loss_is_the_weighted_sum():
    terms = {name: torch.tensor(float(i + 1)) for i, name in enumerate(TERMS)}
    params = build_params(sidecar=PRESETS["v2"]).sidecar
    expected = sum(params.loss_weights[name] * (i + 1) for i, name in enumerate(TERMS))
    assert total_loss(terms, params).item() == pytest.approx(expected)
    # v2: consistency 1 (term 1) + force 10 (term 2) + kv_norm 0.1 (3) + 0.01 * (4 + 5)
    # + output_magnitude 1 (6) + kv_match 1 (7)
    assert expected == pytest.approx(1 + 20 + 0.3 + 0.09 + 6 + 7)


def parse_command(line: str) -> dict:
    """The `-S sidecar.key=value` pairs of a `dvc exp run` line, read as YAML like DVC does."""
    pairs = [token.split("=", 1) for token in line.split() if token.startswith("sidecar.")]
    return {key.removeprefix("sidecar."): yaml.safe_load(value) for key, value in pairs}


@pytest.mark.parametrize("name", ["v1", "v2", "v3"])
def test_each_preset_builds_from_params_and_its_command_round_trips(name):
    params = build_params(sidecar=parse_command(preset_command(name))).sidecar
    assert params == build_params(sidecar=PRESETS[name]).sidecar
    weights = params.loss_weights
    expected = {
        "v1": {"consistency": 50, "force": 0, "output_magnitude": 5, "kv_match": 10, "kv_norm": 0},
        "v2": {"consistency": 1, "force": 10, "output_magnitude": 1, "kv_match": 1, "kv_norm": 0.1},
        "v3": {"force": 1, "kv_norm": 1, "jacobian_ratio": 1},
    }[name]
    assert {key: weights[key] for key in expected} == expected
    assert params.scale_normalize == ("per_sample" if name == "v3" else "none")
    assert params.consistency == ("cosine" if name == "v3" else "mse")
    assert params.jacobian_ratio_weight == (1.0 if name == "v3" else 0.0)


def test_defaults_are_v3_and_bad_values_name_their_key():
    assert build_params(sidecar=PRESETS["v3"]).sidecar == SidecarParams()
    with pytest.raises(ValueError, match="sidecar.force_weight must be >= 0"):
        build_params(sidecar={"force_weight": -1})
    with pytest.raises(ValueError, match="every \\*_weight is 0"):
        build_params(sidecar={f"{name}_weight": 0 for name in TERMS})
    with pytest.raises(ValueError, match="sidecar.consistency must be one of"):
        build_params(sidecar={"consistency": "l2"})
    with pytest.raises(ValueError, match="sidecar.d_model"):
        build_params(sidecar={"d_model": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="sidecar.eval_fraction"):
        build_params(sidecar={"eval_fraction": 1.0})
    with pytest.raises(ValueError, match="unknown key 'sidecar.force'"):
        build_params(sidecar={"force": 1.0})


def test_relative_jacobian_error_per_sample():
    q, k, v, forces = dense_batch(window_size=1)
    params = SidecarParams(scale_normalize="none")
    same = diagnostics(evaluate_batch(q, k, v, k.clone(), v.clone(), 1, forces, params))
    assert same["jacobian_rel_error"][0] == pytest.approx(0.0, abs=1e-12)
    assert same["jacobian_rel_error"][1] == 3  # one value per sample
    zeros = torch.zeros_like(k)  # V = 0: y = 0 and J = 0, i.e. predicting J = 0 scores 1
    none = diagnostics(evaluate_batch(q, k, v, k.clone(), zeros, 1, forces, params))
    assert none["jacobian_rel_error"][0] / 3 == pytest.approx(1.0)
    ev = evaluate_batch(q, k, v, k.clone(), 3 * v, 1, forces, params)  # J_cg = 3 J_dense
    assert diagnostics(ev)["jacobian_rel_error"][0] / 3 == pytest.approx(2.0)
