"""Metrics and report on hand-built inputs with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.common.intervals import half_width, t_interval
from pipeline.common.summary import check_entry
from pipeline.common.teacher import RANDOM_WEIGHTS_CAVEAT
from pipeline.concepts.comparison import (
    Rests,
    Row,
    TeacherFacts,
    comparison_table,
    human_bytes,
    human_count,
    never_left,
    overlaps,
    run_label,
    summary,
    token_count_warning,
)
from pipeline.concepts.params import RunParams
from pipeline.concepts.scores import (
    concept_embeddings,
    knn_predict,
    mean_cosine,
    mean_over_seeds,
    retrieval_ranks,
    row_cosine,
    split_metrics,
    token_count_predict,
    token_coverage,
    top_k_hit_rates,
    train_mean_predict,
)
from tests.tables import squeeze


def test_row_and_mean_cosine_hand_case():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    expected = [1.0, 1 / math.sqrt(2), -1.0]
    assert row_cosine(pred, target).tolist() == pytest.approx(expected)
    assert row_cosine(pred, target).dtype == torch.float64
    assert mean_cosine(pred, target) == pytest.approx(sum(expected) / 3)


def test_cosine_of_zero_row_is_zero_and_empty_is_none():
    assert row_cosine(torch.zeros(1, 3), torch.ones(1, 3)).tolist() == [0.0]
    assert mean_cosine(torch.zeros(0, 3), torch.zeros(0, 3)) is None


# Targets are the 4 unit axes; prediction i's cosines to the targets are known by eye.
TARGETS = torch.eye(4)
PREDS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],  # own target e0 first            -> rank 0
        [0.0, 0.5, 1.0, 0.0],  # e2 (1.0) beats own e1 (0.5)     -> rank 1
        [0.3, 0.2, 0.1, 0.0],  # e0 0.3, e1 0.2 beat own e2 0.1  -> rank 2
        [0.4, 0.3, 0.2, 0.1],  # own e3 is last of 4             -> rank 3
    ]
)


def test_retrieval_ranks_and_hit_rates_hand_case():
    assert retrieval_ranks(PREDS, TARGETS).tolist() == [0, 1, 2, 3]
    rates = top_k_hit_rates(PREDS, TARGETS, ks=(1, 2, 3, 4))
    assert rates == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_retrieval_ties_go_to_the_lower_index():
    # A zero prediction ties with every candidate: ranks by index, hit rate = chance k/N.
    assert retrieval_ranks(torch.zeros(4, 4), TARGETS).tolist() == [0, 1, 2, 3]
    assert top_k_hit_rates(torch.zeros(4, 4), TARGETS, ks=(1, 2)) == {1: 0.25, 2: 0.5}
    # Two identical targets cannot be told apart: only the first wins top-1.
    twins = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert retrieval_ranks(twins, twins).tolist() == [0, 1, 0]


def test_retrieval_subset_queries_keep_the_whole_pool():
    rows = torch.tensor([1, 3])
    # Candidates stay all 4 targets, so row 3 still ranks last (3), a top-2 miss.
    assert retrieval_ranks(PREDS, TARGETS, rows).tolist() == [1, 3]
    assert top_k_hit_rates(PREDS, TARGETS, ks=(1, 2), rows=rows) == {1: 0.0, 2: 0.5}
    no_rows = torch.tensor([], dtype=torch.long)
    assert top_k_hit_rates(PREDS, TARGETS, ks=(1,), rows=no_rows) == {1: None}


def test_token_coverage_hand_csr():
    # concept 0: [1, 2]  train
    # concept 1: [3]     train
    # concept 2: [2, 3]  all tokens seen in train        -> seen
    # concept 3: [4]     token 4 only in test             -> unseen
    # concept 4: [1, 5]  5 occurs only in concept 4       -> unseen
    offsets = torch.tensor([0, 2, 3, 5, 6, 8])
    flat = torch.tensor([1, 2, 3, 2, 3, 4, 1, 5])
    seen = token_coverage(offsets, flat, train_ids=torch.tensor([0, 1]))
    assert seen.tolist() == [True, True, True, False, False]


def test_concept_embeddings_mean_token_rows():
    table_ids = torch.tensor([2, 5, 9])  # sorted, sparse ids as the directions folder stores them
    table_rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    offsets = torch.tensor([0, 2, 3])
    flat = torch.tensor([2, 5, 9])
    emb = concept_embeddings(offsets, flat, table_ids, table_rows, torch.tensor([1, 0]))
    assert emb.tolist() == [[3.0, 3.0], [0.5, 0.5]]
    with pytest.raises(ValueError, match=r"\[7\]"):
        bad = torch.tensor([2, 7, 9])
        concept_embeddings(offsets, bad, table_ids, table_rows, torch.tensor([0]))


POOL = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
POOL_DIRS = torch.tensor([[10.0, 0.0], [20.0, 0.0], [0.0, 30.0]])


def test_knn_k1_returns_nearest_train_direction():
    query = torch.tensor([[0.1, 1.0], [1.0, 0.05]])
    assert knn_predict(query, POOL, POOL_DIRS, k=1).tolist() == [[0.0, 30.0], [10.0, 0.0]]
    # k=2 averages the two nearest: for query 1 those are pool rows 0 and 1.
    assert knn_predict(query[1:], POOL, POOL_DIRS, k=2).tolist() == [[15.0, 0.0]]


def test_knn_train_split_excludes_self():
    # Without exclusion each row finds itself; with it row 0 <-> row 1, row 2 -> row 1.
    assert knn_predict(POOL, POOL, POOL_DIRS, k=1).tolist() == POOL_DIRS.tolist()
    got = knn_predict(POOL, POOL, POOL_DIRS, k=1, exclude_self=True)
    assert got.tolist() == [[20.0, 0.0], [10.0, 0.0], [20.0, 0.0]]
    # k larger than the pool minus self is clamped, not an error.
    assert knn_predict(POOL, POOL, POOL_DIRS, k=10, exclude_self=True).shape == (3, 2)


def test_train_mean_baseline_is_about_zero():
    train = torch.randn(200, 16)
    train = train - train.mean(0)  # centred like directions: float32 noise remains
    test = torch.randn(50, 16)
    pred = train_mean_predict(train, 50)
    assert pred.shape == (50, 16)
    assert mean_cosine(pred, test) == pytest.approx(0.0, abs=1e-12)
    # An uncentred train set gives its real mean.
    shifted = train_mean_predict(train + 1.0, 2)
    assert torch.allclose(shifted, torch.ones(2, 16, dtype=torch.float64))


def test_token_count_baseline_is_the_train_mean_of_concepts_of_the_same_count():
    train_counts = torch.tensor([1, 1, 2, 3])
    train = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [-4.0, -5.0]])  # mean 0
    got = token_count_predict(train_counts, train, torch.tensor([2, 1, 4, 3]))
    # A count no train concept has (4) gets the overall train mean: zero here.
    assert got.tolist() == [[0.0, 5.0], [2.0, 0.0], [0.0, 0.0], [-4.0, -5.0]]
    assert got.dtype == torch.float64
    shifted = token_count_predict(train_counts, train + 1.0, torch.tensor([4]))
    assert shifted.tolist() == [[1.0, 1.0]]


def test_split_metrics_keys_and_subsets():
    preds = {"train": PREDS, "val": PREDS[:0], "test": PREDS}
    targets = {"train": TARGETS, "val": TARGETS[:0], "test": TARGETS}
    seen = torch.tensor([True, True, False, False])
    out = split_metrics(preds, targets, seen, ks=(1, 2))
    assert out["val_cos"] is None
    assert out["test_top1"] == 0.25 and out["test_top2"] == 0.5
    assert out["test_seen_top2"] == 1.0 and out["test_unseen_top2"] == 0.0
    cos = row_cosine(PREDS, TARGETS)
    assert out["test_seen_cos"] == pytest.approx(float(cos[:2].mean()))
    assert out["test_unseen_cos"] == pytest.approx(float(cos[2:].mean()))
    assert out["gap"] == pytest.approx(0.0)


def test_human_sizes():
    assert [human_count(n) for n in (132_000, 1_050_000, 10_000_000, 9_800_000, 999, 999_600)] == [
        "132K",
        "1.05M",
        "10M",
        "9.8M",
        "999",
        "1M",
    ]
    assert [human_bytes(n) for n in (600_000_000, 40_000_000, 512)] == ["600MB", "40MB", "512B"]


def test_run_labels():
    assert run_label(RunParams("trainable", embed_dim=64, hidden_dim=256)) == "Trainable e=64,h=256"
    assert run_label(RunParams("frozen_mlp", hidden_dim=128)) == "Frozen+MLP h=128"
    assert run_label(RunParams("linear_probe")) == "Linear Probe"


TEACHER = TeacherFacts("data/teachers/all-minilm-l6-v2", layer=6, pooling="mean", caveat="")


def _metrics(test_cos: float | None, params: int | None = None, size: int | None = None) -> dict:
    return {
        "test_cos": test_cos,
        "train_cos": 0.95,
        "val_cos": 0.9,
        "gap": 0.05,
        "test_top1": 0.5,
        "test_top10": 0.875,
        "test_seen_cos": 0.91,
        "test_unseen_cos": None,
        "trainable_params": params,
        "inference_bytes": size,
    }


COUNTS = {"train": 70, "val": 40, "test": 40, "test_seen": 10, "test_unseen": 30}
RESTS = Rests(COUNTS, min_rows=30)
FLAT = [0.001, 0.003, 0.002, 0.0, 0.002]
"""A val curve that never leaves the baseline's interval (0 +/- 0.005): its best epoch,
2, is noise."""
RISING = [0.01, 0.1, 0.3, 0.45, 0.5]


def _trained(test_cos: float, params: int, size: int, curves: list[list[float]]) -> dict:
    """A trained row whose seeds' best epochs and noise flags come from their val curves,
    against the train-mean baseline's val cos 0 with a half width of 0.005."""
    seeds = {
        str(i): {
            "best_epoch": curve.index(max(curve)) + 1,
            "epochs": len(curve),
            "chosen_on_noise": never_left(curve, 0.0, 0.005),
        }
        for i, curve in enumerate(curves)
    }
    return _metrics(test_cos, params, size) | {"num_seeds": len(curves), "seeds": seeds}


