"""The papers' claims, checked against an experiment's runs: the numbers and a verdict.

Each claim compares two groups of runs that differ in one thing (the normalization, or the
batch size) and agree in every other grid value; the seeds of a configuration form its group.
A claim's statistic is one number per run; the verdict compares the groups' means:

* ``holds`` / ``does not hold``: the difference has the claimed sign and is larger than twice
  its standard error over the seeds (sqrt(s_a^2/n_a + s_b^2/n_b), sample standard deviations);
* ``within the seeds' spread``: it is not (the seeds cannot tell the two apart);
* with one run per group there is no spread: the verdict says ``(one seed)``, a direction only.

A claim that something is *not* reduced (Santurkar: BN does not reduce ICS) holds unless the
reduction is larger than the spread.

Landscape statistics are taken over the second half of the measured steps ("after warm-up": a
standard network's first steps sit on the 2.3 plateau with a tiny gradient, and the mean over
all steps mixes that phase in). The effective beta-smoothness is compared by its median there,
and its steadiness by its maximum (the spikes the paper's Fig. 4c shows), next to its mean,
so that a mean that says the opposite of the median is explained rather than left to the reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_bn.report.events import RunEvents
from lightning_bn.report.runs import Experiment, RunInfo
from lightning_bn.report.summary import FINAL_TAGS, landscape_suffixes, pretty, trivial_ics_layer

NORM_KEY = "model.init_args.norm"
ROLES = {"none": "standard", "batch": "BN", "noisy_batch": "noisy BN"}
Statistic = Callable[[RunEvents], float | None]


@dataclass(frozen=True)
class Claim:
    text: str  # the paper's claim, e.g. "BN trains faster (Santurkar Fig. 1)"
    statistic: str  # what is compared, e.g. "final validation accuracy"
    value: Statistic
    a: str  # the group the claim is about ("BN")
    b: str  # the group it is compared with ("standard")
    direction: str  # "higher", "lower" or "not lower": what a's value must be relative to b's
    percent: bool = False
    # a second statistic shown with the evidence, e.g. the mean when the claim is judged by the median
    also: tuple[str, Statistic] | None = None


@dataclass(frozen=True)
class Verdict:
    claim: str
    statistic: str
    evidence: str
    verdict: str


# -- statistics ---------------------------------------------------------------------------------
def _final(tag: str) -> Statistic:
    return lambda ev: ev.scalars[tag].final if tag in ev.scalars else None


def _mean(tag: str) -> Statistic:
    return lambda ev: ev.scalars[tag].mean if tag in ev.scalars else None


def _late_values(ev: RunEvents, tag: str) -> np.ndarray | None:
    """The values of ``tag`` over the second half of its measured steps."""
    if tag not in ev.scalars:
        return None
    series = ev.scalars[tag]
    keep = series.steps >= series.steps.min() + (series.steps.max() - series.steps.min()) / 2
    return series.values[keep]


def _late(tag: str, reduce: Callable[[np.ndarray], float]) -> Statistic:
    """``reduce`` over the finite values of the second half of ``tag``'s measured steps."""

    def value(ev: RunEvents) -> float | None:
        late = _late_values(ev, tag)
        late = None if late is None else late[np.isfinite(late)]
        return float(reduce(late)) if late is not None and late.size else None

    return value


def _late_band(low: str, high: str) -> Statistic:
    """Mean width high - low over the second half (both logged at the same steps)."""

    def value(ev: RunEvents) -> float | None:
        a, b = _late_values(ev, low), _late_values(ev, high)
        if a is None or b is None or a.size != b.size:
            return None
        width = (b - a)[np.isfinite(b - a)]
        return float(width.mean()) if width.size else None

    return value


def _ics_mean(ev: RunEvents) -> float | None:
    means = [
        s.mean
        for tag, s in ev.scalars.items()
        if tag.startswith("ics/") and tag.endswith("/l2_diff") and not trivial_ics_layer(ev, tag.split("/")[1])
    ]
    means = [m for m in means if math.isfinite(m)]
    return float(np.mean(means)) if means else None


def _accuracy_tag(runs: Sequence[RunInfo]) -> str | None:
    for tag in ("test/acc", "val/acc"):
        if all(tag in r.events.scalars for r in runs):
            return tag
    return None


