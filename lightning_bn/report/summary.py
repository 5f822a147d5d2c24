"""The numbers of the report's tables: one row per run, one column per measured quantity.

Accuracies and losses are the *final* logged values (the end of training; ``best val acc``
is the maximum over validation epochs). Landscape, ICS and activation-drift columns are
*means over all measured steps* (over layers too for ICS and drift; not over a layer whose ICS
is 0 by definition, the first one), as the papers compare
these along training. Sharpness and Hessian columns are *final* values: Keskar's metric and
the Hessian spectrum characterize the minimizer training ends in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_bn.report.events import RunEvents

ACCURACY = "Accuracy and loss (final values; best: maximum over validation epochs)"
LANDSCAPE = "Loss landscape (means over the measured steps)"
SHIFT = "Internal covariate shift and activation drift (means over the measured steps and layers)"
FINAL = "Sharpness and Hessian (final values)"


@dataclass(frozen=True)
class Column:
    name: str
    value: Callable[[RunEvents], float | None]
    percent: bool = False  # accuracies: shown as %
    group: str = ACCURACY  # one table per group keeps the report readable


def _final(tag: str) -> Callable[[RunEvents], float | None]:
    return lambda ev: ev.scalars[tag].final if tag in ev.scalars else None


def _best(tag: str) -> Callable[[RunEvents], float | None]:
    return lambda ev: float(np.nanmax(ev.scalars[tag].values)) if tag in ev.scalars else None


def _mean(tag: str) -> Callable[[RunEvents], float | None]:
    return lambda ev: ev.scalars[tag].mean if tag in ev.scalars else None


def _mean_band(low: str, high: str) -> Callable[[RunEvents], float | None]:
    def value(ev: RunEvents) -> float | None:
        if low not in ev.scalars or high not in ev.scalars:
            return None
        lo, hi = ev.scalars[low], ev.scalars[high]
        steps, i, j = np.intersect1d(lo.steps, hi.steps, return_indices=True)
        width = hi.values[j] - lo.values[i]
        width = width[np.isfinite(width)]
        return float(width.mean()) if width.size else float("nan")

    return value


def trivial_ics_layer(ev: RunEvents, layer: str) -> bool:
    """Whether ``layer``'s ICS is exactly 0 at every measured step: the first layer, nothing precedes it.

    Def. 2.1 compares a layer's gradient before and after the *preceding* layers update, so the
    network's first layer has G = G' by definition; averaging its zeros in would dilute the
    other layers' values (and it would take a panel of the ICS figure).
    """
    series = ev.scalars.get(f"ics/{layer}/l2_diff")
    return series is not None and series.values.size > 0 and bool(np.all(series.values == 0))


def _mean_over_layers(pattern: str, skip_trivial_ics: bool = False) -> Callable[[RunEvents], float | None]:
    regex = re.compile(pattern)

    def value(ev: RunEvents) -> float | None:
        means = [
            ev.scalars[t].mean
            for t in ev.scalars
            if regex.fullmatch(t) and not (skip_trivial_ics and trivial_ics_layer(ev, t.split("/")[1]))
        ]
        means = [m for m in means if math.isfinite(m)]
        return float(np.mean(means)) if means else None

    return value


# ActivationStatsCallback's key prefix per position: (short name, where the statistics are taken)
POSITIONS = {
    "activations": ("norm input", "input of each normalization layer (what it receives)"),
    "activations_output": (
        "norm output",
        "output of each normalization layer (after the norm and, for noisy BN, its noise: what Fig. 2 shows)",
    ),
}

ACCURACY_COLUMNS = (
    Column("train loss", _final("train/loss")),
    Column("train acc", _final("train/acc"), percent=True),
    Column("val acc", _final("val/acc"), percent=True),
    Column("best val acc", _best("val/acc"), percent=True),
    Column("test acc", _final("test/acc"), percent=True),
)
# the landscape tables (one per LandscapeCallback, see landscape_columns) come between these
SHIFT_COLUMNS = (
    Column("ICS ℓ2", _mean_over_layers(r"ics/[^/]+/l2_diff", skip_trivial_ics=True), group=SHIFT),
    Column("ICS cosine", _mean_over_layers(r"ics/[^/]+/cosine", skip_trivial_ics=True), group=SHIFT),
    Column("act. mean drift", _mean_over_layers(r"activations/.+/mean_drift"), group=SHIFT),
    Column("act. std drift", _mean_over_layers(r"activations/.+/std_drift"), group=SHIFT),
    Column("norm output mean drift", _mean_over_layers(r"activations_output/.+/mean_drift"), group=SHIFT),
    Column("norm output std drift", _mean_over_layers(r"activations_output/.+/std_drift"), group=SHIFT),
)
# ``landscape/loss_min`` of a LandscapeCallback, with its key_suffix (group 1) if it has one
LANDSCAPE_TAG = re.compile(r"landscape/loss_min((?:_[A-Za-z0-9.+-]+)*)")
# The headline value of each sharpness / Hessian measurement (not its diagnostics or per-layer parts).
# Keskar tags may end in a key_suffix (``_lbfgsb_bntrain``); not the bound fractions, nor
# measurements along training (``_curve``), whose last value is not the end of training.
FINAL_TAGS = re.compile(
    r"sharpness/keskar_eps[^_/]+(_sub\d+)?(?!.*(_at_bound|_curve)(_|$))(_[A-Za-z0-9.+-]+)*|hessian/(top_eigenvalue|trace)"
)


SUFFIX_WORDS = {
    "lbfgsb": "L-BFGS-B",
    "bntrain": "BN batch stats",
    "bneval": "BN running stats",
    "curve": "along training",
}


def pretty(tag: str) -> str:
    """A readable name for a measurement tag (``sharpness/keskar_eps0.001`` -> Keskar sharpness, eps = 0.001)."""
    match = re.fullmatch(r"sharpness/keskar_eps([^_]+)(?:_sub(\d+))?((?:_[A-Za-z0-9.+-]+)*)", tag)
    if match:
        space = f", random {match.group(2)}-dim subspace" if match.group(2) else ""
        words = [SUFFIX_WORDS.get(w, w) for w in match.group(3).split("_") if w]
        return f"Keskar sharpness (ε = {match.group(1)}{space}{''.join(', ' + w for w in words)})"
    match = re.fullmatch(r"hessian/eigenvalue_(\d+)", tag)
    if match:
        return f"Hessian eigenvalue #{match.group(1)}"
    return {"hessian/top_eigenvalue": "top Hessian eigenvalue", "hessian/trace": "Hessian trace"}.get(tag, tag)


def final_tags(events: list[RunEvents]) -> list[str]:
    return list(dict.fromkeys(t for ev in events for t in ev.scalars if FINAL_TAGS.fullmatch(t)))


def landscape_suffixes(tags) -> list[str]:
    """The ``key_suffix`` of every LandscapeCallback that logged ``tags`` (``""`` for the default)."""
    found = (LANDSCAPE_TAG.fullmatch(t) for t in tags)
    return sorted({m.group(1) for m in found if m}, key=lambda suffix: (suffix != "", suffix))


def landscape_columns(suffix: str) -> list[Column]:
    """The landscape columns of one LandscapeCallback (``suffix``: its ``key_suffix``)."""
    tag = lambda name: f"landscape/{name}{suffix}"  # noqa: E731
    group = LANDSCAPE + (f", keys ending in {suffix}" if suffix else "")
    return [
        Column("loss range", _mean_band(tag("loss_min"), tag("loss_max")), group=group),
        Column("grad. predictiveness (max)", _mean(tag("grad_diff_max")), group=group),
        Column("β-smoothness", _mean(tag("beta_smoothness")), group=group),
        Column("‖g‖", _mean(tag("grad_norm")), group=group),
    ]


def columns_for(events: list[RunEvents]) -> list[Column]:
    """The columns that at least one run has data for: one landscape table per LandscapeCallback
    (``key_suffix``), a final-value column per sharpness/Hessian tag."""
    suffixes = landscape_suffixes(t for ev in events for t in ev.scalars)
    fixed = [*ACCURACY_COLUMNS, *(c for s in suffixes for c in landscape_columns(s)), *SHIFT_COLUMNS]
    columns = [c for c in fixed if any(c.value(ev) is not None for ev in events)]
    return columns + [Column(pretty(t), _final(t), group=FINAL) for t in final_tags(events)]


def format_number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def format_mean_std(values: list[float], percent: bool = False) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return format_number(values[0] if values else None, percent)
    mean = float(np.mean(finite))
    if len(finite) == 1:
        return format_number(mean, percent)
    std = float(np.std(finite, ddof=1))
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    return f"{mean:.4g} ± {std:.2g}"
