"""The distill stage and its training loop, on the synthetic linear directions folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.common.live import read_metric
from pipeline.concepts import distill
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import RunParams, TrainParams
from pipeline.concepts.students import build_model, load_student
from pipeline.concepts.training import evaluate_cos, fit, train_epoch
from tests.conftest import build_params

RUNS = {
    "probe": {"approach": "linear_probe"},
    "frozen": {"approach": "frozen_mlp", "hidden_dim": 8},
    "tiny": {"approach": "trainable", "embed_dim": 4, "hidden_dim": 8},
}
FAST = {"layer": 2, "epochs": 3, "batch_size": 32, "lr": 0.01, "buffer_rows": 64}


def params(**train):
    return build_params(
        directions={"layers": [2]},
        distill={"train": {**FAST, **train}, "runs": RUNS},
    )


def probe(directions: DirectionSet):
    return build_model(
        RunParams("linear_probe"),
        directions.vocab_size,
        directions.dim,
        directions.embedding_token_ids,
        directions.embedding_rows,
    )


def test_linear_probe_learns_linear_targets(direction_set):
    # Targets are W @ mean(embedding rows) - mean: a linear probe can fit them exactly.
    directions = DirectionSet(direction_set, layer=2)
    torch.manual_seed(0)
    model = probe(directions)
    train = TrainParams(
        layer=2, epochs=40, batch_size=16, lr=0.03, weight_decay=0.0, buffer_rows=64
    )
    result = fit(model, directions, train, seed=0)

    val = [row["val_cos"] for row in result.curves]
    assert [row["epoch"] for row in result.curves] == list(range(1, 41))
    assert result.best_val_cos == max(val) > 0.95
    assert val[result.best_epoch - 1] == result.best_val_cos
    assert result.curves[-1]["train_loss"] < result.curves[0]["train_loss"]
    # fit leaves the best weights in the model, and they are the returned state.
    assert evaluate_cos(model, directions, "val", 7) == pytest.approx(result.best_val_cos, abs=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.state_dict[key])


def test_train_epoch_reports_mean_loss_and_cos(direction_set):
    directions = DirectionSet(direction_set, layer=2)
    model = probe(directions)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model is unchanged
    batches = list(directions.batches("train", 32, 64, shuffle=True, seed=3))
    loss, cos = train_epoch(model, optimizer, directions, batches)
    assert loss == pytest.approx(1 - cos)
    assert cos == pytest.approx(evaluate_cos(model, directions, "train", 50), abs=1e-5)


def test_stage_writes_checkpoint_config_and_curves(direction_set, tmp_path):
    out, live = tmp_path / "frozen", tmp_path / "live" / "frozen"
    summary = distill.run(params(), "frozen", direction_set, out, live)

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "seeds"]
    seed_dir = out / "seeds" / "0"
    written = sorted(p.name for p in seed_dir.iterdir())
    assert written == ["config.json", "model.safetensors"]
    # dvclive: the seed's folder, and the run's mean over seeds beside it.
    assert sorted(p.name for p in live.iterdir()) == ["metrics.json", "plots", "seeds"]
    seed_live = live / "seeds" / "0"
    tsvs = sorted(str(p.relative_to(seed_live)) for p in seed_live.rglob("*.tsv"))
    assert tsvs == [f"plots/metrics/{name}.tsv" for name in ("train_cos", "train_loss", "val_cos")]
    lines = (seed_live / "plots/metrics/val_cos.tsv").read_text().splitlines()
    assert lines[0] == "step\tval_cos" and len(lines) - 1 == FAST["epochs"]
    steps, val = read_metric(seed_live, "val_cos")
    assert steps == [1, 2, 3]
    # One seed: the run's mean curves are that seed's curves.
    for name in ("train_loss", "train_cos", "val_cos"):
        assert read_metric(live, name) == read_metric(seed_live, name)
    last = json.loads((live / "metrics.json").read_text())
    assert last == {"step": 3, "val_cos": val[-1]} | {
        name: read_metric(live, name)[1][-1] for name in ("train_loss", "train_cos")
    }
    config = json.loads((seed_dir / "config.json").read_text())
    assert config["run"] == "frozen" and config["approach"] == "frozen_mlp"
    assert config["seed"] == 0
    assert config["trainable_params"] == 8 * 8 + 8 + 8 * 16 + 16 == summary["trainable_params"]
    assert config["inference_bytes"] == (config["trainable_params"] + 50 * 8) * 4
    assert config["train"]["epochs"] == FAST["epochs"] and config["layer"] == 2
    best = summary["per_seed"]["0"]
    assert best["best_val_cos"] == max(val) == config["best_val_cos"]
    assert val[best["best_epoch"] - 1] == best["best_val_cos"]
    run_config = json.loads((out / "config.json").read_text())
    assert run_config["seeds"] == [0] and run_config["per_seed"] == summary["per_seed"]
    assert run_config["trainable_params"] == config["trainable_params"]

    model, _ = load_student(seed_dir, directions := DirectionSet(direction_set, layer=2))
    assert evaluate_cos(model, directions, "val", 64) == pytest.approx(best["best_val_cos"])


def test_each_seed_trains_its_own_student_and_curves_are_their_mean(direction_set, tmp_path):
    out, live = tmp_path / "tiny", tmp_path / "live"
    (live / "seeds" / "9").mkdir(parents=True)  # a stale seed of an earlier run
    summary = distill.run(params(seeds=[5, 6]), "tiny", direction_set, out, live)
    assert sorted(summary["per_seed"]) == ["5", "6"]
    assert sorted(p.name for p in (live / "seeds").iterdir()) == ["5", "6"]
    curves = {seed: read_metric(live / "seeds" / seed, "val_cos")[1] for seed in ("5", "6")}
    steps, mean = read_metric(live, "val_cos")
    assert steps == [1, 2, 3]
    for epoch, value in enumerate(mean):
        assert value == pytest.approx((curves["5"][epoch] + curves["6"][epoch]) / 2)
    assert curves["5"] != curves["6"]


def test_same_seed_same_weights(direction_set, tmp_path):
    for name in ("a", "b"):
        distill.run(params(seeds=[5]), "tiny", direction_set, tmp_path / name, tmp_path / "live")
    first, second = (load_file(str(tmp_path / n / "seeds/5/model.safetensors")) for n in "ab")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Seed 5 trained beside seed 6 is the same student as seed 5 alone.
    distill.run(params(seeds=[6, 5]), "tiny", direction_set, tmp_path / "c", tmp_path / "live")
    again = load_file(str(tmp_path / "c/seeds/5/model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    third = load_file(str(tmp_path / "c/seeds/6/model.safetensors"))
    assert not torch.equal(first["embedding.weight"], third["embedding.weight"])


@pytest.mark.parametrize(("seeds", "match"), [([], "seeds is empty"), ([1, 1], "repeats")])
def test_seeds_must_be_given_and_distinct(seeds, match):
    with pytest.raises(ValueError, match=match):
        TrainParams(seeds=tuple(seeds))


def test_unknown_run_is_named_and_writes_nothing(direction_set, tmp_path):
    with pytest.raises(ValueError, match=r"'nope'.*\['frozen', 'probe', 'tiny'\]"):
        distill.run(params(), "nope", direction_set, tmp_path / "out", tmp_path / "live")
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()


def test_missing_layer_fails_before_writing(direction_set, tmp_path):
    bad = build_params(
        directions={"layers": [3]}, distill={"train": {**FAST, "layer": 3}, "runs": RUNS}
    )
    with pytest.raises(ValueError, match="layer 3 is not cached"):
        distill.run(bad, "probe", direction_set, tmp_path / "out", tmp_path / "live")
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()


def test_command_line(direction_set, tmp_path):
    import typer

    app = typer.Typer()
    app.command()(distill.command)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "directions": {"layers": [2]},
                "distill": {"train": {**FAST, "epochs": 1}, "runs": RUNS},
            }
        )
    )
    out = tmp_path / "probe"
    args = [
        "--params",
        str(params_file),
        "--run",
        "probe",
        "--directions",
        str(direction_set),
        "--out",
        str(out),
        "--live",
        str(tmp_path / "live"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "seeds/0/model.safetensors").is_file()
    assert read_metric(tmp_path / "live", "val_cos")[0] == [1]
    config = json.loads((out / "config.json").read_text())
    assert config["run"] == "probe" and config["train"]["epochs"] == 1
    assert config["per_seed"]["0"]["best_epoch"] == 1
    # The log line rounds to the table's precision (4 decimals), not a raw float.
    best = config["per_seed"]["0"]["best_val_cos"]
    assert f"best val cos seed 0 {best:.4f} (epoch 1) -> {out}" in result.output
    assert repr(best) not in result.output
