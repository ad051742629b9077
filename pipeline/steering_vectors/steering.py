"""Stage `steering`: learned steering vectors (seed 004) on a frozen causal LM, per task.

Command: python -m pipeline.cli steering --params params.yaml --mcdata data/mcdata --out data/steering --live metrics/live/steering --metrics metrics/steering.json --table metrics/steering.md --plot metrics/plots/steering_accuracy.png

Reads the `steering` section of params.yaml and `<mcdata>/questions.jsonl`; logs one
line naming the prompt format (raw text: no chat template is applied). For
each task: the unsteered accuracy; one vector trained at each layer of
`single_layers` (README7's baseline; best layer on val); one vector shared by all
`layers` with per-layer scales (seed 004 section 2.1); a coefficient sweep of the
better of the two on val (section 2.2). With two or more tasks: their final
vectors combined by a weighted average (alpha chosen on val) and by keyword
routing (section 2.3), on the mixed test set. Writes `<out>/model.safetensors` +
`<out>/config.json` (every trained vector and what was chosen), the metrics JSON
(accuracies, gains with bootstrap 95% intervals over the unsteered model and over a
random vector of the same norm, the mean-difference control, the gain without the
question, keyword routing's precision and recall, and the `summary` block) and the
markdown table. dvclive (`pipeline.common.live`) logs each vector's training:
`<task>/<vector>/train_loss` per epoch (step = epoch) and `<task>/<vector>/val_acc` at
the last epoch. The PNG, one row per task: val accuracy against the coefficient (the
chosen vector and the mean-difference control) and accuracy per layer of the
single-layer vectors, each next to the unsteered model as a dashed line.
"""  # noqa: E501

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from dvclive import Live
from torch import Tensor, nn

from pipeline.common.devices import set_threads
from pipeline.common.identity import ModelIdentity, resolve_model_params
from pipeline.common.io import write_json, write_text
from pipeline.common.live import log_row, open_live
from pipeline.common.params import load_params, to_dict
from pipeline.common.pictures import Panel, line_panels
from pipeline.common.progress import progress
from pipeline.common.run_info import INFO, split_info
from pipeline.common.splits import SPLITS
from pipeline.common.teacher import decoder_blocks, load_causal_lm, teacher_caveat
from pipeline.steering_vectors.evaluation import (
    Answers,
    accuracy,
    accuracy_table,
    alpha_weights,
    best_of,
    bootstrap_gain,
    derangement,
    question_control,
    random_like,
    route,
    routed_correct,
    routing_scores,
    summary_entries,
    sweep_coefficients,
    weighted_average,
    with_controls,
)
from pipeline.steering_vectors.params import SteeringParams
from pipeline.steering_vectors.questions import McQuestion, read_questions
from pipeline.steering_vectors.vector import (
    Deltas,
    Encoded,
    SteeringVector,
    encode,
    mean_difference,
    prompt_format,
    save_vectors,
    train_vector,
)

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
EVAL_SPLITS = ("val", "test")

TaskData = dict[str, Encoded]  # split -> encoded questions


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    vectors: dict[str, SteeringVector]
    final: Deltas
    """The chosen vector at its chosen coefficient, per layer."""
    unsteered: dict[str, Tensor]
    """Per-question correctness of the unsteered model (N,), val and test."""
    panels: list[Panel]
    """The task's row of the PNG."""


