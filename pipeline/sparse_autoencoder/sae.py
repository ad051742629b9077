"""Stage `sae`: a sparse autoencoder on cached activations, with seed 002's metrics.

Reads the dump `sae.input` names (`directions` or token-level `activations`) at
`sae.layer`, plus what turns items into readable text: the wordlist parquet
(concepts) or the corpus and its tokenizer (text spans). Trains the SAE (seed
`sae.seed`) and, with `sae.cross_seed`, its twin (seed + 1), whose dictionaries are
matched one to one. Writes:

- `<out>/model.safetensors` + `config.json`; the twin in `<out>/cross_seed/`
- `--metrics` JSON: seed 002's table columns, the PCA/NMF/ICA baselines at equal L0,
  the spliced-in evaluation (`splice.py`: the teacher's LM loss on the held-out chunks with
  layer L replaced by each reconstruction, against clean and mean ablation), cross-seed
  matching next to its chance level and its same-seed ceiling, (with `--compare`) CKA /
  Procrustes against a second dump, and the `summary` block (`report.summary`)
- `--table` markdown (SAE vs baselines), `--exemplars` markdown (top items of the most
  and least coherent features)
- `--live`: dvclive folder (`pipeline.common.live`) of the seed-`sae.seed` training, a
  row every `sae.log_every` steps: loss, mse, l1, r2, l0, dead_window (means over the
  steps since the previous row; dead_window: the share of features that fired on none
  of the last `sae.dead_window_rows` rows); the curve's epoch and rows counters stay out
  of it (dvclive's step is the x axis, and counters are no metrics)
- `--plot-training` PNG (reconstruction and dead-feature rate over steps) and
  `--plot-density` PNG (histogram of log10 feature density on the eval rows; features
  that never fired there sit in the leftmost bin, one decade below 1 / eval rows)

    python -m pipeline.cli sae --params params.yaml --source data/activations \
        --wordlist data/wordlist/concepts.parquet --corpus data/corpus --out data/sae \
        --metrics metrics/sae.json --table metrics/sae.md \
        --exemplars metrics/sae_exemplars.md --live metrics/live/sae \
        --plot-training metrics/plots/sae_training.png \
        --plot-density metrics/plots/sae_feature_density.png
"""

from __future__ import annotations

import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from pipeline.common.devices import set_threads
from pipeline.common.io import write_json, write_text
from pipeline.common.live import log_row, open_live
from pipeline.common.params import Sections, load_params, to_dict
from pipeline.common.pictures import Panel, histogram, line_panels
from pipeline.common.progress import progress
from pipeline.common.run_info import INFO, split_info
from pipeline.common.tables import rounded
from pipeline.common.teacher import load_causal_lm, teacher_caveat
from pipeline.inputs.text_chunks import CorpusChunks, load_tokenizer
from pipeline.sparse_autoencoder.alignment import (
    linear_cka,
    match_features,
    orthogonal_procrustes,
    random_matching,
)
from pipeline.sparse_autoencoder.exemplars import coherence
from pipeline.sparse_autoencoder.metrics import (
    decoder_cosine_stats,
    equal_l0_components,
    evaluate_baselines,
    evaluate_sae,
    fit_baseline,
)
from pipeline.sparse_autoencoder.model import (
    FitResult,
    SparseAutoencoder,
    fit_sae,
    prepare_inputs,
    save_sae,
)
from pipeline.sparse_autoencoder.params import SaeParams
from pipeline.sparse_autoencoder.report import comparison_table, exemplar_report, summary
from pipeline.sparse_autoencoder.sources import (
    ActivationSource,
    DirectionsSource,
    TokenSource,
    item_keys,
    open_source,
)
from pipeline.sparse_autoencoder.splice import (
    chunk_losses,
    constant,
    hook_point,
    identity,
    loss_recovered,
    model_space,
    module_name,
)

