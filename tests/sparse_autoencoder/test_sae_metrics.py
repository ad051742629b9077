"""SAE metrics, baselines and alignment against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.sparse_autoencoder.alignment import linear_cka, match_features, orthogonal_procrustes
from pipeline.sparse_autoencoder.metrics import (
    CodeStats,
    ReconstructionStats,
    decoder_cosine_stats,
    equal_l0_components,
    fit_baseline,
    gini,
)


def random_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_gini_of_uniform_one_hot_and_a_hand_case():
    assert gini(torch.full((8,), 3.0)) == pytest.approx(0.0, abs=1e-12)
    assert gini(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(0.75)  # (n - 1) / n
    # sorted [0, 0, 1, 3]: sum |xi - xj| over ordered pairs = 20; 20 / (2 * 16 * 1) = 0.625
    assert gini(torch.tensor([3.0, 0.0, 1.0, 0.0])) == pytest.approx(0.625)
    assert gini(torch.zeros(5)) == 0.0


def test_density_dead_rate_l0_and_usage_on_a_fixed_code_matrix():
    z = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.5, 0.0, 0.0, 0.0]])
    stats = CodeStats(4)
    stats.update(z[:2])
    stats.update(z[2:])  # streamed in two batches
    assert stats.rows == 3
    assert stats.usage.tolist() == [2.0, 0.0, 0.0, 2.0]
    assert stats.mean_active == pytest.approx(4 / 3)
    assert stats.density == pytest.approx(4 / 12)
    assert stats.dead_rate == pytest.approx(0.5)
    assert gini(stats.usage) == pytest.approx(0.5)  # sorted [0, 0, 2, 2]: (2 + 6) / 16


def test_decoder_cosine_stats_on_a_fixed_matrix():
    s = 1 / math.sqrt(2)
    decoder = torch.tensor([[1.0, 2.0, s], [0.0, 0.0, s]])  # columns: e1, 2 e1, (e1 + e2)/sqrt2
    stats = decoder_cosine_stats(decoder, block=2)  # blocks must not change the answer
    # pairs: cos(1,2) = 1, cos(1,3) = cos(2,3) = 1/sqrt2
    assert stats["cos_mean"] == pytest.approx((1 + 2 * s) / 3)
    assert stats["cos_max"] == pytest.approx(1.0)
    assert stats["cos_p95"] == pytest.approx(s + 0.9 * (1 - s))  # linear interpolation
    orthonormal = decoder_cosine_stats(torch.eye(5))
    assert orthonormal == {"cos_mean": 0.0, "cos_p95": 0.0, "cos_max": 0.0}
    assert decoder_cosine_stats(-torch.eye(2)[:, [0, 0]])["cos_mean"] == pytest.approx(1.0)


def test_r2_of_perfect_and_mean_only_reconstructions_around_the_data_mean():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen) * 2 + 10.0  # far from zero: a zero-centred R^2 lies
    perfect, mean_only = ReconstructionStats(6), ReconstructionStats(6)
    for part in x.split(16):
        perfect.update(part, part)
        mean_only.update(part, x.mean(0).expand_as(part))
    assert perfect.r2 == 1.0 and perfect.mse == 0.0
    assert mean_only.r2 == pytest.approx(0.0, abs=1e-12)
    centered = x.double() - x.double().mean(0)
    assert mean_only.mse == pytest.approx(centered.pow(2).mean().item())
    half = ReconstructionStats(6)
    half.update(x, x.mean(0) + 0.5 * (x - x.mean(0)))  # residual = half the deviation
    assert half.r2 == pytest.approx(0.75)


def test_pca_baseline_recovers_a_low_rank_signal_and_nmf_ica_reconstruct():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 3, generator=gen) @ torch.randn(3, 10, generator=gen) + 4.0
    pca = fit_baseline("pca", x, 3, seed=0)
    x_hat, active = pca.reconstruct(x)
    assert torch.allclose(x_hat, x, atol=1e-5) and active.eq(3).all()
    assert pca.components == 3 and fit_baseline("pca", x, 99, 0).components == 10
    nmf = fit_baseline("nmf", x - 4.0, 6, seed=0)  # signed data: NMF on [relu(x), relu(-x)]
    nmf_hat, nmf_active = nmf.reconstruct(x - 4.0)
    stats = ReconstructionStats(10)
    stats.update(x - 4.0, nmf_hat)
    assert stats.r2 > 0.8 and (nmf_active <= 6).all()
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        fit_baseline("svd", x, 2, 0)


def _r2(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    stats = ReconstructionStats(x.shape[1])
    stats.update(x, x_hat)
    return stats.r2


def test_top_l0_baselines_keep_each_rows_largest_codes_and_ica_finds_sparse_sources():
    # Sparse independent sources (each on in 20% of rows, magnitude 1-2), mixed by A.
    gen = torch.Generator().manual_seed(3)
    n, d = 4000, 6
    on = torch.rand(n, d, generator=gen) < 0.2
    sign = torch.sign(torch.randn(n, d, generator=gen))
    sources = on * sign * (1 + torch.rand(n, d, generator=gen))
    x = sources @ torch.randn(d, d, generator=gen).T + 4.0
    pca = fit_baseline("pca", x, 2, seed=0)
    wide_pca = fit_baseline("pca_top_l0", x, 2, seed=0)
    ica = fit_baseline("ica", x, 2, seed=0)
    assert (pca.components, pca.keep) == (2, None)
    assert (wide_pca.components, wide_pca.keep) == (ica.components, ica.keep) == (6, 2)
    r2 = {b.name: _r2(x, b.reconstruct(x)[0]) for b in (pca, wide_pca, ica)}
    assert all(b.reconstruct(x)[1].eq(2).all() for b in (pca, wide_pca, ica))
    # Orthonormal basis: the best 2 coefficients per row beat any fixed 2, the top 2 included.
    assert r2["pca_top_l0"] >= r2["pca"]
    # ICA recovers the sources: rows with at most 2 on (90% of them) are nearly exact.
    assert r2["ica"] > 0.93 and r2["ica"] > r2["pca_top_l0"] + 0.03
    with pytest.raises(ValueError, match="sae.basis_components=2 gives ica a basis of 2"):
        fit_baseline("ica", x, 2, seed=0, basis=2)


def testtop_contributions_on_a_hand_case():
    from pipeline.sparse_autoencoder.metrics import top_contributions

    codes = np.array([[3.0, -1.0, 0.5], [0.1, 0.2, -0.3]])
    decoder = np.array([[1.0, 0.0], [0.0, 10.0], [1.0, 0.0]])  # column norms 1, 10, 1
    kept = top_contributions(codes, decoder, 1)
    assert kept.tolist() == [[0.0, -1.0, 0.0], [0.0, 0.2, 0.0]]  # |-1| * 10 beats 3 * 1


def test_equal_l0_components():
    assert equal_l0_components(150.0, 640) == 150
    assert equal_l0_components(1305.5, 640) == 640
    assert equal_l0_components(0.2, 64) == 1
    assert equal_l0_components(2.5, 64) == 3


def test_hungarian_matching_of_a_permuted_dictionary():
    gen = torch.Generator().manual_seed(2)
    first = torch.nn.functional.normalize(torch.randn(16, 12, generator=gen), dim=0)
    perm = torch.randperm(12, generator=gen)
    matched = match_features(first, first[:, perm] * 3.0)  # scale does not matter
    assert matched.mean_cos == pytest.approx(1.0)
    assert matched.fraction_above(0.9) == 1.0
    assert torch.equal(perm[matched.cols], matched.rows)
    # Orthonormal atoms, one replaced by a direction orthogonal to all: it matches at 0.
    basis = random_rotation(16, seed=6)
    replaced = basis[:, :12].clone()
    replaced[:, 0] = basis[:, 12]
    partial = match_features(basis[:, :12], replaced)
    assert partial.fraction_above(0.9) == pytest.approx(11 / 12)
    assert partial.mean_cos == pytest.approx(11 / 12)
    # Rectangular: every column of the smaller dictionary gets a distinct partner.
    wide = match_features(first[:, :5], first)
    assert wide.cols.tolist() == [0, 1, 2, 3, 4] and wide.mean_cos == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different spaces"):
        match_features(first, torch.randn(8, 3))


def test_linear_cka_identical_rotated_scaled_and_unrelated():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    rotation = random_rotation(8)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, 5.0 * x + 2.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(300, 8, generator=gen)) < 0.2
    # Against an independent numpy computation from the HSIC definition.
    xc, yc = (x - x.mean(0)).numpy(), (x[:, :3] - x[:, :3].mean(0)).numpy()
    k, l_ = xc @ xc.T, yc @ yc.T
    expected = (k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum())
    assert linear_cka(x, x[:, :3]) == pytest.approx(expected)


def _svd_procrustes(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The closed form the module computed by hand before it called scipy: U V^T and
    1 - (sum of singular values)^2 of the centered, unit-Frobenius cross product."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, s, vh = torch.linalg.svd((xc / xc.norm()).T @ (yc / yc.norm()), full_matrices=False)
    return u @ vh, 1.0 - s.sum().item() ** 2


@pytest.mark.parametrize("extra", [0, 2, -2])  # same width, a wider and a narrower y
def test_procrustes_matches_the_closed_form_on_a_planted_rotation(extra):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    y = x @ random_rotation(6, seed=8) + 0.3 * torch.randn(120, 6, generator=gen)
    if extra > 0:
        y = torch.cat([y, torch.randn(120, extra, generator=gen, dtype=torch.float64)], 1)
    elif extra < 0:
        y = y[:, :extra]
    rotation, disparity = _svd_procrustes(x, y)
    fit = orthogonal_procrustes(x, y)
    assert fit.rotation.shape == rotation.shape
    assert torch.allclose(fit.rotation, rotation, atol=1e-10)
    assert fit.disparity == pytest.approx(disparity, abs=1e-12)
    assert fit.disparity > 0.01  # the noise leaves a residual: not a trivial fit


def test_procrustes_recovers_a_known_rotation():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    rotation = random_rotation(6, seed=5)
    fit = orthogonal_procrustes(x, 3.0 * x @ rotation + 1.0)
    assert torch.allclose(fit.rotation, rotation, atol=1e-10)
    assert fit.disparity == pytest.approx(0.0, abs=1e-12)
    noisy = orthogonal_procrustes(x, x @ rotation + 0.5 * torch.randn(200, 6, generator=gen))
    assert 0.05 < noisy.disparity < 0.4
    # Into a wider space: an isometric embedding is still recovered exactly.
    wide = orthogonal_procrustes(x, torch.cat([x @ rotation, torch.zeros(200, 2)], dim=1))
    assert wide.disparity == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(wide.rotation[:, :6], rotation, atol=1e-10)
    with pytest.raises(ValueError, match="row counts differ"):
        orthogonal_procrustes(x, x[:10])