def run(
    params: SteeringParams,
    mcdata: Path,
    out: Path,
    live: Path,
    metrics: Path,
    table: Path,
    plot: Path,
) -> dict[str, Any]:
    """Train, sweep and combine; write the vectors, dvclive curves, metrics JSON, table and
    PNG; return the metrics."""
    questions = read_questions(Path(mcdata))
    tasks = check_tasks(questions, params, mcdata)
    set_threads(params.num_threads)
    params, identity = resolve_model_params(params, "steering", "dtype")
    model, tokenizer = load_causal_lm(
        params.model, identity.revision, params.dtype, params.device, "steering.model"
    )
    layers, singles = params.depth_layers(len(decoder_blocks(model)))
    groups = {
        (t, s): [q for q in questions if (q.task, q.split) == (t, s)] for t in tasks for s in SPLITS
    }
    data = {t: {s: encode(groups[t, s], tokenizer) for s in SPLITS} for t in tasks}
    log.info("steering %s: %s", params.model, prompt_format(tokenizer))
    answers = Answers(model, params.position, params.eval_batch_size)
    with open_live(Path(live)) as board:
        results = {
            task: steer_task(model, answers, data[task], params, layers, singles, task, board)
            for task in tasks
        }
    summary: dict[str, Any] = {
        "model": params.model,
        "teacher_caveat": teacher_caveat(model.config),
        "layers": list(layers),
        "single_layers": list(singles),
        "tasks": {task: result.metrics for task, result in results.items()},
    }
    contexts = {t: {s: [q.context for q in groups[t, s]] for s in SPLITS} for t in tasks}
    summary["combined"] = (
        combine(model, answers, data, contexts, results, params) if len(tasks) > 1 else None
    )
    log.info(
        "steering: %d evaluations of a question set, %d more reused",
        answers.computed,
        answers.reused,
    )
    summary["summary"] = summary_entries(summary, params.min_rows)
    vectors = {f"{task}.{name}": v for task, r in results.items() for name, v in r.vectors.items()}
    save_vectors(Path(out), vectors, checkpoint_config(params, model, identity, summary))
    measured, info = split_info(summary, ("model", "teacher_caveat", "layers", "single_layers"))
    write_json(Path(metrics), measured, sort_keys=False)
    write_json(Path(out) / INFO, info, sort_keys=False)
    write_text(Path(table), accuracy_table(summary, params.min_rows))
    panels = [panel for result in results.values() for panel in result.panels]
    line_panels(Path(plot), f"steering: {params.model}", panels)
    return summary


def check_tasks(questions: Sequence[McQuestion], params: SteeringParams, mcdata: Path) -> list[str]:
    """The tasks in file order; every one needs all three splits; keyword tasks must exist."""
    tasks = list(dict.fromkeys(q.task for q in questions))
    present = {(q.task, q.split) for q in questions}
    missing = [f"{t}/{s}" for t in tasks for s in SPLITS if (t, s) not in present]
    if missing:
        raise ValueError(f"{mcdata}: no questions for {missing} (task/split)")
    unknown = sorted(set(params.keywords) - set(tasks))
    if unknown:
        raise ValueError(f"steering.keywords names {unknown}; {mcdata} holds the tasks {tasks}")
    return tasks