# -- the claims ---------------------------------------------------------------------------------
def santurkar_claims(runs: Sequence[RunInfo]) -> list[Claim]:
    tags = {t for r in runs for t in r.events.scalars}
    claims: list[Claim] = []
    acc = _accuracy_tag(runs)
    if acc:
        what = f"final {'test' if acc.startswith('test') else 'validation'} accuracy"
        claims.append(Claim("BN trains faster (Santurkar Fig. 1)", what, _final(acc), "BN", "standard", "higher", True))
        claims.append(
            Claim("noisy BN still trains better than standard (Fig. 2)", what, _final(acc), "noisy BN", "standard",
                  "higher", True)
        )  # fmt: skip
    if any(t.startswith("ics/") for t in tags):
        claims.append(
            Claim("BN does not reduce ICS (Def. 2.1, Fig. 3)", "ICS ‖G − G'‖, mean over steps and layers", _ics_mean,
                  "BN", "standard", "not lower")
        )  # fmt: skip
    for suffix in landscape_suffixes(tags):
        where = " at equal distances" if suffix else ""
        tag = lambda name, s=suffix: f"landscape/{name}{s}"  # noqa: E731
        half = "second half of the measured steps"
        claims += [
            Claim(f"BN: narrower loss band{where} (Fig. 4a)", f"mean loss_max − loss_min, {half}",
                  _late_band(tag("loss_min"), tag("loss_max")), "BN", "standard", "lower"),
            Claim(f"BN: more predictive gradient{where} (Fig. 4b)", f"mean grad_diff_max, {half}",
                  _late(tag("grad_diff_max"), np.mean), "BN", "standard", "lower"),
            Claim(f"BN: lower effective β-smoothness{where} (Fig. 4c)", f"median β, {half}",
                  _late(tag("beta_smoothness"), np.median), "BN", "standard", "lower",
                  also=("mean over all steps", _mean(tag("beta_smoothness")))),
            Claim(f"BN: steadier β-smoothness{where} (Fig. 4c)", f"max β, {half}",
                  _late(tag("beta_smoothness"), np.max), "BN", "standard", "lower"),
        ]  # fmt: skip
    return claims


def keskar_claims(runs: Sequence[RunInfo]) -> list[Claim]:
    tags = {t for r in runs for t in r.events.scalars}
    claims: list[Claim] = []
    sharp = sorted(t for t in tags if FINAL_TAGS.fullmatch(t) and t.startswith("sharpness/"))
    for tag in sharp[:1]:
        claims.append(Claim("large batch: sharper minimum (Keskar Tables 3/4)", f"final {pretty(tag)}", _final(tag),
                            "large batch", "small batch", "higher"))  # fmt: skip
    acc = _accuracy_tag(runs)
    if acc:
        text = "large batch: worse generalization (Keskar Table 2; Masters & Luschi at one base lr)"
        claims.append(Claim(text, f"final {acc}", _final(acc), "large batch", "small batch", "lower", True))
    return claims


# -- verdicts -----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if n > 1 else float("nan"), n


def _text(mean: float, std: float, n: int, percent: bool) -> str:
    scale, unit = (100.0, "%") if percent else (1.0, "")
    if n > 1:
        return f"{scale * mean:.3g} ± {scale * std:.2g}{unit}"
    return f"{scale * mean:.3g}{unit}"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _versus(claim: Claim, a_values: list[float], b_values: list[float]) -> str:
    (ma, sa, na), (mb, sb, nb) = _mean_std(a_values), _mean_std(b_values)
    return f"{claim.a} {_text(ma, sa, na, claim.percent)} vs {claim.b} {_text(mb, sb, nb, claim.percent)}"


def judge(claim: Claim, a_runs: Sequence[RunEvents], b_runs: Sequence[RunEvents]) -> Verdict | None:
    """The verdict of ``claim`` with ``a_runs`` as its group ``a`` and ``b_runs`` as ``b``."""
    a_values, b_values = _finite([claim.value(r) for r in a_runs]), _finite([claim.value(r) for r in b_runs])
    if not a_values or not b_values:
        return None
    (ma, sa, na), (mb, sb, nb) = _mean_std(a_values), _mean_std(b_values)
    seeds = f"{na} vs {nb} runs" if na > 1 or nb > 1 else "one run each"
    evidence = f"{_versus(claim, a_values, b_values)} ({seeds})"
    if claim.also is not None:
        name, also = claim.also
        a_also, b_also = _finite([also(r) for r in a_runs]), _finite([also(r) for r in b_runs])
        if a_also and b_also:
            evidence += f"; {name}: {_versus(claim, a_also, b_also)}"
    difference = ma - mb
    claimed_sign = -1.0 if claim.direction == "lower" else 1.0
    if na > 1 and nb > 1:
        spread = 2.0 * math.sqrt(sa**2 / na + sb**2 / nb)
        if abs(difference) <= spread:
            verdict = (
                "holds (within the seeds' spread)" if claim.direction == "not lower" else "within the seeds' spread"
            )
        elif claim.direction == "not lower":
            verdict = "holds" if difference > 0 else "does not hold"
        else:
            verdict = "holds" if difference * claimed_sign > 0 else "does not hold"
    else:
        agrees = difference >= 0 if claim.direction == "not lower" else difference * claimed_sign > 0
        verdict = ("holds" if agrees else "does not hold") + " (one seed)"
    return Verdict(claim.text, claim.statistic, evidence, verdict)


