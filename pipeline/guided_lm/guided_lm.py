"""Stage `guided_lm`: a tiny causal LM trained on the corpus with its LM loss plus lambda x
a cosine loss pulling its hidden state at each concept word's last token (through a
learned linear map) toward the teacher's direction for that word; held-out LM loss per
corpus size and lambda, lambda = 0 the control at equal tokens (seed 000, idea 1).

Command: python -m pipeline.cli guided_lm --params params.yaml --corpus data/corpus --directions data/directions --metrics metrics/guided_lm.json --table metrics/guided_lm.md --plot metrics/plots/guided_lm_data_efficiency.png --curve metrics/plots/guided_lm_data_efficiency.tsv

Reads the `guided_lm` section and distill.train.layer (the directions layer that
supervises), the corpus chunks (and the tokenizer of the corpus manifest's model, from
data/teachers in the tiny profile), the directions of the train and test concepts, and
the concept texts of the word list. Blocks held out by `pipeline.common.splits.is_heldout`
(`guided_lm.eval_fraction`) are never trained on; each corpus size is a prefix (whole
blocks) of the train blocks, nested. Only train-split concepts supervise. Writes the
metrics JSON (`cells`: every (size, lambda, seed); `rows`: means over seeds with
t-intervals and the paired difference to lambda = 0; `counts`; `summary`), the table,
the data-efficiency PNG and its TSV for `dvc plots`. No model is saved: the grid is
cheap to re-run and the numbers are the result.
"""  # noqa: E501

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from pipeline.common.devices import set_threads
from pipeline.common.io import write_json, write_text
from pipeline.common.params import Sections, load_params
from pipeline.common.progress import progress
from pipeline.common.shards import Manifest
from pipeline.common.tables import fmt, rounded
from pipeline.guided_lm.data import (
    ChunkSplit,
    ConceptTargets,
    Occurrences,
    WordFinder,
    concept_targets,
    find_occurrences,
    split_chunks,
)
from pipeline.guided_lm.model import build_aux_map, build_lm, count_parameters
from pipeline.guided_lm.params import GuidedLmParams
from pipeline.guided_lm.report import (
    BUILTIN_CAVEAT,
    aggregate,
    guided_table,
    summary,
    write_curve,
)
from pipeline.guided_lm.report import plot as plot_data_efficiency
from pipeline.guided_lm.training import (
    Aux,
    apply_probe,
    fit_probe,
    heldout_loss,
    hidden_at,
    mean_cosine,
    train_lm,
)
from pipeline.inputs.text_chunks import CorpusChunks, load_tokenizer

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
PROBE_OCCURRENCES = 50_000
"""The probe is fitted on at most this many train occurrences (the first ones)."""


def _in_rows(occurrences: Occurrences, rows: torch.Tensor) -> Occurrences:
    return occurrences.select(torch.isin(occurrences.row, rows))


def _scores(
    lm: torch.nn.Module,
    aux: Aux | None,
    split: ChunkSplit,
    targets: ConceptTargets,
    fit_on: Occurrences,
    heldout: dict[str, Occurrences],
    layer: int,
    batch_size: int,
) -> dict[str, float | None]:
    fit_hidden = hidden_at(lm, split.tokens, fit_on, layer, batch_size)
    probe = fit_probe(fit_hidden, targets.directions[fit_on.concept])
    out: dict[str, float | None] = {}
    for name, occ in heldout.items():
        hidden = hidden_at(lm, split.tokens, occ, layer, batch_size)
        target = targets.directions[occ.concept]
        with torch.inference_mode():
            out[f"aux_cos_{name}"] = None if aux is None else mean_cosine(aux.map(hidden), target)
        out[f"probe_cos_{name}"] = mean_cosine(apply_probe(probe, hidden), target)
    return out


