"""Stage `inverse` (seed 000's negative result): reads data/directions; writes the metrics JSON and the markdown table of the least-squares map direction -> input embedding.

Command: python -m pipeline.cli inverse --params params.yaml --directions data/directions --metrics metrics/inverse.json --table metrics/inverse.md

Seed 000 inverted its linear map embedding -> direction and found "Inverse reconstruction
(direction -> embedding): 0.3588 cos_sim" (forward: 0.9998). Here, at `inverse.layer` (null:
`distill.train.layer`), a
concept's input embedding is the mean of its tokens' teacher input-embedding rows (what
the frozen students pool, `scores.concept_embeddings`). On the train split, least squares
with an intercept (`torch.linalg.lstsq`; `inverse.ridge` adds an L2 penalty, never on the
intercept) fits direction -> embedding (the inverse) and embedding -> direction (the
forward map). On the test split the table reports, each with a bootstrap 95% interval over
test concepts (`inverse.bootstrap_samples`, `inverse.seed`):

- reconstruction cos_sim of the inverse, and centred on the train-mean embedding;
- the control that predicts the train-mean embedding for every concept (its cos_sim;
  centred, it is 0 by construction), and the inverse's gain over it (paired);
- nearest-token accuracy: the reconstruction's nearest row of the stored embedding table
  (the rows of the tokens some concept uses) by cosine is one of the concept's own tokens;
  for all test concepts and for the single-token ones; next to the same accuracy of the
  true concept embedding (its ceiling), of the train-mean embedding and of always
  answering the most common train token (chance), and uniform chance (own tokens / rows);
- the forward map's test cos_sim (the seed's 0.9998 side).

The JSON holds the same numbers and `summary` (value: reconstruction cos_sim; control:
the train-mean embedding; downstream: nearest-token accuracy).
"""  # noqa: E501

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch import Tensor

from pipeline.common.bootstrap import paired_interval
from pipeline.common.devices import set_threads
from pipeline.common.io import write_json, write_text
from pipeline.common.params import Sections, load_params
from pipeline.common.tables import MISSING, counted, markdown_table, spec, with_interval
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import DistillParams, InverseParams
from pipeline.concepts.scores import CHUNK, concept_embeddings, fit_affine, row_cosine

PARAMS = Path("params.yaml")
BRANCH = "concept directions"
SEED_RECONSTRUCTION = 0.3588
SEED_FORWARD = 0.9998
INTERVAL_KIND = "bootstrap 95% (BCa) over test concepts"


def nearest_rows(queries: Tensor, rows: Tensor) -> Tensor:
    """Index of each query's nearest row by cosine: (Q, E), (V, E) -> (Q,) int64."""
    unit_rows = rows.double() / rows.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = [torch.zeros(0, dtype=torch.long)]
    for start in range(0, queries.shape[0], CHUNK):
        chunk = queries[start : start + CHUNK].double()
        out.append((chunk @ unit_rows.T).argmax(1))  # the query's norm does not change argmax
    return torch.cat(out)


def own_token_hits(data: DirectionSet, concept_ids: Tensor, token_ids: Tensor) -> Tensor:
    """(N,) bool: token_ids[i] is one of concept concept_ids[i]'s own tokens."""
    tokens, mask = data.concept_tokens(concept_ids)  # (N, T)
    return ((tokens == token_ids[:, None]) & mask).any(1)


def nearest_token_hits(data: DirectionSet, concept_ids: Tensor, predicted: Tensor) -> Tensor:
    """(N,) bool: the nearest stored embedding row to predicted[i] (N, E) is a token of
    concept concept_ids[i]."""
    nearest = data.embedding_token_ids[nearest_rows(predicted, data.embedding_rows)]
    return own_token_hits(data, concept_ids, nearest)