PARAMS = Path("params.yaml")
INFO_KEYS = (
    "layer",
    "layer_norm",
    "seed",
    "topk",
    "model_dims",
    "code_dims",
    "baselines.*.components",
    "baselines.*.kept_per_row",
    "start_rows.positions",
    "start_rows.token_ids",
    "start_rows.norm_ratio",
    "splice.applies",
    "splice.reason",
    "splice.hook",
    "splice.teacher_dtype",
    "splice.bootstrap_samples",
    "cross_seed.twin_seed",
    "cross_model.other_layer",
)
"""What describes the run rather than measures it: `<out>/info.json`, not the metrics."""
EVAL_BATCH = 1024
HOOK_TOLERANCE = 0.05
"""Largest relative gap between the hooked and the stored hidden state: bfloat16 storage
and another device's kernels stay far below it; another layer's state does not."""
NO_STREAM = "sae.input=directions: one vector per concept, no token stream to splice into"
LAST_ONLY = (
    "activations.positions={positions}: only each chunk's last token is stored, and it "
    "predicts no token of its chunk"
)


def run(
    params: Sections,
    source: Path,
    out: Path,
    metrics: Path,
    table: Path,
    exemplars: Path,
    live: Path,
    plot_training: Path,
    plot_density: Path,
    wordlist: Path | None = None,
    corpus: Path | None = None,
    compare: Path | None = None,
) -> dict[str, Any]:
    """Train, measure and report; returns the metrics written to `metrics`."""
    sae = params.sae
    set_threads(sae.num_threads)
    data = _open_input(sae, Path(source), wordlist, corpus)
    features = data.dim * sae.code_dims_multiplier
    if sae.topk is not None and sae.topk > features:
        raise ValueError(
            f"sae.topk={sae.topk} exceeds the dictionary: {data.dim} dims x "
            f"sae.code_dims_multiplier={sae.code_dims_multiplier} = {features} features"
        )
    # Independent of the SAE, and the likeliest to fail on bad input: first.
    other = _open_compare(sae, Path(compare)) if compare is not None else None
    cross_model = None
    if other is not None:
        cross_model = cross_model_alignment(data, other, sae.baseline_rows, sae.seed)

    _, sample = data.sample("train", sae.baseline_rows, sae.seed)
    with open_live(Path(live)) as board:
        model, fit = _train(data, sae, features, sae.seed, sample, partial(_log, board))
    result, evaluation, fitted = _measure(model, fit, data, sae, sample)
    result["splice"] = _splice(model, fitted, data, sae, corpus)
    twin = None
    if sae.cross_seed:
        twin, _ = _train(data, sae, features, sae.seed + 1, sample, label="cross-seed twin")
        result["cross_seed"] = _cross_seed(model, twin, data, sae, features, sample)
    if cross_model is not None:
        result["cross_model"] = cross_model
    scores = _coherence(model, data, evaluation)
    result["coherence_mean"] = float(torch.nanmean(scores).item())
    report = exemplar_report(
        evaluation.exemplars,
        scores,
        evaluation.codes.usage,
        evaluation.recon.rows,
        lambda items: data.describe(items, sae.context_tokens),
        sae.report_features,
        f"SAE exemplars: {data.model} layer {sae.layer} ({sae.input})",
    )

    _write_models(model, twin, sae, data, result, Path(out))
    training_picture(fit, Path(plot_training), sae)
    density_picture(evaluation.codes.usage, evaluation.recon.rows, Path(plot_density))
    caveat = teacher_caveat(data.model)
    heading = f"SAE vs baselines: {data.model} layer {sae.layer} ({sae.input})"
    heading += f" ({caveat})" if caveat else ""
    write_text(
        Path(table), comparison_table(result, heading, other.model if other is not None else "")
    )
    write_text(Path(exemplars), report)
    result["summary"] = summary(result, data.model, caveat)
    measured, info = split_info(result, INFO_KEYS)
    write_json(Path(metrics), measured)
    write_json(Path(out) / INFO, info)
    return result


