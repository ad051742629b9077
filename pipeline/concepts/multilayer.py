"""Stage `multilayer` (seed 000, idea 5): reads data/directions; writes the metrics JSON and the markdown table of one multi-head student against one student per layer at equal parameters.

Command: python -m pipeline.cli multilayer --params params.yaml --directions data/directions --metrics metrics/multilayer.json --table metrics/multilayer.md

The multi-head student shares one trunk across layers and has one head per layer:

    frozen teacher rows (E) -> mean -> Linear(E, h) -> GELU -> Linear(h, D) per layer -> (B, L, D)

It trains on the mean of the per-layer cosine losses (`training.fit` on a `LayerStack`),
best epoch on the mean of the per-layer val cos_sim. Its control, per layer: a
`frozen_mlp` student trained on that layer alone whose hidden width makes its parameter
count as close as possible to the WHOLE multi-head student's (`equal_param_width`), so any
gain of the multi-head student is not a gain in size. Both train with `distill.train`'s
epochs, batch size, lr, weight decay, buffer and seeds (each seed fixes the init and the
shuffle of both); `multilayer.hidden_dim` is h, `multilayer.layers` the heads (null: every
layer of directions.layers). Per layer the table gives test cos_sim of both (mean over
seeds, 95% t-interval) and their difference paired by seed; the JSON holds the same and
each seed's scores, plus `summary`: one entry per layer, the single-layer student as
control.
"""  # noqa: E501

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import Tensor, nn

from pipeline.common.devices import set_threads
from pipeline.common.intervals import t_interval
from pipeline.common.io import write_json, write_text
from pipeline.common.params import Sections, load_params
from pipeline.common.tables import MISSING, counted, markdown_table
from pipeline.concepts.layout import DirectionSet, LayerStack
from pipeline.concepts.params import DistillParams, MultilayerParams, RunParams
from pipeline.concepts.students import FrozenEmbeddingModel, build_model, count_trainable
from pipeline.concepts.training import evaluate_cos, fit

PARAMS = Path("params.yaml")
BRANCH = "concept directions"
INTERVAL_KIND = "t-interval 95% over seeds"
STUDENTS = ("multi_head", "single_layer")


class MultiHead(nn.Module):
    """A shared trunk Linear(E, h) -> GELU and one Linear(h, D) head per layer:
    pooled (B, E) -> (B, L, D)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_heads: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, out_dim) for _ in range(num_heads))

    def forward(self, pooled: Tensor) -> Tensor:
        shared = self.trunk(pooled)  # (B, h)
        return torch.stack([head(shared) for head in self.heads], 1)  # (B, L, D)


class HeadView(nn.Module):
    """One head of a multi-head student as a single-layer student: (B, T) -> (B, D)."""

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model, self.index = model, index
        self.reads = model.reads  # what `forward_concepts` feeds it: the whole model's input

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.model(tokens, mask)[:, self.index]


def multi_head_params(embedding_dim: int, hidden_dim: int, output_dim: int, heads: int) -> int:
    """Trainable parameters of the multi-head student: trunk plus `heads` heads."""
    return hidden_dim * (embedding_dim + 1) + heads * (hidden_dim * output_dim + output_dim)


def single_layer_params(embedding_dim: int, hidden_dim: int, output_dim: int) -> int:
    """Trainable parameters of a `frozen_mlp` student: Linear(E, h), Linear(h, D)."""
    return multi_head_params(embedding_dim, hidden_dim, output_dim, 1)


def equal_param_width(embedding_dim: int, hidden_dim: int, output_dim: int, heads: int) -> int:
    """The `frozen_mlp` hidden width whose parameter count is nearest the multi-head
    student's (the smaller width on a tie); one head gives `hidden_dim` itself."""
    target = multi_head_params(embedding_dim, hidden_dim, output_dim, heads)
    exact = (target - output_dim) / (embedding_dim + 1 + output_dim)
    widths = {max(1, math.floor(exact)), max(1, math.ceil(exact))}
    return min(
        widths,
        key=lambda w: (abs(single_layer_params(embedding_dim, w, output_dim) - target), w),
    )


def build_multi_head(data: DirectionSet, hidden_dim: int, heads: int) -> FrozenEmbeddingModel:
    """The multi-head student on the directions' frozen embedding table."""
    head = MultiHead(data.embedding_rows.shape[1], hidden_dim, data.dim, heads)
    return FrozenEmbeddingModel(data.embedding_token_ids, data.embedding_rows, head)


