"""Stage `cross_teacher`: the per-teacher headline and verdict on hand-built metrics, the
teacher-to-teacher ridge map on planted maps, the params, the skipped stage, and the stage
on two tiny teachers."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.common.params import load_params
from pipeline.common.summary import check_entry, read_entries
from pipeline.concepts import cross_teacher, directions
from pipeline.concepts.cross_teacher import NOT_A_FINDING, headline, ridge_map, verdict
from pipeline.concepts.layout import DirectionSet
from tests.concepts.test_directions import write_wordlist
from tests.conftest import build_params, make_direction_set
from tests.tables import squeeze
from tests.tiny_teachers import tiny_teacher

LABELS = {"a": "Frozen+MLP h=8", "b": "Linear Probe"}


def run_metrics(val: float, test: float, span: tuple[float, float] | None) -> dict:
    low, high = (None, None) if span is None else span
    return {
        "val_cos": val,
        "test_cos": test,
        "num_seeds": 1 if span is None else 3,
        "test_cos_ci95_low": low,
        "test_cos_ci95_high": high,
    }


def metrics(b_span=(0.50, 0.70), knn_test=0.55) -> dict:
    """Run b is best on val, kNN the best baseline on val; `c` is not among the runs."""
    return {
        "a": run_metrics(0.80, 0.75, (0.74, 0.76)),
        "b": run_metrics(0.90, 0.60, b_span),
        "c": run_metrics(0.99, 0.99, (0.98, 1.0)),
        "baseline_knn": {"val_cos": 0.50, "test_cos": knn_test},
        "baseline_train_mean": {"val_cos": 0.0, "test_cos": 0.0},
        "baseline_char_ngrams": {"val_cos": None, "test_cos": None},
        "counts": {"train": 70, "val": 15, "test": 15},
        "summary": [],
    }


def test_headline_picks_on_val_among_the_named_runs_and_calls_an_overlap_no_finding():
    row = headline(metrics(), ("a", "b"), LABELS)
    # c scores best but is not a named run; b beats a on val though a is better on test.
    assert (row["student"], row["student_label"], row["test_cos"]) == ("b", "Linear Probe", 0.60)
    assert (row["test_cos_ci95_low"], row["test_cos_ci95_high"], row["num_seeds"]) == (
        0.50,
        0.70,
        3,
    )
    assert (row["baseline"], row["baseline_label"], row["baseline_test_cos"]) == (
        "baseline_knn",
        "knn",
        0.55,
    )
    assert row["gain"] == pytest.approx(0.05)
    assert row["not_a_finding"] is True and verdict(row) == NOT_A_FINDING


def test_an_interval_clear_of_its_baseline_is_a_finding_and_one_seed_has_no_verdict():
    above = headline(metrics(b_span=(0.58, 0.62), knn_test=0.40), ("a", "b"), LABELS)
    assert above["not_a_finding"] is False and verdict(above) == "above its baseline"
    below = headline(metrics(b_span=(0.58, 0.62), knn_test=0.70), ("a", "b"), LABELS)
    assert below["not_a_finding"] is False and verdict(below) == "below its baseline"
    single = headline(metrics(b_span=None), ("a", "b"), LABELS)
    assert single["not_a_finding"] is None and verdict(single) == "no interval (one seed)"


def test_a_run_missing_from_the_metrics_is_named():
    with pytest.raises(ValueError, match=r"no run \['frozen_h256'\]"):
        headline(metrics(), ("frozen_h256", "b"), LABELS)


def planted(rows: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = {"train": rows, "val": rows // 4, "test": rows // 4}
    return {split: torch.randn(n, dim, generator=gen) for split, n in sizes.items()}


def test_ridge_map_recovers_an_affine_map_and_finds_nothing_in_noise():
    inputs = planted(200, 6, seed=0)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    exact = ridge_map(inputs, {split: x @ weight + 2.0 for split, x in inputs.items()})
    assert exact["ridge"] == 0.0  # the best on val: no shrinkage of an exact map
    assert exact["test_cos"] == pytest.approx(1.0, abs=1e-9)
    assert exact["test_cos_ci95_low"] == pytest.approx(1.0, abs=1e-9)
    noise = ridge_map(inputs, planted(200, 4, seed=2))
    assert abs(noise["test_cos"]) < 0.2
    assert noise["test_cos_ci95_low"] < 0.0 < noise["test_cos_ci95_high"]


def test_teacher_maps_refuse_directions_of_different_concepts(tmp_path):
    a = DirectionSet(make_direction_set(tmp_path / "a", num_concepts=120), 2)
    b = DirectionSet(make_direction_set(tmp_path / "b", num_concepts=120, seed=1), 2)
    with pytest.raises(ValueError, match="splits hold different concepts"):
        cross_teacher.teacher_maps(a, b)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"runs": ["nope"]}, r"cross_teacher.runs holds \['nope'\], not keys of distill.runs"),
        ({"templates": ["{word}"]}, r"cross_teacher.templates entry '\{word\}'"),
        ({"runs": []}, r"cross_teacher.runs is empty"),
        ({"layer": -1}, r"cross_teacher.layer must be >= 0, got -1"),
    ],
)
def test_params_name_the_cross_teacher_key(section, message):
    with pytest.raises(ValueError, match=message):
        build_params(cross_teacher={"model": "some/model"} | section)


def test_a_null_model_skips_the_stage_and_adds_no_summary_row(tmp_path):
    params = build_params(cross_teacher={"model": None})
    paths = {"metrics": tmp_path / "cross.json", "table": tmp_path / "cross.md"}
    results = cross_teacher.run(params, tmp_path / "none", None, None, tmp_path / "out", **paths)
    assert results == {"skipped": results["skipped"], "summary": []}
    assert json.loads(paths["metrics"].read_text()) == results
    assert read_entries(paths["metrics"]) == []
    assert paths["table"].read_text().startswith("# Cross-teacher comparison: skipped")
    assert (tmp_path / "out" / cross_teacher.SKIPPED_FILE).is_file()


WORDS = [
    *("time", "the", "cat", "run", "blue", "house", "water", "green", "light", "tree"),
    *("river", "stone", "cloud", "music", "paper", "garden", "winter", "summer", "bird"),
    *("window", "doctor", "letter", "market", "silver", "forest", "ocean", "dream", "horse"),
    *("apple", "bread", "chair", "table", "money", "power", "sound", "voice", "world", "heart"),
]
RUNS = {
    "frozen_h8": {"approach": "frozen_mlp", "hidden_dim": 8},
    "probe": {"approach": "linear_probe"},
}


def test_stage_on_two_tiny_teachers(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    params = build_params(
        wordlist={"source": "wordfreq", "num_concepts": len(WORDS)},
        directions={
            "model": tiny_teacher("qwen3"),
            "layers": [2],
            "templates": ["The word: {concept}"],
            "compute_dtype": "float32",
            "shard_rows": 16,
            "max_length": 32,
        },
        distill={
            "train": {"layer": 2, "epochs": 2, "seeds": [0, 1], "batch_size": 16},
            "runs": RUNS,
        },
        evaluate={"knn_k": 3, "min_rows": 5},
        cross_teacher={
            "model": tiny_teacher("llama"),
            "layer": 3,
            "pooling": "last",
            "runs": ["frozen_h8", "probe"],
        },
    )
    main = tmp_path / "directions"
    directions.run(params.directions, wordlist, main)
    # The main teacher's metrics in evaluate's format (the keys the stage reads).
    main_metrics = cross_teacher.train_and_score(params, DirectionSet(main, 2))
    (tmp_path / "distill.json").write_text(json.dumps(main_metrics | {"summary": []}))
    paths = {"metrics": tmp_path / "cross.json", "table": tmp_path / "cross.md"}
    out = tmp_path / "cross"
    results = cross_teacher.run(params, wordlist, tmp_path / "distill.json", main, out, **paths)

    assert json.loads(paths["metrics"].read_text()) == results
    second = DirectionSet(out, 3)
    extra = second.manifest.extra
    assert extra["model"] == tiny_teacher("llama")
    assert (extra["layers"], extra["pooling"]) == ([3], "last")
    # The same concepts in the same splits as the main teacher's.
    for split in ("train", "val", "test"):
        ids = second.load_split(split)[0].sort().values
        assert torch.equal(ids, DirectionSet(main, 2).load_split(split)[0].sort().values)
    # The main teacher's row: its metrics' own numbers, picked on val among the runs.
    row = results["teachers"]["main"]
    best = max(RUNS, key=lambda name: main_metrics[name]["val_cos"])
    assert row["student"] == best and row["test_cos"] == main_metrics[best]["test_cos"]
    assert row["test_cos_ci95_low"] == main_metrics[best]["test_cos_ci95_low"] is not None
    assert (row["model"], row["layer"]) == (tiny_teacher("qwen3"), 2)
    # The second teacher: both runs over both seeds, beside every baseline of evaluate.
    scores = results["second"]
    assert set(scores) == {*RUNS, "baseline_train_mean", "baseline_token_count"} | {
        "baseline_knn",
        "baseline_char_ngrams",
    }
    assert all(scores[name]["num_seeds"] == 2 for name in RUNS)
    assert all(len(scores[name]["best_epochs"]) == 2 for name in RUNS)
    assert scores["baseline_train_mean"]["test_cos"] == pytest.approx(0.0, abs=1e-6)
    assert results["counts"] == main_metrics["counts"]
    assert set(results["maps"]) == {"second_to_main", "main_to_second"}
    assert all(-1 <= m["test_cos"] <= 1 for m in results["maps"].values())
    (entry,) = results["summary"]
    assert check_entry(entry, "cross") is entry
    assert entry["value"] == results["teachers"]["second"]["test_cos"]
    assert entry["downstream_value"] == row["gain"]
    lines = squeeze(paths["table"].read_text()).splitlines()
    assert lines[0].startswith("# Cross-teacher comparison")
    assert lines[6].startswith(f"| main: {tiny_teacher('qwen3')}, hidden_states[2], last pooling")
    assert lines[7].startswith(f"| second: {tiny_teacher('llama')}, hidden_states[3], last")
    assert any(line.startswith("| second -> main |") for line in lines)


def test_the_profiles_point_the_stage_at_a_second_teacher():
    tiny = load_params("profiles/tiny.yaml").cross_teacher
    assert tiny.model == "data/teachers/all-minilm-l6-v2" and tiny.pooling == "mean"
    real = load_params("params.yaml").cross_teacher
    assert real.model == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and real.pooling == "last"


def table_results() -> dict:
    facts = {"layer": 6, "pooling": "mean", "caveat": None}
    main = {"model": "main-lm"} | facts | headline(metrics(), ("a", "b"), LABELS)
    second = (
        {"model": "second-lm"}
        | facts
        | headline(metrics(b_span=(0.58, 0.62), knn_test=0.40), ("a", "b"), LABELS)
    )
    span = {"test_cos": 0.5, "test_cos_ci95_low": 0.45, "test_cos_ci95_high": 0.55, "ridge": 0.1}
    return {
        "runs": ["a", "b"],
        "teachers": {"main": main, "second": second},
        "maps": {"second_to_main": span, "main_to_second": span},
        "counts": {"test": 40},
    }


def test_the_table_gives_each_teacher_its_verdict_and_marks_too_few_rows():
    lines = squeeze(cross_teacher.cross_table(table_results(), "text", 30)).splitlines()
    assert lines[6] == (
        "| main: main-lm, hidden_states[6], mean pooling | Linear Probe | 0.6000 [0.5000, 0.7000] "
        f"| knn | 0.5500 | +0.0500 | {NOT_A_FINDING} |"
    )
    assert lines[7] == (
        "| second: second-lm, hidden_states[6], mean pooling | Linear Probe "
        "| 0.6000 [0.5800, 0.6200] | knn | 0.4000 | +0.2000 | above its baseline |"
    )
    assert "| second -> main | 0.5000 [0.4500, 0.5500] | 0.1 |" in lines
    few = squeeze(cross_teacher.cross_table(table_results(), "text", 50))
    assert "| Linear Probe | n=40 < 50 | knn | n=40 < 50 | n=40 < 50 |" in few
    assert "| second -> main | n=40 < 50 | 0.1 |" in few
