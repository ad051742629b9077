"""Evaluating steering vectors: accuracy, coefficient sweep, combination, bootstrap CIs.

Every choice (best layer, coefficient, alpha) is made on val and reported on
test. A gain comes with a 95% interval from a paired bootstrap over questions:
the same resampled questions score both the unsteered and the steered model.

    sweep = sweep_coefficients(model, vector, val, params.coefficients)
    combined = weighted_average([deltas_a, deltas_b], alpha_weights(0.5, 2))
    gain = bootstrap_gain(unsteered_correct, steered_correct, samples=2000, seed=0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.steering_vectors.vector import Deltas, Encoded, SteeringVector, correct


def accuracy(right: Tensor) -> float:
    return right.double().mean().item()


def bootstrap_gain(base: Tensor, steered: Tensor, samples: int, seed: int = 0) -> dict[str, float]:
    """Mean of `steered - base` (per-question 0/1) and its 95% percentile interval."""
    if base.shape != steered.shape or base.numel() == 0:
        raise ValueError(
            f"need two equal, non-empty sets of answers: {base.shape} vs {steered.shape}"
        )
    diff = steered.double() - base.double()  # (N,)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(diff), (samples, len(diff)), generator=generator)
    means = diff[index].mean(1)  # (samples,)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return {"gain": diff.mean().item(), "gain_ci_low": low, "gain_ci_high": high}


def random_like(deltas: Deltas, seed: int) -> dict[int, Tensor]:
    """The control: one random direction (seeded) at the same layers, each with that layer's
    norm, so it differs from `deltas` in direction only."""
    if not deltas:
        return {}
    first = next(iter(deltas.values()))
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(first.shape[-1], generator=generator, dtype=torch.float64)
    direction = direction / direction.norm()
    return {
        layer: (direction * d.detach().double().norm().item()).to(d.dtype).to(d.device)
        for layer, d in deltas.items()
    }


def with_controls(
    right: Mapping[str, Tensor],
    base: Tensor,
    control: Tensor,
    samples: int,
    seed: int,
) -> dict[str, float]:
    """Val/test accuracy, test gain over the unsteered model (`gain*`) and over the random
    control (`over_random*`), each with its paired-bootstrap 95% interval."""
    over = bootstrap_gain(control, right["test"], samples, seed)
    return (
        {s: accuracy(right[s]) for s in ("val", "test")}
        | bootstrap_gain(base, right["test"], samples, seed)
        | {"random_test": accuracy(control)}
        | {k.replace("gain", "over_random"): v for k, v in over.items()}
    )


def sweep_coefficients(
    model: nn.Module,
    vector: SteeringVector,
    val: Encoded,
    coefficients: Sequence[float],
    position: int = 0,
    batch_size: int = 32,
) -> dict[float, float]:
    """Val accuracy at each multiple of the trained vector."""
    return {
        c: accuracy(correct(model, val, vector.deltas(c), position, batch_size))
        for c in coefficients
    }


def best_of(scores: Mapping[float, float], prefer: float = 1.0) -> float:
    """The key with the highest score; ties go to the key closest to `prefer`."""
    return max(scores, key=lambda k: (scores[k], -abs(k - prefer)))


def alpha_weights(alpha: float, count: int) -> list[float]:
    """alpha for the first vector, the rest share 1 - alpha (seed: alpha v1 + (1-alpha) v2)."""
    if count == 1:
        return [1.0]
    return [alpha] + [(1.0 - alpha) / (count - 1)] * (count - 1)


def weighted_average(deltas: Sequence[Deltas], weights: Sequence[float]) -> dict[int, Tensor]:
    """Layer by layer sum of weight * delta; a layer missing from one vector counts as 0."""
    out: dict[int, Tensor] = {}
    for one, weight in zip(deltas, weights, strict=True):
        for layer, delta in one.items():
            out[layer] = out.get(layer, 0) + weight * delta.detach()
    return out


def route(context: str, keywords: Mapping[str, Sequence[str]], tasks: Sequence[str]) -> str | None:
    """The task whose keyword occurs first in `keywords` order; else the first task without
    keywords; None (= the equal-weight average) when every task has keywords.

    A keyword matches whole words only, case-insensitively: `math` is not in "aftermath",
    `solve` not in "resolve"; a keyword of several words matches them as one phrase.
    """
    for task, words in keywords.items():
        if any(_whole_words(word).search(context) for word in words):
            return task
    return next((task for task in tasks if not keywords.get(task)), None)


def routed_correct(
    model: nn.Module,
    data: Encoded,
    routes: Sequence[str | None],
    vectors: Mapping[str, Deltas],
    fallback: Deltas,
    position: int = 0,
    batch_size: int = 32,
) -> Tensor:
    """Per-question correctness (N,) with each question steered by its routed task's vector."""
    right = torch.zeros(len(data), dtype=torch.bool)
    for target in dict.fromkeys(routes):
        index = [i for i, r in enumerate(routes) if r == target]
        deltas = fallback if target is None else vectors[target]
        right[index] = correct(model, data.subset(index), deltas, position, batch_size)
    return right


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _gain(m: Mapping[str, float], key: str = "gain") -> str:
    return (
        f"{100 * m[key]:+.1f} pts [{100 * m[f'{key}_ci_low']:+.1f}, "
        f"{100 * m[f'{key}_ci_high']:+.1f}]"
    )


