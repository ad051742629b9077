"""Exemplars per SAE feature, their coherence, and the markdown reports.

`TopExemplars` keeps, for every feature, the k items with the largest positive
activation seen so far; it is fed streamed batches (codes and their items side
by side), so its result does not depend on batch order or shuffling. A feature's
*coherence* is the mean pairwise cosine between its exemplars' inputs (centered
at the data mean): an automatic proxy for "the top items look alike", used to
pick the most and least interpretable features for the report.

    top = TopExemplars(features=256, k=5)
    for batch in source.batches("all", 256, 4096, shuffle=False): top.update(z, batch.items)
    markdown = exemplar_report(top, coherence, texts, ...)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

NONE = "–"


class TopExemplars:
    def __init__(self, features: int, k: int):
        self.k = k
        self.values = torch.full((features, k), -math.inf)  # (F, k) descending
        self.items = torch.full((features, k, 2), -1, dtype=torch.long)  # (F, k, 2)

    def update(self, z: Tensor, items: Tensor) -> None:
        """Merge codes z (B, F) of `items` (B, 2); only positive activations count."""
        z, items = z.detach().float().cpu(), items.cpu()
        candidates = torch.where(z > 0, z, -math.inf).T  # (F, B)
        merged = torch.cat([self.values, candidates], dim=1)  # (F, k + B)
        k = min(self.k, merged.shape[1])
        values, index = merged.topk(k, dim=1)  # (F, k)
        kept = index < self.k
        old = self.items.gather(1, index.clamp(max=self.k - 1)[..., None].expand(-1, -1, 2))
        new = items[(index - self.k).clamp(min=0)]  # (F, k, 2)
        self.items = torch.where(kept[..., None], old, new)
        self.values = values

    @property
    def valid(self) -> Tensor:
        """(F, k) True where an exemplar exists (the feature fired on that many items)."""
        return torch.isfinite(self.values)


def coherence(
    exemplars: TopExemplars, vectors: Tensor, keys: Tensor, center: Tensor, block: int = 512
) -> Tensor:
    """Mean pairwise cosine of each feature's exemplar inputs (F,); NaN under 2 exemplars.

    `vectors` (U, D) are the inputs of the items with `keys` (U,) (see `item_keys`),
    as the SAE sees them; `center` (D,) is subtracted first.
    """
    from pipeline.sparse_autoencoder.sources import item_keys

    unit = torch.nn.functional.normalize(vectors.double() - center.double(), dim=1)  # (U, D)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    features, k = exemplars.values.shape
    out = torch.full((features,), math.nan, dtype=torch.float64)
    for start in range(0, features, block):
        valid = exemplars.valid[start : start + block]  # (b, k)
        found = item_keys(exemplars.items[start : start + block].reshape(-1, 2))
        where = torch.searchsorted(sorted_keys, found).clamp(max=max(len(keys) - 1, 0))
        rows = unit[order[where]].reshape(valid.shape[0], k, -1)  # (b, k, D)
        gram = rows @ rows.transpose(1, 2)  # (b, k, k)
        pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(k, dtype=torch.bool)
        count = pair.sum((1, 2))
        mean = (gram * pair).sum((1, 2)) / count.clamp(min=1)
        out[start : start + block] = torch.where(count > 0, mean, math.nan)
    return out


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
