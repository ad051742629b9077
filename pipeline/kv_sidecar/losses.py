"""Seed-003 losses: attention, its closed-form query Jacobian, every weighted term, diagnostics.

Shapes: q (B, M, d) queries; k, v (B, N, d) dense tokens, N = W * S (W windows of S
tokens); kc, vc (B, W, d) compressed super-tokens (one per window); w (B, M) query
weights summing to 1 per sample.

    y, a = attention(q, k, v)                   # (B, M, d), (B, M, N)
    J = attention_jacobian(q, k, v, a)           # (B, M, d, d) = dy/dq per query
    ev = evaluate_batch(q, k, v, kc, vc, window_size, force_norms, params)
    terms = loss_terms(ev, params); loss = total_loss(terms, params)

The dense side is computed on detached inputs without autograd: gradients reach the
super-tokens (and through them the sidecar) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.kv_sidecar.params import SCALE_NORMALIZE, SIDECAR_TERMS, SidecarParams

EPS = 1e-12
TERMS = SIDECAR_TERMS
_ALL_TERMS = {f"{name}_weight": 0.0 for name in TERMS}
# The seed's three runs as complete param overrides (every weight set, so a preset does
# not inherit a weight from whatever params.yaml holds). Geometric terms: the seed's 0.01.
PRESETS: dict[str, dict[str, float | str | bool]] = {
    "v1": _ALL_TERMS
    | {
        "consistency_weight": 50.0,
        "consistency": "mse",
        "force_weighted": True,
        "force_weight": 0.0,
        "output_magnitude_weight": 5.0,
        "kv_match_weight": 10.0,
        "anti_collapse_weight": 0.01,
        "diversity_weight": 0.01,
        "scale_normalize": "none",
    },
    "v2": _ALL_TERMS
    | {
        "consistency_weight": 1.0,
        "consistency": "mse",
        "force_weighted": True,
        "force_weight": 10.0,
        "output_magnitude_weight": 1.0,
        "kv_match_weight": 1.0,
        "kv_norm_weight": 0.1,
        "anti_collapse_weight": 0.01,
        "diversity_weight": 0.01,
        "scale_normalize": "none",
    },
    "v3": _ALL_TERMS
    | {
        "consistency_weight": 1.0,
        "consistency": "cosine",
        "force_weighted": True,
        "force_weight": 1.0,
        "output_magnitude_weight": 1.0,
        "kv_match_weight": 1.0,
        "kv_norm_weight": 1.0,
        "jacobian_ratio_weight": 1.0,
        "anti_collapse_weight": 0.01,
        "diversity_weight": 0.01,
        "scale_normalize": "per_sample",
    },
}


def preset_command(name: str) -> str:
    """The `dvc exp run -S ...` line that applies preset `name` to the `sidecar` section."""
    sets = []
    for key, value in PRESETS[name].items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        sets.append(f"-S sidecar.{key}={text}")
    lines = [" ".join(sets[i : i + 3]) for i in range(0, len(sets), 3)]
    return " \\\n  ".join([f"dvc exp run -n sidecar-{name}", *lines])


def attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """y = softmax(q k^T / sqrt(d)) v; returns y (..., M, d_v) and probs a (..., M, N)."""
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return probs @ v, probs


def attention_jacobian(q: Tensor, k: Tensor, v: Tensor, probs: Tensor | None = None) -> Tensor:
    """dy/dq per query in closed form: J = V^T (diag(a) - a a^T) K / sqrt(d), (..., M, d_v, d).

    From da_i/dq = a_i (k_i - sum_j a_j k_j) / sqrt(d):
    J = (sum_i a_i v_i k_i^T - y kbar^T) / sqrt(d) with kbar = sum_i a_i k_i.
    """
    if probs is None:
        _, probs = attention(q, k, v)
    d_v, d_k = v.shape[-1], k.shape[-1]
    # sum_i a_i v_i k_i^T as one matmul over the flattened outer products: (..., N, d_v*d_k).
    outer = (v.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)
    first = (probs @ outer).unflatten(-1, (d_v, d_k))  # (..., M, d_v, d_k)
    y, kbar = probs @ v, probs @ k  # (..., M, d_v), (..., M, d_k)
    return (first - y.unsqueeze(-1) * kbar.unsqueeze(-2)) / math.sqrt(q.shape[-1])


def query_weights(force_norms: Tensor, force_weighted: bool) -> Tensor:
    """w_i = ||F(q_i)|| / sum_j ||F(q_j)|| per sample (B, M); uniform if not weighted."""
    uniform = torch.full_like(force_norms, 1.0 / force_norms.shape[-1])
    if not force_weighted:
        return uniform
    total = force_norms.sum(-1, keepdim=True)
    # A sample whose forces are all zero (no loss signal) falls back to uniform weights.
    return torch.where(total > 0, force_norms / total.clamp_min(EPS), uniform)


def windows_of(x: Tensor, window_size: int) -> Tensor:
    """(B, N, d) -> (B, W, S, d) with N = W * S."""
    if x.shape[-2] % window_size:
        raise ValueError(f"{x.shape[-2]} dense tokens do not split into windows of {window_size}")
    return x.unflatten(-2, (x.shape[-2] // window_size, window_size))


def mean_norm(x: Tensor) -> Tensor:
    """Mean token norm per window: (B, W, S, d) -> (B, W)."""
    return x.norm(dim=-1).mean(-1)


def scale_to(x: Tensor, target_norm: Tensor) -> Tensor:
    """Rescale each token of x (B, W, d) to norm target_norm (B, W): `per_window`."""
    return x * (target_norm / x.norm(dim=-1).clamp_min(1e-6)).unsqueeze(-1)


def scale_per_sample(x: Tensor, dense: Tensor) -> Tensor:
    """Seed 003's fix 4: x (B, W, d) times one scalar per sample, mean dense token norm
    over mean super-token norm, dense (B, W, S, d): afterwards the mean super-token norm
    of each sample equals its mean dense norm; the windows keep their relative norms."""
    target = dense.norm(dim=-1).flatten(1).mean(-1)  # (B,)
    scale = target / x.norm(dim=-1).mean(-1).clamp_min(1e-6)
    return x * scale[:, None, None]


def normalize_scale(
    kc: Tensor, vc: Tensor, k_win: Tensor, v_win: Tensor, mode: str
) -> tuple[Tensor, Tensor]:
    """Super-tokens kc, vc (B, W, d) rescaled as `sidecar.scale_normalize` says, against
    the dense windows k_win, v_win (B, W, S, d)."""
    if mode == "per_sample":
        return scale_per_sample(kc, k_win), scale_per_sample(vc, v_win)
    if mode == "per_window":
        return scale_to(kc, mean_norm(k_win)), scale_to(vc, mean_norm(v_win))
    if mode == "none":
        return kc, vc
    raise ValueError(
        f"sidecar.scale_normalize must be one of {list(SCALE_NORMALIZE)}, got {mode!r}"
    )


def consistency_loss(y_dense: Tensor, y_cg: Tensor, weights: Tensor, kind: str) -> Tensor:
    if kind == "mse":
        per_query = (y_dense - y_cg).pow(2).sum(-1)
    elif kind == "cosine":
        per_query = 1.0 - F.cosine_similarity(y_dense, y_cg, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"sidecar.consistency must be mse or cosine, got {kind!r}")
    return (per_query * weights).sum(-1).mean()


def force_matching_loss(j_dense: Tensor, j_cg: Tensor) -> Tensor:
    """||J_dense - J_cg||_F^2 / ||J_dense||_F^2 over each sample's queries, batch mean."""
    num = (j_dense - j_cg).pow(2).flatten(1).sum(-1)
    den = j_dense.pow(2).flatten(1).sum(-1)
    return (num / den.clamp_min(EPS)).mean()