def test_never_left_flags_a_flat_val_curve_and_not_a_rising_one():
    assert never_left(FLAT, baseline=0.0, width=0.005) is True
    assert never_left(RISING, baseline=0.0, width=0.005) is False
    # The bound itself is inside the interval; just above it is out.
    assert never_left([0.0, 0.005], 0.0, 0.005) and not never_left([0.0, 0.0051], 0.0, 0.005)
    assert never_left(FLAT, 0.0, None) is None
    # [1, 2, 3, 4]: sd = sqrt(5/3), se = sd / 2, half width = 1.959964 * se = 1.2651.
    assert half_width(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(1.2651, abs=1e-4)
    assert half_width(torch.tensor([0.5])) is None


def test_comparison_table_known_text_counts_minimum_best_epoch_noise_and_blocks():
    rows = [
        Row("t", "Trainable e=64,h=256", _trained(0.9071, 10_000_000, 40_000_000, [FLAT, FLAT])),
        Row("m", "Baseline: train mean", _metrics(None)),
        Row("k", "Baseline: kNN", _metrics(0.95)),  # best on test, still below the students
        Row("f", "Frozen+MLP h=64", _trained(0.9019, 132_000, 600_000_000, [RISING, FLAT]), True),
        Row("p", "Linear Probe", _trained(0.9062, 1_050_000, 600_000_000, [RISING]), frozen=True),
    ]
    text = squeeze(
        comparison_table(rows, ks=(1, 10), split_by="text", teacher=TEACHER, rests=RESTS)
    )
    lines = text.splitlines()
    assert lines[0] == (
        "# Concept directions: data/teachers/all-minilm-l6-v2, hidden_states[6], mean pooling; "
        "concepts split by text"
    )
    assert [lines[2], *lines[4:10]] == [
        "| Approach | Trainable Params | Inference Size | Train cos_sim (n=70) | "
        "Val cos_sim (n=40) | Best epoch (per seed) | Test cos_sim (n=40) | Gap | Test top-1 | "
        "Test top-10 | Test cos, seen tokens (n=10) | Test cos, unseen tokens (n=30) |",
        # Trained rows first, by test cos_sim; the seen-token column rests on 10 < 30 concepts.
        "| Trainable e=64,h=256 | 10M | 40MB | 0.9500 | 0.9000 | 2†, 2† of 5 | 0.9071 | 0.0500 | "
        "50.0% | 87.5% | n=10 < 30 | — |",
        "| Linear Probe | 1.05M | 600MB* | 0.9500 | 0.9000 | 5 of 5 | 0.9062 | 0.0500 | 50.0% | "
        "87.5% | n=10 < 30 | — |",
        "| Frozen+MLP h=64 | 132K | 600MB* | 0.9500 | 0.9000 | 5, 2† of 5 | 0.9019 | 0.0500 | "
        "50.0% | 87.5% | n=10 < 30 | — |",
        "| *baselines and controls (no training):* | | | | | | | | | | | |",
        "| Baseline: kNN | — | — | 0.9500 | 0.9000 | — | 0.9500 | 0.0500 | 50.0% | 87.5% | "
        "n=10 < 30 | — |",
        "| Baseline: train mean | — | — | 0.9500 | 0.9000 | — | — | 0.0500 | 50.0% | 87.5% | "
        "n=10 < 30 | — |",
    ]
    assert lines[11].startswith("n: the concepts each column is a mean over; a metric over fewer")
    assert "Test top-1/top-10: each of the 40 test concepts" in lines[11]
    assert lines[13] == "\\* needs the teacher's embedding table at inference"
    assert lines[15].startswith("† chosen on noise: in no epoch did that seed's val cos_sim")
    # With every seed's curve rising, no mark and no footnote.
    rising = [Row("p", "Linear Probe", _trained(0.9062, 1, 1, [RISING, RISING]))]
    text = comparison_table(rising, ks=(1,), split_by="text", teacher=TEACHER, rests=RESTS)
    assert "5, 5 of 5" in text and "†" not in text


def test_a_split_column_below_the_minimum_is_marked_in_every_row():
    rows = [Row("p", "Linear Probe", _trained(0.9062, 1, 1, [RISING]))]
    few = Rests(COUNTS | {"val": 12}, min_rows=30)
    text = squeeze(comparison_table(rows, ks=(1,), split_by="text", teacher=TEACHER, rests=few))
    header, _, body = text.splitlines()[2:5]
    assert "| Val cos_sim (n=12) |" in header
    assert body.split(" | ")[4] == "n=12 < 30"
    # At the minimum itself the number is shown.
    exact = Rests(COUNTS | {"val": 30}, min_rows=30)
    text = squeeze(comparison_table(rows, ks=(1,), split_by="text", teacher=TEACHER, rests=exact))
    assert text.splitlines()[4].split(" | ")[4] == "0.9000"


def test_t_interval_known_answer():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), se = s / 2 = 0.6454972, t(0.975, 3) = 3.1824463,
    # half width = 2.0542603 (by hand from the t table).
    low, high = t_interval([1.0, 2.0, 3.0, 4.0])
    assert low == pytest.approx(2.5 - 2.0542603, abs=1e-6)
    assert high == pytest.approx(2.5 + 2.0542603, abs=1e-6)
    # [0.70, 0.72]: mean 0.71, s = 0.0141421, se = 0.01, t(0.975, 1) = 12.7062047.
    assert t_interval([0.70, 0.72]) == pytest.approx((0.71 - 0.127062, 0.71 + 0.127062), abs=1e-6)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert t_interval([0.7]) is None and t_interval([]) is None


