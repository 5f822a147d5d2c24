"""Figures over the grid of a batch-size study: final values against batch size (Keskar et al.
2017: sharp minima of large batches; Masters & Luschi 2018: accuracy against batch size) and
the validation-accuracy heat map over batch size x learning rate (Masters & Luschi 2018).

The batch-size and learning-rate axes are the sweep's ``report: {batch_size, lr}`` keys, or the
varying grid axes whose names end in ``batch_size`` and ``lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from matplotlib.ticker import NullLocator

from lightning_bn.report.events import RunEvents
from lightning_bn.report.runs import Experiment
from lightning_bn.report.style import ReportFigure, colors, decorate, legend, log2_x, log_y, new_figure
from lightning_bn.report.summary import final_tags, pretty

MAX_PANELS = 6


def _final(tag: str) -> Callable[[RunEvents], float | None]:
    return lambda ev: ev.scalars[tag].final if tag in ev.scalars else None


def grid_number(value) -> float | None:
    """A grid value as a number: numbers, and the labels of a labelled axis that are numbers
    (``bn_batch: {4: {...}, 8: {...}}`` gives the labels "4" and "8")."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _vs_batch_size(exp: Experiment, metrics, name: str, title: str, caption: str, log_scale: bool):
    bs_key = exp.axis_for("batch_size")
    if bs_key is None or not metrics:
        return None
    groups = exp.configurations(exclude=(bs_key,))
    palette = colors(len(groups))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = new_figure(rows, cols, f"{exp.name}: {title}")
    all_sizes = sorted({b for r in exp.runs if (b := grid_number(r.get(bs_key))) is not None})
    for ax, (title, ylabel, value, scale) in zip(axes.ravel(), metrics):
        positive = True
        for (label, runs), color in zip(groups.items(), palette):
            points = [(grid_number(r.get(bs_key)), value(r.events)) for r in runs]
            points = [(b, v * scale) for b, v in points if b is not None and v is not None and math.isfinite(v)]
            if not points:
                continue
            positive &= all(v > 0 for _, v in points)
            sizes = sorted({b for b, _ in points})
            means = [np.mean([v for b, v in points if b == s]) for s in sizes]
            ax.scatter([b for b, _ in points], [v for _, v in points], color=color, alpha=0.35, s=14)
            ax.plot(sizes, means, color=color, marker="o", linewidth=1.6, label=label or exp.name)
        log2_x(ax, all_sizes)
        if log_scale and positive:
            log_y(ax)
        decorate(ax, title, "batch size", ylabel)
    for ax in axes.ravel()[len(metrics) :]:
        ax.set_visible(False)
    legend(fig, axes)
    return ReportFigure(name, caption, fig)


def sharpness_figure(exp: Experiment) -> ReportFigure | None:
    tags = final_tags([r.events for r in exp.runs])
    metrics = [(pretty(t), "at the end of training", _final(t), 1.0) for t in tags[:MAX_PANELS]]
    caption = (
        "Final sharpness / Hessian measures against batch size (Keskar et al. 2017: large-batch training "
        "ends in sharper minima); points are runs (seeds), lines their mean."
    )
    return _vs_batch_size(exp, metrics, "sharpness_vs_batch_size", "sharpness vs batch size", caption, log_scale=True)


def accuracy_vs_batch_size_figure(exp: Experiment) -> ReportFigure | None:
    metrics = [
        (f"{what} accuracy", "final accuracy (%)", _final(tag), 100.0)
        for tag, what in (("val/acc", "validation"), ("test/acc", "test"), ("train/acc", "training"))
        if any(tag in r.events.scalars for r in exp.runs)
    ]
    caption = "Final accuracy against batch size (Masters & Luschi 2018); points are runs (seeds), lines their mean."
    return _vs_batch_size(exp, metrics, "accuracy_vs_batch_size", "accuracy vs batch size", caption, log_scale=False)


