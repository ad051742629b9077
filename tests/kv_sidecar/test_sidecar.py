"""The sidecar stage on a synthetic trajectories folder (layout: `kv_sidecar/layout.py`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.common.live import read_metric
from pipeline.common.run_info import split_info
from pipeline.common.shards import Manifest, shard_name, write_shard
from pipeline.common.splits import is_heldout
from pipeline.common.summary import check_entry
from pipeline.inputs import corpus as corpus_stage
from pipeline.inputs.params import CorpusParams
from pipeline.kv_sidecar import sidecar as stage
from pipeline.kv_sidecar import trajectories as trajectories_stage
from pipeline.kv_sidecar.compressors import (
    ATTENTION_MASS,
    BASELINES,
    KEY_NORM_MIN,
    SIDECAR,
    WINDOW_MEAN,
    sidecar_compressor,
    window_mean,
)
from pipeline.kv_sidecar.layout import TRAJECTORIES, kv_head_of_query_head, trajectory_key
from pipeline.kv_sidecar.losses import TERMS, total_loss
from pipeline.kv_sidecar.params import SidecarParams, TrajectoriesParams
from pipeline.kv_sidecar.report import ranking, sidecar_table, summary
from pipeline.kv_sidecar.set_transformer import (
    EVAL_CURVE_KEYS,
    build_sidecar,
    count_parameters,
    evaluate,
    forward_batch,
    load_sidecar,
    lr_factor,
    make_optimizer,
    train_step,
)
from pipeline.kv_sidecar.trajectory_set import KVBatch, TrajectorySet
from tests.conftest import build_params
from tests.picture_checks import assert_picture
from tests.tables import squeeze
from tests.tiny_teachers import tiny_teacher

SIZES = dict(n_heads=4, n_kv_heads=2, head_dim=8, window_size=8, num_windows=4, num_queries=4)
TINY = {
    "layer": 1,
    "d_model": 32,
    "num_heads": 2,
    "num_layers": 1,
    "num_inducing": 4,
    "lr": 3e-3,
    "warmup_steps": 5,
    "max_steps": 12,
    "batch_size": 8,
    "buffer_samples": 32,
    "eval_fraction": 0.25,
    "eval_every": 5,
    "eval_batches": 2,
    "device": "cpu",
}


def make_trajectories(
    folder: Path,
    num_chunks: int = 24,
    layers: tuple[int, ...] = (1, 2),
    force_space: str = "kv",
    shard_rows: int = 8,
    hidden_size: int = 32,
    seed: int = 0,
    n_heads: int = SIZES["n_heads"],
    n_kv_heads: int = SIZES["n_kv_heads"],
    head_dim: int = SIZES["head_dim"],
    window_size: int = SIZES["window_size"],
    num_windows: int = SIZES["num_windows"],
    num_queries: int = SIZES["num_queries"],
) -> Path:
    """A trajectories folder with LLM-like structure: keys of norm ~7 with a shared offset
    and a per-window centre, small values that depend on the keys, queries that point
    along the keys of one window (so dense attention is neither uniform nor one-hot)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokens, mapping = num_windows * window_size, kv_head_of_query_head(n_heads, n_kv_heads)
    value_map = torch.randn(head_dim, head_dim, generator=gen) / head_dim**0.5

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def layer_tensors(rows: int) -> dict[str, torch.Tensor]:
        offset = 2.0 * randn(1, 1, n_kv_heads, head_dim)
        centres = 1.5 * randn(rows, num_windows, 1, n_kv_heads, head_dim)
        keys = offset + (centres + randn(rows, num_windows, window_size, n_kv_heads, head_dim))
        keys = keys.flatten(1, 2)  # (R, W*S, n_kv, d)
        values = 0.3 * (keys @ value_map) + 0.1 * randn(rows, tokens, n_kv_heads, head_dim)
        pick = torch.randint(0, num_windows, (rows, num_queries, n_heads), generator=gen)
        kv_keys = keys[:, :, mapping]  # (R, W*S, n_heads, d)
        window_means = kv_keys.unflatten(1, (num_windows, window_size)).mean(2)
        target = torch.gather(
            window_means, 1, pick[..., None].expand(-1, -1, -1, head_dim)
        )  # (R, Q, n_heads, d)
        queries = 0.4 * target + 0.5 * randn(rows, num_queries, n_heads, head_dim)
        scale = torch.rand(rows, num_queries, n_heads, 1, generator=gen) * 2.0
        force_q = scale * randn(rows, num_queries, n_heads, head_dim)
        if force_space == "hidden":
            return {
                "keys": keys,
                "values": values,
                "queries": queries,
                "force_hidden": randn(rows, tokens, hidden_size),
                "force_queries": force_q.flatten(2),
            }
        return {
            "keys": keys,
            "values": values,
            "queries": queries,
            "force_keys": randn(rows, tokens, n_kv_heads, head_dim),
            "force_values": randn(rows, tokens, n_kv_heads, head_dim),
            "force_queries": force_q,
        }

    records = []
    for index, start in enumerate(range(0, num_chunks, shard_rows)):
        rows = min(shard_rows, num_chunks - start)
        tensors = {"chunk_id": torch.arange(start, start + rows)}
        for layer in layers:
            tensors |= {trajectory_key(layer, k): v for k, v in layer_tensors(rows).items()}
        records.append(write_shard(folder / shard_name(index), tensors))
    Manifest(
        kind=TRAJECTORIES,
        params={},
        shards=records,
        extra={
            "model": "synthetic",
            "revision": None,
            "layers": list(layers),
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads,
            "head_dim": head_dim,
            "hidden_size": hidden_size,
            "window_size": window_size,
            "num_windows": num_windows,
            "num_queries": num_queries,
            "force_space": force_space,
            "rope": "after",
            "kv_head_of_query_head": mapping,
            "block_chunks": 1,
        },
    ).save(folder)
    return folder


