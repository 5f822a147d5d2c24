"""Figures over training steps: accuracy/loss (Santurkar Fig. 1), loss landscape bands
(Fig. 4), internal covariate shift per layer (Fig. 3), activation drift, and any other
measured scalar. One color per configuration; with several seeds, the line is their mean
and the light band their min-max."""

from __future__ import annotations

import re

import numpy as np
from matplotlib.axes import Axes

from callbacks.landscape_math import DEFAULT_LR_MULTIPLIERS
from lightning_bn.report.runs import Experiment
from lightning_bn.report.style import (
    ReportFigure,
    aggregate,
    colors,
    decorate,
    fit_y,
    is_wide,
    label_outer,
    legend,
    log_if_wide,
    log_y,
    new_figure,
    pick,
    smooth,
)
from lightning_bn.report.summary import POSITIONS, landscape_suffixes, pretty, trivial_ics_layer

STEP = "training step"
MAX_LAYERS = 4
COVERED = re.compile(
    r"(train|val|test|landscape)/.*|ics/.+/(l2_diff|cosine)|activations(_output)?/.+/(mean|std|mean_drift|std_drift)"
    r"|normgrad/.+/(ratio|gain|in_norm|out_norm|in_norm_lemma|mean_term|scale_term)"
    r"|normcurv/.+/(curv_in|curv_out|curv_ratio|quad_in|quad_out|quad_chain|norm_term|norm_term_paper)"
)
# Bookkeeping of the measurements (Hessian-vector products used, the standard error of the trace
# estimate, the fraction of sharpness coordinates at their bound): in the logs, not in figures.
DIAGNOSTIC = re.compile(r".*(num_hvps|_stderr|_at_bound)")


def _lines(ax: Axes, exp: Experiment, tag: str, scale: float = 1.0, smooth_weight: float = 0.0) -> list[np.ndarray]:
    """Draw ``tag`` for every configuration; returns the plotted values (for the log-scale choice)."""
    groups = exp.configurations()
    plotted = []
    for (label, runs), color in zip(groups.items(), colors(len(groups))):
        series = [r.events.scalars[tag] for r in runs if tag in r.events.scalars]
        if not series:
            continue
        steps, mean, low, high = aggregate(series)
        mean, low, high = mean * scale, low * scale, high * scale
        if smooth_weight and len(steps) > 10:
            ax.plot(steps, mean, color=color, alpha=0.2, linewidth=0.8)
            mean, low, high = (smooth(v, smooth_weight) for v in (mean, low, high))
        marker = "o" if len(steps) <= 12 else None
        ax.plot(steps, mean, color=color, label=label, linewidth=1.6, marker=marker, markersize=3.5)
        finite = np.flatnonzero(np.isfinite(mean))
        if finite.size and finite[-1] < len(mean) - 1:  # the run diverged: mark where the curve stops
            ax.plot(steps[finite[-1]], mean[finite[-1]], "x", color=color, markersize=9, markeredgewidth=2)
        if len(series) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
        plotted.append(mean)
    return plotted


def _tags_present(exp: Experiment, tags) -> list[str]:
    return [t for t in tags if any(t in r.events.scalars for r in exp.runs)]


def accuracy_figure(exp: Experiment) -> ReportFigure | None:
    panels = {
        "train/loss": ("training loss", "loss", 1.0, 0.8),
        "train/acc": ("training accuracy", "accuracy (%)", 100.0, 0.0),
        "val/acc": ("validation accuracy", "accuracy (%)", 100.0, 0.0),
        "val/loss": ("validation loss", "loss", 1.0, 0.0),
    }
    tags = _tags_present(exp, panels)
    if not tags:
        return None
    fig, axes = new_figure(1, len(tags), f"{exp.name}: training curves", sharex=True)
    for ax, tag in zip(axes[0], tags):
        title, ylabel, scale, weight = panels[tag]
        values = _lines(ax, exp, tag, scale, weight)
        decorate(ax, title + (" (smoothed)" if weight else ""), STEP, ylabel)
        if scale == 1.0:
            fit_y(ax, values)
    legend(fig, axes)
    caption = (
        "Loss and accuracy over training (Santurkar et al. 2018, Fig. 1); training loss smoothed as in TensorBoard "
        "(faint: raw). x: the last finite value of a run that diverged (nan/inf)."
    )
    return ReportFigure("curves", caption, fig)


