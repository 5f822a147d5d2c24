"""Keskar et al. (2017) in the report: the sharpness table (their Tables 3/4) and sharpness along
training against the training loss (their Fig. 5).

Sharpness tags are ``sharpness/keskar_eps<eps>[_sub<p>][<key_suffix>]``; the suffix words
this project's configs use name the protocol: ``lbfgsb`` (SciPy's L-BFGS-B maximizer; none:
the torch one), ``bntrain`` / ``bneval`` (BatchNorm with batch / running statistics while f is
evaluated) and ``curve`` (measured along training, not only at its end). Other words are shown
as they are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from lightning_bn.report.grids import grid_number
from lightning_bn.report.runs import Experiment, RunInfo
from lightning_bn.report.style import ReportFigure, colors, decorate, legend, log_x, log_y, new_figure
from lightning_bn.report.summary import SUFFIX_WORDS as WORDS
from lightning_bn.report.summary import format_mean_std

TAG = re.compile(r"sharpness/keskar_eps(?P<eps>[^_/]+)(?:_sub(?P<sub>\d+))?(?P<suffix>(?:_[A-Za-z0-9.+-]+)*)")


@dataclass(frozen=True)
class Protocol:
    """How one sharpness value was measured: everything but eps."""

    space: str  # "full" or "100-d"
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        maximizer = "L-BFGS-B" if "lbfgsb" in self.words else "torch"
        rest = [WORDS.get(w, w) for w in self.words if w != "lbfgsb"]
        return ", ".join([self.space, maximizer, *rest])

    @property
    def along_training(self) -> bool:
        return "curve" in self.words


def parse(tag: str) -> tuple[str, Protocol] | None:
    """``(eps, protocol)`` of a phi tag, None for other tags (``_at_bound``, ``sharpness/loss``)."""
    match = TAG.fullmatch(tag)
    if match is None or tag.endswith("_at_bound"):
        return None
    words = tuple(w for w in match["suffix"].split("_") if w)
    space = f"{match['sub']}-d" if match["sub"] else "full"
    return match["eps"], Protocol(space, words)


def _protocol_order(protocol: Protocol) -> tuple:
    """Full space first, the torch maximizer before L-BFGS-B, batch statistics (the paper's
    protocol) before running statistics, then anything else by name."""
    mode = 0 if "bntrain" in protocol.words else 1 if "bneval" in protocol.words else 2
    return (protocol.space != "full", protocol.space, "lbfgsb" in protocol.words, mode, protocol.words)


def _batch_order(exp: Experiment) -> list[tuple[str, list[RunInfo]]]:
    """Configurations sorted by batch size where the sweep has a batch-size axis."""
    groups = list(exp.configurations().items())
    key = exp.axis_for("batch_size")
    if key is None:
        return groups

    def size(item: tuple[str, list[RunInfo]]) -> float:
        value = item[1][0].get(key)
        return float(value) if isinstance(value, (int, float)) else math.inf

    return sorted(groups, key=size)


def _finals(runs: list[RunInfo], tag: str) -> list[float]:
    return [r.events.scalars[tag].final for r in runs if tag in r.events.scalars]


def sharpness_table(exp: Experiment) -> list[str]:
    """Markdown: one row per protocol, per eps one column per configuration (mean ± std over
    seeds) and, with two configurations, their ratio (larger batch / smaller batch) of means."""
    tags = sorted({t for r in exp.runs for t in r.events.scalars if parse(t) is not None})
    found = {tag: parse(tag) for tag in tags}
    final = {t: p for t, p in found.items() if p is not None and not p[1].along_training}
    if not final:
        return []
    groups = _batch_order(exp)
    epsilons = sorted({eps for eps, _ in final.values()}, key=float, reverse=True)
    protocols = sorted(dict.fromkeys(p for _, p in final.values()), key=_protocol_order)
    header = ["protocol"]
    for eps in epsilons:
        header += [f"ε={eps}: {label}" for label, _ in groups]
        header += [f"ε={eps}: ratio"] if len(groups) == 2 else []
    rows = []
    for protocol in protocols:
        row = [protocol.text]
        for eps in epsilons:
            tag = next((t for t, (e, p) in final.items() if e == eps and p == protocol), None)
            values = [_finals(runs, tag) if tag else [] for _, runs in groups]
            row += [format_mean_std(v) if v else "–" for v in values]
            if len(groups) == 2:
                means = [float(np.mean(v)) if v else math.nan for v in values]
                ratio = means[1] / means[0] if means[0] > 0 else math.nan
                row.append(f"{ratio:.1f}x" if math.isfinite(ratio) else "–")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def sharpness_curve_figure(exp: Experiment) -> ReportFigure | None:
    """Keskar Fig. 5: phi measured along training against the training loss at the same step."""
    curves = sorted({t for r in exp.runs for t in r.events.scalars if (p := parse(t)) and p[1].along_training})
    if not curves:
        return None
    groups = _batch_order(exp)
    fig, axes = new_figure(1, len(curves), f"{exp.name}: sharpness along training")
    palette = colors(len(groups))
    for ax, tag in zip(axes.ravel(), curves):
        eps, protocol = parse(tag)  # type: ignore[misc]
        for (label, runs), color in zip(groups, palette):
            for i, run in enumerate(runs):
                points = _curve_points(run, tag)
                if points is None:
                    continue
                x, y = points
                ax.plot(
                    x,
                    y,
                    color=color,
                    marker="o",
                    markersize=3,
                    linewidth=1.2,
                    alpha=0.8,
                    label=label if i == 0 else None,
                )
                ax.scatter(x[-1:], y[-1:], color=color, marker="*", s=90, zorder=3)  # the last measurement
        log_x(ax)
        log_y(ax)
        ax.invert_xaxis()  # training goes left to right: the loss falls
        decorate(
            ax,
            f"ε = {eps}, {protocol.text.replace(', along training', '')}",
            "training cross-entropy (log, falling →)",
            "Keskar sharpness φ (log)",
        )
    legend(fig, axes)
    caption = (
        "Keskar sharpness measured at log-spaced steps during training against the training cross-entropy "
        "f(x) on the same fixed sample at that step (Keskar et al. Fig. 5: small-batch sharpness falls late in "
        "training, large-batch sharpness rises); one line per seed, a star at its last measurement."
    )
    return ReportFigure("sharpness_along_training", caption, fig)


def _curve_points(run: RunInfo, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(training loss, phi) at the steps of a phi curve: the loss f(x) the same callback logged
    on its fixed sample (``sharpness/loss<suffix>``), else the nearest logged ``train/loss``."""
    scalars = run.events.scalars
    if tag not in scalars:
        return None
    phi = scalars[tag]
    own = "sharpness/loss" + TAG.fullmatch(tag)["suffix"]
    loss = scalars.get(own) or scalars.get("train/loss")
    if loss is None:
        return None
    nearest = np.abs(loss.steps[None, :] - phi.steps[:, None]).argmin(axis=1)
    x, y = loss.values[nearest], phi.values
    keep = np.isfinite(x) & np.isfinite(y) & (y > 0) & (x > 0)
    return (x[keep], y[keep]) if keep.any() else None


