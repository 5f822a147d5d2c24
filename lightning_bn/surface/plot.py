"""The figures of a surface: a contour map (with the trajectory, when there is one) and a 3-D view.

Contour levels are spaced evenly in log(loss - min + 1e-3 x range), so the basin around the
minimum gets as many lines as the walls (Li et al. draw the same, with hand-set levels).
Every figure's title says which BN statistics it used. No pyplot: the user's backend is left alone.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from lightning_bn.surface.compute import Surface

MAX_PNG_BYTES = 200 * 1024


def _tick_format(ticks: np.ndarray) -> str:
    """The fewest significant digits (3 to 6) that tell the colour-bar ticks apart: levels
    crowd near the minimum, where 3 digits print 1.03 twice."""
    for digits in range(3, 7):
        if len({f"{t:.{digits}g}" for t in ticks}) == len(ticks):
            return f"%.{digits}g"
    return "%.6g"


def shared_levels(arrays, count: int = 24) -> np.ndarray:
    """``count`` contour levels spaced evenly in log(z - min + 1e-3 x range) over the finite
    values of all ``arrays`` together: panels drawn with them share one colour scale."""
    finite = np.concatenate([np.asarray(z, dtype=float).ravel() for z in arrays])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return np.array([0.0, 1e-12])
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.array([low, low + 1e-12])
    floor = 1e-3 * (high - low)
    return low - floor + np.geomspace(floor, high - low + floor, count)


def _axis_labels(surface: Surface) -> tuple[str, str]:
    if surface.mode == "trajectory" and surface.explained_variance is not None:
        v1, v2 = surface.explained_variance
        return (f"PCA direction 1 ({100 * v1:.1f}% of variance)", f"PCA direction 2 ({100 * v2:.1f}% of variance)")
    return ("a  (along d1, filter-normalized)", "b  (along d2, filter-normalized)")


def draw_contour(ax, surface: Surface, levels: np.ndarray, column: str = "train_loss", legend: bool = True):
    """Filled contours of ``column`` at ``levels`` on ``ax``, the path (trajectory mode) or the
    centre on top, axis labels; returns the filled contour set (for a colour bar)."""
    from matplotlib.colors import BoundaryNorm
    from matplotlib.ticker import MaxNLocator

    z = surface.values[column].numpy().T  # rows = b, columns = a, as contourf expects
    norm = BoundaryNorm(levels, 256, extend="max")
    filled = ax.contourf(surface.a, surface.b, z, levels=levels, cmap="viridis", norm=norm, extend="max")
    ax.contour(surface.a, surface.b, z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    if surface.path is not None:
        path = surface.path.numpy()
        ax.plot(path[:, 0], path[:, 1], "o-", color="red", ms=3, lw=1.2, label="checkpoints")
        ax.plot(path[0, 0], path[0, 1], "s", color="white", mec="red", ms=6, label="first")
        ax.plot(path[-1, 0], path[-1, 1], "*", color="red", ms=11, label="final (origin)")
        if legend:
            ax.legend(fontsize=7, loc="best")
    else:
        ax.plot(0, 0, "*", color="red", ms=10)
    # matplotlib's default 9-10 ticks with 2-3 decimals ran into each other on a 5-inch
    # panel ("-1.00-0.75-0.50"): at most 5 intervals, at round steps (-1, -0.5, 0, 0.5, 1)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
    ax.tick_params(labelsize=7)
    xlabel, ylabel = _axis_labels(surface)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    return filled


def add_colorbar(fig, filled, ax, levels: np.ndarray, column: str = "train_loss"):
    """A colour bar labelled at every 4th level (log-spaced levels: all of them would overlap)."""
    ticks = levels[::4]
    bar = fig.colorbar(filled, ax=ax, label=column.replace("_", " "), format=_tick_format(ticks), ticks=ticks)
    bar.ax.tick_params(labelsize=7)
    return bar


def contour_figure(surface: Surface, column: str = "train_loss", title: str | None = None):
    """Filled contours of ``column`` over (a, b); the path (trajectory mode) drawn on top."""
    from matplotlib.figure import Figure

    levels = shared_levels([surface.values[column].numpy()])
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot()
    filled = draw_contour(ax, surface, levels, column)
    add_colorbar(fig, filled, ax, levels, column)
    heading = (title + "\n") if title else ""
    fig.suptitle(f"{heading}{column.replace('_', ' ')}; {surface.bn_label()}", fontsize=8)
    fig.tight_layout()
    return fig


def surface3d_figure(surface: Surface, column: str = "train_loss", title: str | None = None):
    """A 3-D view of ``column`` over (a, b)."""
    from matplotlib.figure import Figure

    z = surface.values[column].numpy().T
    grid_a, grid_b = np.meshgrid(surface.a, surface.b)
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(grid_a, grid_b, z, cmap="viridis", linewidth=0, antialiased=True, rcount=50, ccount=50)
    xlabel, ylabel = _axis_labels(surface)
    ax.set_xlabel(xlabel.split("(")[0], fontsize=8)
    ax.set_ylabel(ylabel.split("(")[0], fontsize=8)
    ax.set_zlabel(column.replace("_", " "), fontsize=8)
    ax.tick_params(labelsize=7)
    heading = (title + "\n") if title else ""
    fig.suptitle(f"{heading}{surface.bn_label()}", fontsize=8)
    return fig


def save_png(fig, path: str | Path, max_bytes: int = MAX_PNG_BYTES) -> Path:
    """Write ``fig`` as PNG of at most ``max_bytes`` (lower resolution until it fits), renamed into place."""
    path = Path(path)
    for dpi in (110, 90, 72, 56, 40):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        if buffer.tell() <= max_bytes:
            break
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path
