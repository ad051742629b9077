"""Markdown tables through tabulate: cells kept as written, columns aligned as asked."""

from __future__ import annotations

import pytest

from pipeline.common.tables import (
    MISSING,
    counted,
    fmt_interval,
    fmt_signed,
    markdown_table,
    over_rows,
    rounded,
    spec,
    too_few,
    with_interval,
)
from tests.tables import squeeze


def test_cells_are_kept_as_written_and_columns_aligned():
    lines = markdown_table(
        ["item", "value", ""], [[" leading space", "1.163e-04", ""], ["b", "2", "x"]], "lrl"
    )
    assert lines == [
        "| item           |     value |    |",
        "|:---------------|----------:|:---|",
        "|  leading space | 1.163e-04 |    |",
        "| b              |         2 | x  |",
    ]
    # What a test compares: the padding squeezed out, the cells themselves unchanged.
    assert squeeze("\n".join(lines)).splitlines()[2:] == [
        "| leading space | 1.163e-04 | |",
        "| b | 2 | x |",
    ]


def test_a_row_or_align_string_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="a table of 2 columns"):
        markdown_table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="align 'lc'"):
        markdown_table(["a", "b"], [["1", "2"]], align="lc")


def test_counts_in_headers_and_the_mark_below_the_minimum():
    assert counted("test", 630) == "test (n=630)"
    assert over_rows(0.93213, 630, 30) == "0.9321"
    assert over_rows(0.93213, 10, 30) == "n=10 < 30"  # not a number among numbers
    assert over_rows(0.93213, 30, 30) == "0.9321"  # the minimum itself is enough
    assert over_rows(None, 0, 30) == "n=0 < 30" and over_rows(None, 40, 30) == MISSING
    assert over_rows(0.5, 40, 30, spec(".1%")) == "50.0%"
    assert too_few(29, 30) == "n=29 < 30" and too_few(30, 30) is None


def test_one_precision_for_values_intervals_and_log_lines():
    assert fmt_signed(0.01234567) == "+0.01235" and fmt_signed(-1.2e-5) == "-1.200e-05"
    assert fmt_interval([0.1, 0.25]) == "[0.1, 0.25]"
    assert fmt_interval([-0.0123, 0.5], fmt_signed) == "[-0.0123, +0.5]"
    assert with_interval(0.5, [0.4, 0.6], spec(".4f")) == "0.5000 [0.4000, 0.6000]"
    assert with_interval(0.5, None) == "0.5" and with_interval(None, None) == MISSING
    line = {"best test cos": 0.9321308653294821, "n": 3, "curve": [0.123456, 1.0e-7], "run": "a"}
    assert rounded(line) == {"best test cos": 0.9321, "n": 3, "curve": [0.1235, 1e-07], "run": "a"}
