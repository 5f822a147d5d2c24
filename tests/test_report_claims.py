"""The report's claims section on small synthetic event files: the statistics, the verdict
rule (holds / does not hold / within the seeds' spread / one seed) and the markdown."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_bn.report import build_report, discover
from lightning_bn.report.claims import Claim, experiment_verdicts, judge
from lightning_bn.report.events import RunEvents, Series
from tests.test_report import sweep_record, write_run

AXES = {"norm": "norm", "seed_everything": "seed"}
NORMS = {"standard": "none", "batch_norm": "batch", "noisy_batch_norm": "noisy_batch"}


def norm_sweep(root, seeds=(0, 1, 2)):
    """standard vs BN vs noisy BN. Per seed s: val acc 0.30 / 0.50 / 0.40 (+0.01 s); ICS l2
    0.5 (standard) vs 0.2 (BN: reduced, the claim fails); beta 20 + s for both in the
    second half, the standard network 60 at one step (a spike); band 2.0 vs 1.0."""
    exp = root / "hl"
    index = 0
    steps = list(range(0, 101, 10))
    for label, norm in NORMS.items():
        for seed in seeds:
            standard = norm == "none"
            beta = [(t, (60.0 if standard and t == 80 else 20.0 + seed) if t >= 50 else 5.0) for t in steps]
            scalars = {
                "val/acc": [(100, {"none": 0.30, "batch": 0.50, "noisy_batch": 0.40}[norm] + 0.01 * seed)],
                "ics/features.0/l2_diff": [(t, 0.0) for t in steps],  # the first layer: 0 by definition
                "ics/features.4/l2_diff": [(t, 0.5 if standard else 0.2 + 0.001 * seed) for t in steps],
                "landscape/loss_min": [(t, 1.0) for t in steps],
                "landscape/loss_max": [(t, 3.0 if standard else 2.0) for t in steps],
                "landscape/grad_diff_max": [(t, 9.0 + seed if standard else 9.0 + 1.5 * seed) for t in steps],
                "landscape/beta_smoothness": beta,
            }
            name = f"norm={label},seed={seed}"
            values = {"norm": label, "seed_everything": seed}
            record = sweep_record("hl", name, index, values, AXES)
            record["options"] = {"model.init_args.norm": norm, "seed_everything": seed}
            write_run(exp / name, scalars, record=record)
            index += 1
    return exp


def verdicts(exp_dir) -> dict[str, tuple[str, str]]:
    exp = discover(exp_dir.parent)[0]
    return {v.claim: (v.evidence, v.verdict) for _, v in experiment_verdicts(exp)}


def test_each_claim_gets_its_statistic_and_verdict(tmp_path):
    got = verdicts(norm_sweep(tmp_path))
    evidence, verdict = got["BN trains faster (Santurkar Fig. 1)"]
    assert verdict == "holds" and evidence == "BN 51 ± 1% vs standard 31 ± 1% (3 vs 3 runs)"
    assert got["noisy BN still trains better than standard (Fig. 2)"][1] == "holds"
    # a claim that does not hold: BN's ICS is lower here (the first layer's zeros are left out)
    evidence, verdict = got["BN does not reduce ICS (Def. 2.1, Fig. 3)"]
    assert verdict == "does not hold" and evidence.startswith("BN 0.201 ± 0.001 vs standard 0.5 ± 0 ")
    assert got["BN: narrower loss band (Fig. 4a)"][1] == "holds"
    # medians equal (20 + s), the spike only in the max; the means include the early phase
    evidence, verdict = got["BN: lower effective β-smoothness (Fig. 4c)"]
    assert verdict == "within the seeds' spread" and "mean over all steps" in evidence
    assert got["BN: steadier β-smoothness (Fig. 4c)"][1] == "holds"
    # 9 + s vs 9 + 1.5 s: means 10.5 vs 10 with stds 1.5 and 1: inside twice the standard error
    assert got["BN: more predictive gradient (Fig. 4b)"][1] == "within the seeds' spread"


def test_one_seed_gives_a_direction_only(tmp_path):
    got = verdicts(norm_sweep(tmp_path, seeds=(0,)))
    assert got["BN trains faster (Santurkar Fig. 1)"] == ("BN 50% vs standard 30% (one run each)", "holds (one seed)")
    assert got["BN does not reduce ICS (Def. 2.1, Fig. 3)"][1] == "does not hold (one seed)"


def _events(values: dict[str, list[tuple[int, float]]]) -> RunEvents:
    ev = RunEvents()
    for tag, points in values.items():
        ev.scalars[tag] = Series(np.array([s for s, _ in points]), np.array([v for _, v in points], dtype=float))
    return ev


@pytest.mark.parametrize(
    ("direction", "a", "b", "expected"),
    [
        ("lower", [1.0, 2.0, 3.0], [5.0, 6.0, 7.0], "holds"),  # difference 4 > 2 * sqrt(1/3 + 1/3) = 1.63
        ("lower", [5.0, 6.0, 7.0], [1.0, 2.0, 3.0], "does not hold"),
        ("lower", [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], "within the seeds' spread"),  # 1 < 1.63
        ("not lower", [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], "holds (within the seeds' spread)"),
        ("not lower", [1.0, 2.0, 3.0], [5.0, 6.0, 7.0], "does not hold"),
        ("higher", [3.0], [1.0], "holds (one seed)"),
        ("higher", [1.0], [3.0], "does not hold (one seed)"),
    ],
)
def test_verdict_rule(direction, a, b, expected):
    claim = Claim("c", "s", lambda ev: ev.scalars["x"].final, "A", "B", direction)
    a_runs = [_events({"x": [(0, v)]}) for v in a]
    b_runs = [_events({"x": [(0, v)]}) for v in b]
    assert judge(claim, a_runs, b_runs).verdict == expected


def test_no_finite_value_gives_no_verdict():
    claim = Claim("c", "s", lambda ev: ev.scalars["x"].final, "A", "B", "lower")
    assert judge(claim, [_events({"x": [(0, math.nan)]})], [_events({"x": [(0, 1.0)]})]) is None


def test_batch_size_claims_compare_the_smallest_and_largest_batch(tmp_path):
    exp = tmp_path / "bs"
    axes = {"data.init_args.batch_size": "batch_size"}
    for index, (bs, sharp, acc) in enumerate(((64, 2.0, 0.9), (512, 8.0, 0.88), (4096, 50.0, 0.8))):
        name = f"batch_size={bs}"
        scalars = {"sharpness/keskar_eps0.001": [(10, sharp)], "test/acc": [(10, acc)]}
        write_run(exp / name, scalars, record=sweep_record("bs", name, index, {"data.init_args.batch_size": bs}, axes))
    got = {v.claim: v for _, v in experiment_verdicts(discover(tmp_path)[0])}
    sharper = got["large batch: sharper minimum (Keskar Tables 3/4)"]
    assert sharper.verdict == "holds (one seed)" and sharper.evidence.startswith("large batch 50 vs small batch 2")
    worse = got["large batch: worse generalization (Keskar Table 2; Masters & Luschi at one base lr)"]
    assert worse.verdict == "holds (one seed)"


def test_the_report_has_the_claims_section(tmp_path):
    norm_sweep(tmp_path / "runs")
    text = build_report(tmp_path / "runs").read_text()
    assert "### Claims" in text
    assert "| BN does not reduce ICS (Def. 2.1, Fig. 3) | ICS ‖G − G'‖, mean over steps and layers |" in text
    assert "| **does not hold** |" in text and "| **within the seeds' spread** |" in text


def test_the_stable_learning_rate_range_claim(tmp_path):
    from lightning_bn.report.claims import stability_verdict

    exp_dir = tmp_path / "ml"
    axes = {"data.init_args.batch_size": "batch_size", "base_lr": "base_lr"}
    index = 0
    for bs, ok_rates in ((8, (0.001, 0.01)), (512, (0.001,))):
        for base_lr in (0.001, 0.01, 0.1):
            acc = 0.3 if base_lr in ok_rates else float("nan")
            name = f"batch_size={bs},base_lr={base_lr}"
            values = {"data.init_args.batch_size": bs, "base_lr": base_lr}
            write_run(exp_dir / name, {"val/acc": [(9, acc)]}, record=sweep_record("ml", name, index, values, axes))
            index += 1
    verdict = stability_verdict(discover(tmp_path)[0])
    assert verdict.evidence == "batch 8: 2 of 3 (0.001 to 0.01); batch 512: 1 of 3 (0.001 to 0.001)"
    assert verdict.verdict == "holds (one seed)"
