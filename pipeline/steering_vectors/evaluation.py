"""Evaluating steering vectors: accuracy, coefficient sweep, combination, bootstrap CIs.

Every choice (best layer, coefficient, alpha) is made on val and reported on
test. A gain comes with a 95% interval from a paired bootstrap over questions:
the same resampled questions score both the unsteered and the steered model.
The question control asks each test question after another question's context of
the same task (a seeded derangement): a vector whose gain survives without its
question learned a prior over the options, not to answer the question.

    sweep = sweep_coefficients(answers, vector.deltas, val, params.coefficients)
    combined = weighted_average([deltas_a, deltas_b], alpha_weights(0.5, 2))
    gain = bootstrap_gain(unsteered_correct, steered_correct, samples=2000, seed=0)
    swapped = test.with_contexts_of(derangement(len(test), seed=0))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.common.bootstrap import paired_interval
from pipeline.common.progress import progress
from pipeline.common.tables import counted, markdown_table, over_rows, too_few
from pipeline.steering_vectors.vector import Deltas, Encoded, correct


def accuracy(right: Tensor) -> float:
    return right.double().mean().item()


def bootstrap_gain(base: Tensor, steered: Tensor, samples: int, seed: int = 0) -> dict[str, float]:
    """Mean of `steered - base` (per-question 0/1) and its paired 95% BCa interval."""
    if base.shape != steered.shape or base.numel() == 0:
        raise ValueError(
            f"need two equal, non-empty sets of answers: {base.shape} vs {steered.shape}"
        )
    return bootstrap_mean(steered.double() - base.double(), samples, seed)


def bootstrap_mean(diff: Tensor, samples: int, seed: int = 0) -> dict[str, float]:
    """Mean of the per-question values `diff` (N,) and its 95% BCa interval over `samples`
    resamples of the questions (`paired_interval`; seeded: equal seeds resample the same
    questions)."""
    values = diff.double().cpu().numpy()
    low, high = paired_interval((values,), np.mean, samples, seed)
    return {"gain": float(values.mean()), "gain_ci_low": low, "gain_ci_high": high}


def derangement(count: int, seed: int) -> list[int]:
    """A seeded permutation without a fixed point: one cycle through a shuffled order, so
    question i gets the context of question `result[i]` != i."""
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 questions, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * count
    for k, i in enumerate(order):
        out[i] = order[(k + 1) % count]
    return out


def question_control(
    right: Tensor,
    base: Tensor,
    right_swapped: Tensor,
    base_swapped: Tensor,
    samples: int,
    seed: int,
) -> dict[str, float | bool]:
    """The gain without the question (`no_question*`: steered vs unsteered, both with every
    context swapped for another question's) and the gain with it minus the gain without
    (`question_effect*`), each with its paired-bootstrap 95% interval. `prior_only`: the
    gain without the question is not clearly below the gain with it (the difference's
    interval reaches 0), so whatever the vector gains it gains from the options alone."""
    without = bootstrap_gain(base_swapped, right_swapped, samples, seed)
    with_minus_without = (right.double() - base.double()) - (
        right_swapped.double() - base_swapped.double()
    )
    effect = bootstrap_mean(with_minus_without, samples, seed)
    return (
        {"no_question_test": accuracy(right_swapped)}
        | {k.replace("gain", "no_question_gain"): v for k, v in without.items()}
        | {k.replace("gain", "question_effect"): v for k, v in effect.items()}
        | {"prior_only": effect["gain_ci_low"] <= 0.0}
    )


def routing_scores(
    routes: Mapping[str, Sequence[str | None]], tasks: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Per task: how many questions were routed to it, precision (the share of those that
    belong to it; None when none was) and recall (the share of its questions routed to it)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for task in tasks:
        routed = sum(r == task for t in tasks for r in routes[t])
        hits = sum(r == task for r in routes[task])
        out[task] = {
            "routed": routed,
            "precision": hits / routed if routed else None,
            "recall": hits / len(routes[task]) if routes[task] else None,
        }
    return out


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


class Answers:
    """`correct` of the model under a steering, each (questions, deltas) computed once: the
    stage asks some twice (the sweep's coefficient 1 is the trained vector, the chosen
    coefficient's val accuracy is the sweep's), and each costs a forward pass per question.

        answers = Answers(model, position=0, batch_size=32)
        answers(val, vector.deltas(1.0))  # (N,) bool; the same call again is free
    """

    def __init__(self, model: nn.Module, position: int = 0, batch_size: int = 32) -> None:
        self.model, self.position, self.batch_size = model, position, batch_size
        self.known: dict[tuple, tuple[Encoded, Tensor]] = {}
        self.computed = self.reused = 0

    def __call__(self, data: Encoded, deltas: Deltas) -> Tensor:
        key = self._key(data, deltas)
        if key in self.known:
            self.reused += 1
        else:
            self.remember(
                data, deltas, correct(self.model, data, deltas, self.position, self.batch_size)
            )
            self.computed += 1
        return self.known[key][1]

    def remember(self, data: Encoded, deltas: Deltas, right: Tensor) -> None:
        """Record answers computed elsewhere (training scores val once at its end)."""
        # `data` is kept with its answers so that its id cannot be reused by another.
        self.known[self._key(data, deltas)] = (data, right)

    @staticmethod
    def _key(data: Encoded, deltas: Deltas) -> tuple:
        return (id(data), *((layer, _bytes(deltas[layer])) for layer in sorted(deltas)))


def _bytes(delta: Tensor) -> bytes:
    return delta.detach().float().cpu().numpy().tobytes()


def sweep_coefficients(
    answers: Callable[[Encoded, Deltas], Tensor],
    deltas_at: Callable[[float], Deltas],
    val: Encoded,
    coefficients: Sequence[float],
    desc: str = "coefficients",
) -> dict[float, float]:
    """Val accuracy at each coefficient c of `deltas_at(c)`, with a progress bar `desc`."""
    return {
        c: accuracy(answers(val, deltas_at(c)))
        for c in progress(coefficients, desc=desc, unit="coefficient")
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


@dataclass(frozen=True)
class _Over:
    """The cells of scores over one set of `rows` questions: each marked `n=10 < 30`
    (`pipeline.common.tables.too_few`) instead of a number below `min_rows`."""

    rows: int
    min_rows: int

    def pct(self, value: float) -> str:
        return over_rows(value, self.rows, self.min_rows, _pct)

    def gain(self, m: Mapping[str, float], key: str = "gain") -> str:
        return too_few(self.rows, self.min_rows) or _gain(m, key)


def _test(m: Mapping, min_rows: int) -> _Over:
    return _Over(m["questions"]["test"], min_rows)


def accuracy_table(summary: Mapping, min_rows: int) -> str:
    """Markdown: per task on test (choices on val), then the combination on the mixed test
    set; a score over fewer than `min_rows` test questions (`steering.min_rows`) is marked
    as such."""
    caveat = summary.get("teacher_caveat")
    lines = [
        "# Steering: multiple-choice accuracy on test (every choice made on val)"
        + (f" ({caveat})" if caveat else ""),
        "",
        f"Model `{summary['model']}`; multi-layer set {summary['layers']}; single-layer "
        f"candidates {summary['single_layers']}. Gain = best coefficient vs unsteered, "
        f"paired BCa bootstrap 95% interval over questions; a score over fewer than {min_rows} "
        f"test questions (steering.min_rows) reads `n=<questions> < {min_rows}`.",
        "",
    ]
    header = [
        "task",
        "n test",
        "unsteered",
        "best single layer",
        "multi-layer",
        "best coefficient",
        "gain [95% CI]",
    ]
    rows = []
    for task, m in summary["tasks"].items():
        best, coef, cell = m["best_single"], m["best_coefficient"], _test(m, min_rows)
        rows.append(
            [
                task,
                str(m["questions"]["test"]),
                cell.pct(m["unsteered"]["test"]),
                f"{cell.pct(best['test'])} (L{best['layer']})",
                cell.pct(m["multi_layer"]["test"]),
                f"{cell.pct(coef['test'])} ({coef['config']} x{coef['coefficient']:g})",
                cell.gain(coef),
            ]
        )
    lines += markdown_table(header, rows, align="lrrrrrl")
    lines += [
        "",
        "Controls on test: each vector against a random vector (seeded) of the same norm at "
        "the same layers, and the training-free mean-difference vector (contrastive "
        "activation addition, from train; coefficient chosen on val) at the multi-layer set.",
        "",
    ]
    header = [
        "task",
        "vector",
        "test",
        "gain over unsteered [95% CI]",
        "random, same norm",
        "gain over random [95% CI]",
    ]
    rows = [
        [task, name, c.pct(r["test"]), c.gain(r), c.pct(r["random_test"]), c.gain(r, "over_random")]
        for task, m in summary["tasks"].items()
        for c in [_test(m, min_rows)]
        for name, r in _vector_rows(m).items()
    ]
    lines += markdown_table(header, rows, align="llrlrl")
    lines += _question_tables(summary, min_rows)
    combined = summary.get("combined")
    if combined:
        average, routing = combined["average"], combined["routing"]
        val, test = (_Over(combined["questions"][s], min_rows) for s in ("val", "test"))
        lines += [
            "",
            f"Combination of {', '.join(combined['tasks'])} on the mixed test set "
            f"({combined['questions']['test']} questions):",
            "",
            *markdown_table(
                ["method", counted("val", val.rows), counted("test", test.rows), "gain [95% CI]"],
                [
                    [
                        "unsteered",
                        val.pct(combined["unsteered"]["val"]),
                        test.pct(combined["unsteered"]["test"]),
                        "",
                    ],
                    [
                        f"weighted average (alpha={average['alpha']:g})",
                        val.pct(average["val"]),
                        test.pct(average["test"]),
                        test.gain(average),
                    ],
                    [
                        f"keyword routing ({_pct(routing['routed_right'])} routed to their task)",
                        val.pct(routing["val"]),
                        test.pct(routing["test"]),
                        test.gain(routing),
                    ],
                ],
                align="lrrl",
            ),
            "",
            "Keyword routing on the mixed test set: whole words, any case; a question without "
            "a keyword goes to the first task without keywords. Precision = share of the "
            "questions routed to a task that belong to it; recall = share of a task's "
            "questions routed to it.",
            "",
        ]
        rows = []
        for task, r in routing["by_task"].items():
            words = ", ".join(routing["keywords"].get(task, [])) or "(none: the fallback)"
            rows.append(
                [task, words, str(r["routed"]), _maybe_pct(r["precision"]), _maybe_pct(r["recall"])]
            )
        header = ["task", "keywords", "routed to it", "precision", "recall"]
        lines += markdown_table(header, rows, align="llrrr")
    return "\n".join(lines) + "\n"


def _vector_rows(m: Mapping) -> dict[str, Mapping]:
    best, coef, caa = m["best_single"], m["best_coefficient"], m["mean_difference"]
    return {
        f"best single layer (L{best['layer']})": best,
        "multi-layer": m["multi_layer"],
        f"best coefficient ({coef['config']} x{coef['coefficient']:g})": coef,
        f"mean difference (x{caa['coefficient']:g})": caa,
    }


def _question_tables(summary: Mapping, min_rows: int) -> list[str]:
    lines = [
        "",
        "Without the question: each test question asked after another test question's "
        "context of the same task (a seeded derangement), so only its options are its own. "
        "A gain that survives is a prior over the options (e.g. an ending prior), not "
        "steering toward the answer. `prior only` marks rows whose gain without the question "
        "is not clearly below the gain with it (the paired 95% interval of their difference "
        "reaches 0); on a row without a gain it says only that the question adds nothing. "
        "A task with one distinct context keeps it (nothing to swap): every row is marked.",
        "",
    ]
    header = [
        "task",
        "distinct contexts",
        "context changed",
        "unsteered",
        "unsteered without question",
    ]
    rows = [
        [
            task,
            f"{m['no_question']['distinct_contexts']} of {m['questions']['test']}",
            _pct(m["no_question"]["context_changed"]),
            _test(m, min_rows).pct(m["unsteered"]["test"]),
            _test(m, min_rows).pct(m["no_question"]["unsteered_test"]),
        ]
        for task, m in summary["tasks"].items()
    ]
    lines += [*markdown_table(header, rows, align="lrrrr"), ""]
    header = [
        "task",
        "vector",
        "gain with question [95% CI]",
        "gain without question [95% CI]",
        "with - without [95% CI]",
        "",
    ]
    rows = [
        [
            task,
            name,
            c.gain(r),
            c.gain(r, "no_question_gain"),
            c.gain(r, "question_effect"),
            "prior only" if r["prior_only"] else "",
        ]
        for task, m in summary["tasks"].items()
        for c in [_test(m, min_rows)]
        for name, r in _vector_rows(m).items()
    ]
    return lines + markdown_table(header, rows, align="llllll")


def summary_entries(summary: Mapping, min_rows: int, branch: str = "steering") -> list[dict]:
    """The `summary` block (one entry per task, the first three): the best vector's test
    gain over unsteered, its gain over the random same-norm vector as the control, and its
    gain without the question as the caveat; every number as the table shows it."""
    entries = []
    for task, m in list(summary["tasks"].items())[:3]:
        coef = m["best_coefficient"]
        caveat = "; prior only: not clearly below the gain with it" if coef["prior_only"] else ""
        entries.append(
            {
                "branch": branch,
                "metric": f"{task}: test accuracy gain of the best vector ({coef['config']} "
                f"x{coef['coefficient']:g}) over unsteered",
                "value": coef["gain"],
                "interval": [coef["gain_ci_low"], coef["gain_ci_high"]],
                "interval_kind": "paired BCa bootstrap 95%",
                "control": "gain over a random vector of the same norm at the same layers",
                "control_value": coef["over_random"],
                "control_interval": [coef["over_random_ci_low"], coef["over_random_ci_high"]],
                "downstream": "gain without the question (contexts deranged within the task)"
                + caveat,
                "downstream_value": coef["no_question_gain"],
                "teacher": summary["model"],
                "n": m["questions"]["test"],
                "rows": m["questions"]["test"],
                "min_rows": min_rows,
                "caveat": summary.get("teacher_caveat") or None,
            }
        )
    return entries


def _maybe_pct(value: float | None) -> str:
    return "-" if value is None else _pct(value)


def _whole_words(keyword: str) -> re.Pattern[str]:
    words = keyword.split()
    phrase = r"\s+".join(map(re.escape, words))
    return re.compile(rf"(?<!\w){phrase}(?!\w)", re.IGNORECASE)
