"""Santurkar et al. (2018) Fig. 4 from logged ``landscape/*`` scalars: one run or several side by side.

Panels, each over training steps: (a) loss landscape, the band [loss_min, loss_max] of
L(W_t - eta g_t) over the step-size grid; (b) gradient predictiveness, the band of
||grad L(W_t - eta g_t) - g_t||; (c) effective beta-smoothness; (d) ||g_t|| (the two bands
scale with it, so compare them only together with this panel). Runs share every panel, one
color per run, as in the paper's standard-vs-BN figure.

From the command line, with TensorBoard log directories (a version directory, or any
directory holding exactly one run's event files)::

    python -m callbacks.landscape_plot standard=logs/vgg/version_0 bn=logs/vgg_bn/version_0 --out fig4.png
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from callbacks.landscape_math import SUMMARY_KEYS

PREFIX = "landscape/"
# (low key, high key, panel title, y label) for the shaded min-max bands
BANDS = (
    ("loss_min", "loss_max", "loss landscape", r"$L(W - \eta g)$"),
    ("grad_diff_min", "grad_diff_max", "gradient predictiveness", r"$\|\nabla L(W - \eta g) - g\|$"),
)
# (key, panel title, y label) for the lines
LINES = (
    ("beta_smoothness", r"effective $\beta$-smoothness", r"$\max_\eta \|\nabla L(W - \eta g) - g\| / \|\eta g\|$"),
    ("grad_norm", "gradient norm", r"$\|g\|$"),
)

Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]
"""Summary key (no prefix) -> (steps, values)."""


def plot_landscape(runs: Mapping[str, Series], *, title: str | None = None, log_y: bool = False) -> Figure:
    """Draw the Fig. 4 panels for one or more runs (label -> series). Missing keys leave a panel empty."""
    if not runs:
        raise ValueError("runs must name at least one run, got an empty mapping")
    fig = Figure(figsize=(16, 3.8), layout="constrained")
    axes = fig.subplots(1, len(BANDS) + len(LINES))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, series), color in zip(runs.items(), colors):
        for ax, (lo, hi, _, _) in zip(axes, BANDS):
            if lo in series and hi in series:
                steps, low = _arrays(series[lo])
                steps_hi, high = _arrays(series[hi])
                if not np.array_equal(steps, steps_hi):
                    raise ValueError(f"run {label!r}: {lo} and {hi} were logged at different steps")
                ax.fill_between(steps, low, high, color=color, alpha=0.35, linewidth=0, label=label)
        for ax, (key, _, _) in zip(axes[len(BANDS) :], LINES):
            if key in series:
                ax.plot(*_arrays(series[key]), color=color, label=label)
    for ax, (_, _, name, ylabel) in zip(axes, BANDS):
        ax.set_title(name)
        ax.set_ylabel(ylabel)
    for ax, (_, name, ylabel) in zip(axes[len(BANDS) :], LINES):
        ax.set_title(name)
        ax.set_ylabel(ylabel)
    for ax in axes:
        ax.set_xlabel("training step")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return fig


def _arrays(series: tuple[Sequence[int], Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    steps, values = series
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def find_event_dir(path: str | Path) -> Path:
    """The one directory at or under ``path`` that holds TensorBoard event files."""
    path = Path(path)
    if path.is_file():
        return path
    dirs = sorted({f.parent for f in path.rglob("events.out.tfevents.*")})
    if len(dirs) != 1:
        found = ", ".join(str(d) for d in dirs) or "none"
        raise ValueError(f"{path} must hold the event files of exactly one run, found: {found}")
    return dirs[0]


def read_landscape_scalars(
    path: str | Path, prefix: str = PREFIX, key_suffix: str = ""
) -> dict[str, tuple[list[int], list[float]]]:
    """``landscape/*<key_suffix>`` scalars of one TensorBoard run: key (prefix and suffix removed)
    -> (steps, values). ``key_suffix`` picks one of several LandscapeCallbacks (e.g. ``"_unit"``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(find_event_dir(path)), size_guidance={"scalars": 0})  # 0: keep all
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith(prefix) and tag.endswith(key_suffix):
            events = accumulator.Scalars(tag)
            out[tag[len(prefix) : len(tag) - len(key_suffix)]] = ([e.step for e in events], [e.value for e in events])
    if not any(key in out for key in SUMMARY_KEYS):
        raise ValueError(f"no {prefix}*{key_suffix} scalars in {path}; was LandscapeCallback among the callbacks?")
    return out


def plot_runs(logdirs: Mapping[str, str | Path], key_suffix: str = "", **kwargs) -> Figure:
    """Fig. 4 for several runs (label -> TensorBoard log directory), e.g. standard vs BN;
    ``key_suffix`` picks the LandscapeCallback that logged with it."""
    return plot_landscape(
        {label: read_landscape_scalars(path, key_suffix=key_suffix) for label, path in logdirs.items()}, **kwargs
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Santurkar et al. Fig. 4 from TensorBoard logs.")
    parser.add_argument("runs", nargs="+", metavar="LABEL=LOGDIR", help="one run per argument")
    parser.add_argument("--out", required=True, help="output image (png, pdf, svg)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axes")
    parser.add_argument("--key-suffix", default="", help="the key_suffix of the LandscapeCallback to plot (e.g. _unit)")
    args = parser.parse_args(argv)
    logdirs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            parser.error(f"runs must be LABEL=LOGDIR, got {item!r}")
        logdirs[label] = path
    plot_runs(logdirs, key_suffix=args.key_suffix, title=args.title, log_y=args.log_y).savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
