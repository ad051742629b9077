"""The sidecar stage's tables and its `summary` block, from the metrics dict it writes.

text = sidecar_table(metrics)   # compressors ranked by LM loss increase, then diagnostics
block = summary(metrics)        # the issue-11 summary contract (headline + control)
"""

from __future__ import annotations

from typing import Any

from pipeline.common.tables import MISSING, fmt, fmt_signed, markdown_table, with_interval
from pipeline.kv_sidecar.compressors import BASELINES, LABELS, SIDECAR
from pipeline.kv_sidecar.lm_loss import INTERVAL_KIND
from pipeline.kv_sidecar.losses import TERMS

BRANCH = "kv_sidecar"
# (label, key of the dense reference or None, key of the compressed value)
ROWS = (
    ("LM loss at the future positions (nats/token)", None, "lm_loss"),
    ("LM loss increase over dense", None, "lm_loss_increase"),
    ("relative Jacobian error ‖J_dense − J_cg‖_F / ‖J_dense‖_F", None, "jacobian_rel_error"),
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
BY_CONSTRUCTION = {
    "per_sample": "each sample's super-tokens are rescaled to its mean dense K and V norms "
    "(seed 003 fix 4: one scalar per sample for K, one for V), so the mean norms match",
    "per_window": "each super-token is rescaled to its own window's mean dense norm",
}


def prefix_note(start_tokens: int) -> str:
    """The chunk's start tokens, which every compressor keeps dense (the attention sink)."""
    if not start_tokens:
        return ""
    return (
        f"; the {start_tokens} start token before the windows (position 0, an attention sink) "
        "stays dense for every compressor"
    )


def read_by_future(counts: dict[str, Any]) -> str:
    """What the future queries read in place of the window tokens."""
    if counts.get("start_tokens"):
        return "the dense start token, the super-tokens"
    return "the super-tokens"


def ranking(compressors: dict[str, dict[str, Any]]) -> list[str]:
    """Compressor names by LM loss increase over dense, lowest first (ties: by name)."""
    return sorted(compressors, key=lambda name: (compressors[name]["lm_loss_increase"], name))


def label(name: str) -> str:
    return LABELS.get(name, name)


def summary(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Headline: the sidecar's LM loss increase over dense with its interval; control: the
    training-free baseline with the lowest increase; downstream: the dense LM loss."""
    compressors, counts = metrics["compressors"], metrics["counts"]
    sidecar = compressors[SIDECAR]
    baselines = [name for name in metrics["ranking"] if name in BASELINES]
    best = compressors[baselines[0]] if baselines else None
    where = f"layer {counts['layer']}, {counts['window_size']}x compression"
    return [
        {
            "branch": BRANCH,
            "metric": f"sidecar LM loss increase over dense (nats/token, {where})",
            "value": sidecar["lm_loss_increase"],
            "interval": sidecar["lm_loss_increase_interval"],
            "interval_kind": INTERVAL_KIND,
            "control": (
                f"best training-free baseline: {label(baselines[0])}" if baselines else None
            ),
            "control_value": best["lm_loss_increase"] if best else None,
            "control_interval": best["lm_loss_increase_interval"] if best else None,
            "downstream": "dense LM loss at the future positions (nats/token)",
            "downstream_value": metrics["dense"]["lm_loss"],
            "teacher": metrics["teacher"]["model"],
            "n": counts["lm_chunks"],
            "caveat": metrics["teacher"].get("caveat") or None,
        }
    ]


def sidecar_table(metrics: dict[str, Any]) -> str:
    """The ranking table (one row per compressor), then every diagnostic and loss term."""
    compressors, counts = metrics["compressors"], metrics.get("counts", {})
    order = metrics.get("ranking") or ranking(compressors)
    mode = metrics.get("scale_normalize")
    teacher = metrics.get("teacher", {}).get("model", MISSING)
    caveat = metrics.get("teacher", {}).get("caveat")
    lines = [
        f"# KV sidecar vs training-free compressors: {teacher}"
        + (f" ({caveat})" if caveat else ""),
        "",
        f"Compressors of layer {counts.get('layer', MISSING)}'s K/V cache, teacher {teacher}, "
        f"on {counts.get('lm_chunks', MISSING)} held-out chunks "
        f"({counts.get('heldout_samples', MISSING)} samples = chunk x KV head): "
        f"{counts.get('dense_tokens', MISSING)} window tokens -> "
        f"{counts.get('super_tokens', MISSING)} super-tokens per KV head, "
        f"{counts.get('queries_per_sample', MISSING)} future queries per sample"
        + prefix_note(counts.get("start_tokens", 0))
        + ".",
        "",
        f"Dense LM loss at the future positions: "
        f"{fmt(metrics.get('dense', {}).get('lm_loss'))} nats/token. Ranked by the increase "
        "over dense (lowest first).",
        "",
    ]
    header = [
        "rank",
        "compressor",
        "LM loss",
        "increase over dense [95% CI] ¹",
        "rel. Jacobian error ²",
        "Jacobian ratio",
        "output cosine",
        "K norm ratio",
        "V norm ratio",
    ]
    ranked = []
    for rank, name in enumerate(order, 1):
        c = compressors[name]
        mark = " ³" if name == SIDECAR and mode in BY_CONSTRUCTION else ""
        increase = c.get("lm_loss_increase")
        ranked.append(
            [
                str(rank),
                label(name),
                fmt(c.get("lm_loss")),
                with_interval(increase, c.get("lm_loss_increase_interval"), fmt_signed),
                fmt(c.get("jacobian_rel_error")),
                fmt(c.get("jacobian_ratio")),
                fmt(c.get("output_cosine")),
                f"{fmt(c.get('k_norm_ratio'))}{mark}",
                f"{fmt(c.get('v_norm_ratio'))}{mark}",
            ]
        )
    lines += markdown_table(header, ranked, align="rlrrrrrrr")
    lines += [
        "",
        "¹ Mean over held-out chunks of (compressed − dense) next-token cross-entropy at the "
        "future positions, when at this layer the future queries of every head attend to "
        f"{read_by_future(counts)} plus the causal future tokens instead of the window "
        f"tokens (all other layers and positions dense); {INTERVAL_KIND}.",
        "² Per sample (chunk x KV head), the Frobenius norm over its stacked per-query "
        "Jacobians dy/dq, then the mean over samples; predicting J = 0 scores 1.",
    ]
    if mode in BY_CONSTRUCTION:
        lines.append(
            f"³ 1 by construction of sidecar.scale_normalize: {mode}: {BY_CONSTRUCTION[mode]}. "
            "The baselines are never rescaled."
        )
    elif mode is not None:
        lines.append(f"sidecar.scale_normalize: {mode}: no compressor is rescaled.")
    reference = compressors[order[0]] if order else {}
    body = []
    for text, dense_key, key in ROWS:
        dense = fmt(reference.get(dense_key)) if dense_key else ""
        if key == "lm_loss":
            dense = fmt(metrics.get("dense", {}).get("lm_loss"))
        body.append([text, dense, *(fmt(compressors[name].get(key)) for name in order)])
    header = ["metric", "dense", *(label(name) for name in order)]
    lines += ["", *markdown_table(header, body, align="lr" + "r" * len(order))]
    return "\n".join(lines) + "\n"