@pytest.fixture
def trajectories(tmp_path) -> Path:
    return make_trajectories(tmp_path / "trajectories")


def sidecar_params(**overrides) -> SidecarParams:
    return build_params(sidecar={**TINY, **overrides}).sidecar


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> tuple[Path, Path]:
    """(trajectories, corpus) of the tiny Llama (8 query heads, 2 KV heads, head_dim 8):
    24 chunks of 4 windows x 8 tokens + 4 future positions + 1, layers 1 and 2."""
    root = tmp_path_factory.mktemp("teacher_run")
    llama = tiny_teacher("llama")
    corpus_params = CorpusParams(
        source="builtin", model=llama, chunk_tokens=37, max_chunks=24, block_chunks=1
    )
    corpus_stage.run(corpus_params, root / "corpus")
    params = TrajectoriesParams(
        model=llama, layers=(1, 2), window_size=8, num_windows=4, num_queries=4,
        max_chunks=24, compute_dtype="float32", storage_dtype="float32", shard_rows=8,
        batch_size=8, device="cpu",
    )  # fmt: skip
    trajectories_stage.run(params, root / "corpus", root / "trajectories")
    return root / "trajectories", root / "corpus"


def stage_paths(tmp_path: Path, name: str = "out") -> dict[str, Path]:
    """The stage's output paths by keyword, all under `tmp_path`."""
    return {
        "out": tmp_path / name,
        "live": tmp_path / "live" / name,
        "metrics": tmp_path / f"{name}.json",
        "table": tmp_path / f"{name}.md",
        "plot_training": tmp_path / "plots" / f"{name}_training.png",
        "plot_lm_loss": tmp_path / "plots" / f"{name}_lm_loss.png",
    }


def run_stage(params, teacher_run, tmp_path, name="out"):
    folder, corpus = teacher_run
    return stage.run(params, folder, corpus, **stage_paths(tmp_path, name))


