"""The evaluate stage end to end on a synthetic directions folder with hand-made checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.common.checkpoints import save_checkpoint
from pipeline.common.intervals import t_interval
from pipeline.common.io import write_json
from pipeline.common.live import log_row, open_live
from pipeline.concepts.evaluate import run
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import RunParams
from pipeline.concepts.scores import concept_embeddings, mean_cosine
from pipeline.concepts.students import (
    build_model,
    count_trainable,
    inference_bytes,
    seed_folder,
)
from tests.conftest import build_params, make_direction_set
from tests.picture_checks import assert_picture
from tests.tables import squeeze

LAYER = 2
RUNS = {
    "linear_probe": {"approach": "linear_probe"},
    "tiny": {"approach": "trainable", "embed_dim": 4, "hidden_dim": 8},
}
# What every row has, trained or baseline.
BASELINES = (
    "baseline_train_mean",
    "baseline_knn",
    "baseline_char_ngrams",
    "baseline_token_count",
)
BASELINE_KEYS = {
    "train_cos",
    "val_cos",
    "test_cos",
    "gap",
    "test_top1",
    "test_top10",
    "test_seen_cos",
    "test_unseen_cos",
    "test_seen_top1",
    "test_unseen_top1",
    "test_seen_top10",
    "test_unseen_top10",
}
# What only trained rows have: their size, and their spread over seeds.
TRAINED_KEYS = {
    "trainable_params",
    "inference_bytes",
    "num_seeds",
    "test_cos_ci95_low",
    "test_cos_ci95_high",
    "seeds",
}
RUN_KEYS = BASELINE_KEYS | TRAINED_KEYS
SECTIONS = {
    "directions": {"layers": [LAYER]},
    "distill": {"train": {"layer": LAYER}, "runs": RUNS},
    "evaluate": {"knn_k": 3, "retrieval_k": [1, 10]},
}


def fit_exact_probe(model: torch.nn.Module, data: DirectionSet) -> None:
    """Least squares on train: the synthetic targets are an affine map of mean token rows."""
    ids, dirs = data.load_split("train")
    pooled = concept_embeddings(
        data.offsets, data.flat_tokens, data.embedding_token_ids, data.embedding_rows, ids
    )
    design = torch.cat([pooled, torch.ones(len(ids), 1, dtype=torch.float64)], 1)  # (N, E+1)
    solution = torch.linalg.lstsq(design, dirs.double()).solution  # (E+1, D)
    with torch.no_grad():
        model.head.weight.copy_(solution[:-1].T)
        model.head.bias.copy_(solution[-1])


RISING = (0.2, 0.5)
"""A val curve well above the train-mean baseline's val cos_sim (0)."""
FLAT = (0.0, 0.0)
"""A val curve that never leaves the baseline's interval: its best epoch is noise."""


def write_run(
    distill: Path,
    name: str,
    data: DirectionSet,
    exact: bool = False,
    seeds: tuple = (0,),
    curve: tuple[float, ...] = RISING,
) -> torch.nn.Module:
    """One checkpoint per seed (seed s: torch.manual_seed(s) init), the run's config and
    its dvclive val curve `curve` (the run's and each seed's); returns the first seed's
    model."""
    models = [write_seed(distill, name, data, exact, seed, curve) for seed in seeds]
    write_json(distill / name / "config.json", {"run": name, "seeds": list(seeds)})
    live = distill.parent / "live" / name
    for folder in (live, *(seed_folder(live, seed) for seed in seeds)):
        with open_live(folder) as logger:
            for epoch, val in enumerate(curve, 1):
                log_row(logger, {"epoch": epoch, "train_loss": 0.5, "val_cos": val}, step="epoch")
    return models[0]


