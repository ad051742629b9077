"""Seed 002's SAE metrics, accumulated in float64 over streamed batches, and the baselines.

Definitions (N eval rows, D input dims, F features, z the codes):

- reconstruction MSE = sum ||x - x_hat||^2 / (N D)
- R^2 (fraction of variance explained) = 1 - SSE / sum ||x - mean(x)||^2, around the
  eval data's own mean (not zero)
- activation density = share of (row, feature) pairs with z > 0 = L0 / F
- mean active (L0) = mean over rows of #{j : z_j > 0}
- dead-feature rate = share of features with z_j > 0 on no eval row (whole eval pass)
- Gini of feature usage, usage_j = #rows where z_j > 0: 0 = all equal, (F-1)/F = one feature
- decoder cosine mean / p95 / max over the F(F-1)/2 pairs of distinct decoder columns
  (signed: a feature and its opposite are not duplicates for ReLU codes)

Baselines (`fit_baseline`) are scikit-learn factorizations fit on a bounded sample;
`Reconstructor.reconstruct` maps eval rows to reconstructions. `pca` and `nmf` have k
components (the SAE's L0). With k components FastICA spans exactly PCA's top-k subspace
(it whitens with that PCA, then rotates), so its reconstruction would equal PCA's: `ica`
instead fits a larger basis (`basis_components`, default the input width) and keeps, per
row, the k sources of largest contribution |s_j| ||a_j|| (a_j its mixing column), which
measures what ICA is for, a sparse code; `pca_top_l0` applies the same per-row rule to
PCA's coefficients in a basis of the same size.

    recon, codes = ReconstructionStats(D), CodeStats(F)
    for x, x_hat, z in ...: recon.update(x, x_hat); codes.update(z)
    recon.mse, recon.r2, codes.density, codes.dead_rate, gini(codes.usage)
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.sparse_autoencoder.exemplars import TopExemplars

log = logging.getLogger(__name__)
COSINE_BLOCK = 1024


class ReconstructionStats:
    """Streaming MSE and R^2; sums in float64 so large N loses no precision."""

    def __init__(self, dim: int):
        self.rows = 0
        self.sum_x = torch.zeros(dim, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sse = 0.0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = x.detach().double().cpu(), x_hat.detach().double().cpu()
        self.rows += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_sq += x.pow(2).sum().item()
        self.sse += (x - x_hat).pow(2).sum().item()

    @property
    def mse(self) -> float:
        return self.sse / max(self.rows * self.sum_x.numel(), 1)

    @property
    def total_variance(self) -> float:
        """sum over rows of ||x - mean||^2 = sum ||x||^2 - N ||mean||^2."""
        if self.rows == 0:
            return 0.0
        return self.sum_sq - self.sum_x.pow(2).sum().item() / self.rows

    @property
    def r2(self) -> float:
        total = self.total_variance
        return 1.0 - self.sse / total if total > 0 else float("nan")


class CodeStats:
    """Streaming usage counts of F features."""

    def __init__(self, features: int):
        self.rows = 0
        self.usage = torch.zeros(features, dtype=torch.float64)

    def update(self, z: Tensor) -> None:
        active = (z.detach() > 0).cpu()
        self.rows += z.shape[0]
        self.usage += active.sum(0).double()

    @property
    def mean_active(self) -> float:
        return self.usage.sum().item() / max(self.rows, 1)

    @property
    def density(self) -> float:
        return self.mean_active / self.usage.numel()

    @property
    def dead_rate(self) -> float:
        return (self.usage == 0).double().mean().item()


def gini(usage: Tensor) -> float:
    """Gini coefficient of a nonnegative vector: sum_i (2i - n - 1) u_(i) / (n sum u), u sorted."""
    values = torch.sort(usage.double().flatten()).values
    n, total = values.numel(), values.sum().item()
    if n == 0 or total <= 0:
        return 0.0
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return ((2 * rank - n - 1) * values).sum().item() / (n * total)


def decoder_cosine_stats(decoder: Tensor, block: int = COSINE_BLOCK) -> dict[str, float]:
    """Mean, 95th percentile and max cosine over distinct pairs of columns of decoder (D, F)."""
    w = torch.nn.functional.normalize(decoder.detach().double().cpu(), dim=0)  # (D, F)
    features = w.shape[1]
    if features < 2:
        return {"cos_mean": float("nan"), "cos_p95": float("nan"), "cos_max": float("nan")}
    pairs = []
    for start in range(0, features, block):
        stop = min(start + block, features)
        cos = w[:, start:stop].T @ w  # (b, F)
        # Keep j > i only: each unordered pair once, no self-pairs.
        upper = torch.arange(features)[None, :] > torch.arange(start, stop)[:, None]
        pairs.append(cos[upper].numpy())
    values = np.concatenate(pairs)
    return {
        "cos_mean": float(values.mean(dtype=np.float64)),
        "cos_p95": float(np.quantile(values, 0.95)),
        "cos_max": float(values.max()),
    }


@dataclass
class Reconstructor:
    """A fitted baseline: `reconstruct(x) -> (x_hat, active dims per row)`."""

    name: str
    components: int
    model: object
    nmf_split: bool = False
    keep: int | None = None
    """Per row, keep only this many codes (largest |code_j| * ||component_j||); None: all."""

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        data = x.detach().double().cpu().numpy()
        if self.nmf_split:
            dim = data.shape[1]
            codes = self.model.transform(_nonnegative_split(data))
            doubled = codes @ self.model.components_
            x_hat = doubled[:, :dim] - doubled[:, dim:]
        else:
            codes = self.model.transform(data)
            if self.keep is not None and self.keep < codes.shape[1]:
                codes = top_contributions(codes, self._decoder(), self.keep)
            x_hat = self.model.inverse_transform(codes)
        active = (np.abs(codes) > 1e-12).sum(1)
        return torch.from_numpy(x_hat).to(x.dtype), torch.from_numpy(active)

    def _decoder(self) -> np.ndarray:
        """(components, D): what each code is multiplied by in the reconstruction."""
        mixing = getattr(self.model, "mixing_", None)  # FastICA: x = s @ mixing_.T + mean_
        return mixing.T if mixing is not None else self.model.components_


def top_contributions(codes: np.ndarray, decoder: np.ndarray, keep: int) -> np.ndarray:
    """codes (N, K) with all but each row's `keep` largest |code_j| ||decoder_j|| set to 0."""
    weight = np.abs(codes) * np.linalg.norm(decoder, axis=1)
    drop = np.argpartition(-weight, keep, axis=1)[:, keep:]
    kept = codes.copy()
    np.put_along_axis(kept, drop, 0.0, axis=1)
    return kept