@pytest.mark.parametrize("force_space", ["kv", "hidden"])
def test_samples_are_chunk_kv_head_pairs_with_their_gqa_queries(tmp_path, force_space):
    folder = make_trajectories(tmp_path / "t", force_space=force_space, num_chunks=10)
    data = TrajectorySet(folder, layer=2, eval_fraction=0.3)
    record = data.manifest.shards[0]
    shard = load_file(str(folder / record.file))
    names = ("keys", "values", "queries", "force_queries")
    raw = {name: shard[trajectory_key(2, name)] for name in names}
    heldout = is_heldout(torch.arange(8), 0.3, 1)
    train = data.shard_samples(record, "train")
    chunks = torch.arange(8)[~heldout]
    assert train.chunk_id.tolist() == chunks.repeat_interleave(2).tolist()
    assert train.kv_head.tolist() == [0, 1] * len(chunks)
    assert train.keys.shape == (2 * len(chunks), 32, 8) and train.queries.shape[1:] == (8, 8)
    force = raw["force_queries"].reshape(8, 4, 4, 8).norm(dim=-1)  # (R, Q, heads)
    for row, (chunk, kv) in enumerate(zip(train.chunk_id, train.kv_head, strict=True)):
        assert torch.equal(train.keys[row], raw["keys"][chunk, :, kv])
        assert torch.equal(train.values[row], raw["values"][chunk, :, kv])
        heads = [h for h in range(4) if h // 2 == kv]  # kv_head_of_query_head, group 2
        for m in range(8):
            query, head = divmod(m, 2)
            assert torch.equal(train.queries[row, m], raw["queries"][chunk, query, heads[head]])
            assert train.force_norms[row, m] == pytest.approx(
                float(force[chunk, query, heads[head]])
            )


def test_heldout_split_is_stable_and_batches_cover_each_sample_once(trajectories):
    data = TrajectorySet(trajectories, layer=1, eval_fraction=0.25)
    ids = torch.arange(24)
    assert torch.equal(is_heldout(ids[5:], 0.25, 1), is_heldout(ids, 0.25, 1)[5:])  # per chunk
    counts = data.chunk_counts()
    heldout = int(is_heldout(ids, 0.25, 1).sum())
    assert counts == {"heldout": heldout, "train": 24 - counts["heldout"]}
    assert 0 < counts["heldout"] < 24
    seen = {}
    for split in ("train", "heldout"):
        batches = list(data.batches(split, 5, buffer_samples=6, shuffle=True, seed=3))
        assert all(len(b) <= 5 for b in batches)
        pairs = [
            (int(c), int(h)) for b in batches for c, h in zip(b.chunk_id, b.kv_head, strict=True)
        ]
        assert len(pairs) == len(set(pairs)) == 2 * counts[split]
        seen[split] = {c for c, _ in pairs}
    assert not seen["train"] & seen["heldout"] and len(seen["train"] | seen["heldout"]) == 24
    again = [b.chunk_id for b in data.batches("train", 5, 6, shuffle=True, seed=3)]
    first = [b.chunk_id for b in data.batches("train", 5, 6, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


def test_reader_errors_name_the_problem(trajectories, tmp_path):
    with pytest.raises(ValueError, match=r"layer 7 is not stored \(sidecar.layer\).*\[1, 2\]"):
        TrajectorySet(trajectories, layer=7, eval_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TrajectorySet(tmp_path / "nowhere", layer=1, eval_fraction=0.1)
    # 64 divides the params' 4 x 64 windows (checked when loading) but not the 32 dense
    # tokens this dump stores: the reader checks the dump itself.
    with pytest.raises(ValueError, match="sidecar.window_size=64 does not divide the 32"):
        stage.run(
            build_params(sidecar={**TINY, "window_size": 64}),
            trajectories,
            tmp_path / "no-corpus",
            **stage_paths(tmp_path),
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()
    assert not (tmp_path / "live").exists() and not (tmp_path / "plots").exists()


def test_seed_architecture_parameter_count():
    model = build_sidecar(SidecarParams(), head_dim=64)  # TinyLlama: d_head 64 -> input 128
    parts = {name: count_parameters(module) for name, module in model.named_children()}
    print(f"sidecar parameters at d_head 64: {count_parameters(model):,} {parts}")
    # 3 pre-LN encoder layers: 3 x (attn 263,168 + FFN 525,568 + 2 LN 1,024)
    assert parts["encoder"] == 3 * 789_760
    # ISAB: 8 x 256 inducing points + 2 MABs; PMA: 1 seed + 1 MAB; MAB = attn + FFN + 3 LN
    assert parts["isab"] == 8 * 256 + 2 * 790_272 and parts["pma"] == 256 + 790_272
    assert parts["embed"] == 128 * 256 + 256 and parts["head"] == 256 * 128 + 128
    # The seed reports 4,374,144 without its block layout; ours is 434,688 (9.9%) larger.
    assert count_parameters(model) == 4_808_832


def test_sidecar_is_a_set_function_per_window():
    model = build_sidecar(sidecar_params(), head_dim=8).eval()
    keys, values = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    k_cg, v_cg = model(keys, values)
    assert k_cg.shape == v_cg.shape == (2, 3, 8)
    perm = torch.randperm(8)
    k_perm, v_perm = model(keys[:, :, perm], values[:, :, perm])
    assert torch.allclose(k_perm, k_cg, atol=1e-5) and torch.allclose(v_perm, v_cg, atol=1e-5)
    changed = keys.clone()
    changed[:, 0] += 1.0  # window 0 only
    k_changed, _ = model(changed, values)
    assert torch.equal(k_changed[:, 1:], k_cg[:, 1:]) and not torch.equal(
        k_changed[:, 0], k_cg[:, 0]
    )


def test_gradients_reach_the_sidecar_and_not_the_frozen_model():
    # A frozen "teacher" that produces the dense K/V/Q in the same graph.
    teacher = torch.nn.Linear(16, 3 * 8)
    teacher.requires_grad_(False)
    teacher.weight.requires_grad_(True)  # even a trainable-looking teacher gets no gradient
    hidden = torch.randn(4, 32, 16, requires_grad=True)
    k, v, q = teacher(hidden).split(8, dim=-1)
    batch = KVBatch(
        torch.arange(4), torch.zeros(4, dtype=torch.long), k, v, q[:, :6], torch.rand(4, 6)
    )
    params = sidecar_params()
    model = build_sidecar(params, head_dim=8)
    _, terms = forward_batch(model, batch, params, window_size=8)
    total_loss(terms, params).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert teacher.weight.grad is None and hidden.grad is None


def test_lr_schedule_warms_up_then_decays():
    assert [lr_factor(s, 4, 12) for s in (0, 3)] == [0.25, 1.0]
    assert lr_factor(4, 4, 12) == 1.0 and lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)


@pytest.mark.slow
def test_a_few_hundred_steps_reduce_the_heldout_loss(trajectories):
    params = sidecar_params(max_steps=200, warmup_steps=20, lr=3e-3, batch_size=16)
    data = TrajectorySet(trajectories, layer=1, eval_fraction=params.eval_fraction)
    torch.manual_seed(0)
    model = build_sidecar(params, head_dim=8)

    def heldout_loss() -> float:
        batches = data.batches("heldout", 64, 64, shuffle=False)
        sidecar = {SIDECAR: sidecar_compressor(model, params.scale_normalize)}
        return evaluate(sidecar, batches, params, 8)[SIDECAR]["loss_total"]

    before = heldout_loss()
    optimizer, schedule = make_optimizer(model, params)
    rows, step = [], 0
    while step < params.max_steps:
        for batch in data.batches("train", 16, 64, shuffle=True, seed=step):
            rows.append(train_step(model, optimizer, schedule, batch, params, 8)["loss"])
            step += 1
            if step == params.max_steps:
                break
    after = heldout_loss()
    assert sum(rows[-20:]) / 20 < 0.5 * sum(rows[:20]) / 20
    assert after < 0.5 * before


def test_mean_baseline_is_each_windows_mean():
    keys, values = torch.randn(2, 4, 8, 3), torch.randn(2, 4, 8, 3)
    kb, vb = window_mean(keys, values)
    assert torch.allclose(kb[1, 2], keys[1, 2].mean(0)) and torch.allclose(
        vb[0, 3], values[0, 3].mean(0)
    )


COMPRESSORS = (SIDECAR, *BASELINES)


def test_stage_writes_outputs_and_metrics_for_every_compressor(teacher_run, tmp_path, capsys):
    folder, corpus = teacher_run
    paths = stage_paths(tmp_path, "sidecar")
    out, live, metrics, table = (paths[k] for k in ("out", "live", "metrics", "table"))
    params = build_params(sidecar=TINY)
    results = stage.run(params, folder, corpus, **paths)
    log = capsys.readouterr().err  # each long loop's bar, named by the layer
    layer = params.sidecar.layer
    for bar in (f"seed {params.sidecar.seed}", "LM loss", "held-out scores"):
        assert f"sidecar layer {layer} {bar}: " in log, bar

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "info.json",
        "model.safetensors",
    ]
    measured, info = json.loads(metrics.read_text()), json.loads((out / "info.json").read_text())
    assert (measured, info) == split_info(results, ("teacher", "scale_normalize", "counts.layer"))
    assert info["counts"] == {"layer": results["counts"]["layer"]} and "teacher" in info
    assert "teacher" not in measured and "layer" not in measured["counts"]
    keys = {
        "jacobian_rel_error", "jacobian_norm_dense", "jacobian_norm_compressed",
        "jacobian_ratio", "k_norm_dense", "k_norm_compressed", "v_norm_dense",
        "v_norm_compressed", "attention_entropy_dense", "attention_entropy_compressed",
        "attention_max_dense", "attention_max_compressed", "output_mse", "output_cosine",
        "loss_total", "lm_loss", "lm_loss_increase", "lm_loss_increase_interval",
        *(f"loss_{name}" for name in TERMS),
    }  # fmt: skip
    compressors = results["compressors"]
    assert sorted(compressors) == sorted(COMPRESSORS)
    for name in COMPRESSORS:
        assert keys <= set(compressors[name])
        c = compressors[name]
        assert c["lm_loss_increase"] == pytest.approx(c["lm_loss"] - results["dense"]["lm_loss"])
        low, high = c["lm_loss_increase_interval"]
        assert low <= c["lm_loss_increase"] <= high
    # The dense reference is the same data for every compressor.
    assert len({compressors[n]["jacobian_norm_dense"] for n in COMPRESSORS}) == 1
    base = compressors[WINDOW_MEAN]
    assert base["loss_kv_match"] == pytest.approx(0.0, abs=1e-6)
    assert base["attention_entropy_compressed"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    # per_sample: the sidecar's mean norms match by construction; the selections keep
    # real tokens, so their norms are those of actual cached tokens (not rescaled).
    assert compressors[SIDECAR]["k_norm_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert compressors[KEY_NORM_MIN]["k_norm_ratio"] < 1.0  # the lowest norm of each window
    assert compressors[ATTENTION_MASS]["k_norm_ratio"] != pytest.approx(1.0, abs=1e-6)
    heldout = int(is_heldout(torch.arange(24), 0.25, 1).sum())
    assert results["counts"] == {
        "layer": 1,
        "train_chunks": 24 - heldout,
        "heldout_chunks": heldout,
        "heldout_samples": 2 * heldout,
        "dense_tokens": 32,
        "super_tokens": 4,
        "window_size": 8,
        "queries_per_sample": 16,
        "lm_chunks": heldout,
    }
    assert results["ranking"] == sorted(
        COMPRESSORS, key=lambda n: (compressors[n]["lm_loss_increase"], n)
    )
    assert results["summary"] == summary(results)
    assert results["teacher"]["model"] == tiny_teacher("llama")
    # dvclive: train/<column> every step, heldout/<column> every eval_every and at the end.
    tsvs = {str(p.relative_to(live / "plots/metrics"))[:-4] for p in live.rglob("*.tsv")}
    assert {"train/lr", "train/loss", "train/jacobian_ratio"} <= tsvs
    assert {f"train/{name}" for name in TERMS} <= tsvs
    assert {f"heldout/{key}" for key in EVAL_CURVE_KEYS} <= tsvs
    steps, losses = read_metric(live, "train/loss")
    assert steps == list(range(1, 13)) and losses[-1] == results["train"]["final_loss"]
    assert losses[0] == results["train"]["first_loss"]
    assert (live / "plots/metrics/train/loss.tsv").read_text().splitlines()[0] == "step\tloss"
    assert read_metric(live, "heldout/jacobian_ratio")[0] == [5, 10, 12]
    last = json.loads((live / "metrics.json").read_text())
    assert last["step"] == 12 and last["train"]["loss"] == losses[-1]
    assert set(last["heldout"]) == set(EVAL_CURVE_KEYS)
    for name in ("plot_training", "plot_lm_loss"):
        assert_picture(paths[name])
    text = table.read_text()
    assert f"on {heldout} held-out chunks ({2 * heldout} samples" in text
    assert text == sidecar_table(results)

    model, config = load_sidecar(out)
    assert config["head_dim"] == 8 and config["params"]["d_model"] == 32
    data = TrajectorySet(folder, layer=1, eval_fraction=0.25)
    sidecar = {SIDECAR: sidecar_compressor(model, "per_sample")}
    again = evaluate(sidecar, data.batches("heldout", 8, 8, shuffle=False), params.sidecar, 8)
    assert again[SIDECAR]["loss_total"] == pytest.approx(compressors[SIDECAR]["loss_total"])


def test_stage_refuses_a_corpus_the_trajectories_did_not_come_from(teacher_run, tmp_path):
    folder, _ = teacher_run
    other = tmp_path / "corpus"
    corpus_stage.run(
        CorpusParams(source="builtin", model=tiny_teacher("llama"), chunk_tokens=37,
                     max_chunks=24, seed=1),
        other,
    )  # fmt: skip
    with pytest.raises(ValueError, match="is not the corpus .* computed from"):
        stage.run(build_params(sidecar=TINY), folder, other, **stage_paths(tmp_path))


def test_same_seed_same_weights(teacher_run, tmp_path):
    params = build_params(sidecar={**TINY, "max_steps": 4})
    first, second = (run_stage(params, teacher_run, tmp_path, name) for name in ("a", "b"))
    assert first["compressors"] == second["compressors"]
    weights = [load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("preset", ["v1", "v2", "v3"])
def test_each_preset_trains(teacher_run, tmp_path, preset):
    from pipeline.kv_sidecar.losses import PRESETS

    params = build_params(sidecar={**TINY, **PRESETS[preset], "max_steps": 3, "eval_every": 3})
    results = run_stage(params, teacher_run, tmp_path)
    weights = params.sidecar.loss_weights
    sidecar = results["compressors"][SIDECAR]
    expected = sum(weights[t] * sidecar[f"loss_{t}"] for t in TERMS)
    assert sidecar["loss_total"] == pytest.approx(expected, rel=1e-5)


def test_command(teacher_run, tmp_path):
    folder, corpus = teacher_run
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"sidecar": {**TINY, "max_steps": 2}}))
    app = typer.Typer()
    app.command()(stage.command)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "--params", str(params), "--trajectories", str(folder), "--corpus", str(corpus),
            "--out", str(out), "--metrics", str(tmp_path / "m.json"),
            "--table", str(tmp_path / "m.md"), "--live", str(tmp_path / "live"),
            "--plot-training", str(tmp_path / "a.png"), "--plot-lm-loss", str(tmp_path / "b.png"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["train"]["steps"] == 2
    assert math.isfinite(metrics["compressors"][SIDECAR]["lm_loss_increase"])


def hand_metrics(mode: str = "per_sample") -> dict:
    """A metrics dict as the stage writes it, with round numbers."""

    def compressor(increase, interval, **extra):
        return {"lm_loss": 3.0 + increase, "lm_loss_increase": increase,
                "lm_loss_increase_interval": interval, "jacobian_rel_error": 0.5,
                "jacobian_ratio": 0.8, "output_cosine": 0.9, "k_norm_ratio": 1.0,
                "v_norm_ratio": 1.0, "jacobian_norm_dense": 0.25} | extra  # fmt: skip

    metrics = {
        "dense": {"lm_loss": 3.0},
        "compressors": {
            SIDECAR: compressor(0.25, [0.125, 0.375]),
            WINDOW_MEAN: compressor(0.5, [0.25, 0.75], k_norm_ratio=0.35),
            KEY_NORM_MIN: compressor(0.125, [0.0625, 0.1875], k_norm_ratio=None),
            ATTENTION_MASS: compressor(1.0, [0.5, 1.5]),
        },
        "counts": {
            "layer": 11,
            "window_size": 64,
            "lm_chunks": 40,
            "heldout_samples": 160,
            "dense_tokens": 256,
            "super_tokens": 4,
            "queries_per_sample": 128,
        },  # fmt: skip
        "teacher": {"model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "revision": "abc"},
        "scale_normalize": mode,
    }
    metrics["ranking"] = ranking(metrics["compressors"])
    return metrics


def test_the_lm_loss_picture_draws_every_compressor_and_needs_one(tmp_path):
    results = {
        "ranking": ["window_mean", "sidecar"],
        "compressors": {
            "window_mean": {"lm_loss_increase": 0.1, "lm_loss_increase_interval": [0.05, 0.2]},
            "sidecar": {"lm_loss_increase": 0.3, "lm_loss_increase_interval": [float("nan")] * 2},
        },
    }
    assert_picture(stage.lm_loss_picture(results, tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"y.png: no data to plot .*no bars"):
        stage.lm_loss_picture({"ranking": [], "compressors": {}}, tmp_path / "y.png")


def test_summary_block_on_hand_built_metrics():
    metrics = hand_metrics()
    assert metrics["ranking"] == [KEY_NORM_MIN, SIDECAR, WINDOW_MEAN, ATTENTION_MASS]
    (block,) = summary(metrics)
    assert block == {
        "branch": "kv_sidecar",
        "metric": "sidecar LM loss increase over dense (nats/token, layer 11, 64x compression)",
        "value": 0.25,
        "interval": [0.125, 0.375],
        "interval_kind": ("paired bootstrap 95% (BCa, 10,000 resamples over held-out chunks)"),
        # the best training-free baseline, even where it beats the sidecar
        "control": "best training-free baseline: lowest-key-norm token (Devoto et al. 2024)",
        "control_value": 0.125,
        "control_interval": [0.0625, 0.1875],
        "downstream": "dense LM loss at the future positions (nats/token)",
        "downstream_value": 3.0,
        "teacher": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "n": 40,
        "caveat": None,
    }
    check_entry(block, "sidecar")


def test_table_ranks_by_lm_loss_increase_and_footnotes_ratios_by_construction():
    text = squeeze(sidecar_table(hand_metrics()))
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1] for row in rows] == [
        "lowest-key-norm token (Devoto et al. 2024)",
        "sidecar (trained)",
        "window mean K, V",
        "largest-attention-mass token (H2O/SnapKV-style)",
    ]
    assert rows[1] == (
        "| 2 | sidecar (trained) | 3.25 | +0.25 [+0.125, +0.375] | 0.5 | 0.8 | 0.9 | 1 ³ | 1 ³ |"
    )
    assert rows[0].endswith("| 0.9 | — | 1 |")  # a missing ratio renders as a dash
    assert "Dense LM loss at the future positions: 3 nats/token" in text
    assert "³ 1 by construction of sidecar.scale_normalize: per_sample" in text
    plain = squeeze(sidecar_table(hand_metrics("none")))
    assert "³" not in plain and "| 1 | 1 |" in plain


def test_the_lm_pass_compresses_the_stored_keys_and_values(teacher_run):
    """The super-tokens are built from the live K/V of the spliced block: the same
    post-RoPE, per-KV-head tensors the trajectories stage stored for that chunk."""
    from pipeline.common.teacher import load_causal_lm
    from pipeline.inputs.text_chunks import CorpusChunks
    from pipeline.kv_sidecar.compressors import Compressor
    from pipeline.kv_sidecar.lm_loss import heldout_lm_losses

    folder, corpus = teacher_run
    data = TrajectorySet(folder, layer=2, eval_fraction=0.25)
    batch = next(data.batches("heldout", 64, 64, shuffle=False))  # every held-out sample
    tokens = CorpusChunks(corpus).tokens_of(batch.chunk_id.unique())
    seen = []

    def record(keys, values, mass):
        seen.append((keys.clone(), values.clone()))
        return window_mean(keys, values)

    model, _ = load_causal_lm(tiny_teacher("llama"), None)
    lm = heldout_lm_losses(model, tokens, 2, 32, 8, {"r": Compressor("r", record)}, 64)
    keys, values = seen[0]  # (chunks x KV heads, 4 windows, 8, d), chunk-major
    row = {
        (c, h): i
        for i, (c, h) in enumerate(
            zip(batch.chunk_id.tolist(), batch.kv_head.tolist(), strict=True)
        )
    }
    for i, chunk in enumerate(lm.chunk_ids):
        for head in range(2):
            stored = row[(chunk, head)]
            assert torch.allclose(keys[2 * i + head].flatten(0, 1), batch.keys[stored], atol=1e-5)
            assert torch.allclose(
                values[2 * i + head].flatten(0, 1), batch.values[stored], atol=1e-5
            )