def write_seed(distill: Path, name: str, data: DirectionSet, exact: bool, seed: int, curve):
    spec = RunParams(**RUNS[name])
    table = (data.embedding_token_ids, data.embedding_rows)
    torch.manual_seed(seed)
    model = build_model(spec, data.vocab_size, data.dim, *table)
    if exact:
        fit_exact_probe(model, data)
    emb_dim = int(data.embedding_rows.shape[1])
    trainable = count_trainable(model)
    held = data.embedding_token_ids.numel() if spec.approach == "trainable" else None
    config = {
        "run": name,
        "approach": spec.approach,
        "embed_dim": spec.embed_dim,
        "hidden_dim": spec.hidden_dim,
        "vocab_size": data.vocab_size,
        "output_dim": data.dim,
        "embedding_dim": emb_dim,
        "layer": LAYER,
        "trainable_params": trainable,
        "held_tokens": held,
        "inference_bytes": inference_bytes(
            spec.approach, trainable, data.vocab_size, emb_dim, held_tokens=held
        ),
        "best_epoch": curve.index(max(curve)) + 1,
        "best_val_cos": max(curve),
        "train": {"epochs": len(curve)},
    }
    save_checkpoint(seed_folder(distill / name, seed), model.state_dict(), config)
    return model.eval()