def jacobian_ratio_loss(j_dense: Tensor, j_cg: Tensor) -> Tensor:
    """(||J_cg||_F / ||J_dense||_F - 1)^2 per sample, batch mean (v3 fix 3)."""
    ratio = j_cg.flatten(1).norm(dim=-1) / j_dense.flatten(1).norm(dim=-1).clamp_min(EPS)
    return (ratio - 1.0).pow(2).mean()


def kv_norm_loss(kc: Tensor, vc: Tensor, mu_k: Tensor, mu_v: Tensor) -> Tensor:
    """(||k_cg|| - mu_K)^2 + (||v_cg|| - mu_V)^2 per super-token (bidirectional), mean."""
    return ((kc.norm(dim=-1) - mu_k).pow(2) + (vc.norm(dim=-1) - mu_v).pow(2)).mean()


def participation_ratio(x: Tensor) -> Tensor:
    """Effective rank (tr C)^2 / ||C||_F^2 of the covariance of rows x (n, d); scale-free."""
    centred = x - x.mean(0, keepdim=True)
    cov = centred.T @ centred / max(x.shape[0], 1)
    return cov.trace().pow(2) / cov.pow(2).sum().clamp_min(EPS)


def anti_collapse_loss(kc: Tensor, vc: Tensor, kb: Tensor, vb: Tensor) -> Tensor:
    """relu(1 - PR(cg) / PR(window means)) for K and V, over all super-tokens of the batch."""
    if kc.shape[0] * kc.shape[1] < 2:
        return kc.new_zeros(())
    loss = kc.new_zeros(())
    for cg, ref in ((kc, kb), (vc, vb)):
        target = participation_ratio(ref.flatten(0, 1)).detach()
        loss = loss + F.relu(1.0 - participation_ratio(cg.flatten(0, 1)) / target.clamp_min(EPS))
    return loss


