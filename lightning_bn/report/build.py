"""Build the report: figures (PNG) and ``report.md`` for every experiment under a runs directory."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_bn.errors import ConfigError
from lightning_bn.report import curves, distributions, grids, keskar, surfaces
from lightning_bn.report.markdown import section
from lightning_bn.report.runs import Experiment, discover
from lightning_bn.report.style import ReportFigure, save
from lightning_bn.report.summary import columns_for

REPORT_FILE = "report.md"
# Which figures an experiment gets is decided by what it logged: each maker returns nothing
# when its tags (or grid axes) are absent.
FIGURE_MAKERS: Sequence[Callable[[Experiment], ReportFigure | list[ReportFigure] | None]] = (
    curves.accuracy_figure,
    curves.landscape_figure,
    curves.ics_figure,
    curves.activation_figure,
    curves.norm_gradient_figure,
    curves.norm_curvature_figure,
    distributions.distribution_figures,
    surfaces.surface_figures,
    grids.heatmap_figure,
    grids.stable_lr_figure,
    grids.accuracy_vs_batch_size_figure,
    grids.sharpness_figure,
    keskar.sharpness_curve_figure,
    keskar.sharpness_and_accuracy_figure,
    curves.other_figures,
)
TITLES = {
    "curves": "Training curves",
    "landscape": "Optimization landscape",
    "ics": "Internal covariate shift",
    "activations": "Activation statistics (norm inputs)",
    "activations_output": "Activation statistics (norm outputs)",
    "norm_gradient": "Gradient through the normalization layers (Lemma 4.1)",
    "norm_curvature": "Curvature along the gradient at the normalization layers (Theorem 4.2)",
    "surface": "2-D loss surface (Li et al. 2018)",
    "surface_trajectory": "Optimization trajectory on its PCA plane (Li et al. 2018)",
    "heatmap": "Accuracy over batch size and learning rate",
    "stable_lr_range": "Learning rates that train, per batch size",
    "accuracy_vs_batch_size": "Accuracy vs batch size",
    "sharpness_vs_batch_size": "Sharpness vs batch size",
    "sharpness_along_training": "Sharpness along training (Keskar Fig. 5)",
    "sharpness_and_accuracy_vs_batch_size": "Sharpness and test accuracy vs batch size (Keskar Fig. 4)",
}


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "figure"


def make_figures(exp: Experiment) -> list[ReportFigure]:
    figures: list[ReportFigure] = []
    for maker in FIGURE_MAKERS:
        made = maker(exp)
        figures += made if isinstance(made, list) else [made] if made is not None else []
    return figures


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None, command: str | None = None) -> Path:
    """Write ``<out_dir>/report.md`` and ``<out_dir>/<experiment>/<figure>.png``; returns the markdown path.

    ``out_dir`` defaults to ``<runs_dir>/report``; ``command`` is shown as how the report was made.
    Everything is made in a staging directory first and moved into ``out_dir`` at the end, so a
    failure leaves the previous report as it was (never half overwritten).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        what = "is not a directory" if runs_dir.exists() else "does not exist"
        raise FileNotFoundError(f"runs directory {str(runs_dir)!r} {what}")
    out_dir = Path(out_dir) if out_dir is not None else runs_dir / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output directory {str(out_dir)!r} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-staging-", dir=out_dir))
    try:
        report = _build(runs_dir, out_dir, staging, command)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _build(runs_dir: Path, out_dir: Path, staging: Path, command: str | None) -> Path:
    experiments = discover(runs_dir)
    command = command or f"python -m lightning_bn.report {runs_dir}"
    parts = [
        "# lightning-bn report",
        "",
        f"Made by `{command}` from {_count(sum(len(e.runs) for e in experiments), 'run')} in "
        f"{_count(len(experiments), 'experiment')}. Re-run it to update the figures and tables.",
        "",
    ]
    if experiments:
        parts += ["Experiments: " + ", ".join(f"[{e.name}](#{_anchor(e.name)})" for e in experiments), ""]
    else:
        parts += [f"No runs found under `{runs_dir}` (no `run.json` nor TensorBoard event files).", ""]
    for exp in experiments:
        columns = columns_for([run.events for run in exp.runs])
        shown = []
        for figure in make_figures(exp):
            relative = Path(_file_stem(exp.name)) / f"{_file_stem(figure.name)}.png"
            save(figure.figure, staging / relative)
            title = figure.title or TITLES.get(figure.name, figure.name.replace("_", " ").capitalize())
            shown.append((title, figure.caption, relative.as_posix()))
        parts.append(section(exp, columns, shown))
    (staging / REPORT_FILE).write_text("\n".join(parts))
    return out_dir / REPORT_FILE


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged files into ``out_dir``, ``report.md`` last (each move is atomic)."""
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == REPORT_FILE)
    targets = [out_dir / p.relative_to(staging) for p in files]
    for target in targets:  # refuse before anything is replaced
        if target.is_dir():
            raise ConfigError(f"cannot write {target}: it is a directory")
        for parent in target.parents:
            if parent == out_dir:
                break
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"cannot write {target}: {parent} is a file")
    for source, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def _anchor(name: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, punctuation except - and _ dropped."""
    return re.sub(r"[^a-z0-9 _-]", "", name.lower()).replace(" ", "-")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