def _measure(model, fit, data, sae: SaeParams, sample: torch.Tensor) -> tuple[dict, Any, list]:
    """Seed 002's table columns on the eval rows, and the baselines at the same L0."""
    evaluation = evaluate_sae(model, data, EVAL_BATCH, sae.top_exemplars, sae.buffer_rows)
    result: dict[str, Any] = {
        "layer": sae.layer,
        "seed": sae.seed,
        "model_dims": data.dim,
        "code_dims": model.features,
        "topk": sae.topk,
        "layer_norm": sae.layer_norm,
        "train_rows_per_epoch": fit.rows // sae.epochs,
        "eval_rows": evaluation.recon.rows,
        "baseline_rows": int(sample.shape[0]),
        "steps": fit.steps,
        **evaluation.summary(),
        "dead_feature_rate_train_window": fit.dead_window,
        **decoder_cosine_stats(model.W_dec),
    }
    if isinstance(data, TokenSource):
        dropped = data.dropped_rows
        result["start_rows"] = {
            "positions": data.start.positions,
            "token_ids": list(data.start.token_ids),
            "norm_ratio": data.start.norm_ratio,
            "dropped_train_rows": dropped["train"],
            "dropped_eval_rows": dropped["eval"],
        }
    fitted, result["baselines"] = _baselines(sae, data, sample, result["mean_active"])
    return result, evaluation, fitted


def _cross_seed(model, twin, data, sae: SaeParams, features: int, sample: torch.Tensor) -> dict:
    """The two seeds' matched decoder cosine, next to chance (random dictionaries of the same
    shape) and, with `same_seed_rerun`, the ceiling (the same seed trained twice)."""
    matched = match_features(model.W_dec, twin.W_dec)
    desc = f"sae layer {sae.layer} cross-seed chance"
    chance = random_matching(data.dim, features, sae.chance_draws, sae.seed, desc)
    cross: dict[str, Any] = {
        "twin_seed": sae.seed + 1,
        "mean_matched_cos": matched.mean_cos,
        "frac_above_0_9": matched.fraction_above(0.9),
        "chance_mean_matched_cos": float(np.mean(chance)),
        "chance_sd": float(np.std(chance, ddof=1)) if len(chance) > 1 else None,
        "chance_draws": chance,
    }
    if sae.same_seed_rerun:
        again, _ = _train(data, sae, features, sae.seed, sample, label="same-seed rerun")
        first, second = model.state_dict(), again.state_dict()
        cross["same_seed_mean_matched_cos"] = match_features(model.W_dec, again.W_dec).mean_cos
        cross["same_seed_bit_identical"] = all(
            torch.equal(first[name], second[name]) for name in first
        )
    return cross


