"""Markdown table of the sidecar's held-out diagnostics next to the mean-K/V baseline.

text = sidecar_table(metrics)  # metrics: the dict stage `sidecar` writes as JSON
"""

from __future__ import annotations

from typing import Any

from pipeline.kv_sidecar.losses import TERMS

MISSING = "—"
# (label, key of the dense reference or None, key of the compressed value)
ROWS = (
    ("Jacobian norm per query ‖dy/dq‖_F", "jacobian_norm_dense", "jacobian_norm_compressed"),
    ("Jacobian ratio (compressed / dense)", None, "jacobian_ratio"),
    ("K norm per token", "k_norm_dense", "k_norm_compressed"),
    ("K norm ratio", None, "k_norm_ratio"),
    ("V norm per token", "v_norm_dense", "v_norm_compressed"),
    ("V norm ratio", None, "v_norm_ratio"),
    ("attention entropy (nats)", "attention_entropy_dense", "attention_entropy_compressed"),
    ("attention max", "attention_max_dense", "attention_max_compressed"),
    ("output norm", "output_norm_dense", "output_norm_compressed"),
    ("output MSE (per element)", None, "output_mse"),
    ("output cosine", None, "output_cosine"),
    *((f"loss: {name}", None, f"loss_{name}") for name in TERMS),
    ("loss: total (weighted)", None, "loss_total"),
)


def fmt(value: Any) -> str:
    if value is None:
        return MISSING
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def sidecar_table(metrics: dict[str, Any]) -> str:
    """Rows: diagnostics and loss terms; columns: dense reference, sidecar, baseline."""
    sidecar, baseline = metrics["sidecar"], metrics["baseline_mean"]
    counts = metrics.get("counts", {})
    lines = [
        f"Held-out chunks of layer {counts.get('layer', MISSING)}: "
        f"{counts.get('heldout_samples', MISSING)} samples (chunk x KV head), "
        f"{counts.get('dense_tokens', MISSING)} dense tokens -> "
        f"{counts.get('super_tokens', MISSING)} super-tokens, "
        f"{counts.get('queries_per_sample', MISSING)} queries each.",
        "",
        "| metric | dense | sidecar | baseline (window mean K, V) |",
        "|---|---:|---:|---:|",
    ]
    for label, dense_key, key in ROWS:
        dense = fmt(sidecar.get(dense_key)) if dense_key else ""
        lines.append(f"| {label} | {dense} | {fmt(sidecar.get(key))} | {fmt(baseline.get(key))} |")
    return "\n".join(lines) + "\n"
