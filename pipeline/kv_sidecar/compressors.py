"""Compressors of a window of K/V tokens into one super-token: the sidecar and the
training-free baselines at the same budget (one (k, v) per window and KV head).

A compressor maps windows keys, values (B, W, S, d) and, for the attention-mass
selection, the attention mass each window token receives from its own window's queries
(B, W, S), to super-tokens k_cg, v_cg (B, W, d); a row of B is one sample (chunk x KV
head). Only the sidecar's output is rescaled (`sidecar.scale_normalize`): the baselines
are fixed references.

    compressors = compressor_set(model, params)   # {"sidecar": ..., "window_mean": ...}
    kc, vc = compressors["key_norm_min"].apply(k_win, v_win, mass=None)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.kv_sidecar.losses import normalize_scale
from pipeline.kv_sidecar.params import SidecarParams

SIDECAR = "sidecar"
WINDOW_MEAN = "window_mean"
KEY_NORM_MIN = "key_norm_min"
ATTENTION_MASS = "attention_mass"
BASELINES = (WINDOW_MEAN, KEY_NORM_MIN, ATTENTION_MASS)
LABELS = {
    SIDECAR: "sidecar (trained)",
    WINDOW_MEAN: "window mean K, V",
    KEY_NORM_MIN: "lowest-key-norm token (Devoto et al. 2024)",
    ATTENTION_MASS: "largest-attention-mass token (H2O/SnapKV-style)",
}


@dataclass(frozen=True)
class Compressor:
    name: str
    compress: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]
    scale_normalize: str = "none"
    needs_mass: bool = False
    module: nn.Module | None = None
    """The trained model behind `compress`, if any (evaluation puts it in eval mode)."""

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    def apply(self, keys: Tensor, values: Tensor, mass: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, W, S, d) x 2 [, (B, W, S)] -> super-tokens (B, W, d) x 2, rescaled as set."""
        if self.needs_mass and mass is None:
            raise ValueError(f"compressor {self.name} needs the window queries' attention mass")
        kc, vc = self.compress(keys, values, mass)
        return normalize_scale(kc, vc, keys, values, self.scale_normalize)


def window_mean(keys: Tensor, values: Tensor, mass: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each window's mean K and mean V."""
    return keys.mean(-2), values.mean(-2)


def select(keys: Tensor, values: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The (k, v) of token index (B, W) of each window: an actual cached token, kept as is."""
    at = index[..., None, None].expand(*index.shape, 1, keys.shape[-1])
    return keys.gather(-2, at).squeeze(-2), values.gather(-2, at).squeeze(-2)


def key_norm_min(keys: Tensor, values: Tensor, mass: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep, per window and KV head, the token with the LOWEST key L2 norm: Devoto et al.
    2024 ("A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression") find
    that low-key-norm tokens receive high attention and keep those. Chosen because it
    needs neither queries nor attention scores, so it fits any cache as stored."""
    return select(keys, values, keys.norm(dim=-1).argmin(-1))


def attention_mass(keys: Tensor, values: Tensor, mass: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keep, per window and KV head, the token that receives the most attention from the
    window's own queries (summed over the query heads of that KV head), as H2O (heavy
    hitters: accumulated attention) and SnapKV (attention from an observation window)
    score tokens. The queries of window tokens are not stored in the trajectories, so
    the mass comes from the LM-loss pass over the teacher (`lm_loss.window_attention_mass`)."""
    if mass is None:
        raise ValueError("attention_mass selection needs the window queries' attention mass")
    return select(keys, values, mass.argmax(-1))


def sidecar_compressor(model: nn.Module, scale_normalize: str) -> Compressor:
    """The trained sidecar, its super-tokens rescaled per `sidecar.scale_normalize`."""

    def compress(keys: Tensor, values: Tensor, mass: Tensor | None) -> tuple[Tensor, Tensor]:
        return model(keys, values)

    return Compressor(SIDECAR, compress, scale_normalize, module=model)


def baseline_compressors() -> dict[str, Compressor]:
    return {
        WINDOW_MEAN: Compressor(WINDOW_MEAN, window_mean),
        KEY_NORM_MIN: Compressor(KEY_NORM_MIN, key_norm_min),
        ATTENTION_MASS: Compressor(ATTENTION_MASS, attention_mass, needs_mass=True),
    }


def compressor_set(model: nn.Module, params: SidecarParams) -> dict[str, Compressor]:
    """The sidecar and every baseline, in table order before ranking."""
    return {SIDECAR: sidecar_compressor(model, params.scale_normalize)} | baseline_compressors()
