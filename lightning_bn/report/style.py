"""Shared look of the report's figures: colors, smoothing, seed aggregation, axes, legends.

Figures are ``matplotlib.figure.Figure`` objects saved with the Agg renderer; pyplot's global
state is never touched, so the report works headless and inside other programs.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, NullLocator

from lightning_bn.report.events import Series

DPI = 130
PANEL = (4.3, 3.2)  # inches per panel
MAX_LEGEND_IN_AXES = 3


def colors(n: int) -> list:
    """Distinct colors: tab10 up to 10 series, else evenly spaced viridis."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.95, n)]


def new_figure(rows: int, cols: int, title: str, *, sharex: bool | str = False, sharey: bool | str = False):
    fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=sharex, sharey=sharey)
    # a long title over one or two panels would be cut at the figure's edges: wrap it (about
    # 7 bold characters of 13 pt per inch), keeping explicit line breaks
    width = max(20, int(PANEL[0] * cols * 7))
    title = "\n".join(textwrap.fill(line, width) for line in title.split("\n"))
    fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig, axes


def smooth(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average (ignores non-finite points)."""
    out = np.full(len(values), np.nan)
    last, count = 0.0, 0
    for i, v in enumerate(values):
        if np.isfinite(v):  # a diverged (nan/inf) point stays a gap instead of freezing the average
            last = last * weight + (1 - weight) * v
            count += 1
            out[i] = last / (1 - weight**count)
    return out


def aggregate(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs (seeds) at the steps all of them logged."""
    steps = series[0].steps
    for s in series[1:]:
        steps = np.intersect1d(steps, s.steps)
    if steps.size == 0:  # no common steps: fall back to the first run
        s = series[0]
        return s.steps, s.values, s.values, s.values
    stack = np.stack([s.values[np.searchsorted(s.steps, steps)] for s in series])
    stack[~np.isfinite(stack)] = np.nan
    with warnings.catch_warnings():  # steps where every seed diverged stay nan, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(stack, axis=0), np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)


def decorate(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)


def is_wide(arrays: Sequence[np.ndarray], decades: float = 2.5) -> bool:
    """Whether the data is positive and spans more than ``decades`` orders of magnitude."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    return bool(values.size and values.min() > 0 and np.log10(values.max() / values.min()) > decades)


def log_if_wide(ax: Axes, arrays: Sequence[np.ndarray], decades: float = 2.5) -> None:
    """Log y scale when positive data spans more than ``decades`` orders of magnitude."""
    if is_wide(arrays, decades):
        log_y(ax)


def fit_y(ax: Axes, arrays: Sequence[np.ndarray], decades: float = 2.5) -> None:
    """Keep a diverging run from flattening the others: clip the y range at 1.5x the 98th
    percentile when a few values are far above it; then go logarithmic if what is left
    spans more than ``decades`` orders of magnitude."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if not values.size:
        return
    top = float(np.percentile(values, 98))
    if top > 0 and values.max() > 5 * top:
        kept = values[values <= 1.5 * top]
        log_if_wide(ax, [kept], decades)
        low = kept.min()
        ax.set_ylim(low * 0.8 if ax.get_yscale() == "log" else low - 0.05 * (1.5 * top - low), 1.5 * top)
        ax.text(0.99, 0.99, "y clipped", transform=ax.transAxes, ha="right", va="top", fontsize=7, alpha=0.6)
    else:
        log_if_wide(ax, [values], decades)


def log_y(ax: Axes) -> None:
    """Log y axis with plain numbers (0.01, 20) instead of 10^-2, 2x10^1."""
    ax.set_yscale("log")
    # LogFormatter labels minor ticks (2, 3, 5...) only when the axis spans few decades.
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


def log_x(ax: Axes) -> None:
    """Log x axis with plain numbers, as :func:`log_y`."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


class _PlainLogFormatter(LogFormatter):
    def _pprint_val(self, x: float, d: float) -> str:
        return f"{x:g}"

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"  # matplotlib writes values below 1 as 1e-01


def log2_x(ax: Axes, ticks: Sequence[float]) -> None:
    """Log-2 x axis ticked at the grid values themselves (batch sizes 16, 64, 256)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def label_outer(axes: np.ndarray) -> None:
    """Axis labels only on the left column and the bottom row (shared axes hide inner tick labels)."""
    rows, cols = axes.shape
    for r in range(rows):
        for c in range(cols):
            if r < rows - 1:
                axes[r, c].set_xlabel("")
            if c > 0:
                axes[r, c].set_ylabel("")


def legend(fig: Figure, axes: np.ndarray, title: str | None = None) -> None:
    """One legend: inside the first panel when short, else below the figure."""
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if not labels:
        return
    if len(labels) <= MAX_LEGEND_IN_AXES and axes.size > 1:
        axes.ravel()[0].legend(handles, labels, fontsize=8, title=title, title_fontsize=8, framealpha=0.85)
    else:
        ncol = min(len(labels), 4 if axes.shape[1] <= 2 else 6)
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, title=title, title_fontsize=8)


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


class ReportFigure:
    """A figure of the report: file stem, one-line caption, the figure, and its section title
    (None: the report's title for ``name``)."""

    def __init__(self, name: str, caption: str, figure: Figure, title: str | None = None) -> None:
        self.name, self.caption, self.figure, self.title = name, caption, figure, title


def pick(items: Sequence[str], k: int) -> list[str]:
    """At most ``k`` items evenly spread from first to last (e.g. layers across the depth)."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted({round(x) for x in np.linspace(0, len(items) - 1, k)})]