def run(
    params: Sections,
    corpus: Path,
    directions: Path,
    metrics: Path,
    table: Path,
    plot_path: Path,
    curve: Path,
) -> dict[str, Any]:
    """Train the grid, score it on the held-out blocks; write the outputs; return metrics."""
    gp = params.guided_lm
    set_threads(gp.threads)
    chunks = CorpusChunks(Path(corpus))
    extra = chunks.manifest.extra
    tokenizer = load_tokenizer(extra["model"], extra.get("revision"))
    split = split_chunks(chunks, gp.eval_fraction)
    layer = params.distill.train.layer
    targets = concept_targets(Path(directions), layer)
    finder = WordFinder(tokenizer, targets.texts, split.vocabulary)
    occurrences = find_occurrences(split.tokens, finder)
    supervising = _in_rows(targets.of_split(occurrences, "train"), split.train_rows)
    if len(supervising) == 0:
        raise ValueError(
            f"{corpus}: no train-split concept of {directions} occurs in the train blocks; "
            "the aux loss would supervise nothing"
        )
    heldout = {
        name: _in_rows(targets.of_split(occurrences, name), split.heldout_rows)
        for name in ("train", "test")
    }
    heldout_tokens = split.tokens[split.heldout_rows]
    vocab = split.vocabulary.numel()
    grid = [(f, seed, lam) for f in gp.sizes for seed in gp.seeds for lam in sorted(gp.lambdas)]
    log.info(
        "guided_lm: %d cells of %d steps; the LM holds the %d token ids the corpus uses "
        "(of %d in the tokenizer)",
        len(grid),
        gp.steps,
        vocab,
        len(tokenizer),
    )
    cells = []
    for fraction, seed, lam in progress(grid, desc="guided_lm cells", unit="cell"):
        rows = split.train_prefix(fraction)
        fit_on = _in_rows(supervising, rows).select(slice(0, PROBE_OCCURRENCES))
        lm = build_lm(gp, vocab, seed)
        aux = None
        if lam > 0:
            aux_map = build_aux_map(gp.d_model, targets.directions.shape[1], seed)
            aux = Aux(aux_map, supervising, targets.directions, gp.layer, lam)
        result = train_lm(
            lm,
            rows,
            split.tokens,
            gp.steps,
            gp.batch_size,
            gp.lr,
            gp.weight_decay,
            seed,
            aux,
            desc=f"guided_lm lambda={fmt(lam)} fraction={fmt(fraction)} seed={seed}",
        )
        cell = {
            "fraction": fraction,
            "train_tokens": rows.numel() * split.chunk_tokens,
            "lambda": lam,
            "seed": seed,
            "heldout_loss": heldout_loss(lm, heldout_tokens, gp.eval_batch_size),
            "final_train_loss": result.lm_losses[-1],
            "supervised_occurrences": result.supervised,
            **_scores(lm, aux, split, targets, fit_on, heldout, gp.layer, gp.eval_batch_size),
        }
        log.debug("guided_lm cell %s", cell)
        cells.append(cell)
    directions_extra = Manifest.load(Path(directions)).extra
    caveats = [directions_extra.get("teacher_caveat") or ""]
    if extra.get("source") == "builtin":
        caveats.append(BUILTIN_CAVEAT)
    results: dict[str, Any] = {
        "teacher": {"model": directions_extra["model"], "layer": layer},
        "caveat": "; ".join(c for c in caveats if c),
        "lambdas": sorted(gp.lambdas),
        "cells": cells,
        "rows": aggregate(cells),
        "counts": {
            "parameters": count_parameters(build_lm(gp, vocab, 0)),
            "vocabulary": vocab,
            "tokenizer_vocabulary": len(tokenizer),
            "steps": gp.steps,
            "batch_size": gp.batch_size,
            "seeds": len(gp.seeds),
            "train_chunks": split.train_rows.numel(),
            "heldout_chunks": split.heldout_rows.numel(),
            "heldout_tokens": heldout_tokens[:, 1:].numel(),
            "supervising_occurrences": len(supervising),
            "heldout_train_occurrences": len(heldout["train"]),
            "heldout_test_occurrences": len(heldout["test"]),
            "words_cut_at_chunk_ends": finder.cut,
            "concepts_not_one_word": targets.skipped,
        },
    }
    results["summary"] = summary(results, gp.min_rows)
    write_json(metrics, results)
    write_text(table, guided_table(results, gp.min_rows))
    plot_data_efficiency(plot_path, results)
    write_curve(curve, results)
    return results


def command(
    corpus: Annotated[Path, typer.Option(help="Folder written by the corpus stage.")],
    directions: Annotated[Path, typer.Option(help="Folder written by the directions stage.")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON: every cell, rows, summary.")],
    table: Annotated[Path, typer.Option(help="Markdown table: loss per size and lambda.")],
    plot: Annotated[Path, typer.Option(help="PNG: held-out loss vs train tokens per lambda.")],
    curve: Annotated[Path, typer.Option(help="TSV for dvc plots: train_tokens, loss per lambda.")],
    params: Annotated[Path, typer.Option(help="Params file; its `guided_lm` section.")] = PARAMS,
) -> None:
    """Train the direction-supervised tiny LM grid; held-out LM loss against lambda = 0."""
    sections = load_params(params, guided_lm=GuidedLmParams)  # + distill (its READS)
    started = time.perf_counter()
    results = run(sections, corpus, directions, metrics, table, plot, curve)
    headline = [
        {k: row[k] for k in ("train_tokens", "lambda", "heldout_loss", "difference")}
        for row in results["rows"]
    ]
    took = time.perf_counter() - started
    typer.echo(f"guided_lm: {json.dumps(rounded(headline))} ({took:.1f} s)")