def accuracy_table(summary: Mapping) -> str:
    """Markdown: per task on test (choices on val), then the combination on the mixed test set."""
    lines = [
        "# Steering: multiple-choice accuracy on test (every choice made on val)",
        "",
        f"Model `{summary['model']}`; multi-layer set {summary['layers']}; single-layer "
        f"candidates {summary['single_layers']}. Gain = best coefficient vs unsteered, "
        "paired bootstrap 95% interval over questions.",
        "",
        "| task | n test | unsteered | best single layer | multi-layer | best coefficient "
        "| gain [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for task, m in summary["tasks"].items():
        best, coef = m["best_single"], m["best_coefficient"]
        lines.append(
            f"| {task} | {m['questions']['test']} | {_pct(m['unsteered']['test'])} "
            f"| {_pct(best['test'])} (L{best['layer']}) | {_pct(m['multi_layer']['test'])} "
            f"| {_pct(coef['test'])} ({coef['config']} x{coef['coefficient']:g}) | {_gain(coef)} |"
        )
    lines += [
        "",
        "Controls on test: each vector against a random vector (seeded) of the same norm at "
        "the same layers, and the training-free mean-difference vector (contrastive "
        "activation addition, from train; coefficient chosen on val) at the multi-layer set.",
        "",
        "| task | vector | test | gain over unsteered [95% CI] | random, same norm "
        "| gain over random [95% CI] |",
        "|---|---|---:|---|---:|---|",
    ]
    for task, m in summary["tasks"].items():
        best, coef, caa = m["best_single"], m["best_coefficient"], m["mean_difference"]
        rows = {
            f"best single layer (L{best['layer']})": best,
            "multi-layer": m["multi_layer"],
            f"best coefficient ({coef['config']} x{coef['coefficient']:g})": coef,
            f"mean difference (x{caa['coefficient']:g})": caa,
        }
        lines += [
            f"| {task} | {name} | {_pct(r['test'])} | {_gain(r)} | {_pct(r['random_test'])} "
            f"| {_gain(r, 'over_random')} |"
            for name, r in rows.items()
        ]
    combined = summary.get("combined")
    if combined:
        average, routing = combined["average"], combined["routing"]
        lines += [
            "",
            f"Combination of {', '.join(combined['tasks'])} on the mixed test set "
            f"({combined['questions']['test']} questions):",
            "",
            "| method | val | test | gain [95% CI] |",
            "|---|---:|---:|---|",
            f"| unsteered | {_pct(combined['unsteered']['val'])} "
            f"| {_pct(combined['unsteered']['test'])} | |",
            f"| weighted average (alpha={average['alpha']:g}) | {_pct(average['val'])} "
            f"| {_pct(average['test'])} | {_gain(average)} |",
            f"| keyword routing ({_pct(routing['routed_right'])} routed to their task) "
            f"| {_pct(routing['val'])} | {_pct(routing['test'])} | {_gain(routing)} |",
        ]
    return "\n".join(lines) + "\n"


def _whole_words(keyword: str) -> re.Pattern[str]:
    words = keyword.split()
    phrase = r"\s+".join(map(re.escape, words))
    return re.compile(rf"(?<!\w){phrase}(?!\w)", re.IGNORECASE)
