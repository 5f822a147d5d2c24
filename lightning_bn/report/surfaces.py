"""2-D loss surfaces and trajectory planes (Li et al. 2018) found in the runs' directories.

``python -m lightning_bn.surface ... --out <run>/surface`` writes ``surface.csv`` and
``directions.pt``; any directory holding both, at most :data:`MAX_DEPTH` levels below a run's
directory, is that run's surface output. Per experiment and per kind (random plane, PCA
trajectory plane) one figure, one panel per output (e.g. standard | BN), drawn by
:mod:`lightning_bn.surface.plot` with the same contour levels in every panel, so equal colours
mean equal losses across runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lightning_bn.report.runs import Experiment, RunInfo
from lightning_bn.report.style import ReportFigure, new_figure
from lightning_bn.surface.compute import Surface
from lightning_bn.surface.outputs import read_outputs
from lightning_bn.surface.plot import add_colorbar, draw_contour, shared_levels

MAX_DEPTH = 2
MAX_COLUMNS = 3
COLUMN = "train_loss"
KINDS = {
    "random": ("surface", "2-D loss surface around the final weights"),
    "trajectory": ("surface_trajectory", "optimization path on its PCA plane"),
}


def surface_dirs(run_dir: Path) -> list[Path]:
    """Directories at most :data:`MAX_DEPTH` levels below ``run_dir`` (itself included) holding
    ``surface.csv`` and ``directions.pt``, sorted."""
    found = []
    for depth in range(MAX_DEPTH + 1):
        for csv_file in run_dir.glob("/".join(["*"] * depth + ["surface.csv"])):
            if (csv_file.parent / "directions.pt").is_file():
                found.append(csv_file.parent)
    return sorted(found)


def _outputs(exp: Experiment) -> dict[str, list[tuple[str, Surface]]]:
    """Mode -> (panel label, surface) for every readable surface output of the experiment's runs."""
    found: dict[str, list[tuple[RunInfo, Path, Surface]]] = {}
    for run in exp.runs:
        for directory in surface_dirs(run.dir):
            try:
                surface = read_outputs(directory)
            except (OSError, RuntimeError, ValueError, KeyError):  # half-written or foreign files
                continue
            if COLUMN in surface.values and surface.mode in KINDS:
                found.setdefault(surface.mode, []).append((run, directory, surface))
    out: dict[str, list[tuple[str, Surface]]] = {}
    for mode, items in found.items():
        several = {run.name for run, _, _ in items if sum(r is run for r, _, _ in items) > 1}
        out[mode] = [(_label(exp, run, directory, run.name in several), s) for run, directory, s in items]
    return out


def _label(exp: Experiment, run: RunInfo, directory: Path, with_dir: bool) -> str:
    """The run's label in the report (``norm=batch``); the output's directory when a run has several."""
    label = exp.label(run) if len(exp.runs) > 1 else run.name
    return f"{label} ({directory.relative_to(run.dir).as_posix() or '.'})" if with_dir else label


def _panel_title(label: str, surface: Surface) -> str:
    title = f"{label}\n{surface.bn_label()}"
    if surface.explained_variance is not None:
        v1, v2 = surface.explained_variance
        title += f"\nPCA explained variance {100 * v1:.1f}% + {100 * v2:.1f}%"
    return title


def _figure(exp: Experiment, mode: str, panels: list[tuple[str, Surface]]) -> ReportFigure:
    name, what = KINDS[mode]
    cols = min(len(panels), MAX_COLUMNS)
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(rows, cols, f"{exp.name}: {what}")
    levels = shared_levels([s.values[COLUMN].numpy() for _, s in panels])
    filled = None
    for ax, (label, surface) in zip(axes.ravel(), panels):
        filled = draw_contour(ax, surface, levels, COLUMN, legend=ax is axes.ravel()[0])
        ax.set_title(_panel_title(label, surface), fontsize=8)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    add_colorbar(fig, filled, axes.ravel()[: len(panels)].tolist(), levels, COLUMN)
    return ReportFigure(name, _caption(mode, panels, levels), fig)


def _caption(mode: str, panels: list[tuple[str, Surface]], levels: np.ndarray) -> str:
    plane = (
        "the plane of the top-2 PCA directions of each run's checkpoints around its final one, its path on top "
        "(square: first checkpoint, star: final)"
        if mode == "trajectory"
        else "W + a d1 + b d2 around each run's weights (star), filter-normalized random directions"
    )
    return (
        f"Training loss over {plane}, from `python -m lightning_bn.surface`; {len(panels)} panel(s) with the "
        f"same {len(levels)} log-spaced contour levels ({levels[0]:.3g} to {levels[-1]:.3g}) and colours, "
        "so equal colours are equal losses across panels. Each panel says which BN statistics it used."
    )


def surface_figures(exp: Experiment) -> list[ReportFigure]:
    """One figure per kind of surface output found in the experiment's runs (none: [])."""
    return [_figure(exp, mode, panels) for mode, panels in sorted(_outputs(exp).items())]