def test_mean_over_seeds_is_keywise_and_none_if_any_seed_lacks_a_score():
    seeds = [{"a": 1.0, "b": None}, {"a": 2.0, "b": 0.5}]
    assert mean_over_seeds(seeds) == {"a": 1.5, "b": None}


def _seeded(test_cos: float, ci: list[float] | None, n: int = 3) -> dict:
    low, high = ci or (None, None)
    return {
        "test_cos": test_cos,
        "num_seeds": n,
        "test_cos_ci95_low": low,
        "test_cos_ci95_high": high,
    }


def test_seed_table_marks_rows_whose_interval_overlaps_the_next():
    rows = [
        Row("a", "A", _seeded(0.90, [0.89, 0.91])),
        Row("b", "B", _seeded(0.895, [0.885, 0.905])),  # overlaps A
        Row("c", "C", _seeded(0.70, [0.69, 0.71])),  # far below B
        Row("k", "kNN", {"test_cos": 0.695}),  # deterministic point, inside C's interval
        Row("s", "Single", _seeded(0.60, None, n=1)),  # one seed: no interval
    ]
    text = comparison_table(rows, ks=(1,), split_by="stem", teacher=TEACHER, rests=RESTS)
    lines = squeeze(text).splitlines()
    assert lines[-10].endswith("concepts split by stem (wordlist.split_by):")
    table = lines[
        lines.index("| Approach | Seeds | Test cos_sim (mean) | 95% interval | Overlaps next |") :
    ]
    # Baselines in their own block: kNN is not ranked between C and Single, and C's
    # overlap with it is not an overlap with the next trained row.
    assert table[2:] == [
        "| A | 3 | 0.9000 | [0.8900, 0.9100] | yes |",
        "| B | 3 | 0.8950 | [0.8850, 0.9050] | no |",
        "| C | 3 | 0.7000 | [0.6900, 0.7100] | — |",
        "| Single | 1 | 0.6000 | — | — |",
        "| *baselines and controls (no training):* | | | | |",
        "| kNN | — | 0.6950 | exact | — |",
    ]
    assert overlaps((0.1, 0.2), (0.2, 0.3)) and not overlaps((0.1, 0.2), (0.21, 0.3))
    assert overlaps(None, (0.1, 0.2)) is None