def diversity_loss(kc: Tensor, vc: Tensor) -> Tensor:
    """Mean cosine between the (k, v) super-tokens of different windows of a sample."""
    windows = kc.shape[1]
    if windows < 2:
        return kc.new_zeros(())
    z = F.normalize(torch.cat([kc, vc], -1), dim=-1, eps=1e-8)  # (B, W, 2d)
    gram = z @ z.transpose(-1, -2)  # (B, W, W)
    off_diagonal = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off_diagonal / (windows * (windows - 1))).mean()


def output_magnitude_loss(y_dense: Tensor, y_cg: Tensor) -> Tensor:
    """(||y_cg|| - ||y_dense||)^2 per query, mean."""
    return (y_cg.norm(dim=-1) - y_dense.norm(dim=-1)).pow(2).mean()


def kv_match_loss(kc: Tensor, vc: Tensor, kb: Tensor, vb: Tensor) -> Tensor:
    """Direction only: (1 - cos(k_cg, mean k)) + (1 - cos(v_cg, mean v)) per window, mean."""
    cos_k = F.cosine_similarity(kc, kb, dim=-1, eps=1e-8)
    cos_v = F.cosine_similarity(vc, vb, dim=-1, eps=1e-8)
    return (2.0 - cos_k - cos_v).clamp_min(0.0).mean()  # clamp: rounding can give cos > 1


@dataclass(frozen=True)
class BatchEval:
    """Dense and compressed attention of one batch: what the losses and diagnostics read."""

    k_dense: Tensor  # (B, N, d)
    v_dense: Tensor  # (B, N, d)
    y_dense: Tensor  # (B, M, d)
    probs_dense: Tensor  # (B, M, N)
    j_dense: Tensor  # (B, M, d, d)
    kc: Tensor  # (B, W, d) super-tokens as attention consumes them
    vc: Tensor  # (B, W, d)
    y_cg: Tensor  # (B, M, d)
    probs_cg: Tensor  # (B, M, W)
    j_cg: Tensor  # (B, M, d, d)
    k_mean: Tensor  # (B, W, d) window means: the training-free baseline compressor
    v_mean: Tensor  # (B, W, d)
    mu_k: Tensor  # (B, W) mean dense K norm per window
    mu_v: Tensor  # (B, W)
    weights: Tensor  # (B, M) query weights


def evaluate_batch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    window_size: int,
    force_norms: Tensor,
    params: SidecarParams,
) -> BatchEval:
    """Dense attention (no autograd) and compressed attention (autograd via kc, vc)."""
    with torch.no_grad():
        q, k, v = q.detach(), k.detach(), v.detach()
        k_win, v_win = windows_of(k, window_size), windows_of(v, window_size)
        y_dense, probs_dense = attention(q, k, v)
        j_dense = attention_jacobian(q, k, v, probs_dense)
        mu_k, mu_v = mean_norm(k_win), mean_norm(v_win)
        weights = query_weights(force_norms.detach(), params.force_weighted)
    kc, vc = normalize_scale(kc, vc, k_win, v_win, params.scale_normalize)
    y_cg, probs_cg = attention(q, kc, vc)
    return BatchEval(
        k_dense=k,
        v_dense=v,
        y_dense=y_dense,
        probs_dense=probs_dense,
        j_dense=j_dense,
        kc=kc,
        vc=vc,
        y_cg=y_cg,
        probs_cg=probs_cg,
        j_cg=attention_jacobian(q, kc, vc, probs_cg),
        k_mean=k_win.mean(-2),
        v_mean=v_win.mean(-2),
        mu_k=mu_k,
        mu_v=mu_v,
        weights=weights,
    )


