"""The offline PNG helpers: readable images of what they are given; empty input refused."""

from __future__ import annotations

import math

import pytest

from pipeline.common.pictures import Panel, bar_chart, histogram, line_panels
from tests.picture_checks import assert_picture


def test_line_panels_draw_each_series_and_reference(tmp_path):
    panels = [
        Panel("loss", "step", "loss", {"train": ([1, 2, 3], [0.9, 0.5, 0.4])}, {"base": 0.7}),
        Panel(
            "ratio",
            "step",
            "ratio",
            {"a": ([1, 2], [1.0, math.nan]), "b": ([2], [0.5])},
            {"skipped": math.inf},
            log_y=True,
            integer_x=True,
        ),
        Panel("third", "x", "y", {"c": ([0, 1], [0, 1])}),
    ]
    wide = assert_picture(line_panels(tmp_path / "sub" / "a.png", "title", panels))
    single = assert_picture(line_panels(tmp_path / "b.png", "title", panels[:1], columns=1))
    # Three panels two per row: wider and taller than one panel.
    assert wide.shape[0] > single.shape[0] and wide.shape[1] > single.shape[1]


@pytest.mark.parametrize(
    ("series", "match"),
    [
        ({}, r"no data to plot in 'p' \(no series\)"),
        ({"train": ([], [])}, r"no data to plot in 'p': 'train' is empty"),
        ({"train": ([1, 2], [0.5])}, r"'train' in 'p' has 2 x but 1 y values"),
    ],
)
def test_an_empty_or_ragged_series_is_an_error_and_writes_nothing(tmp_path, series, match):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match=match):
        line_panels(path, "t", [Panel("p", "x", "y", series)])
    assert not path.exists()
    with pytest.raises(ValueError, match="no panels"):
        line_panels(path, "t", [])


def test_bars_with_and_without_intervals_and_the_histogram(tmp_path):
    bars = {"a": (0.1, (0.05, 0.2)), "b": (-0.05, None), "c": (0.3, (math.nan, math.nan))}
    assert_picture(bar_chart(tmp_path / "bars.png", "t", "nats", bars))
    assert_picture(histogram(tmp_path / "hist.png", "t", "log10", [-3.0, -2.0, -2.5, -1.0]))
    with pytest.raises(ValueError, match="no bars"):
        bar_chart(tmp_path / "none.png", "t", "nats", {})
    with pytest.raises(ValueError, match="no values"):
        histogram(tmp_path / "none.png", "t", "x", [])
    with pytest.raises(ValueError, match="1 non-finite values"):
        histogram(tmp_path / "none.png", "t", "x", [1.0, math.inf])
    assert not (tmp_path / "none.png").exists()
