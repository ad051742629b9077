"""`make demo`'s second concept split: finding the experiment and the side-by-side table.

The demo itself (`dvc repro`, then `dvc exp run --temp`) runs in `make demo`; here the
parts that read DVC's output, on hand-written output.
"""

from __future__ import annotations

from pipeline.demo import experiment_commit, split_comparison

LISTING = "master:\n\tc01ff19 [split-by-stem]\n\t9ab12cd [other]\n"


def test_the_experiment_is_found_by_name_in_dvc_exp_list_output():
    assert experiment_commit(LISTING, "split-by-stem") == "c01ff19"
    assert experiment_commit(LISTING, "other") == "9ab12cd"
    assert experiment_commit(LISTING, "split-by") is None, "a prefix is not the name"
    assert experiment_commit("", "split-by-stem") is None


def test_split_comparison_puts_old_and_new_side_by_side_best_text_split_first():
    changes = {
        "baseline_knn.test_cos": {"old": 0.50, "new": 0.525, "diff": 0.025},
        "linear_probe.test_cos": {"old": 0.70, "new": 0.65, "diff": -0.05},
        "linear_probe.test_cos_ci95_low": {"old": 0.69, "new": 0.64},
        "linear_probe.test_cos_ci95_high": {"old": 0.71, "new": 0.66},
        "linear_probe.val_cos": {"old": 0.7, "new": 0.6},  # not a test cos: not shown
        "linear_probe.seeds.0.test_cos": {"old": 0.7, "new": 0.6},  # one seed's: not shown
        "counts.test": {"old": 298, "new": 318},
    }
    assert split_comparison(changes).splitlines() == [
        "| Row | Test cos_sim, split by text | Test cos_sim, split by stem | Stem - text |",
        "|---|---|---|---|",
        "| linear_probe | 0.7000 [0.6900, 0.7100] | 0.6500 [0.6400, 0.6600] | -0.0500 |",
        "| baseline_knn | 0.5000 | 0.5250 | +0.0250 |",
    ]
