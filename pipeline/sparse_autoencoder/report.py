"""The SAE's markdown reports: exemplars of the most and least coherent features, and
the SAE next to its baselines (seed 002's columns).

    markdown = exemplar_report(top, scores, usage, eval_rows, describe, count, title)
    table = comparison_table(metrics, heading)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pipeline.sparse_autoencoder.exemplars import TopExemplars

NONE = "–"


def rank_features(scores: Tensor, count: int) -> tuple[list[int], list[int]]:
    """(most, least) coherent feature indices, `count` each, ignoring NaN (dead or lonely)."""
    finite = torch.isfinite(scores).nonzero().flatten()
    ordered = finite[torch.argsort(scores[finite], descending=True, stable=True)].tolist()
    most = ordered[:count]
    least = [f for f in reversed(ordered[-count:]) if f not in most] if count else []
    return most, least


def exemplar_report(
    exemplars: TopExemplars,
    scores: Tensor,
    usage: Tensor,
    eval_rows: int,
    describe: Callable[[Tensor], list[str]],
    count: int,
    title: str,
) -> str:
    """Markdown: the `count` most and least coherent features with their top items."""
    most, least = rank_features(scores, count)
    dead = int((~exemplars.valid[:, 0]).sum())
    lines = [
        f"# {title}",
        "",
        f"{exemplars.values.shape[0]} features; {dead} never fired on any item. Coherence = "
        "mean pairwise cosine of a feature's top items' inputs (centered): an automatic "
        "proxy for how alike its exemplars are. Fires = share of eval rows where it is > 0.",
        "",
    ]
    for heading, features in (("Most coherent features", most), ("Least coherent features", least)):
        lines += [f"## {heading}", ""]
        for feature in features:
            lines += _feature_block(exemplars, feature, scores, usage, eval_rows, describe)
    return "\n".join(lines) + "\n"


def _feature_block(exemplars, feature, scores, usage, eval_rows, describe) -> list[str]:
    valid = exemplars.valid[feature]
    items = exemplars.items[feature][valid]
    texts = describe(items)
    fires = usage[feature].item() / max(eval_rows, 1)
    lines = [
        f"### Feature {feature}: coherence {scores[feature].item():.3f}, fires {fires:.2%}",
        "",
        "| rank | activation | item |",
        "|---:|---:|:---|",
    ]
    for rank, (value, text) in enumerate(zip(exemplars.values[feature][valid], texts, strict=True)):
        lines.append(f"| {rank + 1} | {value.item():.4f} | {_cell(text)} |")
    return lines + [""]


def comparison_table(metrics: dict[str, Any], heading: str, other_model: str = "") -> str:
    """Markdown: the SAE next to each baseline at equal L0, seed 002's columns."""
    header = (
        "| method | components | active dims (L0) | MSE | R^2 | density | dead rate | Gini "
        "| cos mean | cos p95 | cos max |"
    )
    lines = [
        f"# {heading}",
        "",
        f"Measured on {metrics['eval_rows']} held-out rows; baselines are fit on "
        f"{metrics['baseline_rows']} train rows with as many components as the SAE's L0.",
        "",
        header,
        "|:---|" + "---:|" * 10,
        _row(f"SAE (seed {metrics['seed']})", metrics["code_dims"], metrics),
    ]
    for name, base in metrics.get("baselines", {}).items():
        lines.append(_row(name.upper(), base["components"], base))
    cross = metrics.get("cross_seed")
    if cross:
        lines += [
            "",
            f"Cross-seed (seeds {metrics['seed']} and {cross['twin_seed']}): mean matched "
            f"decoder cosine {cross['mean_matched_cos']:.4f}, "
            f"{cross['frac_above_0_9']:.2%} of features matched above 0.9.",
        ]
    model = metrics.get("cross_model")
    if model:
        lines += [
            "",
            f"Cross-model ({model['rows']} shared items, vs {other_model} layer "
            f"{model['other_layer']}): linear CKA {model['cka']:.4f}, Procrustes disparity "
            f"{model['procrustes_disparity']:.4f}.",
        ]
    return "\n".join(lines) + "\n"


def _row(name: str, components: int, values: dict[str, Any]) -> str:
    keys = (
        "mean_active",
        "reconstruction_mse",
        "reconstruction_r2",
        "activation_density",
        "dead_feature_rate",
        "gini",
        "cos_mean",
        "cos_p95",
        "cos_max",
    )
    cells = [_number(values.get(key)) for key in keys]
    return f"| {name} | {components} | " + " | ".join(cells) + " |"


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("\r", "")