def landscape_figure(exp: Experiment) -> list[ReportFigure]:
    """Fig. 4 for every LandscapeCallback of the runs: one figure per ``key_suffix``."""
    suffixes = landscape_suffixes(t for run in exp.runs for t in run.events.scalars)
    return [figure for suffix in suffixes if (figure := _landscape_figure(exp, suffix)) is not None]


def _landscape_figure(exp: Experiment, suffix: str) -> ReportFigure | None:
    tag = lambda name: f"landscape/{name}{suffix}"  # noqa: E731
    bands = [
        (tag("loss_min"), tag("loss_max"), "loss landscape", r"$L(W - \eta g)$ over $\eta$"),
        (tag("grad_diff_min"), tag("grad_diff_max"), "gradient predictiveness", r"$\|\nabla L(W - \eta g) - g\|$"),
    ]
    lines = [
        (tag("beta_smoothness"), r"effective $\beta$-smoothness", r"$\max_\eta \|\Delta\nabla L\| / \|\eta g\|$"),
        (tag("grad_norm"), "gradient norm", r"$\|g\|$"),
    ]
    bands = [b for b in bands if _tags_present(exp, b[:2]) == list(b[:2])]
    lines = [line for line in lines if _tags_present(exp, line[:1])]
    if not bands and not lines:
        return None
    which = f" (keys ending in {suffix})" if suffix else ""
    grid = landscape_grid(exp, suffix)
    title = f"{exp.name}: optimization landscape{which}" + (f"\n{grid}" if grid else "")
    fig, axes = new_figure(1, len(bands) + len(lines), title, sharex=True)
    groups = exp.configurations()
    palette = colors(len(groups))
    for ax, (low_tag, high_tag, title, ylabel) in zip(axes[0], bands):
        drawn = []
        for (label, runs), color in zip(groups.items(), palette):
            lows = [r.events.scalars[low_tag] for r in runs if low_tag in r.events.scalars]
            highs = [r.events.scalars[high_tag] for r in runs if high_tag in r.events.scalars]
            if not lows or not highs:
                continue
            steps, low, _, _ = aggregate(lows)
            steps_hi, high, _, _ = aggregate(highs)
            steps, i, j = np.intersect1d(steps, steps_hi, return_indices=True)
            ax.fill_between(steps, low[i], high[j], color=color, alpha=0.35, linewidth=0, label=label)
            ax.plot(steps, high[j], color=color, linewidth=0.6, alpha=0.8)
            ax.plot(steps, low[i], color=color, linewidth=0.6, alpha=0.8)
            drawn += [low[i], high[j]]
        decorate(ax, title, STEP, ylabel)
        log_if_wide(ax, drawn)
    for ax, (line_tag, title, ylabel) in zip(axes[0][len(bands) :], lines):
        log_if_wide(ax, _lines(ax, exp, line_tag))
        decorate(ax, title, STEP, ylabel)
    legend(fig, axes)
    caption = (
        "Santurkar et al. 2018, Fig. 4 layout: at each measured step, the range over step sizes eta of the loss "
        "L(W - eta g) and of the gradient change ||grad L(W - eta g) - g|| (shaded bands), the effective "
        "beta-smoothness, and ||g||: the bands scale with ||g||, so compare them together with the last panel."
    )
    if suffix:
        caption += (
            f" Logged by the LandscapeCallback with key_suffix {suffix!r}; with direction='unit' its steps are "
            "fixed distances d along g/||g|| (eta = d/||g||), so the networks are compared at the same distance moved."
        )
    title = "Optimization landscape" + which
    return ReportFigure("landscape" + suffix, caption, fig, title=title if suffix else None)