def stage_paths(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "metrics"
    names = {"metrics": "distill.json", "table": "comparison.md", "plot": "curves.png"}
    return {"live": tmp_path / "live"} | {key: out / name for key, name in names.items()}


@pytest.fixture
def setup(tmp_path):
    """Directions with unseen-token test concepts (large vocab), plus both checkpoints."""
    directions = make_direction_set(tmp_path / "directions", vocab_size=400, layer=LAYER)
    data = DirectionSet(directions, LAYER)
    distill = tmp_path / "distill"
    models = {"linear_probe": write_run(distill, "linear_probe", data, exact=True)}
    models["tiny"] = write_run(distill, "tiny", data, curve=FLAT)
    return build_params(**SECTIONS), directions, distill, data, models


def test_evaluate_end_to_end(setup, tmp_path):
    params, directions, distill, data, models = setup
    paths = stage_paths(tmp_path)
    results = run(params, directions, distill, **paths)

    assert json.loads(paths["metrics"].read_text()) == results
    assert set(results) == {*RUNS, *BASELINES, "counts", "summary"}
    for name in RUNS:
        # A trainable row also says how many embedding rows it holds.
        extra = {"held_tokens"} if RUNS[name]["approach"] == "trainable" else set()
        assert set(results[name]) == RUN_KEYS | extra
    assert results["tiny"]["held_tokens"] == data.embedding_token_ids.numel()
    for name in BASELINES:
        assert set(results[name]) == BASELINE_KEYS
    counts = results["counts"]
    assert counts["train"] + counts["val"] + counts["test"] == data.num_concepts
    assert counts["test_seen"] > 0 and counts["test_unseen"] > 0
    assert counts["test_seen"] + counts["test_unseen"] == counts["test"]

    probe = results["linear_probe"]
    # The exact affine map reproduces every direction, seen tokens or not.
    for key in ("train_cos", "val_cos", "test_cos", "test_seen_cos", "test_unseen_cos"):
        assert probe[key] == pytest.approx(1.0, abs=1e-5)
    assert probe["test_top1"] == 1.0 and probe["test_top10"] == 1.0
    assert probe["gap"] == pytest.approx(0.0, abs=1e-5)
    assert probe["trainable_params"] == 8 * 16 + 16
    assert {k: probe["seeds"]["0"][k] for k in ("best_epoch", "epochs", "chosen_on_noise")} == {
        "best_epoch": 2,
        "epochs": 2,
        "chosen_on_noise": False,
    }
    # The untrained student's flat curve never left the train-mean baseline's interval.
    noise = results["tiny"]["seeds"]["0"]
    assert noise["chosen_on_noise"] is True and noise["best_epoch"] == 1
    assert noise["val_half_width"] > 0
    assert probe["num_seeds"] == 1 and probe["test_cos_ci95_low"] is None

    # The untrained student's score equals the one computed directly from its predictions.
    ids, targets = data.load_split("test")
    with torch.no_grad():
        direct = mean_cosine(models["tiny"](*data.concept_tokens(ids)), targets)
    assert results["tiny"]["test_cos"] == pytest.approx(direct, abs=1e-6)
    assert results["tiny"]["gap"] == pytest.approx(
        results["tiny"]["train_cos"] - results["tiny"]["test_cos"]
    )

    assert results["baseline_train_mean"]["test_cos"] == pytest.approx(0.0, abs=1e-9)
    # A zero prediction ties with every candidate, so retrieval is at chance: k / N.
    assert results["baseline_train_mean"]["test_top10"] == pytest.approx(10 / counts["test"])
    # The targets are a smooth function of the teacher's embeddings, so kNN there helps.
    assert results["baseline_knn"]["test_cos"] > 0.3
    # Token-count baseline: each test concept gets the mean train direction of the train
    # concepts with as many tokens (the stored tokens the students read).
    lengths = data.offsets[1:] - data.offsets[:-1]
    train_ids, train_dirs = data.load_split("train")
    expected = []
    for concept in ids.tolist():
        same = lengths[train_ids] == lengths[concept]
        expected.append(train_dirs[same].double().mean(0))
    by_count = mean_cosine(torch.stack(expected), targets)
    assert results["baseline_token_count"]["test_cos"] == pytest.approx(by_count, abs=1e-9)

    lines = squeeze(paths["table"].read_text()).splitlines()
    title = "# Concept directions: synthetic, hidden_states[2], last pooling; concepts split by "
    title += "text"
    assert lines[0] == title
    assert lines[4].startswith("| Linear Probe | 144 | ")
    assert "*" in lines[4].split(" | ")[2]
    # Best epochs per seed (of 2), the untrained student's marked as chosen on noise; the
    # baselines below the separator.
    assert lines[4].split(" | ")[5] == "2 of 2" and lines[5].split(" | ")[5] == "1† of 2"
    assert lines[6].startswith("| *baselines and controls (no training):* |")
    assert any(line.startswith("† chosen on noise") for line in lines)
    header = lines[2].split(" | ")
    assert header[3:5] == [
        f"Train cos_sim (n={counts['train']})",
        f"Val cos_sim (n={counts['val']})",
    ]
    assert "\\* needs the teacher's embedding table at inference" in lines
    seed_rows = [line for line in lines if line.startswith("| Linear Probe | 1 |")]
    assert seed_rows == ["| Linear Probe | 1 | 1.0000 | — | — |"]
    assert_picture(paths["plot"])

    # The summary block: the student best on val, its test number as the table shows it.
    (block,) = results["summary"]
    assert results["linear_probe"]["val_cos"] > results["tiny"]["val_cos"]
    assert block["value"] == results["linear_probe"]["test_cos"]
    assert block["control_value"] == results["baseline_knn"]["test_cos"]
    assert block["control"] == "best baseline on val (Baseline: kNN k=3 (teacher embeddings))"
    assert (block["teacher"], block["n"], block["interval"]) == ("synthetic", 1, None)
    assert f"| Linear Probe | 1 | {block['value']:.4f} |" in squeeze(paths["table"].read_text())


def test_evaluate_empty_subset_is_null(direction_set, tmp_path):
    # In the default fixture every test concept's tokens occur in train: no unseen subset.
    data = DirectionSet(direction_set, LAYER)
    distill = tmp_path / "distill"
    for name in RUNS:
        write_run(distill, name, data)
    paths = stage_paths(tmp_path)
    results = run(build_params(**SECTIONS), direction_set, distill, **paths)
    assert results["counts"]["test_unseen"] == 0
    assert results["tiny"]["test_unseen_cos"] is None
    assert results["tiny"]["test_unseen_top1"] is None
    assert '"test_unseen_cos": null' in paths["metrics"].read_text()


def test_missing_run_folder_names_it(setup, tmp_path):
    params, directions, distill, _, _ = setup
    runs = RUNS | {"absent": {"approach": "frozen_mlp", "hidden_dim": 4}}
    params = build_params(**(SECTIONS | {"distill": {"train": {"layer": LAYER}, "runs": runs}}))
    with pytest.raises(FileNotFoundError, match=r"absent.*config\.json.*dvc repro"):
        run(params, directions, distill, **stage_paths(tmp_path))
    assert not stage_paths(tmp_path)["metrics"].exists()


def test_cli_evaluate(setup, tmp_path):
    _, directions, distill, _, _ = setup
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(SECTIONS))
    paths = stage_paths(tmp_path)
    args = [
        "evaluate",
        "--params",
        str(params_file),
        "--directions",
        str(directions),
        "--distill",
        str(distill),
    ]
    for name, path in paths.items():
        args += [f"--{name}", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert all(paths[name].is_file() for name in ("metrics", "table", "plot"))
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics) == {*RUNS, *BASELINES, "counts", "summary"}
    assert "\n| Linear Probe | 144 | " in squeeze(paths["table"].read_text())
    # Trained rows and baselines counted apart; the best trained row's number as the table has it.
    probe = metrics["linear_probe"]["test_cos"]
    assert (
        f"evaluate: 2 trained rows, 4 baselines; best trained row on test: linear_probe, "
        f"test cos {probe:.4f}" in result.output
    )