def heatmap_figure(exp: Experiment, tag: str = "val/acc") -> ReportFigure | None:
    # y: the sweep's report hint heatmap_y (e.g. a ghost-BN batch size), else the learning rate
    bs_key, lr_key = exp.axis_for("batch_size"), exp.axis_for("heatmap_y") or exp.axis_for("lr")
    if bs_key is None or lr_key is None or bs_key == lr_key or not any(tag in r.events.scalars for r in exp.runs):
        return None
    sizes = sorted({b for r in exp.runs if (b := grid_number(r.get(bs_key))) is not None})
    rates = sorted({v for r in exp.runs if (v := grid_number(r.get(lr_key))) is not None})
    if len(sizes) < 2 or len(rates) < 2:
        return None
    panels = exp.configurations(exclude=(bs_key, lr_key))
    grids = {label: _grid(runs, tag, bs_key, sizes, lr_key, rates) for label, runs in panels.items()}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    limits = (finite.min(), finite.max()) if finite.size else (0.0, 100.0)
    lr_name = exp.short.get(lr_key, lr_key)
    cols = min(3, len(panels))
    fig, axes = new_figure(-(-len(panels) // cols), cols, f"{exp.name}: final {_NAMES.get(tag, tag)} (%)")
    for ax, (label, grid) in zip(axes.ravel(), grids.items()):
        image = _draw_heatmap(ax, grid, sizes, rates, limits)
        decorate(ax, label if len(panels) > 1 else "", "batch size", lr_name)
        ax.grid(False)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"final {_NAMES.get(tag, tag)} (%)", shrink=0.9)
    caption = (
        f"Final {_NAMES.get(tag, tag)} (%, mean over seeds) for each batch size and {lr_name} (Masters & Luschi "
        "2018); both axes step through the log-spaced grid values. Grey cells: not run or not finite."
    )
    return ReportFigure("heatmap", caption, fig)


_NAMES = {"val/acc": "validation accuracy", "test/acc": "test accuracy", "train/acc": "training accuracy"}


def _grid(runs, tag: str, bs_key: str, sizes: list[float], lr_key: str, rates: list[float]) -> np.ndarray:
    """``grid[i, j]``: mean final ``tag`` (%) of the runs at rate ``i`` and batch size ``j``."""
    grid = np.full((len(rates), len(sizes)), np.nan)
    for i, rate in enumerate(rates):
        for j, size in enumerate(sizes):
            cell = [
                _final(tag)(r.events)
                for r in runs
                if grid_number(r.get(bs_key)) == size and grid_number(r.get(lr_key)) == rate
            ]
            cell = [v for v in cell if v is not None and math.isfinite(v)]
            if cell:
                grid[i, j] = 100 * float(np.mean(cell))
    return grid


def _draw_heatmap(ax, grid: np.ndarray, sizes: list[float], rates: list[float], limits: tuple[float, float]):
    image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto", vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(sizes)), [f"{s:g}" for s in sizes])
    ax.set_yticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_facecolor("0.85")
    middle = (limits[0] + limits[1]) / 2
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                color = "black" if grid[i, j] > middle else "white"
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=9, color=color)
    return image


def trains(run) -> bool | None:
    """Whether a run trained: its final validation (else test) accuracy is finite and at least
    1.5x chance, chance = 1 / ``model.init_args.num_classes`` (10 when the run does not set it).
    A diverged run (nan) or one stuck at a constant prediction (chance) did not; a learning rate
    too small to get far in the epochs given is a slow run, not an unstable one, and counts as
    training if it got clear of chance. None without an accuracy."""
    for tag in ("val/acc", "test/acc"):
        series = run.events.scalars.get(tag)
        if series is not None and series.values.size:
            classes = run.get("model.init_args.num_classes")
            chance = 1.0 / classes if isinstance(classes, int) and classes > 0 else 0.1
            final = float(series.values[-1])
            return bool(math.isfinite(final) and final >= 1.5 * chance)
    return None


def stable_range(runs, bs_key: str, lr_key: str) -> dict[float, list[float]]:
    """Batch size -> the sorted learning-rate values whose runs all trained (:func:`trains`)."""
    out: dict[float, list[float]] = {}
    cells: dict[tuple[float, float], list[bool]] = {}
    for run in runs:
        size, rate, ok = grid_number(run.get(bs_key)), grid_number(run.get(lr_key)), trains(run)
        if size is not None and rate is not None and ok is not None:
            cells.setdefault((size, rate), []).append(ok)
    for (size, rate), oks in sorted(cells.items()):
        out.setdefault(size, [])
        if all(oks):
            out[size].append(rate)
    return out


def stable_lr_figure(exp: Experiment) -> ReportFigure | None:
    """Masters & Luschi's stability claim: the learning rates that train, per batch size."""
    bs_key, lr_key = exp.axis_for("batch_size"), exp.axis_for("lr")
    if bs_key is None or lr_key is None or bs_key == lr_key:
        return None
    panels = exp.configurations(exclude=(bs_key, lr_key))
    sizes = sorted({b for r in exp.runs if (b := grid_number(r.get(bs_key))) is not None})
    rates = sorted({v for r in exp.runs if (v := grid_number(r.get(lr_key))) is not None})
    if len(sizes) < 2 or len(rates) < 2 or all(trains(r) is None for r in exp.runs):
        return None
    lr_name = exp.short.get(lr_key, lr_key)
    cols = min(3, len(panels))
    fig, axes = new_figure(-(-len(panels) // cols), cols, f"{exp.name}: {lr_name} that train, per batch size")
    for ax, (label, runs) in zip(axes.ravel(), panels.items()):
        for run in runs:
            size, rate, ok = grid_number(run.get(bs_key)), grid_number(run.get(lr_key)), trains(run)
            if size is None or rate is None or ok is None:
                continue
            ax.scatter([size], [rate], marker="o" if ok else "x", color="tab:green" if ok else "tab:red", s=40,
                       label="trains" if ok else "does not train", zorder=3)  # fmt: skip
        for size, good in stable_range(runs, bs_key, lr_key).items():
            if good:
                ax.plot([size, size], [good[0], good[-1]], color="tab:green", linewidth=6, alpha=0.3)
        log2_x(ax, sizes)
        ax.set_yscale("log", base=2)
        ax.set_yticks(rates, [f"{r:g}" for r in rates])
        ax.yaxis.set_minor_locator(NullLocator())
        decorate(ax, label if len(panels) > 1 else "", "batch size", lr_name)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    legend(fig, axes)
    caption = (
        f"The {lr_name} values that train at each batch size (Masters & Luschi 2018: the stable range shrinks as "
        "the batch grows): green circle, the run's final validation accuracy is at least 1.5x chance; red x, it "
        "diverged (nan) or stayed near chance; the bar spans the values that train."
    )
    return ReportFigure("stable_lr_range", caption, fig)