def _values_text(values: list[float]) -> str:
    shown = [f"{v:g}" for v in values]
    return "{" + (", ".join(shown) if len(shown) <= 5 else f"{shown[0]}, {shown[1]}, …, {shown[-1]}") + "}"


def landscape_grid(exp: Experiment, suffix: str) -> str | None:
    """The step sizes of the runs' LandscapeCallback with ``key_suffix`` (from run.json), as
    ``eta in {...}`` or ``d in {...}`` (direction='unit'); None if unknown or not the same in every run."""
    texts = set()
    for run in exp.runs:
        entries = run.get("trainer.callbacks") or []
        for entry in entries if isinstance(entries, list) else []:
            args = entry.get("init_args", {}) if isinstance(entry, dict) else {}
            if (
                not str(entry.get("class_path", "")).endswith("LandscapeCallback")
                or args.get("key_suffix", "") != suffix
            ):
                continue
            if args.get("step_sizes"):
                sizes = [float(v) for v in args["step_sizes"]]
            else:
                lr = run.get("model.init_args.lr")
                if not isinstance(lr, int | float):
                    return None
                sizes = [m * lr for m in args.get("lr_multipliers", DEFAULT_LR_MULTIPLIERS)]
            symbol = "d" if args.get("direction") == "unit" else "η"
            texts.add(
                f"{symbol} ∈ {_values_text(sizes)} ({len(sizes)} {'distances' if symbol == 'd' else 'step sizes'})"
            )
    return texts.pop() if len(texts) == 1 else None


def _layers(exp: Experiment, prefix: str, suffix: str) -> list[str]:
    pattern = re.compile(rf"{re.escape(prefix)}/(.+)/{re.escape(suffix)}")
    found: dict[str, None] = {}
    for run in exp.runs:
        for tag in run.events.scalars:
            match = pattern.fullmatch(tag)
            if match:
                found.setdefault(match.group(1))
    return list(found)


def _per_layer_figure(
    exp: Experiment, prefix: str, rows, name: str, title: str, caption: str, skip_trivial_ics: bool = False
) -> ReportFigure | None:
    rows = [r for r in rows if _layers(exp, prefix, r[0])]
    layers = list(dict.fromkeys(layer for r in rows for layer in _layers(exp, prefix, r[0])))
    if skip_trivial_ics:
        layers = [lay for lay in layers if not all(trivial_ics_layer(run.events, lay) for run in exp.runs)]
    layers = pick(layers, MAX_LAYERS)
    if not layers or not rows:
        return None
    # y not shared: layers differ in scale, and each panel compares the configurations
    fig, axes = new_figure(len(rows), len(layers), f"{exp.name}: {title}", sharex=True)
    for row, (suffix, quantity, log_ok) in zip(axes, rows):
        row_values = []
        for ax, layer in zip(row, layers):
            row_values += _lines(ax, exp, f"{prefix}/{layer}/{suffix}")
            decorate(ax, f"layer {layer}", STEP, quantity)
        if log_ok and is_wide(row_values):  # one rule per row: the layers of a quantity read alike
            for ax in row:
                log_y(ax)
    label_outer(axes)
    legend(fig, axes)
    return ReportFigure(name, caption, fig)


def ics_figure(exp: Experiment) -> ReportFigure | None:
    rows = [("l2_diff", r"$\|G - G'\|_2$", True), ("cosine", r"$\cos(G, G')$", False)]
    caption = (
        "Internal covariate shift (Santurkar et al. 2018, Def. 2.1 and Fig. 3): for each layer, the difference "
        "between its gradient G before and G' after the preceding layers take their update; "
        f"up to {MAX_LAYERS} layers from first to last, without a layer whose ICS is 0 at every step in every run "
        "(the first layer: nothing precedes it)."
    )
    return _per_layer_figure(exp, "ics", rows, "ics", "internal covariate shift", caption, skip_trivial_ics=True)


