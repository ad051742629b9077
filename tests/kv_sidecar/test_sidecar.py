"""The sidecar stage on a synthetic trajectories folder (layout: `kv_sidecar/layout.py`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.common.shards import Manifest, shard_name, write_shard
from pipeline.kv_sidecar import sidecar as stage
from pipeline.kv_sidecar.layout import TRAJECTORIES, kv_head_of_query_head, trajectory_key
from pipeline.kv_sidecar.losses import TERMS, total_loss
from pipeline.kv_sidecar.params import SidecarParams
from pipeline.kv_sidecar.report import sidecar_table
from pipeline.kv_sidecar.set_transformer import (
    BASELINE,
    build_sidecar,
    count_parameters,
    evaluate,
    forward_batch,
    load_sidecar,
    lr_factor,
    make_optimizer,
    mean_compressor,
    train_step,
)
from pipeline.kv_sidecar.trajectory_set import KVBatch, TrajectorySet, is_heldout
from tests.conftest import build_params

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
            tmp_path / "out",
            tmp_path / "m.json",
            tmp_path / "m.md",
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


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
        return evaluate(model, batches, params, 8)["sidecar"]["loss_total"]

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
    kb, vb = mean_compressor(keys, values)
    assert torch.allclose(kb[1, 2], keys[1, 2].mean(0)) and torch.allclose(
        vb[0, 3], values[0, 3].mean(0)
    )


def test_stage_writes_outputs_and_metrics_for_sidecar_and_baseline(trajectories, tmp_path):
    out, metrics, table = tmp_path / "sidecar", tmp_path / "m" / "sidecar.json", tmp_path / "t.md"
    params = build_params(sidecar=TINY)
    results = stage.run(params, trajectories, out, metrics, table)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "curves.csv",
        "eval_curves.csv",
        "model.safetensors",
    ]
    assert json.loads(metrics.read_text()) == results
    keys = {
        "jacobian_norm_dense", "jacobian_norm_compressed", "jacobian_ratio",
        "k_norm_dense", "k_norm_compressed", "v_norm_dense", "v_norm_compressed",
        "attention_entropy_dense", "attention_entropy_compressed", "attention_max_dense",
        "attention_max_compressed", "output_mse", "output_cosine", "loss_total",
        *(f"loss_{name}" for name in TERMS),
    }  # fmt: skip
    for name in ("sidecar", BASELINE):
        assert keys <= set(results[name])
    # The dense reference is the same data for both compressors.
    assert results["sidecar"]["jacobian_norm_dense"] == results[BASELINE]["jacobian_norm_dense"]
    base = results[BASELINE]
    assert base["loss_kv_match"] == pytest.approx(0.0, abs=1e-6)
    assert base["attention_entropy_compressed"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    heldout = int(is_heldout(torch.arange(24), 0.25, 1).sum())
    assert results["counts"] == {
        "layer": 1,
        "train_chunks": 24 - heldout,
        "heldout_chunks": heldout,
        "heldout_samples": 2 * heldout,
        "dense_tokens": 32,
        "super_tokens": 4,
        "window_size": 8,
        "queries_per_sample": 8,
    }
    with open(out / "curves.csv", newline="") as handle:
        curves = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in curves] == list(range(1, 13))
    assert {"lr", "loss", "jacobian_ratio", *TERMS} <= set(curves[0])
    assert float(curves[-1]["loss"]) == results["train"]["final_loss"]
    with open(out / "eval_curves.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [5, 10, 12]
    text = table.read_text()
    assert "| metric | dense | sidecar | baseline (window mean K, V) |" in text
    assert f"{results['counts']['heldout_samples']} samples" in text

    model, config = load_sidecar(out)
    assert config["head_dim"] == 8 and config["params"]["d_model"] == 32
    data = TrajectorySet(trajectories, layer=1, eval_fraction=0.25)
    again = evaluate(model, data.batches("heldout", 8, 8, shuffle=False), params.sidecar, 8)
    assert again["sidecar"]["loss_total"] == pytest.approx(results["sidecar"]["loss_total"])


def test_same_seed_same_weights(trajectories, tmp_path):
    params = build_params(sidecar={**TINY, "max_steps": 4})
    for name in ("a", "b"):
        stage.run(
            params, trajectories, tmp_path / name, tmp_path / f"{name}.json", tmp_path / "t.md"
        )
    first, second = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("preset", ["v1", "v2", "v3"])
def test_each_preset_trains(trajectories, tmp_path, preset):
    from pipeline.kv_sidecar.losses import PRESETS

    params = build_params(sidecar={**TINY, **PRESETS[preset], "max_steps": 3, "eval_every": 3})
    results = stage.run(
        params, trajectories, tmp_path / "o", tmp_path / "m.json", tmp_path / "t.md"
    )
    weights = params.sidecar.loss_weights
    expected = sum(weights[t] * results["sidecar"][f"loss_{t}"] for t in TERMS)
    assert results["sidecar"]["loss_total"] == pytest.approx(expected, rel=1e-5)


def test_command(trajectories, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"sidecar": {**TINY, "max_steps": 2}}))
    app = typer.Typer()
    app.command()(stage.command)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "--params", str(params), "--trajectories", str(trajectories), "--out", str(out),
            "--metrics", str(tmp_path / "m.json"), "--table", str(tmp_path / "m.md"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["train"]["steps"] == 2 and math.isfinite(metrics["sidecar"]["jacobian_ratio"])


def test_table_renders_missing_values():
    metrics = {"sidecar": {"jacobian_ratio": 0.5}, BASELINE: {"jacobian_ratio": None}}
    text = sidecar_table(metrics)
    assert "| Jacobian ratio (compressed / dense) |  | 0.5 | — |" in text
