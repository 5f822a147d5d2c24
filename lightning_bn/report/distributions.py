"""Distributions over time from TensorBoard histograms (Santurkar et al. 2018, Fig. 2 and 5).

Each panel is TensorBoard's distribution view: nested bands between the percentiles
(min-max, 6.7-93.3%, 15.9-84.1%, 30.9-69.1%) and the median, over training steps. Rows are
layers (up to four, first to last), columns are configurations (first seed of each), rows
share their y axis so the same layer can be compared across networks, as in the paper.
"""

from __future__ import annotations

from lightning_bn.report.runs import Experiment, RunInfo
from lightning_bn.report.style import ReportFigure, colors, decorate, label_outer, new_figure, pick
from lightning_bn.report.summary import POSITIONS

MAX_LAYERS = 4
MAX_CONFIGS = 5
# (low, high) percentile indices of events.PERCENTILES, outermost first, with their opacity
BANDS = ((0, 8, 0.12), (1, 7, 0.22), (2, 6, 0.35), (3, 5, 0.5))
MEDIAN = 4


def _split(tag: str) -> tuple[str, str, str]:
    """``activations/features.1/output`` -> ("activations", "features.1", "output")."""
    parts = tag.split("/")
    if len(parts) >= 3:
        return parts[0], "/".join(parts[1:-1]), parts[-1]
    if len(parts) == 2:
        return parts[0], parts[1], ""
    return "histograms", tag, ""


def distribution_figures(exp: Experiment) -> list[ReportFigure]:
    # (prefix, kind) -> layers in first-logged order
    kinds: dict[tuple[str, str], dict[str, None]] = {}
    for run in exp.runs:
        for tag in run.events.distributions:
            prefix, layer, kind = _split(tag)
            kinds.setdefault((prefix, kind), {})[layer] = None
    groups = exp.configurations()
    firsts: dict[str, RunInfo] = {label: runs[0] for label, runs in list(groups.items())[:MAX_CONFIGS]}
    palette = colors(len(groups))
    out = []
    for (prefix, kind), layer_set in kinds.items():
        layers = pick(list(layer_set), MAX_LAYERS)
        what = f"{prefix} {kind}".strip()
        fig, axes = new_figure(len(layers), len(firsts), f"{exp.name}: {what} distributions", sharex=True, sharey="row")
        for r, (row, layer) in enumerate(zip(axes, layers)):
            tag = "/".join(p for p in (prefix, layer, kind) if p)
            for ax, (label, run), color in zip(row, firsts.items(), palette):
                dist = run.events.distributions.get(tag)
                decorate(ax, label if r == 0 else "", "training step", f"layer {layer}\n{kind}".strip())
                if dist is None:
                    ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", alpha=0.6)
                    continue
                for low, high, alpha in BANDS:
                    ax.fill_between(dist.steps, dist.quantiles[:, low], dist.quantiles[:, high],
                                    color=color, alpha=alpha, linewidth=0)  # fmt: skip
                ax.plot(dist.steps, dist.quantiles[:, MEDIAN], color=color, linewidth=1.2)
        label_outer(axes)
        caption = (
            f"Distribution of `{prefix}/<layer>/{kind}` over training, TensorBoard style: bands between the "
            "min/max and the 6.7/93.3, 15.9/84.1 and 30.9/69.1 percentiles, line at the median."
        )
        if prefix in POSITIONS:
            caption += f" Taken at the {POSITIONS[prefix][1]}."
        name = "distributions_" + "_".join(p for p in (prefix, kind) if p)
        out.append(ReportFigure(name, caption, fig))
    return out