def norm_gradient_figure(exp: Experiment) -> ReportFigure | None:
    rows = [
        ("ratio", r"$\|\partial L/\partial y\| \,/\, \|\partial L/\partial z\|$", True),
        ("gain", r"mean $\gamma^2/\sigma^2$", True),
        ("in_norm", r"$\|\partial L/\partial y\|$", True),
    ]
    caption = (
        "Santurkar et al. Lemma 4.1 measured in training (NormGradientCallback, docs/norm-gradient.md): per "
        "normalization layer, the gradient norm below the layer over the norm above it (exactly 1 at a standard "
        "network's placeholder), BatchNorm's gain γ²/σ² that rescales it, and the gradient norm below the layer; "
        f"up to {MAX_LAYERS} layers from first to last."
    )
    return _per_layer_figure(
        exp, "normgrad", rows, "norm_gradient", "gradient through the normalization layers", caption
    )


def norm_curvature_figure(exp: Experiment) -> ReportFigure | None:
    # linear axes: a curvature along the gradient can be negative
    rows = [
        ("curv_in", r"$g_y^\top H_{yy}\, g_y / \|g_y\|^2$", False),
        ("curv_out", r"$g_z^\top H_{zz}\, g_z / \|g_z\|^2$", False),
        ("curv_ratio", "curv_in / curv_out", False),
    ]
    caption = (
        "Santurkar et al. Theorem 4.2 measured in training (NormCurvatureCallback, docs/norm-gradient.md): per "
        "normalization layer, the loss's second derivative along the normalized gradient with respect to the "
        "layer's input y and to its output z (what the network without the layer sees there), and their ratio "
        f"(exactly 1 at a standard network's placeholder); up to {MAX_LAYERS} layers from first to last."
    )
    return _per_layer_figure(
        exp, "normcurv", rows, "norm_curvature", "curvature along the gradient at the norms", caption
    )


def activation_figure(exp: Experiment) -> list[ReportFigure]:
    """One figure per position the ActivationStatsCallbacks observed (norm input and/or output)."""
    rows = [
        ("mean", "mean of unit means", False),
        ("std", "mean of unit stds", True),
        ("mean_drift", "drift of unit means", True),
        ("std_drift", "drift of unit stds", True),
    ]
    figures = []
    for prefix, (short, where) in POSITIONS.items():
        caption = (
            f"Activation statistics at the {where} (Santurkar et al. 2018, Fig. 1 and 5): per-unit batch mean "
            "and standard deviation averaged over units, and their step-to-step drift (the covariate shift)."
        )
        figure = _per_layer_figure(exp, prefix, rows, prefix, f"activation statistics ({short})", caption)
        if figure is not None:
            figures.append(figure)
    return figures


def other_figures(exp: Experiment, per_figure: int = 8) -> list[ReportFigure]:
    """Every scalar no other figure shows (e.g. sharpness or Hessian over training), by tag prefix."""
    tags: dict[str, None] = {}
    for run in exp.runs:  # a value logged once (e.g. sharpness at the end) has no curve to show
        shown = (t for t, s in run.events.scalars.items() if len(s.steps) > 1)
        tags.update(dict.fromkeys(t for t in shown if not COVERED.fullmatch(t) and not DIAGNOSTIC.fullmatch(t)))
    groups: dict[str, list[str]] = {}
    for tag in tags:
        groups.setdefault(tag.split("/")[0] if "/" in tag else "other", []).append(tag)
    out = []
    for group, group_tags in groups.items():
        for start in range(0, len(group_tags), per_figure):
            chunk = group_tags[start : start + per_figure]
            cols = min(4, len(chunk))
            rows = -(-len(chunk) // cols)
            fig, axes = new_figure(rows, cols, f"{exp.name}: {group} over training")
            for ax, tag in zip(axes.ravel(), chunk):
                log_if_wide(ax, _lines(ax, exp, tag))
                decorate(ax, pretty(tag), STEP, tag.split("/")[-1])
            for ax in axes.ravel()[len(chunk) :]:
                ax.set_visible(False)
            legend(fig, axes)
            suffix = f"_{start // per_figure + 1}" if len(group_tags) > per_figure else ""
            out.append(ReportFigure(f"{group}{suffix}", f"Logged `{group}/*` scalars over training.", fig))
    return out
