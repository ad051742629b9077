"""Markdown tables through tabulate: cells kept as written, columns aligned as asked."""

from __future__ import annotations

import pytest

from pipeline.common.tables import markdown_table
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