def _splice(model, fitted: list, data: ActivationSource, sae: SaeParams, corpus: Path | None):
    """The spliced-in LM loss of the SAE and each baseline on the held-out chunks."""
    if isinstance(data, DirectionsSource):
        return {"applies": False, "reason": NO_STREAM}
    positions = data.manifest.extra.get("positions")
    if positions != "all":
        return {"applies": False, "reason": LAST_ONLY.format(positions=positions)}
    held = torch.cat([items for items, _, _ in data.shards("eval")])  # (R, 2): the SAE's rows
    chunk_ids = held[:, 0].unique()
    chunk_ids = chunk_ids[: sae.splice_chunks] if sae.splice_chunks else chunk_ids
    reader = CorpusChunks(Path(corpus))
    tokens = torch.stack(list(reader.tokens_of(chunk_ids).values()))  # ascending chunk id
    pad = reader.pad_token_id
    mask = tokens != pad if pad is not None else torch.ones_like(tokens, dtype=torch.bool)
    dtype = data.manifest.params.get("compute_dtype", "float32")
    revision = data.manifest.extra.get("revision")
    lm, _ = load_causal_lm(data.model, revision, dtype, sae.device, "activations.model")
    module = hook_point(lm, sae.layer)
    batch = sae.splice_batch_size

    replaced = _rows_of(held, chunk_ids, tokens.shape)  # start rows stay as they are
    passes = 2 + 1 + len(fitted)  # clean, mean ablation, the SAE, each baseline
    bar = progress(
        total=passes * math.ceil(tokens.shape[0] / batch),
        desc=f"sae layer {sae.layer} splice",
        unit="batch",
    )

    def losses(replace, capture=False, name=""):
        bar.set_postfix(method=name)
        return chunk_losses(lm, tokens, mask, batch, module, replace, capture, replaced, bar.update)

    clean = losses(identity, capture=True, name="clean")
    check = _hook_check(clean.captured, data, chunk_ids[:batch], replaced[:batch])
    ablated = losses(constant(_train_mean(data)), name="mean ablation")
    methods = {"sae": model_space(lambda p: model.decode(model.encode(p)), sae.layer_norm)}
    for baseline in fitted:
        methods[baseline.name] = model_space(
            lambda p, b=baseline: b.reconstruct(p)[0].to(p.device), sae.layer_norm
        )
    samples, seed = sae.bootstrap_samples, sae.seed
    scores = {
        name: loss_recovered(clean, ablated, losses(replace, name=name), samples, seed)
        for name, replace in methods.items()
    }
    bar.close()
    return {
        "applies": True,
        "chunks": int(chunk_ids.numel()),
        "predicted_tokens": int(clean.counts.sum()),
        "teacher_dtype": dtype,
        "bootstrap_samples": samples,
        "hook": module_name(lm, module),
        "hook_check_rel_error": check,
        "clean_loss": clean.loss,
        "clean_explained_variance": clean.recon.r2,
        "mean_ablation": loss_recovered(clean, ablated, ablated, samples, seed),
        "methods": scores,
    }


def _rows_of(items: torch.Tensor, chunk_ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(C, T) bool: True at the (chunk, position) of each item whose chunk is in the
    ascending `chunk_ids`."""
    rows = torch.zeros(shape, dtype=torch.bool)
    items = items[torch.isin(items[:, 0], chunk_ids)]
    rows[torch.searchsorted(chunk_ids, items[:, 0].contiguous()), items[:, 1]] = True
    return rows


def _hook_check(captured, data: ActivationSource, chunk_ids, mask) -> float:
    """||hooked - stored|| / ||stored|| over the first batch's rows: the hook must see exactly
    the tensor the activations stage stored (up to its storage dtype)."""
    chunk, position = mask.nonzero(as_tuple=True)
    items = torch.stack([chunk_ids[chunk], position], dim=1)
    stored = data.gather(item_keys(items))
    error = ((captured - stored).norm() / stored.norm().clamp(min=1e-12)).item()
    if error > HOOK_TOLERANCE:
        raise RuntimeError(
            f"the spliced-in evaluation hooks a tensor {error:.3g} (relative) away from the "
            f"stored layer {data.layer} of {data.folder}: not the same hidden state"
        )
    return error


def _train_mean(data: ActivationSource) -> torch.Tensor:
    total, rows = torch.zeros(data.dim, dtype=torch.float64), 0
    for _, x, _ in data.shards("train"):
        total += x.double().sum(0)
        rows += x.shape[0]
    if rows == 0:
        raise ValueError(f"{data.folder}: no train rows for the mean-ablation baseline")
    return (total / rows).float()


def _open_input(
    sae: SaeParams, source: Path, wordlist: Path | None, corpus: Path | None
) -> ActivationSource:
    data = open_source(source, sae.layer, sae.eval_fraction, keep_start_rows=sae.keep_start_rows)
    if data.kind != sae.input:
        raise ValueError(f"sae.input={sae.input} but {source} holds a {data.kind!r} dump")
    if isinstance(data, DirectionsSource):
        if wordlist is None:
            raise ValueError("sae.input=directions needs --wordlist for the concept texts")
        data.attach_texts(wordlist)
    elif isinstance(data, TokenSource):
        if corpus is None:
            raise ValueError("sae.input=activations needs --corpus to decode text spans")
        revision = data.manifest.extra.get("revision")
        data.attach_texts(corpus, load_tokenizer(data.model, revision, "activations.model"))
    return data


def _open_compare(sae: SaeParams, compare: Path) -> ActivationSource:
    from pipeline.common.shards import Manifest

    layers = Manifest.load(compare).extra.get("layers", [])
    layer = sae.compare_layer if sae.compare_layer is not None else max(layers, default=-1)
    return open_source(compare, layer, sae.eval_fraction, keep_start_rows=sae.keep_start_rows)


def _train(
    data: ActivationSource,
    sae: SaeParams,
    features: int,
    seed: int,
    sample: torch.Tensor,
    on_log=None,
    label: str = "",
) -> tuple[SparseAutoencoder, Any]:
    model = SparseAutoencoder(data.dim, features, sae.topk, sae.layer_norm, seed=seed)
    model.init_decoder_bias(sample)
    return model, fit_sae(model, data, sae, seed, on_log, label)


COUNTERS = ("epoch", "rows")


def _log(board, row: dict[str, float]) -> None:
    log_row(board, {key: value for key, value in row.items() if key not in COUNTERS})


def training_picture(fit: FitResult, path: Path, sae: SaeParams) -> Path:
    """Reconstruction (MSE, R²) and the dead-in-window feature rate over steps."""

    def column(key: str) -> tuple[list[float], list[float]]:
        return [row["step"] for row in fit.curves], [row[key] for row in fit.curves]

    panels = [
        Panel("reconstruction MSE (train batches)", "step", "MSE", {"mse": column("mse")}),
        Panel("reconstruction R² (train batches)", "step", "R²", {"r2": column("r2")}),
        Panel(
            f"dead features (none fired in the last {sae.dead_window_rows} rows)",
            "step",
            "share of features",
            {"dead_window": column("dead_window")},
        ),
        Panel("L0 (active features per row)", "step", "L0", {"l0": column("l0")}),
    ]
    return line_panels(path, f"SAE training (seed {sae.seed})", panels)


def density_picture(usage: torch.Tensor, rows: int, path: Path) -> Path:
    """log10 of each feature's firing rate on `rows` eval rows; never-fired features one
    decade below the rarest possible rate (1 / rows), so they show as their own bar."""
    if rows <= 0:
        raise ValueError(f"{path}: no eval rows to measure feature density on")
    floor = math.log10(1.0 / rows) - 1.0
    density = usage.double() / rows
    values = [math.log10(d) if d > 0 else floor for d in density.tolist()]
    dead = int((density == 0).sum())
    title = f"feature density on {rows} eval rows"
    title += f" ({dead} of {len(values)} never fired: at {floor:.2f})"
    return histogram(path, title, "log10 feature density", values)


def _baselines(sae: SaeParams, data, sample: torch.Tensor, mean_active: float):
    """(the fitted baselines, their metrics on the eval rows)."""
    if not sae.baselines:
        return [], {}
    k = equal_l0_components(mean_active, data.dim)
    prepared = prepare_inputs(sample, sae.layer_norm)
    fitted = []
    # One fit each (scikit-learn), minutes apiece at real width: a line per fit.
    bar = progress(sae.baselines, desc=f"sae layer {sae.layer} baselines", unit="fit")
    for kind in bar:
        fitted.append(fit_baseline(kind, prepared, k, sae.seed, sae.basis_components))
        bar.set_postfix(done=kind)
    prepare = lambda x: prepare_inputs(x, sae.layer_norm)  # noqa: E731
    return fitted, evaluate_baselines(fitted, prepare, data, EVAL_BATCH, sae.buffer_rows)


def _coherence(model: SparseAutoencoder, data: ActivationSource, evaluation) -> torch.Tensor:
    top = evaluation.exemplars
    keys = item_keys(top.items[top.valid]).unique()
    if keys.numel() == 0:
        return torch.full((model.features,), float("nan"), dtype=torch.float64)
    vectors = model.prepare(data.gather(keys))
    center = evaluation.recon.sum_x / evaluation.recon.rows
    return coherence(top, vectors, keys, center)


def cross_model_alignment(
    first: ActivationSource, second: ActivationSource, max_rows: int, seed: int
) -> dict[str, float]:
    """Linear CKA and Procrustes disparity over the items both dumps hold (a seeded sample)."""
    keys_a = torch.cat([item_keys(items) for items, _, _ in first.shards("all")])
    keys_b = torch.cat([item_keys(items) for items, _, _ in second.shards("all")])
    shared = keys_a[torch.isin(keys_a, keys_b)].unique()
    if shared.numel() < 2:
        raise ValueError(
            f"{first.folder} and {second.folder} share {shared.numel()} items: cross-model "
            "alignment needs the same concepts (or chunks) in both dumps"
        )
    generator = torch.Generator().manual_seed(seed)
    pick = shared[torch.randperm(shared.numel(), generator=generator)[:max_rows]]
    x, y = first.gather(pick), second.gather(pick)
    return {
        "rows": int(pick.numel()),
        "other_layer": second.layer,
        "other_dims": second.dim,
        "cka": linear_cka(x, y),
        "procrustes_disparity": orthogonal_procrustes(x, y).disparity,
    }


def _write_models(model, twin, sae: SaeParams, data, result: dict, out: Path) -> None:
    config = {
        "input": sae.input,
        "layer": sae.layer,
        "teacher": data.model,
        "source_manifest": data.manifest.extra,
        "sae": to_dict(sae),
        "metrics": {k: v for k, v in result.items() if not isinstance(v, dict)},
    }
    if out.exists():
        shutil.rmtree(out)  # no stale cross_seed/ from an earlier run
    save_sae(model, {**config, "seed": sae.seed}, out)
    if twin is not None:
        save_sae(twin, {**config, "seed": sae.seed + 1, "metrics": {}}, out / "cross_seed")


def command(
    source: Annotated[
        Path, typer.Option(help="The dump sae.input names (directions or activations).")
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for model.safetensors, config.json, cross_seed/.")
    ],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON to write.")],
    table: Annotated[Path, typer.Option(help="Markdown table: SAE vs baselines.")],
    exemplars: Annotated[Path, typer.Option(help="Markdown exemplar report.")],
    live: Annotated[Path, typer.Option(help="dvclive folder of the training curves.")],
    plot_training: Annotated[
        Path, typer.Option(help="PNG: reconstruction and dead-feature rate over steps.")
    ],
    plot_density: Annotated[Path, typer.Option(help="PNG: feature-density histogram.")],
    wordlist: Annotated[Path | None, typer.Option(help="Concept table (directions input).")] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus folder (activations input).")] = None,
    compare: Annotated[
        Path | None, typer.Option(help="A second dump of the same items: CKA and Procrustes.")
    ] = None,
    params: Annotated[Path, typer.Option(help="Params file; its `sae` section.")] = PARAMS,
) -> None:
    """Train the seed-002 SAE on cached activations; write metrics, tables and exemplars."""
    started = time.perf_counter()
    result = run(
        load_params(params, sae=SaeParams),
        source,
        out,
        metrics,
        table,
        exemplars,
        live,
        plot_training,
        plot_density,
        wordlist,
        corpus,
        compare,
    )
    headline = ("reconstruction_r2", "activation_density", "dead_feature_rate", "gini")
    took = f"{time.perf_counter() - started:.1f} s"
    typer.echo(f"sae: {json.dumps(rounded({k: result[k] for k in headline}))}, {took} -> {metrics}")
