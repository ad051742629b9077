"""The SAE's markdown reports: exemplars of the most and least coherent features, and
the SAE next to its baselines (seed 002's columns, the spliced-in LM loss, cross-seed
matching against chance and ceiling); and the metrics' `summary` block.

    markdown = exemplar_report(top, scores, usage, eval_rows, describe, count, title)
    table = comparison_table(metrics, heading)
    metrics["summary"] = summary(metrics, teacher)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pipeline.common.tables import markdown_table, spec, with_interval
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
    ]
    rows = [
        [str(rank + 1), f"{value.item():.4f}", _cell(text)]
        for rank, (value, text) in enumerate(
            zip(exemplars.values[feature][valid], texts, strict=True)
        )
    ]
    return lines + markdown_table(["rank", "activation", "item"], rows, align="rrl") + [""]


def comparison_table(metrics: dict[str, Any], heading: str, other_model: str = "") -> str:
    """Markdown: the SAE next to each baseline at equal L0 (seed 002's columns), the
    spliced-in LM loss of each, and the cross-seed line with its chance and ceiling."""
    header = [
        "method",
        "components",
        "active dims (L0)",
        "MSE",
        "R^2",
        "density",
        "dead rate",
        "Gini",
        "cos mean",
        "cos p95",
        "cos max",
    ]
    rows = [_row(f"SAE (seed {metrics['seed']})", metrics["code_dims"], metrics)]
    for name, base in metrics.get("baselines", {}).items():
        rows.append(_row(LABELS.get(name, name), base["components"], base))
    lines = [
        f"# {heading}",
        "",
        f"Measured on {metrics['eval_rows']} held-out rows, in the SAE's input space "
        f"({_space(metrics)}); baselines are fit on {metrics['baseline_rows']} train rows "
        "at the SAE's L0: " + _baseline_note(metrics) + _start_rows_note(metrics),
        "",
        *markdown_table(header, rows, align="l" + "r" * 10),
    ]
    lines += ["", *_splice_section(metrics)]
    cross = metrics.get("cross_seed")
    if cross:
        lines += ["", _cross_seed_line(metrics, cross)]
    model = metrics.get("cross_model")
    if model:
        lines += [
            "",
            f"Cross-model ({model['rows']} shared items, vs {other_model} layer "
            f"{model['other_layer']}): linear CKA {model['cka']:.4f}, Procrustes disparity "
            f"{model['procrustes_disparity']:.4f}.",
        ]
    return "\n".join(lines) + "\n"


def _start_rows_note(metrics: dict[str, Any]) -> str:
    """What the rows leave out: attention sinks (`sources.StartRows`), or nothing."""
    start = metrics.get("start_rows")
    if start is None:
        return ""
    if start["positions"] == 0:
        return " Start rows kept (sae.keep_start_rows): position 0 is an attention sink."
    dropped = start["dropped_train_rows"] + start["dropped_eval_rows"]
    tokens = " and rows holding a start token" if start["token_ids"] else ""
    return (
        f" Attention sinks are left out of training, metrics, baselines, exemplars and "
        f"splice: each chunk's first {start['positions']} position(s){tokens} and rows above "
        f"{start['norm_ratio']:g}x their shard's median norm ({dropped} rows; "
        "sae.keep_start_rows keeps them)."
    )


LABELS = {"pca": "PCA", "pca_top_l0": "PCA top-L0", "nmf": "NMF", "ica": "ICA top-L0"}


def _space(metrics: dict[str, Any]) -> str:
    return "each row layer-normed" if metrics.get("layer_norm") else "raw rows"


def _baseline_note(metrics: dict[str, Any]) -> str:
    notes = []
    for name, base in metrics.get("baselines", {}).items():
        notes.append(f"{LABELS.get(name, name)} {_what(name, base)}")
    return "; ".join(notes) + "." if notes else "none."


def _what(name: str, base: dict[str, Any]) -> str:
    k, keep = base["components"], base.get("kept_per_row")
    if name == "pca":
        return f"projects onto the top {k} principal components"
    if name == "nmf":
        return f"has {k} components (on [relu(x), relu(-x)])"
    kind = "FastICA sources" if name == "ica" else "PCA coefficients"
    return f"keeps per row the {keep} largest of {k} {kind} (by magnitude x component norm)"


def _splice_section(metrics: dict[str, Any]) -> list[str]:
    splice = metrics.get("splice") or {}
    if not splice.get("applies"):
        reason = splice.get("reason", "not run")
        return [f"Spliced-in LM-loss evaluation: does not apply ({reason})."]
    chunks, layer = splice["chunks"], metrics["layer"]
    lines = [
        f"## Spliced in: teacher LM loss on {chunks} held-out chunks "
        f"({splice['predicted_tokens']} predicted tokens)",
        "",
        f"hidden_states[{layer}] (the output of `{splice['hook']}`, the tensor the activations "
        f"stage stored: hooked vs stored relative error {splice['hook_check_rel_error']:.1e}) "
        "is replaced at every token by each method's reconstruction, mapped back to the "
        "model's space. Loss recovered = (L_mean - L) / (L_mean - L_clean), L_mean with the "
        "train mean activation spliced in (SAELens's ce_loss_score uses zero ablation "
        "instead). Intervals: 95% paired BCa bootstrap over the chunks "
        f"({splice['bootstrap_samples']} resamples). EV = 1 - SSE / total variance of the "
        "replaced rows in the model's space.",
        "",
    ]
    header = [
        "method",
        "spliced in",
        "LM loss (nats/token)",
        "loss recovered [95% CI]",
        "loss increase [95% CI]",
        "EV (model space)",
    ]
    clean = ["clean", "nothing", f"{splice['clean_loss']:.4f}", "1", "0"]
    rows = [[*clean, _number(splice["clean_explained_variance"])]]
    baselines = metrics.get("baselines", {})
    for name, scores in splice["methods"].items():
        if name == "sae":
            label, what = f"SAE (seed {metrics['seed']})", f"its top-{metrics['topk']} code"
            if metrics.get("topk") is None:
                what = "its ReLU code"
        else:
            label, what = LABELS.get(name, name), _what(name, baselines.get(name, {}))
        rows.append(_splice_row(label, what, scores))
    ablation = splice["mean_ablation"]
    rows.append(_splice_row("mean ablation", "the train mean activation", ablation))
    lines += markdown_table(header, rows, align="llrrrr")
    interval = ablation["loss_increase_ci"]
    if interval is not None and interval[0] <= 0:
        raised = with_interval(ablation["loss_increase"], interval, spec("+.4f"))
        lines += [
            "",
            f"Mean ablation raises the loss by {raised} "
            "nats/token: its interval reaches 0, so the denominator of loss recovered is "
            "indistinguishable from noise and the fractions above are not interpretable; "
            "compare the loss increases instead.",
        ]
    return lines


def _splice_row(label: str, what: str, scores: dict[str, Any]) -> list[str]:
    recovered = with_interval(scores["loss_recovered"], scores["loss_recovered_ci"], spec("+.3f"))
    increase = with_interval(scores["loss_increase"], scores["loss_increase_ci"], spec("+.4f"))
    lm_loss, explained = f"{scores['lm_loss']:.4f}", _number(scores["explained_variance"])
    return [label, what, lm_loss, recovered, increase, explained]


def _cross_seed_line(metrics: dict[str, Any], cross: dict[str, Any]) -> str:
    draws = cross["chance_draws"]
    spread = f" ± {cross['chance_sd']:.4f} (sd)" if cross.get("chance_sd") is not None else ""
    line = (
        f"Cross-seed (seeds {metrics['seed']} and {cross['twin_seed']}): mean matched decoder "
        f"cosine {cross['mean_matched_cos']:.4f}, {cross['frac_above_0_9']:.2%} of features "
        f"matched above 0.9. Chance (the same Hungarian matching of two random unit-Gaussian "
        f"dictionaries of the same shape, ({metrics['model_dims']}, {metrics['code_dims']}), "
        f"{len(draws)} seeded draws): {cross['chance_mean_matched_cos']:.4f}{spread}."
    )
    if "same_seed_mean_matched_cos" in cross:
        how = (
            "bit-identical weights, so this ceiling is by construction"
            if cross["same_seed_bit_identical"]
            else "the weights differ: training is not bit-deterministic here"
        )
        line += (
            f" Ceiling (seed {metrics['seed']} trained twice): "
            f"{cross['same_seed_mean_matched_cos']:.4f} ({how})."
        )
    return line


def summary(metrics: dict[str, Any], teacher: str, caveat: str = "") -> list[dict[str, Any]]:
    """The summary entries of this branch, from the numbers its table shows; `caveat` (e.g.
    `teacher_caveat(model)`) goes into each entry."""
    entries = []
    splice = metrics.get("splice") or {}
    if splice.get("applies"):
        sae = splice["methods"]["sae"]
        others = {name: v for name, v in splice["methods"].items() if name != "sae"}
        best = max(others, key=lambda name: others[name]["loss_recovered"], default=None)
        entries.append(
            _entry(
                f"SAE fraction of LM loss recovered, layer {metrics['layer']} spliced in",
                sae["loss_recovered"],
                sae["loss_recovered_ci"],
                "paired BCa bootstrap 95% over held-out chunks",
                f"best baseline at equal L0: {LABELS.get(best, best)}" if best else None,
                others[best]["loss_recovered"] if best else None,
                others[best]["loss_recovered_ci"] if best else None,
                "SAE LM loss increase over clean (nats/token)",
                sae["loss_increase"],
                teacher,
                splice["chunks"],
                caveat,
            )
        )
    cross = metrics.get("cross_seed")
    if cross:
        draws = cross["chance_draws"]
        entries.append(
            _entry(
                "SAE cross-seed mean matched decoder cosine",
                cross["mean_matched_cos"],
                None,
                None,
                "random dictionaries of the same shape (chance; interval: min, max of draws)",
                cross["chance_mean_matched_cos"],
                [min(draws), max(draws)],
                None,
                None,
                teacher,
                metrics["code_dims"],
                caveat,
            )
        )
    if not entries:
        r2 = {name: b["reconstruction_r2"] for name, b in metrics.get("baselines", {}).items()}
        best = max(r2, key=r2.get, default=None)
        entries.append(
            _entry(
                "SAE reconstruction R^2 (held-out rows)",
                metrics["reconstruction_r2"],
                None,
                None,
                f"best baseline at equal L0: {LABELS.get(best, best)}" if best else None,
                r2[best] if best else None,
                None,
                None,
                None,
                teacher,
                metrics["eval_rows"],
                caveat,
            )
        )
    return entries


def _entry(
    metric, value, interval, kind, control, control_value, control_interval, downstream,
    downstream_value, teacher, n, caveat,
) -> dict[str, Any]:  # fmt: skip
    return {
        "branch": "sae",
        "metric": metric,
        "value": value,
        "interval": interval,
        "interval_kind": kind,
        "control": control,
        "control_value": control_value,
        "control_interval": control_interval,
        "downstream": downstream,
        "downstream_value": downstream_value,
        "teacher": teacher,
        "n": n,
        "caveat": caveat or None,
    }


def _row(name: str, components: int, values: dict[str, Any]) -> list[str]:
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
    return [name, str(components), *(_number(values.get(key)) for key in keys)]


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("\r", "")