def test_the_title_of_a_random_weight_teacher_says_so():
    tiny = TeacherFacts("data/teachers/tiny-qwen3", 2, "last", RANDOM_WEIGHTS_CAVEAT)
    rows = [Row("p", "Linear Probe", _metrics(0.5), frozen=True)]
    title = comparison_table(rows, (1,), "stem", tiny, RESTS).splitlines()[0]
    assert title == (
        "# Concept directions: data/teachers/tiny-qwen3, hidden_states[2], last pooling; "
        "concepts split by stem (random-weight teacher: these numbers test the code, not "
        "the method)"
    )


def _picked(val_cos: float, test_cos: float, ci: list[float] | None, n: int = 3) -> dict:
    return {"val_cos": val_cos} | _seeded(test_cos, ci, n)


def test_summary_picks_student_and_control_on_val_and_reports_their_test_numbers():
    rows = [
        # Best on test but not on val: a pick on test would be selection on the test set.
        Row("a", "Frozen+MLP h=256", _picked(0.70, 0.80, [0.78, 0.82])),
        Row("b", "Linear Probe", _picked(0.75, 0.72, [0.71, 0.73])),
        Row("m", "Baseline: train mean", {"val_cos": 0.0, "test_cos": 0.0}),
        Row("k", "Baseline: kNN k=10 (teacher embeddings)", {"val_cos": 0.6, "test_cos": 0.58}),
    ]
    (block,) = summary(rows, "stem", TEACHER, RESTS)
    assert block == {
        "branch": "concept directions",
        "metric": "test cos_sim of the best student on val (Linear Probe), mean over seeds; "
        "concepts split by stem",
        "value": 0.72,
        "interval": [0.71, 0.73],
        "interval_kind": "t-interval 95% over seeds",
        "control": "best baseline on val (Baseline: kNN k=10 (teacher embeddings))",
        "control_value": 0.58,
        "control_interval": None,
        "downstream": None,
        "downstream_value": None,
        "teacher": "data/teachers/all-minilm-l6-v2",
        "n": 3,
        "rows": 40,
        "min_rows": 30,
        "caveat": None,
        "warning": None,
    }
    check_entry(block, "concepts")