def test_rows_are_the_mean_over_seeds_with_a_t_interval(tmp_path):
    directions = make_direction_set(tmp_path / "directions", vocab_size=400, layer=LAYER)
    data = DirectionSet(directions, LAYER)
    distill = tmp_path / "distill"
    write_run(distill, "linear_probe", data, exact=True, seeds=(0, 1))
    write_run(distill, "tiny", data, seeds=(3, 4, 5))
    paths = stage_paths(tmp_path)
    results = run(build_params(**SECTIONS), directions, distill, **paths)

    tiny = results["tiny"]
    per_seed = [tiny["seeds"][s]["test_cos"] for s in ("3", "4", "5")]
    assert len(set(per_seed)) == 3  # three inits, three scores
    assert tiny["num_seeds"] == 3 and tiny["test_cos"] == pytest.approx(sum(per_seed) / 3)
    interval = (tiny["test_cos_ci95_low"], tiny["test_cos_ci95_high"])
    assert interval == pytest.approx(t_interval(per_seed))
    assert interval[0] < tiny["test_cos"] < interval[1]
    # The exact probe scores the same under both seeds: a zero-width interval at 1.
    probe = results["linear_probe"]
    low, high = probe["test_cos_ci95_low"], probe["test_cos_ci95_high"]
    assert low == pytest.approx(1.0, abs=1e-5) and high == pytest.approx(low, abs=1e-9)
    text = squeeze(paths["table"].read_text())
    assert "concepts split by text (wordlist.split_by):" in text
    assert "| Linear Probe | 2 | 1.0000 | [1.0000, 1.0000] | no |" in text


def test_the_picture_overlays_every_run_and_an_empty_curve_is_named(setup, tmp_path):
    params, directions, distill, _, _ = setup
    paths = stage_paths(tmp_path)
    run(params, directions, distill, **paths)
    pixels = assert_picture(paths["plot"])
    # Two runs and the kNN line: more than one colour beyond black, white and grey.
    colours = {tuple(p) for p in pixels.reshape(-1, 3).astype(int).tolist()}
    assert len([c for c in colours if max(c) - min(c) > 60]) > 2

    # A run whose dvclive curve holds no epoch: one clear error naming the run's file.
    tsv = paths["live"] / "tiny" / "plots" / "metrics" / "val_cos.tsv"
    tsv.write_text("step\tval_cos\n")
    with pytest.raises(ValueError, match=r"curves.png: no data to plot .*'tiny' is empty"):
        run(params, directions, distill, **paths)
    tsv.unlink()
    with pytest.raises(FileNotFoundError, match=r"dvclive metric 'val_cos' not found: .*tiny"):
        run(params, directions, distill, **paths)