def sharpness_and_accuracy_figure(exp: Experiment) -> ReportFigure | None:
    """Keskar Fig. 4: final phi (left axis, log) and test accuracy (right axis) against batch
    size, one panel per eps, one line per protocol; mean over seeds. Needs >= 3 batch sizes."""
    # against the batch size, or against the sweep's report hint x (e.g. the warm-start epochs k)
    by_batch = exp.axis_for("batch_size") is not None
    key = exp.axis_for("batch_size") or exp.axis_for("x")
    # a pure study of that axis (other axes would be averaged together), with a test accuracy
    if (
        key is None
        or set(exp.varying) - {key, exp.seed_key}
        or not any("test/acc" in r.events.scalars for r in exp.runs)
    ):
        return None
    final = {t: p for r in exp.runs for t in r.events.scalars if (p := parse(t)) and not p[1].along_training}
    sizes = sorted({v for r in exp.runs if (v := grid_number(r.get(key))) is not None})
    if not final or len(sizes) < 3:
        return None
    epsilons = sorted({eps for eps, _ in final.values()}, key=float, reverse=True)
    protocols = list(dict.fromkeys(p for _, p in final.values()))
    x_name = "batch size" if by_batch else exp.short.get(key, key)
    fig, axes = new_figure(1, len(epsilons), f"{exp.name}: sharpness and test accuracy vs {x_name}")
    palette = colors(len(protocols))

    def mean_at(tag: str, size: float) -> float:
        values = [
            r.events.scalars[tag].final for r in exp.runs if grid_number(r.get(key)) == size and tag in r.events.scalars
        ]
        return float(np.mean(values)) if values else math.nan

    for ax, eps in zip(axes.ravel(), epsilons):
        for protocol, color in zip(protocols, palette):
            tag = next((t for t, (e, p) in final.items() if e == eps and p == protocol), None)
            if tag is not None:
                ax.plot(sizes, [mean_at(tag, s) for s in sizes], color=color, marker="o", label=f"φ, {protocol.text}")
        if by_batch:
            log_x(ax)
        log_y(ax)
        decorate(ax, f"ε = {eps}", "batch size (log)" if by_batch else x_name, "Keskar sharpness φ (log)")
        twin = ax.twinx()
        twin.plot(
            sizes,
            [100 * mean_at("test/acc", s) for s in sizes],
            color="black",
            linestyle="--",
            marker="s",
            label="test accuracy",
        )
        twin.set_ylabel("test accuracy (%)")
        twin.grid(False)
        if ax is axes.ravel()[0]:
            ax.plot([], [], color="black", linestyle="--", marker="s", label="test accuracy (right axis)")
    # below the figure: inside a panel it would cover points of one of the two y axes
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), fontsize=8)
    caption = (
        "Final Keskar sharpness (left, log scale, one line per protocol) and test accuracy (right, dashed) against "
        + (
            "the batch size, means over seeds (Keskar et al. Fig. 4: sharpness rises and test accuracy falls with "
            "the batch size)."
            if by_batch
            else f"{x_name}, means over seeds."
        )
    )
    name = "sharpness_and_accuracy_vs_batch_size" if by_batch else f"sharpness_and_accuracy_vs_{x_name}"
    return ReportFigure(name, caption, fig)