def fit_baseline(
    kind: str, x: Tensor, components: int, seed: int, basis: int | None = None
) -> Reconstructor:
    """A baseline at L0 `components` (k): PCA or NMF (on [relu(x), relu(-x)], so signed
    data fits) with k components; `pca_top_l0` or FastICA (`ica`) with `basis` components
    (None: the input width), keeping the top k codes per row."""
    from sklearn.decomposition import NMF, PCA, FastICA

    data = x.detach().double().cpu().numpy()
    k = max(1, min(components, data.shape[0], data.shape[1]))
    if kind in ("pca_top_l0", "ica"):
        wide = min(basis or data.shape[1], data.shape[0], data.shape[1])
        if wide <= k:
            raise ValueError(
                f"sae.basis_components={basis} gives {kind} a basis of {wide} components, "
                f"not more than the SAE's L0 ({k}): the top-L0 rule would keep every code"
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "pca":
            model, split = PCA(n_components=k, random_state=seed).fit(data), False
        elif kind == "pca_top_l0":
            model = PCA(n_components=wide, random_state=seed).fit(data)
            return _logged(kind, caught, Reconstructor(kind, wide, model, keep=k))
        elif kind == "nmf":
            # Multiplicative updates: matrix products only, fast at real sizes (50k x 4096).
            nmf = NMF(n_components=k, init="nndsvda", solver="mu", max_iter=300, random_state=seed)
            model, split = nmf.fit(_nonnegative_split(data)), True
        elif kind == "ica":
            ica = FastICA(
                n_components=wide,
                whiten="unit-variance",
                max_iter=400,
                tol=1e-3,
                random_state=seed,
            )
            return _logged(kind, caught, Reconstructor(kind, wide, ica.fit(data), keep=k))
        else:
            raise ValueError(f"unknown baseline {kind!r}; known: pca, pca_top_l0, nmf, ica")
    return _logged(kind, caught, Reconstructor(kind, k, model, split))


def _logged(kind: str, caught: list, fitted: Reconstructor) -> Reconstructor:
    for warning in caught:
        log.warning("baseline %s: %s", kind, warning.message)
    return fitted


def equal_l0_components(mean_active: float, dim: int) -> int:
    """Components a dense baseline gets to match the SAE's L0 (at least 1, at most D)."""
    return max(1, min(dim, int(math.floor(mean_active + 0.5))))


def _nonnegative_split(data: np.ndarray) -> np.ndarray:
    return np.concatenate([np.maximum(data, 0), np.maximum(-data, 0)], axis=1)


@dataclass
class Evaluation:
    recon: ReconstructionStats
    codes: CodeStats
    exemplars: TopExemplars

    def summary(self) -> dict[str, float]:
        return {
            "reconstruction_mse": self.recon.mse,
            "reconstruction_r2": self.recon.r2,
            "activation_density": self.codes.density,
            "dead_feature_rate": self.codes.dead_rate,
            "gini": gini(self.codes.usage),
            "mean_active": self.codes.mean_active,
        }


@torch.no_grad()
def evaluate_sae(
    model, source, batch_size: int, top_k: int, buffer_rows: int, shuffle: bool = False, seed=0
) -> Evaluation:
    """One pass over every row: metrics on the eval rows, top exemplars over all rows.

    `shuffle` only exists to show the result does not depend on row order.
    """
    model.eval()
    device = model.b_dec.device
    recon, codes = ReconstructionStats(model.dim), CodeStats(model.features)
    top = TopExemplars(model.features, top_k)
    for batch in source.batches("all", batch_size, buffer_rows, shuffle, seed):
        out = model(batch.x.to(device))
        top.update(out.z, batch.items)
        held = batch.is_eval.to(device)
        if held.any():
            recon.update(out.x[held], out.x_hat[held])
            codes.update(out.z[held])
    if recon.rows == 0:
        raise ValueError(f"{source.folder}: no eval rows to measure the SAE on")
    return Evaluation(recon, codes, top)


@torch.no_grad()
def evaluate_baselines(
    baselines: list[Reconstructor], prepare, source, batch_size: int, buffer_rows: int
) -> dict[str, dict[str, float]]:
    """MSE, R^2 and mean active dims of each fitted baseline over the eval rows."""
    stats = {b.name: ReconstructionStats(source.dim) for b in baselines}
    active = {b.name: 0.0 for b in baselines}
    for batch in source.batches("eval", batch_size, buffer_rows, shuffle=False):
        x = prepare(batch.x)
        for baseline in baselines:
            x_hat, used = baseline.reconstruct(x)
            stats[baseline.name].update(x, x_hat)
            active[baseline.name] += used.double().sum().item()
    return {
        b.name: {
            "components": b.components,
            "kept_per_row": b.keep,
            "mean_active": active[b.name] / max(stats[b.name].rows, 1),
            "reconstruction_mse": stats[b.name].mse,
            "reconstruction_r2": stats[b.name].r2,
        }
        for b in baselines
    }