def loss_terms(ev: BatchEval, params: SidecarParams) -> dict[str, Tensor]:
    """Every term of the seed, unweighted, each a scalar; keys are TERMS."""
    return {
        "consistency": consistency_loss(ev.y_dense, ev.y_cg, ev.weights, params.consistency),
        "force": force_matching_loss(ev.j_dense, ev.j_cg),
        "kv_norm": kv_norm_loss(ev.kc, ev.vc, ev.mu_k, ev.mu_v),
        "anti_collapse": anti_collapse_loss(ev.kc, ev.vc, ev.k_mean, ev.v_mean),
        "diversity": diversity_loss(ev.kc, ev.vc),
        "output_magnitude": output_magnitude_loss(ev.y_dense, ev.y_cg),
        "kv_match": kv_match_loss(ev.kc, ev.vc, ev.k_mean, ev.v_mean),
        "jacobian_ratio": jacobian_ratio_loss(ev.j_dense, ev.j_cg),
    }


def total_loss(terms: dict[str, Tensor], params: SidecarParams) -> Tensor:
    weights = params.loss_weights
    return sum((weights[name] * terms[name] for name in TERMS), terms["consistency"].new_zeros(()))


def entropy(probs: Tensor) -> Tensor:
    """Attention entropy in nats per query: (B, M, N) -> (B, M)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


@torch.no_grad()
def diagnostics(ev: BatchEval) -> dict[str, tuple[float, int]]:
    """(sum, count) per diagnostic, so batches of any size combine into exact means."""
    jd = ev.j_dense.flatten(-2).norm(dim=-1)  # (B, M) per-query Frobenius norms
    jc = ev.j_cg.flatten(-2).norm(dim=-1)
    queries, elements = jd.numel(), ev.y_dense.numel()

    def mean_of(x: Tensor) -> tuple[float, int]:
        return float(x.sum()), x.numel()

    # Relative Jacobian error per sample (chunk x KV head), its M queries' Jacobians
    # stacked: ||J_dense - J_cg||_F / ||J_dense||_F; predicting J = 0 scores 1.
    diff = (ev.j_dense - ev.j_cg).flatten(1).norm(dim=-1)
    rel = diff / ev.j_dense.flatten(1).norm(dim=-1).clamp_min(EPS)
    return {
        "jacobian_rel_error": mean_of(rel),
        "jacobian_norm_dense": mean_of(jd),
        "jacobian_norm_compressed": mean_of(jc),
        "k_norm_dense": mean_of(ev.k_dense.norm(dim=-1)),
        "k_norm_compressed": mean_of(ev.kc.norm(dim=-1)),
        "v_norm_dense": mean_of(ev.v_dense.norm(dim=-1)),
        "v_norm_compressed": mean_of(ev.vc.norm(dim=-1)),
        "attention_entropy_dense": mean_of(entropy(ev.probs_dense)),
        "attention_entropy_compressed": mean_of(entropy(ev.probs_cg)),
        "attention_max_dense": mean_of(ev.probs_dense.amax(-1)),
        "attention_max_compressed": mean_of(ev.probs_cg.amax(-1)),
        "output_mse": (float((ev.y_dense - ev.y_cg).pow(2).sum()), elements),
        "output_cosine": mean_of(F.cosine_similarity(ev.y_dense, ev.y_cg, dim=-1, eps=1e-8)),
        "output_norm_dense": (float(ev.y_dense.norm(dim=-1).sum()), queries),
        "output_norm_compressed": (float(ev.y_cg.norm(dim=-1).sum()), queries),
    }


RATIOS = {
    "jacobian_ratio": ("jacobian_norm_compressed", "jacobian_norm_dense"),
    "k_norm_ratio": ("k_norm_compressed", "k_norm_dense"),
    "v_norm_ratio": ("v_norm_compressed", "v_norm_dense"),
}


def with_ratios(means: dict[str, float]) -> dict[str, float | None]:
    """Add compressed / dense ratios (None where the dense value is 0)."""
    out: dict[str, float | None] = dict(means)
    for name, (num, den) in RATIOS.items():
        out[name] = means[num] / means[den] if means[den] else None
    return out
