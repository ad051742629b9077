"""PNG charts that work offline (matplotlib's Agg backend: no display, no network), for
the pictures each stage writes under metrics/plots/ beside its tables.

DVC's own HTML plots load vega from a CDN; these PNGs open anywhere. A chart given an
empty series, or nothing at all, raises ValueError naming the file and the series: a
picture of nothing would hide a training loop that logged nothing. NaN points are gaps.

    line_panels(Path("metrics/plots/x.png"), "title", [Panel("loss", "step", "loss",
        {"train": ([1, 2], [0.9, 0.5])}, {"baseline": 0.7})])
    bar_chart(Path("bars.png"), "title", "increase", {"a": (0.1, (0.05, 0.2))})
    histogram(Path("hist.png"), "title", "log10 density", [-2.0, -1.5, -1.0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DPI = 110
REFERENCE_STYLES = ("--", ":", "-.")
"""One line style per reference of a panel, so two of them stay apart."""
Series = tuple[Sequence[float], Sequence[float]]  # (x, y), equal lengths


@dataclass(frozen=True)
class Panel:
    """One axes: a line per series, a dashed horizontal line per reference."""

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, Series]
    """label -> (x, y)."""
    references: Mapping[str, float] = field(default_factory=dict)
    """label -> y, e.g. a baseline or the unsteered model; non-finite ones are left out."""
    log_y: bool = False
    integer_x: bool = False


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check(path: Path, panel: Panel) -> None:
    if not panel.series:
        raise ValueError(f"{path}: no data to plot in {panel.title!r} (no series)")
    for label, (x, y) in panel.series.items():
        if len(x) == 0:
            raise ValueError(f"{path}: no data to plot in {panel.title!r}: {label!r} is empty")
        if len(x) != len(y):
            raise ValueError(
                f"{path}: {label!r} in {panel.title!r} has {len(x)} x but {len(y)} y values"
            )


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def line_panels(path: Path, title: str, panels: Sequence[Panel], columns: int = 2) -> Path:
    """Panels side by side (`columns` per row), one shared title; writes the PNG."""
    if not panels:
        raise ValueError(f"{path}: no panels to plot")
    for panel in panels:
        _check(path, panel)
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False, layout="constrained"
    )
    for ax, panel in zip(axes.flat, panels, strict=False):
        for label, (x, y) in panel.series.items():
            ax.plot(x, y, marker="." if len(x) <= 60 else None, label=label)
        for i, (label, value) in enumerate(panel.references.items()):
            if math.isfinite(value):
                style = REFERENCE_STYLES[i % len(REFERENCE_STYLES)]
                ax.axhline(value, linestyle=style, linewidth=1.2, color="gray", label=label)
        if panel.log_y:
            ax.set_yscale("log")
        if panel.integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def bar_chart(
    path: Path,
    title: str,
    ylabel: str,
    bars: Mapping[str, tuple[float, Sequence[float] | None]],
) -> Path:
    """One bar per label, its (low, high) interval as an error bar when given."""
    if not bars:
        raise ValueError(f"{path}: no data to plot in {title!r} (no bars)")
    plt = _pyplot()
    labels = list(bars)
    values = [bars[k][0] for k in labels]
    spans = [_finite_span(bars[k][1]) for k in labels]
    low = [v - span[0] if span else 0.0 for v, span in zip(values, spans, strict=True)]
    high = [span[1] - v if span else 0.0 for v, span in zip(values, spans, strict=True)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.0))
    ax.bar(labels, values, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _finite_span(span: Sequence[float] | None) -> Sequence[float] | None:
    """An interval that can be drawn, or None (no error bar)."""
    if span is None or not all(math.isfinite(v) for v in span):
        return None
    return span


def histogram(path: Path, title: str, xlabel: str, values: Sequence[float], bins: int = 40) -> Path:
    """Counts of `values` in `bins` equal bins; non-finite values are an error."""
    if len(values) == 0:
        raise ValueError(f"{path}: no data to plot in {title!r} (no values)")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} non-finite values in {title!r}, e.g. {bad[0]}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.grid(alpha=0.3)
    return _save(fig, path)