def token_pairs(data: DirectionSet, concept_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct (row, token) pairs of these concepts: row indexes `concept_ids`."""
    tokens, mask = data.concept_tokens(concept_ids)  # (N, T)
    rows = torch.arange(concept_ids.numel())[:, None].expand_as(tokens)[mask]
    pairs = torch.unique(rows * data.vocab_size + tokens[mask])
    return pairs // data.vocab_size, pairs % data.vocab_size


def most_common_token(data: DirectionSet, concept_ids: Tensor) -> int:
    """The token that the most of these concepts use (the lowest id on a tie)."""
    _, tokens = token_pairs(data, concept_ids)
    return int(torch.bincount(tokens, minlength=data.vocab_size).argmax())


def distinct_tokens(data: DirectionSet, concept_ids: Tensor) -> Tensor:
    """(N,) int64: how many different tokens each concept has."""
    rows, _ = token_pairs(data, concept_ids)
    return torch.bincount(rows, minlength=concept_ids.numel())


def _estimate(values: Tensor, inverse: InverseParams) -> dict[str, Any]:
    """Mean of per-concept values with its bootstrap 95% interval."""
    array = values.double().numpy()
    low, high = paired_interval((array,), np.mean, inverse.bootstrap_samples, inverse.seed)
    return {"value": float(array.mean()), "ci95_low": low, "ci95_high": high, "n": array.size}


def run(params: Sections, directions: Path, metrics: Path, table: Path) -> dict[str, Any]:
    """Fit both maps on train, score them on test; write metrics and table."""
    inverse = params.inverse
    set_threads(inverse.num_threads)
    layer = inverse.inverted_layer(params.distill)
    data = DirectionSet(Path(directions), layer)
    splits = {split: data.load_split(split) for split in ("train", "test")}
    for split, (ids, _) in splits.items():
        if ids.numel() == 0:
            raise ValueError(f"{directions}: the {split} split is empty; the inverse needs both")
    tables = (data.offsets, data.flat_tokens, data.embedding_token_ids, data.embedding_rows)
    emb = {split: concept_embeddings(*tables, ids) for split, (ids, _) in splits.items()}
    (train_ids, train_dirs), (test_ids, test_dirs) = splits["train"], splits["test"]
    backward = fit_affine(train_dirs, emb["train"], inverse.ridge)
    forward = fit_affine(emb["train"], train_dirs, inverse.ridge)
    recon, truth = backward(test_dirs), emb["test"]  # (N, E)
    mean = emb["train"].mean(0).expand_as(truth)
    recon_cos, mean_cos = row_cosine(recon, truth), row_cosine(mean, truth)
    centred = row_cosine(recon - mean, truth - mean)
    common = most_common_token(data, train_ids)
    hits = {
        "reconstruction": nearest_token_hits(data, test_ids, recon),
        "true_embedding": nearest_token_hits(data, test_ids, truth),
        "train_mean": nearest_token_hits(data, test_ids, mean),
        "most_common_token": own_token_hits(data, test_ids, torch.full_like(test_ids, common)),
    }
    single = (data.offsets[test_ids + 1] - data.offsets[test_ids]) == 1
    distinct = distinct_tokens(data, test_ids)
    est = partial(_estimate, inverse=inverse)
    results: dict[str, Any] = {
        "layer": layer,
        "ridge": inverse.ridge,
        "reconstruction_cos": est(recon_cos),
        "reconstruction_centred_cos": est(centred),
        "train_mean_cos": est(mean_cos),
        "gain_over_train_mean": est(recon_cos - mean_cos),
        "forward_cos": est(row_cosine(forward(emb["test"]), test_dirs)),
        "train_reconstruction_cos": float(row_cosine(backward(train_dirs), emb["train"]).mean()),
        "nearest_token": {name: est(h) for name, h in hits.items()},
        "nearest_token_single": {name: est(h[single]) for name, h in hits.items()}
        if bool(single.any())
        else None,
        "most_common_token": common,
        "chance_uniform": float((distinct.double() / data.embedding_rows.shape[0]).mean()),
        "counts": {
            "train": int(train_ids.numel()),
            "test": int(test_ids.numel()),
            "test_single_token": int(single.sum()),
            "embedding_rows": int(data.embedding_rows.shape[0]),
            "vocab_size": data.vocab_size,
            "embedding_dim": int(data.embedding_rows.shape[1]),
            "direction_dim": data.dim,
        },
        "seed_000": {"reconstruction_cos": SEED_RECONSTRUCTION, "forward_cos": SEED_FORWARD},
    }
    extra = data.manifest.extra
    caveat = extra["teacher_caveat"] or None
    results["summary"] = summary(results, extra["model"], caveat)
    write_json(metrics, results)
    write_text(table, inverse_table(results, extra, params.wordlist.split_by, caveat))
    return results


def verdict(reconstruction: dict[str, Any]) -> str:
    """Where the seed's 0.3588 lies against our interval, and what that does and does not say."""
    low, high = reconstruction["ci95_low"], reconstruction["ci95_high"]
    if low > SEED_RECONSTRUCTION:
        where = "does not reproduce it: the reconstruction is better than the seed's"
    elif high < SEED_RECONSTRUCTION:
        where = "is worse still than the seed's"
    else:
        where = "reproduces it: the seed's value lies inside the interval"
    return (
        f"Seed 000's {SEED_RECONSTRUCTION}: this measurement {where} "
        f"({reconstruction['value']:.4f} [{low:.4f}, {high:.4f}]). The seed inverted token "
        "embeddings of synthetic sequences at Qwen3-0.6B layer 14; here each concept's mean "
        "input embedding is inverted from its direction at this teacher and layer, so the two "
        "numbers answer related but different questions."
    )


def summary(results: dict[str, Any], teacher: str, caveat: str | None) -> list[dict[str, Any]]:
    recon, control = results["reconstruction_cos"], results["train_mean_cos"]
    rows = results["counts"]["embedding_rows"]
    return [
        {
            "branch": BRANCH,
            "metric": f"inverse least-squares map hidden_states[{results['layer']}] direction "
            f"-> input embedding, test reconstruction cos_sim (seed 000: {SEED_RECONSTRUCTION})",
            "value": recon["value"],
            "interval": [recon["ci95_low"], recon["ci95_high"]],
            "interval_kind": INTERVAL_KIND,
            "control": "the train-mean input embedding for every concept",
            "control_value": control["value"],
            "control_interval": [control["ci95_low"], control["ci95_high"]],
            "downstream": f"nearest-token accuracy of the reconstruction (among {rows:,} "
            "stored embedding rows)",
            "downstream_value": results["nearest_token"]["reconstruction"]["value"],
            "teacher": teacher,
            "n": recon["n"],
            "caveat": caveat,
        }
    ]


def _cell(estimate: dict[str, Any] | None, percent: bool = False) -> str:
    if estimate is None:
        return MISSING
    interval = (estimate["ci95_low"], estimate["ci95_high"])
    return with_interval(estimate["value"], interval, spec(".1%" if percent else ".4f"))


def inverse_table(
    results: dict[str, Any], extra: dict[str, Any], split_by: str, caveat: str | None
) -> str:
    """Title, the cos_sim table, the nearest-token table, the verdict on the seed's 0.36."""
    counts, layer = results["counts"], results["layer"]
    title = (
        f"# Inverse transform: {extra['model']}, hidden_states[{layer}] direction -> input "
        f"embedding; concepts split by {split_by}"
    )
    lines = [title + (f" ({caveat})" if caveat else ""), ""]
    lines.append(
        f"Least squares with an intercept on {counts['train']:,} train concepts (ridge "
        f"{results['ridge']:g}); a concept's input embedding is the mean of its tokens' "
        f"teacher input-embedding rows ({counts['embedding_dim']}-d), its direction "
        f"{counts['direction_dim']}-d. Test: {counts['test']:,} concepts, bootstrap 95% "
        "intervals over them. Centred: cos_sim after subtracting the train-mean embedding "
        "from both sides (the train-mean control is 0 there by construction)."
    )
    lines.append("")
    test = counts["test"]
    header = [
        "Map (test)",
        counted("cos_sim [95%]", test),
        counted("Centred cos_sim [95%]", test),
        "Seed 000",
    ]
    body = [
        [
            "Inverse: direction -> embedding",
            _cell(results["reconstruction_cos"]),
            _cell(results["reconstruction_centred_cos"]),
            f"{SEED_RECONSTRUCTION}",
        ],
        ["Control: train-mean embedding", _cell(results["train_mean_cos"]), "0 (exact)", "—"],
        ["Inverse minus control (paired)", _cell(results["gain_over_train_mean"]), "—", "—"],
        ["Forward: embedding -> direction", _cell(results["forward_cos"]), "—", f"{SEED_FORWARD}"],
    ]
    lines += markdown_table(header, body, align="lrrr")
    lines += [
        "",
        f"Inverse on train (fitted rows): {results['train_reconstruction_cos']:.4f}.",
        "",
        f"Nearest-token accuracy: the prediction's nearest row by cosine among the "
        f"{counts['embedding_rows']:,} stored embedding rows (every token some concept uses; "
        f"the vocabulary has {counts['vocab_size']:,}) is one of the concept's own tokens. "
        f"Single-token concepts: {counts['test_single_token']:,} of the test set.",
        "",
    ]
    single = results["nearest_token_single"] or {}
    labels = {
        "reconstruction": "Inverse reconstruction",
        "true_embedding": "Ceiling: the true concept embedding",
        "train_mean": "Control: train-mean embedding",
        "most_common_token": f"Chance: always token {results['most_common_token']} (most "
        "common in train)",
    }
    body = [
        [labels[name], _cell(est, percent=True), _cell(single.get(name), percent=True)]
        for name, est in results["nearest_token"].items()
    ]
    uniform = f"{results['chance_uniform']:.1%}"
    body.append(["Chance: a uniform row (own tokens / rows)", uniform, "—"])
    lines += markdown_table(
        [
            "Predicted embedding",
            counted("All test concepts [95%]", test),
            counted("Single-token concepts [95%]", counts["test_single_token"]),
        ],
        body,
        align="lrr",
    )
    lines += ["", verdict(results["reconstruction_cos"])]
    return "\n".join(lines) + "\n"


def command(
    directions: Annotated[Path, typer.Option(help="Folder written by the directions stage.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write (with `summary`).")],
    table: Annotated[Path, typer.Option(help="Markdown table to write.")],
    params: Annotated[Path, typer.Option(help="Params file; its `inverse` section.")] = PARAMS,
) -> None:
    """Least squares direction -> input embedding (and back); test cos_sim, nearest token."""
    loaded = load_params(params, inverse=InverseParams, distill=DistillParams)
    results = run(loaded, directions, metrics, table)
    recon, mean = results["reconstruction_cos"]["value"], results["train_mean_cos"]["value"]
    hits = results["nearest_token"]["reconstruction"]["value"]
    typer.echo(
        f"inverse: test reconstruction cos {recon:.4f} (train-mean control {mean:.4f}), "
        f"nearest-token accuracy {hits:.1%} -> {table}"
    )
