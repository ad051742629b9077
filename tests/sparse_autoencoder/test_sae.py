"""The SAE: planted-dictionary recovery, exemplar alignment under shuffling, the stage."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from pipeline.common.live import read_metric
from pipeline.common.run_info import split_info
from pipeline.common.shards import Manifest, shard_name
from pipeline.common.teacher import load_causal_lm
from pipeline.concepts.layout import KIND, write_shard_rows, write_side_files
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.inputs.words import concepts_table
from pipeline.sparse_autoencoder import sae as sae_stage
from pipeline.sparse_autoencoder.alignment import match_features, random_matching
from pipeline.sparse_autoencoder.exemplars import TopExemplars, coherence
from pipeline.sparse_autoencoder.metrics import evaluate_sae
from pipeline.sparse_autoencoder.model import (
    SparseAutoencoder,
    dead_in_window,
    fit_sae,
    load_sae,
    sae_loss,
    train_step,
)
from pipeline.sparse_autoencoder.params import SaeParams
from pipeline.sparse_autoencoder.report import rank_features
from pipeline.sparse_autoencoder.sources import DirectionsSource, item_keys, open_source
from tests.conftest import build_params, make_direction_set
from tests.picture_checks import assert_picture
from tests.tables import squeeze

# The synthetic directions folders cache layer 2; distill must read a cached layer too.
LAYER_2 = {
    "directions": {"layers": [2]},
    "distill": {"train": {"layer": 2}, "runs": {"probe": {"approach": "linear_probe"}}},
}


def write_directions(
    folder: Path, x: torch.Tensor, split: torch.Tensor, layer: int = 2, shard_rows: int = 1024
) -> Path:
    """A directions folder holding exactly x (N, D) (stored train mean 0), concept ids 0..N-1."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, start in enumerate(range(0, x.shape[0], shard_rows)):
        ids = torch.arange(start, min(start + shard_rows, x.shape[0]))
        records.append(
            write_shard_rows(folder / shard_name(index), ids, split[ids], {layer: x[ids]})
        )
    n = x.shape[0]
    files = write_side_files(
        folder,
        means={layer: torch.zeros(x.shape[1])},
        embedding_token_ids=torch.arange(2),
        embedding_rows=torch.zeros(2, 2),
        offsets=torch.arange(n + 1),
        flat_tokens=torch.ones(n, dtype=torch.long),
        texts=[f"w{i}" for i in range(n)],
    )
    extra = {"layers": [layer], "vocab_size": 2, "hidden_size": x.shape[1], "model": "synthetic"}
    Manifest(kind=KIND, params={}, shards=records, files=files, extra=extra).save(folder)
    return folder