def steer_task(
    model: nn.Module,
    ev: Answers,
    data: TaskData,
    params: SteeringParams,
    layers: tuple[int, ...],
    singles: tuple[int, ...],
    task: str,
    board: Live,
) -> TaskResult:
    """Unsteered, single-layer at each candidate, multi-layer, then the coefficient sweep;
    `board` (dvclive) gets each vector's training curve; `ev` answers the questions."""
    unsteered = {s: ev(data[s], {}) for s in EVAL_SPLITS}
    dim = model.get_input_embeddings().weight.shape[1]
    vectors = {f"single_L{layer}": SteeringVector((layer,), dim) for layer in singles}
    vectors["multi"] = SteeringVector(layers, dim)
    right: dict[str, dict[str, Tensor]] = {}
    for name, vector in vectors.items():
        logged = partial(log_row, board, step="epoch", prefix=f"{task}/{name}/")
        fit = train_vector(
            model, vector, data["train"], data["val"], params, f"{task} {name}", logged
        )
        ev.remember(data["val"], vector.deltas(), fit.val_correct)  # the sweep's coefficient 1
        right[name] = {"val": fit.val_correct, "test": ev(data["test"], vector.deltas())}
    val_acc = {name: accuracy(r["val"]) for name, r in right.items()}
    best_single = max((n for n in vectors if n != "multi"), key=lambda n: val_acc[n])
    # Ties go to the single layer: the simpler model.
    chosen = "multi" if val_acc["multi"] > val_acc[best_single] else best_single
    sweep = sweep_coefficients(
        ev,
        vectors[chosen].deltas,
        data["val"],
        params.coefficients,
        f"{task} {chosen} coefficients",
    )
    coefficient = best_of(sweep)
    final = {k: d.detach() for k, d in vectors[chosen].deltas(coefficient).items()}
    final_right = {s: ev(data[s], final) for s in EVAL_SPLITS}
    # Training-free control: the mean-difference vector at the multi-layer set, its
    # coefficient chosen on val like the trained vector's.
    caa = mean_difference(model, data["train"], layers, params.eval_batch_size)

    def times(c: float) -> Deltas:
        return {layer: c * d for layer, d in caa.items()}

    caa_sweep = sweep_coefficients(
        ev, times, data["val"], params.coefficients, f"{task} mean-difference coefficients"
    )
    caa_coefficient = best_of(caa_sweep)
    caa_right = {s: ev(data[s], times(caa_coefficient)) for s in EVAL_SPLITS}
    # The question control: every test question after another test question's context.
    test = data["test"]
    source = derangement(len(test), params.seed)
    swapped = test.with_contexts_of(source)
    unsteered_swapped = ev(swapped, {})

    def scored(deltas: Deltas, right: dict[str, Tensor]) -> dict[str, float]:
        """Accuracies and gains over unsteered, over a random vector of the same norms, and
        without the question."""
        control = ev(test, random_like(deltas, params.seed))
        samples, seed = params.bootstrap_samples, params.seed
        return with_controls(right, unsteered["test"], control, samples, seed) | question_control(
            right["test"], unsteered["test"], ev(swapped, deltas), unsteered_swapped, samples, seed
        )

    def trained(name: str) -> Deltas:
        return {k: d.detach() for k, d in vectors[name].deltas().items()}

    steered = {
        "best_single": (trained(best_single), right[best_single]),
        "multi_layer": (trained("multi"), right["multi"]),
        "best_coefficient": (final, final_right),
        "mean_difference": (times(caa_coefficient), caa_right),
    }
    controls = {
        name: scored(*steered[name])
        for name in progress(steered, desc=f"{task} controls", unit="vector")
    }

    metrics = {
        "questions": {s: len(data[s]) for s in SPLITS},
        "unsteered": {s: accuracy(unsteered[s]) for s in EVAL_SPLITS},
        "no_question": {
            "unsteered_test": accuracy(unsteered_swapped),
            "distinct_contexts": len({tuple(c) for c in test.contexts}),
            "context_changed": sum(
                test.contexts[i] != test.contexts[j] for i, j in enumerate(source)
            )
            / len(test),
        },
        "single_layer": {
            name.removeprefix("single_"): {s: accuracy(r[s]) for s in EVAL_SPLITS}
            for name, r in right.items()
            if name != "multi"
        },
        "best_single": {"layer": vectors[best_single].layers[0]} | controls["best_single"],
        "multi_layer": {
            "layers": list(layers),
            "scales": vectors["multi"].scales.detach().cpu().tolist(),
        }
        | controls["multi_layer"],
        "coefficient_sweep": {
            "config": chosen,
            "val": {f"coef_{c:g}": acc for c, acc in sweep.items()},
        },
        "best_coefficient": {"config": chosen, "coefficient": coefficient}
        | controls["best_coefficient"],
        "mean_difference": {
            "layers": list(layers),
            "coefficient": caa_coefficient,
            "val_by_coefficient": {f"coef_{c:g}": acc for c, acc in caa_sweep.items()},
        }
        | controls["mean_difference"],
    }
    panels = task_panels(task, metrics, sweep, caa_sweep, singles, chosen)
    return TaskResult(metrics, vectors, final, unsteered, panels)


def task_panels(
    task: str,
    metrics: dict[str, Any],
    sweep: dict[float, float],
    caa_sweep: dict[float, float],
    singles: tuple[int, ...],
    chosen: str,
) -> list[Panel]:
    """Val accuracy against the coefficient, and accuracy per single layer, each with the
    unsteered model's as a dashed line."""
    unsteered = metrics["unsteered"]
    by_layer = [metrics["single_layer"][f"L{layer}"] for layer in singles]
    return [
        Panel(
            f"{task}: val accuracy vs coefficient",
            "coefficient",
            "val accuracy",
            {
                f"trained ({chosen})": (list(sweep), list(sweep.values())),
                "mean difference": (list(caa_sweep), list(caa_sweep.values())),
            },
            {"unsteered (val)": unsteered["val"]},
        ),
        Panel(
            f"{task}: single-layer vectors (coefficient 1)",
            "layer",
            "accuracy",
            {split: (list(singles), [acc[split] for acc in by_layer]) for split in EVAL_SPLITS},
            {f"unsteered ({split})": unsteered[split] for split in EVAL_SPLITS},
            integer_x=True,
        ),
    ]


