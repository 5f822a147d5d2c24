"""The report's Keskar section on synthetic logs: the sharpness table (protocol rows, mean ± std
over seeds per batch size, the ratio of the means) and the sharpness-along-training figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_bn.report import build_report, discover, make_figures
from lightning_bn.report.keskar import parse, sharpness_table
from tests.test_report import sweep_record, write_run

SUFFIXES = ("_bntrain", "_bneval", "_lbfgsb_bntrain", "_sub100_bntrain")


def keskar_experiment(root: Path) -> Path:
    """small (256) / large (6000) x 2 seeds; final phi = base x (1 + seed) per protocol, the large
    batch 10x the small; a phi curve at log-spaced steps."""
    exp = root / "keskar_f1"
    axes = {"batch": "batch", "seed_everything": "seed"}
    index = 0
    for label, bs, scale in (("small", 256, 1.0), ("large", 6000, 10.0)):
        for seed in (0, 1):
            name = f"batch={label},seed={seed}"
            end = 100
            scalars = {
                "train/loss": [(t, 2.0 / (t + 1)) for t in range(0, end, 2)],
                "test/acc": [(end, 0.9 - 0.01 * scale)],
            }
            for k, suffix in enumerate(SUFFIXES):
                for eps, base in (("0.001", 10.0), ("0.0005", 2.0)):
                    key = f"sharpness/keskar_eps{eps}{suffix}"
                    scalars[key] = [(end, (k + 1) * base * scale * (1 + seed))]
                    scalars[key + "_at_bound"] = [(end, 0.5)]
            scalars["sharpness/keskar_eps0.001_bntrain_curve"] = [(t, scale * (1 + t / 10)) for t in (1, 3, 10, 31)]
            record = sweep_record(
                "keskar_f1",
                name,
                index,
                {"batch": label, "seed_everything": seed},
                axes,
                options={"data.init_args.batch_size": bs},
                report={"batch_size": "data.init_args.batch_size"},
            )
            record["values"]["data.init_args.batch_size"] = bs
            write_run(exp / name, scalars, record=record)
            index += 1
    return exp


def test_parse_reads_eps_space_maximizer_and_bn_mode():
    eps, protocol = parse("sharpness/keskar_eps0.001_sub100_lbfgsb_bneval")
    assert eps == "0.001" and protocol.text == "100-d, L-BFGS-B, BN running stats"
    assert parse("sharpness/keskar_eps0.001_at_bound") is None
    assert parse("sharpness/loss_bntrain") is None
    assert parse("sharpness/keskar_eps5e-04_bntrain_curve")[1].along_training


def test_table_has_a_row_per_protocol_with_mean_std_over_seeds_and_the_ratio(tmp_path):
    (exp,) = discover(keskar_experiment(tmp_path).parent)
    lines = sharpness_table(exp)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "protocol",
        "ε=0.001: batch=small",
        "ε=0.001: batch=large",
        "ε=0.001: ratio",
        "ε=0.0005: batch=small",
        "ε=0.0005: batch=large",
        "ε=0.0005: ratio",
    ]
    rows = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in lines[2:]}
    assert set(rows) == {
        "full, torch, BN batch stats",
        "full, torch, BN running stats",
        "full, L-BFGS-B, BN batch stats",
        "100-d, torch, BN batch stats",
    }
    # full, torch, batch stats (k = 0): small seeds 10, 20 -> 15 ± 7.1; large 100, 200 -> 150 ± 71; 10x
    assert rows["full, torch, BN batch stats"][:3] == ["15 ± 7.1", "150 ± 71", "10.0x"]
    # eps 5e-4, L-BFGS-B (k = 2): small 6, 12 -> 9 ± 4.2
    assert rows["full, L-BFGS-B, BN batch stats"][3] == "9 ± 4.2"
    assert not any("curve" in r or "along training" in r for r in rows)  # the curve is not a final value


def test_report_shows_the_table_instead_of_wide_sharpness_columns_and_draws_the_curve(tmp_path):
    runs = keskar_experiment(tmp_path / "runs").parent
    (exp,) = discover(runs)
    figures = {f.name: f for f in make_figures(exp)}
    assert "sharpness_along_training" in figures
    text = build_report(runs).read_text()
    assert "### Keskar sharpness (Keskar et al. Tables 3/4)" in text
    assert "| full, torch, BN batch stats | 15 ± 7.1 | 150 ± 71 | 10.0x |" in text
    run_tables = text.split("### Keskar sharpness")[0]
    assert "Keskar sharpness (ε" not in run_tables  # not repeated as 8 run-table columns
    assert (runs / "report" / "keskar_f1" / "sharpness_along_training.png").stat().st_size < 200_000
    assert np.isfinite(exp.runs[0].events.scalars["sharpness/keskar_eps0.001_bntrain_curve"].final)


def test_fig4_plots_mean_phi_and_test_accuracy_per_batch_size_on_two_axes(tmp_path):
    exp_dir = tmp_path / "runs" / "bs"
    axes = {"data.init_args.batch_size": "batch_size", "seed_everything": "seed"}
    for index, (bs, seed) in enumerate((b, s) for b in (64, 256, 1024) for s in (0, 1)):
        name = f"batch_size={bs},seed={seed}"
        values = {"data.init_args.batch_size": bs, "seed_everything": seed}
        scalars = {
            "sharpness/keskar_eps0.001_bntrain": [(10, bs / 64 + seed)],
            "sharpness/keskar_eps0.001_bntrain_curve": [(1, 1.0), (10, 2.0)],
            "test/acc": [(10, 0.9 - bs / 10_000)],
        }
        write_run(exp_dir / name, scalars, record=sweep_record("bs", name, index, values, axes))
    (exp,) = discover(exp_dir.parent)
    figures = {f.name: f for f in make_figures(exp)}
    fig = figures["sharpness_and_accuracy_vs_batch_size"].figure
    left, right = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(left.lines[0].get_xdata(), [64, 256, 1024])
    np.testing.assert_allclose(left.lines[0].get_ydata(), [1.5, 4.5, 16.5])  # mean over the two seeds
    np.testing.assert_allclose(right.lines[0].get_ydata(), [100 * (0.9 - b / 10_000) for b in (64, 256, 1024)])
    assert left.get_yscale() == "log" and right.get_ylabel() == "test accuracy (%)"


def test_sharpness_and_accuracy_against_the_warm_start_epochs(tmp_path):
    """Without a batch-size axis, the report hint x (warm_epochs: labels "0", "5", "20") is the x axis."""
    exp_dir = tmp_path / "runs" / "warm"
    axes = {"warm_epochs": "warm_epochs"}
    for index, k in enumerate((0, 5, 20)):
        name = f"warm_epochs={k}"
        record = sweep_record("warm", name, index, {"warm_epochs": str(k)}, axes, report={"x": "warm_epochs"})
        scalars = {"sharpness/keskar_eps0.001_bntrain": [(10, 100.0 / (k + 1))], "test/acc": [(10, 0.8 + k / 200)]}
        write_run(exp_dir / name, scalars, record=record)
    (exp,) = discover(exp_dir.parent)
    figure = {f.name: f for f in make_figures(exp)}["sharpness_and_accuracy_vs_warm_epochs"]
    left, right = figure.figure.axes[0], figure.figure.axes[1]
    np.testing.assert_allclose(left.lines[0].get_xdata(), [0, 5, 20])
    np.testing.assert_allclose(left.lines[0].get_ydata(), [100.0, 100 / 6, 100 / 21])
    np.testing.assert_allclose(right.lines[0].get_ydata(), [80.0, 82.5, 90.0])
    assert left.get_xscale() == "linear" and left.get_xlabel() == "warm_epochs"