def write_wordlist(path: Path, n: int) -> Path:
    words = [f"concept{i:04d}" for i in range(n)]
    table = concepts_table(
        [(w, i) for i, w in enumerate(words)], [(None, None)] * n, WordlistParams(num_concepts=n)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def planted(num_rows: int, dim: int, atoms: int, active: int, seed: int = 0):
    """Rows that are sums of `active` of `atoms` unit atoms with weights in [1, 2)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, dim, generator=gen), dim=1)
    chosen = torch.rand(num_rows, atoms, generator=gen).argsort(1)[:, :active]
    weights = 1 + torch.rand(num_rows, active, generator=gen)
    codes = torch.zeros(num_rows, atoms).scatter(1, chosen, weights)
    return codes @ dictionary, dictionary


def sae_params(**overrides) -> SaeParams:
    base = dict(
        input="directions",
        layer=2,
        code_dims_multiplier=2,
        topk=4,
        l1_strength=1e-3,
        layer_norm=False,
        epochs=3,
        batch_size=32,
        lr=5e-3,
        seed=7,
        buffer_rows=64,
        log_every=5,
        top_exemplars=3,
        report_features=2,
        baselines=("pca", "nmf", "ica"),
        baseline_rows=500,
        device="cpu",
    )
    return SaeParams(**(base | overrides))


def test_sae_recovers_a_planted_sparse_dictionary(tmp_path):
    x, dictionary = planted(num_rows=8192, dim=32, atoms=48, active=3)
    split = torch.zeros(8192, dtype=torch.int8)
    split[::10] = 1
    source = DirectionsSource(write_directions(tmp_path / "planted", x, split), layer=2)
    params = sae_params(
        code_dims_multiplier=3,
        topk=3,
        l1_strength=0.0,
        epochs=6,
        batch_size=128,
        buffer_rows=4096,
        log_every=20,
    )
    model = SparseAutoencoder(32, 96, topk=3, layer_norm=False, seed=0)
    model.init_decoder_bias(source.sample("train", 2000)[1])
    logged = []
    result = fit_sae(model, source, params, seed=0, on_log=logged.append)
    # Every row reaches the logger, the last (partial: 348 steps, a row per 20) too.
    assert logged == result.curves and logged[-1]["step"] == result.steps == 348

    matched = match_features(dictionary.T, model.W_dec)  # each atom gets its own feature
    assert matched.mean_cos >= 0.9, f"mean matched cosine {matched.mean_cos:.3f}"
    assert matched.fraction_above(0.9) >= 0.9
    assert result.curves[-1]["r2"] > 0.9 and result.curves[-1]["l0"] == 3.0
    assert result.curves[-1]["mse"] < result.curves[0]["mse"] / 5
    assert result.rows == 6 * int((split == 0).sum())


def test_codes_decoder_norm_and_loss_by_hand():
    model = SparseAutoencoder(dim=8, features=16, topk=3, layer_norm=True, seed=1)
    x = torch.randn(10, 8) * 3 + 5
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scalars, fired = train_step(model, optimizer, x, l1_strength=0.5)
    assert torch.allclose(model.W_dec.norm(dim=0), torch.ones(16))  # renormalized after the step
    out = model(x)
    assert ((out.z > 0).sum(1) <= 3).all() and (out.z >= 0).all()
    assert torch.allclose(out.x.mean(1), torch.zeros(10), atol=1e-5)  # layer-normed rows
    assert torch.allclose(out.x.std(1, unbiased=False), torch.ones(10), atol=1e-3)
    loss, mse, l1 = sae_loss(out, 0.5)
    assert mse.item() == pytest.approx(((out.x_hat - out.x) ** 2).sum().item() / 80, rel=1e-5)
    assert l1.item() == pytest.approx(out.z.abs().sum().item() / 160, rel=1e-5)
    assert loss.item() == pytest.approx(mse.item() + 0.5 * l1.item(), rel=1e-6)
    assert fired.shape == (16,) and scalars["l0"] <= 3
    dense = SparseAutoencoder(dim=8, features=16, topk=None, layer_norm=False, seed=1)
    assert torch.equal(dense(x).z, torch.relu((x - dense.b_dec) @ dense.W_enc.T + dense.b_enc))
    with pytest.raises(ValueError, match="sae.topk=20 exceeds the dictionary size 16"):
        SparseAutoencoder(dim=8, features=16, topk=20, layer_norm=False)


def test_batches_cover_every_row_once_with_items_aligned(tmp_path):
    x = torch.arange(96 * 3, dtype=torch.float32).reshape(96, 3)  # row i starts with 3 i
    split = (torch.arange(96) % 4 == 0).to(torch.int8)  # every 4th concept is val
    source = DirectionsSource(write_directions(tmp_path / "d", x, split, shard_rows=16), 2)
    # Batch size divides the buffer exactly: the final drain finds an empty buffer.
    for split_name, expected in (("all", 96), ("train", 72), ("eval", 24)):
        batches = list(source.batches(split_name, 8, 16, shuffle=True, seed=1))
        ids = torch.cat([b.items[:, 0] for b in batches])
        assert sorted(ids.tolist()) == sorted(set(ids.tolist())) and ids.numel() == expected
        for batch in batches:
            assert torch.equal(batch.x[:, 0], 3.0 * batch.items[:, 0])
            assert torch.equal(batch.is_eval, split[batch.items[:, 0]] != 0)
    items, sample = source.sample("train", 40, seed=0)
    assert 30 <= items.shape[0] <= 40 and (split[items[:, 0]] == 0).all()
    assert torch.equal(sample[:, 0], 3.0 * items[:, 0])
    keys = item_keys(torch.tensor([[50, -1], [3, -1]]))
    assert torch.equal(source.gather(keys), x[[50, 3]])
    with pytest.raises(ValueError, match="1 of 2 requested items absent"):
        source.gather(item_keys(torch.tensor([[50, -1], [999, -1]])))


def test_dead_in_window_on_a_hand_case():
    # Training rows seen when each feature last fired; -1: never.
    last_fired = torch.tensor([-1, 10, 90, 95, 100])
    window = SaeParams(dead_window_rows=10)
    assert dead_in_window(last_fired, rows=100, params=window) == pytest.approx(3 / 5)
    # Before a full window has passed only never-fired features count.
    early = torch.tensor([-1, 2, 3, 5, 5])
    assert dead_in_window(early, rows=5, params=window) == pytest.approx(1 / 5)


def test_same_seed_same_weights_and_a_different_seed_differs(direction_set):
    source = DirectionsSource(direction_set, layer=2)
    weights = []
    for seed in (3, 3, 4):
        model = SparseAutoencoder(source.dim, 32, topk=4, layer_norm=False, seed=seed)
        fit_sae(model, source, sae_params(epochs=1), seed=seed)
        weights.append(model.W_dec.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.allclose(weights[0], weights[2])


def test_training_bar_names_layer_seed_and_run_and_learns_its_total(direction_set, capsys):
    source = DirectionsSource(direction_set, layer=2)
    model = SparseAutoencoder(source.dim, 32, topk=4, layer_norm=False, seed=3)
    steps = fit_sae(model, source, sae_params(epochs=2), seed=3, label="cross-seed twin").steps
    lines = capsys.readouterr().err.splitlines()  # not a terminal: plain lines
    assert lines[0].startswith("sae layer 2 seed 3 (cross-seed twin): 0/? [")  # epoch 1 counts
    assert lines[-1].startswith(f"sae layer 2 seed 3 (cross-seed twin): {steps}/{steps} [")


def test_top_exemplars_on_a_hand_case():
    top = TopExemplars(features=3, k=2)
    z1 = torch.tensor([[0.5, 0.0, 0.0], [2.0, 0.0, 0.1]])
    z2 = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.0, 0.0]])
    items = torch.tensor([[10, -1], [11, -1], [12, -1], [13, -1]])
    top.update(z1, items[:2])
    top.update(z2, items[2:])
    assert top.items[0, :, 0].tolist() == [11, 12] and top.values[0].tolist() == [2.0, 1.0]
    assert top.valid[1].tolist() == [False, False]  # never fired: no exemplar at all
    assert top.items[2, :, 0].tolist() == [12, 11]
    assert top.values[2].tolist() == pytest.approx([0.3, 0.1])


def test_coherence_and_ranking_on_a_hand_case():
    top = TopExemplars(features=3, k=2)
    items = torch.tensor([[0, -1], [1, -1], [2, -1]])
    # Feature 0: items 0, 1 (same direction); feature 1: items 0, 2 (opposite); 2: one item.
    top.update(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), items)
    vectors = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    scores = coherence(top, vectors, item_keys(items), center=torch.zeros(2))
    assert scores[0].item() == pytest.approx(1.0) and scores[1].item() == pytest.approx(-1.0)
    assert math.isnan(scores[2].item())
    assert rank_features(scores, 1) == ([0], [1])


def test_exemplars_stay_aligned_when_the_loader_shuffles(tmp_path):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 12, generator=gen)
    split = torch.randint(0, 3, (300,), generator=gen).to(torch.int8)
    source = DirectionsSource(write_directions(tmp_path / "d", x, split, shard_rows=40), layer=2)
    model = SparseAutoencoder(12, 24, topk=5, layer_norm=True, seed=2)
    fit_sae(model, source, sae_params(epochs=1), seed=2)

    ordered = evaluate_sae(model, source, batch_size=32, top_k=4, buffer_rows=10_000)
    shuffled = evaluate_sae(model, source, 7, 4, buffer_rows=50, shuffle=True, seed=11)
    assert torch.equal(ordered.exemplars.items, shuffled.exemplars.items)
    assert torch.allclose(ordered.exemplars.values, shuffled.exemplars.values)
    assert ordered.recon.sse == pytest.approx(shuffled.recon.sse)

    # Brute force over the whole matrix in memory: the same items and values.
    with torch.no_grad():
        z = model(x).z  # (N, F); concept id = row index
    values, rows = torch.where(z > 0, z, -math.inf).T.topk(4, dim=1)
    valid = torch.isfinite(values)
    assert torch.equal(shuffled.exemplars.valid, valid)
    assert torch.equal(shuffled.exemplars.items[..., 0][valid], rows[valid])
    # Each exemplar's activation is what its own item's vector produces at that feature.
    for feature in range(0, 24, 5):
        for value, item in zip(
            shuffled.exemplars.values[feature], shuffled.exemplars.items[feature], strict=True
        ):
            if torch.isfinite(value):
                vector = source.gather(item_keys(item[None]))
                with torch.no_grad():
                    code = model(vector).z[0, feature]
                assert code.item() == pytest.approx(value.item(), rel=1e-5)


def run_stage(tmp_path: Path, params, source: Path, **paths):
    out = {
        name: tmp_path / "outputs" / name
        for name in ("sae", "sae.json", "sae.md", "exemplars.md", "live", "train.png", "dens.png")
    }
    result = sae_stage.run(
        params,
        source,
        out["sae"],
        out["sae.json"],
        out["sae.md"],
        out["exemplars.md"],
        out["live"],
        out["train.png"],
        out["dens.png"],
        **paths,
    )
    return result, out


def test_stage_on_directions_writes_models_metrics_tables_and_exemplars(tmp_path):
    folder = make_direction_set(tmp_path / "directions", num_concepts=240, dim=16)
    wordlist = write_wordlist(tmp_path / "wordlist" / "concepts.parquet", 240)
    params = build_params(**LAYER_2, sae=vars(sae_params()))
    result, out = run_stage(tmp_path, params, folder, wordlist=wordlist)

    metrics = json.loads(out["sae.json"].read_text())
    info = json.loads((out["sae"] / "info.json").read_text())
    # Metrics and info split the returned dict; floats round-trip exactly.
    assert [metrics, info] == json.loads(json.dumps(split_info(result, sae_stage.INFO_KEYS)))
    assert "layer" not in metrics and "seed" not in metrics and "model_dims" not in metrics
    assert (info["layer"], info["seed"], info["layer_norm"]) == (2, 7, result["layer_norm"])
    seed_columns = (
        "reconstruction_mse",
        "reconstruction_r2",
        "activation_density",
        "dead_feature_rate",
        "gini",
        "cos_mean",
        "cos_p95",
        "cos_max",
        "mean_active",
    )
    for key in seed_columns:
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert info["model_dims"] == 16 and info["code_dims"] == 32
    assert metrics["mean_active"] <= 4 and metrics["activation_density"] == pytest.approx(
        metrics["mean_active"] / 32
    )
    eval_rows = sum(int((s != 0).sum()) for s in _splits(folder))
    assert metrics["eval_rows"] == eval_rows
    assert set(metrics["baselines"]) == {"pca", "nmf", "ica"}
    pca = metrics["baselines"]["pca"]
    components = info["baselines"]["pca"]["components"]
    assert components == round(metrics["mean_active"]) and pca["mean_active"] == components
    assert 0 < pca["reconstruction_r2"] <= 1
    cross = metrics["cross_seed"]
    assert info["cross_seed"]["twin_seed"] == 8 and -1 <= cross["mean_matched_cos"] <= 1
    assert "Cross-seed (seeds 7 and 8)" in out["sae.md"].read_text()
    # Chance: random (16, 32) dictionaries; ceiling: seed 7 again, bit for bit on the CPU.
    assert cross["chance_draws"] == random_matching(16, 32, 5, 7)
    assert cross["chance_mean_matched_cos"] == pytest.approx(np.mean(cross["chance_draws"]))
    assert cross["same_seed_bit_identical"] and cross["same_seed_mean_matched_cos"] == 1.0
    assert "Ceiling (seed 7 trained twice): 1.0000 (bit-identical" in out["sae.md"].read_text()
    assert info["splice"] == {"applies": False, "reason": sae_stage.NO_STREAM}
    assert "Spliced-in LM-loss evaluation: does not apply" in out["sae.md"].read_text()
    assert [e["metric"] for e in metrics["summary"]] == [
        "SAE cross-seed mean matched decoder cosine"
    ]

    model, config = load_sae(out["sae"])
    twin, twin_config = load_sae(out["sae"] / "cross_seed")
    assert config["seed"] == 7 and twin_config["seed"] == 8 and model.features == 32
    assert match_features(model.W_dec, twin.W_dec).mean_cos == pytest.approx(
        cross["mean_matched_cos"]
    )
    table = squeeze(out["sae.md"].read_text())
    assert "| SAE (seed 7) | 32 |" in table and "| PCA |" in table and "| NMF |" in table
    report = out["exemplars.md"].read_text()
    assert "## Most coherent features" in report and "concept0" in report
    # dvclive: one TSV per curve column, a row every sae.log_every steps and at the end.
    names = ("loss", "mse", "l1", "r2", "l0", "dead_window")
    live = out["live"]
    tsvs = sorted(p.name for p in (live / "plots" / "metrics").iterdir())
    assert tsvs == sorted(f"{name}.tsv" for name in names)
    steps, r2 = read_metric(live, "r2")
    assert steps[-1] == metrics["steps"] and steps == sorted(set(steps))
    last = json.loads((live / "metrics.json").read_text())
    assert last["step"] == metrics["steps"] and last["r2"] == r2[-1]
    assert (live / "plots/metrics/mse.tsv").read_text().splitlines()[0] == "step\tmse"
    assert read_metric(live, "dead_window")[1][-1] == metrics["dead_feature_rate_train_window"]
    for name in ("train.png", "dens.png"):
        assert_picture(out[name])


def _splits(folder: Path):
    from pipeline.common.shards import read_shard

    manifest = Manifest.load(folder)
    return [read_shard(folder, r, ["split"])["split"] for r in manifest.shards]


def test_stage_cross_model_alignment_of_a_rotated_dump(tmp_path):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(200, 10, generator=gen)
    split = torch.zeros(200, dtype=torch.int8)
    split[::4] = 1
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
    first = write_directions(tmp_path / "a", x, split)
    second = write_directions(tmp_path / "b", x[:150] @ q, split[:150], layer=5)
    wordlist = write_wordlist(tmp_path / "concepts.parquet", 200)
    sae = vars(sae_params(cross_seed=False, baselines=(), epochs=1))
    params = build_params(**LAYER_2, sae=sae)
    result, out = run_stage(tmp_path, params, first, wordlist=wordlist, compare=second)
    cross = result["cross_model"]
    assert cross["rows"] == 150 and cross["other_layer"] == 5  # the shared concepts only
    assert cross["cka"] == pytest.approx(1.0) and cross["procrustes_disparity"] < 1e-9
    assert "cross_seed" not in result and result["baselines"] == {}
    assert "linear CKA 1.0000" in out["sae.md"].read_text()


def test_stage_on_token_activations_reports_text_spans(tmp_path, tiny_llama_path, capsys):
    from transformers import AutoTokenizer

    from pipeline.sparse_autoencoder import activations
    from tests.sparse_autoencoder.test_activations import make_corpus

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    corpus = make_corpus(tmp_path / "corpus", tokenizer, num_chunks=6, model=tiny_llama_path)
    acts = build_params(
        corpus={"model": tiny_llama_path},
        trajectories={"model": tiny_llama_path},
        activations={
            "model": tiny_llama_path,
            "layers": [2],
            "positions": "all",
            "compute_dtype": "float32",
            "shard_rows": 24,
            "device": "cpu",
        },
        sae=vars(sae_params(input="activations", eval_fraction=0.5, layer_norm=True)),
    )
    activations.run(acts.activations, corpus, tmp_path / "acts")
    capsys.readouterr()
    result, out = run_stage(tmp_path, acts, tmp_path / "acts", corpus=corpus)
    log = capsys.readouterr().err
    # Clean, mean ablation, the SAE and 3 baselines over one batch of held-out chunks.
    assert re.search(r"^sae layer 2 splice: 6/6 \[.*method=ica\]$", log, re.M)
    assert re.search(r"^sae layer 2 baselines: 3/3 \[.*done=ica\]$", log, re.M)
    source = open_source(tmp_path / "acts", 2, eval_fraction=0.5)
    held = sum(int(e.sum()) for _, _, e in source.shards("all"))
    assert 0 < held < 66 and result["eval_rows"] == held  # 6 chunks x 11 tokens after position 0
    assert result["model_dims"] == 64 and result["code_dims"] == 128
    report = out["exemplars.md"].read_text()
    assert report.count("[[") >= 3 and f"{tiny_llama_path} layer 2 (activations)" in report

    # The spliced-in evaluation, on the held-out chunks of the dump.
    splice = result["splice"]
    held_chunks = torch.cat([items[:, 0] for items, _, _ in source.shards("eval")]).unique()
    assert splice["applies"] and splice["chunks"] == held_chunks.numel()
    # Stored in bfloat16 (the default storage_dtype): its rounding, 2^-9, and no more.
    assert splice["hook"] == "model.layers.1" and splice["hook_check_rel_error"] < 4e-3
    tokens = torch.stack(list(CorpusChunks(corpus).tokens_of(held_chunks).values()))
    lm, _ = load_causal_lm(tiny_llama_path, None)
    with torch.no_grad():
        logits = lm(input_ids=tokens).logits
    # Position 0 (the corpus records no start token: still a sink) predicts nothing scored.
    own = torch.nn.functional.cross_entropy(logits[:, 1:-1].transpose(1, 2), tokens[:, 2:])
    assert splice["clean_loss"] == pytest.approx(own.item(), rel=1e-6)
    assert splice["predicted_tokens"] == tokens.numel() - 2 * tokens.shape[0]
    start = result["start_rows"]
    assert start["positions"] == 1 and start["dropped_train_rows"] == 6 - splice["chunks"]
    assert start["dropped_eval_rows"] == splice["chunks"]
    assert "each chunk's first 1 position(s) and rows above 5x" in squeeze(
        out["sae.md"].read_text()
    )
    assert set(splice["methods"]) == {"sae", "pca", "nmf", "ica"}
    assert splice["mean_ablation"]["loss_recovered"] == 0.0
    sae = splice["methods"]["sae"]
    expected = (splice["mean_ablation"]["lm_loss"] - sae["lm_loss"]) / (
        splice["mean_ablation"]["lm_loss"] - splice["clean_loss"]
    )
    assert sae["loss_recovered"] == pytest.approx(expected, rel=1e-9)
    assert sae["loss_increase"] == pytest.approx(sae["lm_loss"] - splice["clean_loss"])
    low, high = sae["loss_recovered_ci"]
    assert low <= sae["loss_recovered"] <= high
    table = squeeze(out["sae.md"].read_text())
    assert "## Spliced in: teacher LM loss on" in table and "| mean ablation |" in table
    assert re.search(r"\| ICA top-L0 \| keeps per row the 4 largest of \d+ FastICA sources", table)
    head = result["summary"][0]
    assert head["value"] == sae["loss_recovered"] and head["n"] == splice["chunks"]


def test_bad_input_is_named_before_anything_is_written(tmp_path, direction_set):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", 240)
    acts_params = build_params(
        **LAYER_2,
        activations={"layers": [2]},
        sae=vars(sae_params(input="activations")),
    )
    with pytest.raises(ValueError, match="sae.input=activations but .* holds a 'directions' dump"):
        run_stage(tmp_path, acts_params, direction_set, wordlist=wordlist)
    big_k = build_params(**LAYER_2, sae=vars(sae_params(topk=40)))
    with pytest.raises(ValueError, match=r"sae.topk=40 exceeds the dictionary: 16 dims x"):
        run_stage(tmp_path, big_k, direction_set, wordlist=wordlist)
    plain = build_params(**LAYER_2, sae=vars(sae_params()))
    with pytest.raises(ValueError, match="needs --wordlist"):
        run_stage(tmp_path, plain, direction_set)
    assert not (tmp_path / "outputs").exists()


def test_params_validation_and_layer_check():
    with pytest.raises(ValueError, match="sae.topk must be > 0"):
        SaeParams(topk=0)
    with pytest.raises(ValueError, match="sae.l1_strength must be >= 0"):
        SaeParams(l1_strength=-1.0)
    with pytest.raises(ValueError, match=r"sae.eval_fraction must lie in \(0, 1\)"):
        SaeParams(eval_fraction=1.0)
    with pytest.raises(ValueError, match="sae.baselines must be one of"):
        build_params(sae={"baselines": ["pca", "svd"]})
    with pytest.raises(
        ValueError, match=r"sae.layer=3 is not cached: .*directions.layers is \[14\]"
    ):
        build_params(sae={"input": "directions", "layer": 3})
    assert build_params(sae={"topk": None}).sae.topk is None
    assert build_params(sae={"l1_strength": "1e-4"}).sae.l1_strength == 1e-4


def test_command_line(tmp_path, direction_set):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", 240)
    params_file = tmp_path / "params.yaml"
    section = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(sae_params()).items()}
    section |= {"epochs": 1, "cross_seed": False, "baselines": ["pca"]}
    params_file.write_text(yaml.safe_dump({**LAYER_2, "sae": section}))
    app = typer.Typer()
    app.command()(sae_stage.command)
    outputs = tmp_path / "o"
    args = [
        "--params",
        str(params_file),
        "--source",
        str(direction_set),
        "--wordlist",
        str(wordlist),
    ]
    args += ["--out", str(outputs / "sae"), "--metrics", str(outputs / "sae.json")]
    args += ["--table", str(outputs / "sae.md"), "--exemplars", str(outputs / "ex.md")]
    args += ["--live", str(outputs / "live"), "--plot-training", str(outputs / "t.png")]
    args += ["--plot-density", str(outputs / "d.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((outputs / "sae.json").read_text())["baselines"].keys() == {"pca"}


def test_the_density_picture_puts_dead_features_in_their_own_bin(tmp_path):
    usage = torch.tensor([0.0, 0.0, 1.0, 10.0, 100.0])
    assert_picture(sae_stage.density_picture(usage, 100, tmp_path / "d.png"))
    with pytest.raises(ValueError, match="no eval rows"):
        sae_stage.density_picture(usage, 0, tmp_path / "e.png")
    with pytest.raises(ValueError, match="no data to plot"):
        sae_stage.density_picture(torch.zeros(0), 10, tmp_path / "f.png")
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "f.png").exists()