def run(params: Sections, directions: Path, metrics: Path, table: Path) -> dict[str, Any]:
    """Train both students once per seed of distill.train.seeds; write metrics and table."""
    set_threads(params.multilayer.num_threads)
    layers = params.multilayer.heads(params.directions)
    if len(layers) < 2:
        raise ValueError(
            f"multilayer needs at least two layers, got {list(layers)} (multilayer.layers="
            f"{params.multilayer.layers}, directions.layers={list(params.directions.layers)}): "
            "cache another layer in directions.layers"
        )
    train = params.distill.train
    stack = LayerStack(Path(directions), layers)
    per_layer = {layer: DirectionSet(Path(directions), layer) for layer in layers}
    embedding_dim = int(stack.embedding_rows.shape[1])
    hidden = params.multilayer.hidden_dim
    width = equal_param_width(embedding_dim, hidden, stack.dim, len(layers))
    single_run = RunParams("frozen_mlp", hidden_dim=width)
    seeds: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for seed in train.seeds:
        torch.manual_seed(seed)
        multi = build_multi_head(stack, hidden, len(layers))
        result = fit(multi, stack, train, seed)
        sizes["multi_head"] = count_trainable(multi)
        scores = {"multi_head": _scores(result, multi, per_layer, train.batch_size)}
        singles = {}
        for layer, data in per_layer.items():
            torch.manual_seed(seed)
            single = build_model(
                single_run, data.vocab_size, data.dim, data.embedding_token_ids, data.embedding_rows
            )
            single_result = fit(single, data, train, seed)
            sizes["single_layer"] = count_trainable(single)
            singles[str(layer)] = {
                "best_epoch": single_result.best_epoch,
                "val_cos": single_result.best_val_cos,
                "test_cos": evaluate_cos(single, data, "test", train.batch_size),
            }
        scores["single_layer"] = singles
        seeds[str(seed)] = scores
    extra = stack.manifest.extra
    results = {
        "layers": list(layers),
        "hidden_dim": hidden,
        "single_hidden_dim": width,
        "multi_head_params": sizes["multi_head"],
        "single_layer_params": sizes["single_layer"],
        "num_seeds": len(train.seeds),
        "per_layer": {str(layer): layer_scores(seeds, layer) for layer in layers},
        "seeds": seeds,
        "counts": {split: int(stack.load_split(split)[0].numel()) for split in ("train", "test")},
    }
    teacher = {"model": extra["model"], "pooling": extra["pooling"]}
    caveat = extra["teacher_caveat"] or None
    results["summary"] = summary(results, teacher["model"], caveat)
    write_json(metrics, results)
    write_text(table, multilayer_table(results, teacher, params.wordlist.split_by, caveat))
    return results


def _scores(result, multi: nn.Module, per_layer: dict[int, DirectionSet], batch: int) -> dict:
    """A multi-head fit's best epoch and, per head, its val and test cos_sim."""
    scores: dict[str, Any] = {"best_epoch": result.best_epoch, "mean_val_cos": result.best_val_cos}
    for index, (layer, data) in enumerate(per_layer.items()):
        view = HeadView(multi, index)
        scores[str(layer)] = {
            "val_cos": evaluate_cos(view, data, "val", batch),
            "test_cos": evaluate_cos(view, data, "test", batch),
        }
    return scores


def _interval_fields(values: list[float], prefix: str) -> dict[str, float | None]:
    span = t_interval(values)
    return {
        prefix: sum(values) / len(values),
        f"{prefix}_ci95_low": None if span is None else span[0],
        f"{prefix}_ci95_high": None if span is None else span[1],
    }


def layer_scores(seeds: dict[str, Any], layer: int) -> dict[str, Any]:
    """Mean over seeds and 95% t-interval of both students' test cos at `layer`, and of
    their difference paired by seed (multi-head minus single-layer)."""
    key = str(layer)
    test = {name: [scores[name][key]["test_cos"] for scores in seeds.values()] for name in STUDENTS}
    val = {name: [scores[name][key]["val_cos"] for scores in seeds.values()] for name in STUDENTS}
    out: dict[str, Any] = {
        name: _interval_fields(test[name], "test_cos")
        | {"val_cos": sum(val[name]) / len(val[name])}
        for name in STUDENTS
    }
    difference = [m - s for m, s in zip(test["multi_head"], test["single_layer"], strict=True)]
    out["difference"] = _interval_fields(difference, "test_cos")
    return out


def _span(scores: dict[str, Any]) -> list[float] | None:
    low, high = scores["test_cos_ci95_low"], scores["test_cos_ci95_high"]
    return None if low is None else [low, high]


def summary(results: dict[str, Any], teacher: str, caveat: str | None) -> list[dict[str, Any]]:
    """One entry per layer: the multi-head student's test cos_sim next to the single-layer
    student of equal parameters; downstream: their difference paired by seed."""
    heads = len(results["layers"])
    entries = []
    for layer, scores in results["per_layer"].items():
        multi, single = scores["multi_head"], scores["single_layer"]
        entries.append(
            {
                "branch": BRANCH,
                "metric": f"test cos_sim at hidden_states[{layer}] of one multi-head student "
                f"({heads} layers, shared trunk h={results['hidden_dim']}), mean over seeds",
                "value": multi["test_cos"],
                "interval": _span(multi),
                "interval_kind": INTERVAL_KIND,
                "control": f"single-layer Frozen+MLP h={results['single_hidden_dim']} trained "
                f"on hidden_states[{layer}] alone, equal parameters "
                f"({results['single_layer_params']:,} vs {results['multi_head_params']:,})",
                "control_value": single["test_cos"],
                "control_interval": _span(single),
                "downstream": "multi-head minus single-layer test cos_sim, paired by seed",
                "downstream_value": scores["difference"]["test_cos"],
                "teacher": teacher,
                "n": results["num_seeds"],
                "caveat": caveat,
            }
        )
    return entries


def _cell(scores: dict[str, Any], sign: str = "") -> str:
    value, span = scores["test_cos"], _span(scores)
    text = f"{value:{sign}.4f}"
    return text + (f" [{span[0]:{sign}.4f}, {span[1]:{sign}.4f}]" if span else f" {MISSING}")


def multilayer_table(
    results: dict[str, Any], teacher: dict[str, str], split_by: str, caveat: str | None
) -> str:
    """Title, what was trained, then one row per layer: both students' test cos_sim and
    their difference, each with its 95% t-interval over seeds."""
    layers = ", ".join(str(layer) for layer in results["layers"])
    heads, hidden = len(results["layers"]), results["hidden_dim"]
    width = results["single_hidden_dim"]
    multi_params, single_params = results["multi_head_params"], results["single_layer_params"]
    title = (
        f"# Multi-layer targets: {teacher['model']}, hidden_states[{layers}], "
        f"{teacher['pooling']} pooling; concepts split by {split_by}"
    )
    lines = [title + (f" ({caveat})" if caveat else ""), ""]
    lines.append(
        f"One student, frozen teacher rows -> mean -> Linear(E, {hidden}) -> GELU shared, one "
        f"Linear({hidden}, D) head per layer ({multi_params:,} trainable parameters for all "
        f"{heads} layers), trained on the mean of the per-layer cosine losses, best epoch on "
        f"the mean val cos_sim; against, per layer, one Frozen+MLP h={width} trained on that "
        f"layer alone ({single_params:,} parameters each: equal to the whole multi-head "
        f"student, as near as a width allows). Same distill.train epochs, lr and seeds; test "
        f"cos_sim mean over {results['num_seeds']} seeds with its 95% t-interval; the "
        f"difference is paired by seed (an interval that holds 0: no difference shown)."
    )
    lines.append("")
    header = [
        "Layer",
        counted("Multi-head test cos_sim [95%]", results["counts"]["test"]),
        counted("Single-layer test cos_sim [95%]", results["counts"]["test"]),
        "Multi - single [95%]",
        "Multi-head params (all layers)",
        "Single-layer params (this layer)",
    ]
    body = [
        [
            f"hidden_states[{layer}]",
            _cell(scores["multi_head"]),
            _cell(scores["single_layer"]),
            _cell(scores["difference"], "+"),
            f"{multi_params:,}",
            f"{single_params:,} (h={width})",
        ]
        for layer, scores in results["per_layer"].items()
    ]
    lines += markdown_table(header, body, align="lrrrrr")
    return "\n".join(lines) + "\n"


def command(
    directions: Annotated[Path, typer.Option(help="Folder written by the directions stage.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write (with `summary`).")],
    table: Annotated[Path, typer.Option(help="Markdown table to write.")],
    params: Annotated[
        Path, typer.Option(help="Params file; `multilayer` and `distill.train`.")
    ] = PARAMS,
) -> None:
    """Train one multi-head student and one single-layer student per layer (equal params)."""
    loaded = load_params(params, multilayer=MultilayerParams, distill=DistillParams)
    results = run(loaded, directions, metrics, table)
    cells = ", ".join(
        f"L{layer} {s['multi_head']['test_cos']:.4f} vs {s['single_layer']['test_cos']:.4f}"
        for layer, s in results["per_layer"].items()
    )
    typer.echo(f"multilayer: test cos multi-head vs single-layer: {cells} -> {table}")
