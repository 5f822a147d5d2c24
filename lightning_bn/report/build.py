"""Build the report: figures (PNG) and ``report.md`` for every experiment under a runs directory."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_bn.report import curves, distributions, grids
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
    distributions.distribution_figures,
    grids.heatmap_figure,
    grids.accuracy_vs_batch_size_figure,
    grids.sharpness_figure,
    curves.other_figures,
)
TITLES = {
    "curves": "Training curves",
    "landscape": "Optimization landscape",
    "ics": "Internal covariate shift",
    "activations": "Activation statistics",
    "heatmap": "Accuracy over batch size and learning rate",
    "accuracy_vs_batch_size": "Accuracy vs batch size",
    "sharpness_vs_batch_size": "Sharpness vs batch size",
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
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {str(runs_dir)!r} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else runs_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
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
            path = save(figure.figure, out_dir / _file_stem(exp.name) / f"{_file_stem(figure.name)}.png")
            title = TITLES.get(figure.name, figure.name.replace("_", " ").capitalize())
            shown.append((title, figure.caption, path.relative_to(out_dir).as_posix()))
        parts.append(section(exp, columns, shown))
    report = out_dir / REPORT_FILE
    report.write_text("\n".join(parts))
    return report


def _anchor(name: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, punctuation except - and _ dropped."""
    return re.sub(r"[^a-z0-9 _-]", "", name.lower()).replace(" ", "-")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