def combine(
    model: nn.Module,
    ev: Answers,
    data: dict[str, TaskData],
    contexts: dict[str, dict[str, list[str]]],
    results: dict[str, TaskResult],
    params: SteeringParams,
) -> dict[str, Any]:
    """Weighted average (alpha swept on the mixed val set) and keyword routing, mixed test."""
    tasks = list(data)
    finals = [results[t].final for t in tasks]

    def mixed(deltas: Deltas, split: str) -> Tensor:  # (N_mixed,) over all tasks in order
        return torch.cat([ev(data[t][split], deltas) for t in tasks])

    unsteered = {s: torch.cat([results[t].unsteered[s] for t in tasks]) for s in EVAL_SPLITS}
    averages = {a: weighted_average(finals, alpha_weights(a, len(tasks))) for a in params.alphas}
    alpha_val = {
        a: accuracy(mixed(averages[a], "val"))
        for a in progress(averages, desc="combined alphas", unit="alpha")
    }
    alpha = best_of(alpha_val, prefer=0.5)
    average_test = mixed(averages[alpha], "test")
    fallback = weighted_average(finals, [1.0 / len(tasks)] * len(tasks))
    vectors = {t: results[t].final for t in tasks}
    routes = {
        t: {s: [route(c, params.keywords, tasks) for c in contexts[t][s]] for s in EVAL_SPLITS}
        for t in tasks
    }
    steered = partial(
        routed_correct,
        model,
        vectors=vectors,
        fallback=fallback,
        position=params.position,
        batch_size=params.eval_batch_size,
    )
    routed = {s: torch.cat([steered(data[t][s], routes[t][s]) for t in tasks]) for s in EVAL_SPLITS}
    hits = [r == t for t in tasks for r in routes[t]["test"]]
    gain = partial(
        bootstrap_gain, unsteered["test"], samples=params.bootstrap_samples, seed=params.seed
    )
    return {
        "tasks": tasks,
        "questions": {s: len(unsteered[s]) for s in EVAL_SPLITS},
        "unsteered": {s: accuracy(unsteered[s]) for s in EVAL_SPLITS},
        "average": {
            "alpha": alpha,
            "weights": alpha_weights(alpha, len(tasks)),
            "val_by_alpha": {f"alpha_{a:g}": acc for a, acc in alpha_val.items()},
            "val": alpha_val[alpha],
            "test": accuracy(average_test),
        }
        | gain(average_test),
        "routing": {
            "routed_right": sum(hits) / len(hits),
            "keywords": {t: list(k) for t, k in params.keywords.items()},
            "by_task": routing_scores({t: routes[t]["test"] for t in tasks}, tasks),
            "val": accuracy(routed["val"]),
            "test": accuracy(routed["test"]),
        }
        | gain(routed["test"]),
    }


def checkpoint_config(
    params: SteeringParams, model: nn.Module, identity: ModelIdentity, summary: dict[str, Any]
) -> dict[str, Any]:
    """What a reader needs to re-apply the vectors: model, layers, chosen config and coefficient."""
    final = {
        task: {
            "vector": f"{task}.{m['best_coefficient']['config']}",
            "coefficient": m["best_coefficient"]["coefficient"],
        }
        for task, m in summary["tasks"].items()
    }
    combined = summary["combined"]
    return {
        "model": params.model,
        **identity.manifest(),
        "dtype": params.dtype,
        "hidden_size": int(model.get_input_embeddings().weight.shape[1]),
        "num_layers": len(decoder_blocks(model)),
        "position": params.position,
        "final": final,
        "combination": None
        if combined is None
        else {
            "tasks": combined["tasks"],
            "weights": combined["average"]["weights"],
            "keywords": {t: list(k) for t, k in params.keywords.items()},
        },
        "steering": to_dict(params),
    }


def command(
    mcdata: Annotated[Path, typer.Option(help="Folder written by the mcdata stage.")],
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors and config.json.")],
    live: Annotated[Path, typer.Option(help="dvclive folder: each vector's training curve.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    table: Annotated[Path, typer.Option(help="Markdown accuracy table to write.")],
    plot: Annotated[Path, typer.Option(help="PNG: accuracy vs coefficient and per layer.")],
    params: Annotated[Path, typer.Option(help="Params file; its `steering` section.")] = PARAMS,
) -> None:
    """Train steering vectors (single layer, multi-layer), sweep coefficients, combine tasks."""
    summary = run(
        load_params(params, steering=SteeringParams).steering,
        mcdata,
        out,
        live,
        metrics,
        table,
        plot,
    )
    gains = ", ".join(
        f"{task} {100 * m['best_coefficient']['gain']:+.1f} pts"
        for task, m in summary["tasks"].items()
    )
    typer.echo(f"steering: test gain of the best vector over unsteered: {gains} -> {metrics}")


if __name__ == "__main__":
    typer.run(command)
