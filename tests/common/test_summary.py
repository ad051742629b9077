"""The summary page: the contract each branch's `summary` entries keep, the page, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.common.summary import check_entry, read_entries, run, summary_numbers, summary_table
from tests.tables import squeeze


def entry(**changes):
    base = {
        "branch": "sidecar",
        "metric": "LM loss increase over dense",
        "value": 0.25,
        "interval": [0.1, 0.4],
        "interval_kind": "paired bootstrap 95%",
        "control": "window mean",
        "control_value": 0.5,
        "control_interval": [0.3, 0.7],
        "downstream": None,
        "downstream_value": None,
        "teacher": "data/teachers/tiny-llama",
        "n": 24,
    }
    return base | changes


def write_metrics(path: Path, entries) -> Path:
    path.write_text(json.dumps({"other": 1.0, "summary": entries}))
    return path


def test_page_and_numbers_from_three_files(tmp_path):
    a = write_metrics(tmp_path / "a.json", [entry()])
    b = write_metrics(
        tmp_path / "b.json",
        [
            entry(
                branch="SAE",
                metric="fraction of loss recovered",
                value=0.8,
                interval=None,
                interval_kind=None,
                control="PCA",
                control_value=0.3,
                control_interval=None,
                downstream="LM loss increase",
                downstream_value=0.12,
                caveat="random-weight tiny teacher",
                n=7,
            )
        ],
    )
    c = write_metrics(
        tmp_path / "c.json",
        [entry(branch="steering", caveat="random-weight tiny teacher", teacher="tiny-qwen3")],
    )
    stats = run([a, b, c], tmp_path / "summary.json", tmp_path / "summary.md")
    assert stats == {"entries": 3, "branches": 3}
    page = squeeze((tmp_path / "summary.md").read_text())
    assert (
        "| sidecar | LM loss increase over dense | 0.25 [0.1, 0.4] | window mean | 0.5 [0.3, 0.7] |"
        in page
    )
    assert (
        "| SAE | fraction of loss recovered | 0.8 | PCA | 0.3 | LM loss increase: 0.12 | none | 7 |"
        in page
    )
    assert "data/teachers/tiny-llama (1) |" in page and "tiny-qwen3 (1) |" in page
    assert page.rstrip().endswith("\n(1) random-weight tiny teacher")  # one note per caveat
    numbers = json.loads((tmp_path / "summary.json").read_text())
    assert numbers == {
        "sidecar": {
            "lm_loss_increase_over_dense": {
                "value": 0.25,
                "n": 24,
                "low": 0.1,
                "high": 0.4,
                "control_low": 0.3,
                "control_high": 0.7,
                "control": 0.5,
            }
        },
        "sae": {
            "fraction_of_loss_recovered": {
                "value": 0.8,
                "n": 7,
                "control": 0.3,
                "downstream": 0.12,
            }
        },
        "steering": numbers["sidecar"],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value": float("nan")}, "value: expected a finite number"),
        ({"value": None}, "missing ['value']"),
        ({"interval": [0.4, 0.1]}, "interval: expected [low, high]"),
        ({"interval_kind": None}, "interval_kind: an interval must say which kind"),
        ({"n": 0}, "n: expected a positive integer"),
        ({"control": ""}, "control: expected a non-empty string"),
        ({"colour": "red"}, "unknown keys ['colour']"),
        ({"rows": 10}, "rows and min_rows come together"),
        ({"rows": -1, "min_rows": 30}, "rows: expected an integer >= 0 or null, got -1"),
        ({"rows": 10, "min_rows": 2.5}, "min_rows: expected an integer >= 0 or null, got 2.5"),
        ({"warning": 1}, "warning: expected a string or null, got 1"),
    ],
)
def test_broken_entries_name_the_file_and_key(tmp_path, change, message):
    path = write_metrics(tmp_path / "m.json", [entry(), entry(**change)])
    with pytest.raises(ValueError, match="m.json: summary\\[1\\]") as err:
        read_entries(path)
    assert message in str(err.value)


def test_a_metrics_file_without_summary_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"sidecar": {"output_cosine": 0.9}}))
    with pytest.raises(ValueError, match="old.json: no `summary` list"):
        read_entries(path)
    with pytest.raises(FileNotFoundError, match="absent.json: no such metrics file"):
        read_entries(tmp_path / "absent.json")


def test_two_headlines_of_one_name_in_a_branch_are_refused():
    with pytest.raises(ValueError, match="two 'lm_loss_increase_over_dense' headlines"):
        summary_numbers([entry(), entry(value=0.3)])


def test_check_entry_returns_a_valid_entry_unchanged():
    assert check_entry(entry(), "x") == entry()
    assert squeeze(summary_table([entry()])).count("\n| sidecar |") == 1


def test_a_headline_on_fewer_rows_than_its_minimum_is_shown_as_such():
    few, enough = entry(rows=10, min_rows=30), entry(rows=30, min_rows=30)
    row = squeeze(summary_table([few])).splitlines()[6].split(" | ")
    # The value and the control (on the same rows) are marks, not numbers among numbers.
    assert row[2:5] == ["n=10 < 30", "window mean", "n=10 < 30"]
    row = squeeze(summary_table([enough])).splitlines()[6].split(" | ")
    assert row[2:5] == ["0.25 [0.1, 0.4]", "window mean", "0.5 [0.3, 0.7]"]
    # The JSON keeps the number either way.
    assert summary_numbers([few])["sidecar"]["lm_loss_increase_over_dense"]["value"] == 0.25


def test_a_warning_marks_its_headline_and_is_printed_under_the_table():
    line = "Matched by the token-count baseline (test cos_sim 0.9997): Linear Probe 0.86."
    page = squeeze(summary_table([entry(warning=line), entry(branch="SAE")]))
    rows = [row for row in page.splitlines() if row.startswith("| ")]
    assert rows[2].startswith("| sidecar | LM loss increase over dense ⚠ | 0.25 ")
    assert rows[3].startswith("| SAE | LM loss increase over dense | 0.25 ")
    assert f"**⚠ sidecar: {line}**" in page.splitlines()
    assert "⚠" not in summary_table([entry(warning=None)])