def test_summary_of_one_seed_has_no_interval_and_names_the_caveat():
    tiny = TeacherFacts("data/teachers/tiny-qwen3", 2, "last", RANDOM_WEIGHTS_CAVEAT)
    rows = [Row("p", "Linear Probe", _picked(0.5, 0.4, None, n=1))]
    (block,) = summary(rows, "text", tiny, RESTS)
    assert block["interval"] is None and block["n"] == 1 and block["value"] == 0.4
    assert block["metric"].endswith("concepts split by text")
    assert block["caveat"] == RANDOM_WEIGHTS_CAVEAT
    assert block["control"] is None and block["control_value"] is None
    baseline_only = [Row("m", "Baseline: train mean", {"val_cos": 0.0, "test_cos": 0.0})]
    assert summary(baseline_only, "text", tiny, RESTS) == []


def test_the_token_count_baseline_flags_every_student_it_matches():
    bar = Row("baseline_token_count", "Baseline: train mean per token count", _metrics(0.9))
    rows = [
        Row("over", "Linear Probe", _picked(0.9, 0.95, [0.92, 0.98])),
        Row("overlap", "Frozen+MLP h=128", _picked(0.8, 0.91, [0.89, 0.93])),
        Row("under", "Trainable e=32,h=128", _picked(0.5, 0.5, [0.4, 0.6])),
        Row("one", "Distilled e=8,h=64", _picked(0.9, 0.9, None, n=1)),  # its mean: on the bar
        Row("m", "Baseline: train mean", {"val_cos": 0.0, "test_cos": 0.0}),
        bar,
    ]
    line = (
        "Matched by the token-count baseline (test cos_sim 0.9000 from the concept's token "
        "count alone): Frozen+MLP h=128 0.9100 [0.8900, 0.9300]; Trainable e=32,h=128 "
        "0.5000 [0.4000, 0.6000]; Distilled e=8,h=64 0.9000. Their test cos_sim is no "
        "evidence that they read the concept."
    )
    assert token_count_warning(rows) == line
    (block,) = summary(rows, "text", TEACHER, RESTS)
    assert block["warning"] == line and check_entry(block, "concepts")
    table = comparison_table(rows, (1, 10), "text", TEACHER, RESTS)
    assert f"**{line}**" in table.splitlines()
    assert token_count_warning(rows[:1] + rows[-1:]) is None
    assert token_count_warning(rows[:-1]) is None  # no such baseline: nothing to say