def _norm_axis_groups(exp: Experiment) -> list[tuple[str, dict[str, list[RunInfo]]]]:
    """(context, role -> runs) for every setting of the axes other than the normalization."""
    norm_axes = tuple(k for k in exp.varying if len({r.get(NORM_KEY) for r in exp.runs if r.values.get(k)}) > 1)
    contexts: dict[str, dict[str, list[RunInfo]]] = {}
    for run in exp.runs:
        role = ROLES.get(run.get(NORM_KEY))
        if role is not None:
            contexts.setdefault(exp.label(run, exclude=norm_axes), {}).setdefault(role, []).append(run)
    return list(contexts.items())


def _batch_groups(exp: Experiment) -> list[tuple[str, dict[str, list[RunInfo]]]]:
    axis = exp.axis_for("batch_size")
    if axis is None:
        return []
    contexts: dict[str, dict[object, list[RunInfo]]] = {}
    for run in exp.runs:
        contexts.setdefault(exp.label(run, exclude=(axis,)), {}).setdefault(run.get(axis), []).append(run)
    out = []
    for context, by_size in contexts.items():
        sizes = sorted((s for s in by_size if isinstance(s, int | float)), key=float)
        if len(sizes) >= 2:
            label = (
                f"{context}, batch {sizes[0]} vs {sizes[-1]}"
                if context != exp.name
                else f"batch {sizes[0]} vs {sizes[-1]}"
            )
            out.append((label, {"small batch": by_size[sizes[0]], "large batch": by_size[sizes[-1]]}))
    return out


def stability_verdict(exp: Experiment) -> Verdict | None:
    """Masters & Luschi: the range of learning rates that train shrinks as the batch grows
    (:func:`~lightning_bn.report.grids.trains`), smallest vs largest batch size."""
    from lightning_bn.report.grids import stable_range

    bs_key, lr_key = exp.axis_for("batch_size"), exp.axis_for("lr")
    if bs_key is None or lr_key is None or bs_key == lr_key:
        return None
    ranges = stable_range(exp.runs, bs_key, lr_key)
    if len(ranges) < 2:
        return None
    (small, s_good), (large, l_good) = min(ranges.items()), max(ranges.items())
    tried = len({r.get(lr_key) for r in exp.runs})

    def text(size: float, good: list[float]) -> str:
        span = f" ({good[0]:g} to {good[-1]:g})" if good else ""
        return f"batch {size:g}: {len(good)} of {tried}{span}"

    if len(s_good) == len(l_good):
        verdict = "does not hold (the same number of values train)"
    else:
        verdict = "holds" if len(s_good) > len(l_good) else "does not hold"
    seeds = exp.seed_key is None or len({r.get(exp.seed_key) for r in exp.runs}) == 1
    return Verdict(
        "the range of learning rates that train shrinks as the batch grows (Masters & Luschi)",
        f"{exp.short.get(lr_key, lr_key)} values whose runs all train (final validation accuracy >= 1.5x chance)",
        f"{text(small, s_good)}; {text(large, l_good)}",
        verdict + (" (one seed)" if seeds else ""),
    )


def experiment_verdicts(exp: Experiment) -> list[tuple[str, Verdict]]:
    """(context, verdict) for every claim the experiment's runs can answer."""
    out: list[tuple[str, Verdict]] = []
    stability = stability_verdict(exp)
    if stability is not None:
        out.append((exp.name, stability))
    for groups, make in ((_norm_axis_groups(exp), santurkar_claims), (_batch_groups(exp), keskar_claims)):
        for context, roles in groups:
            for claim in make([r for runs in roles.values() for r in runs]):
                if claim.a in roles and claim.b in roles:
                    verdict = judge(claim, [r.events for r in roles[claim.a]], [r.events for r in roles[claim.b]])
                    if verdict is not None:
                        out.append((context, verdict))
    return out


def claims_table(exp: Experiment) -> list[str]:
    verdicts = experiment_verdicts(exp)
    if not verdicts:
        return []
    contexts = {c for c, _ in verdicts}
    header = (["setting"] if len(contexts) > 1 else []) + ["claim", "statistic", "values", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for context, v in verdicts:
        cells = ([context] if len(contexts) > 1 else []) + [v.claim, v.statistic, v.evidence, f"**{v.verdict}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines
