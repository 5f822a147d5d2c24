"""The report's Lemma 4.1 figure from NormGradientCallback's scalars (synthetic logs)."""

from __future__ import annotations

import numpy as np

from lightning_bn.report import discover, make_figures
from tests.test_report import sweep_record, write_run

LAYERS = ("features.1", "features.5")


def test_norm_gradient_figure_draws_ratio_gain_and_in_norm_per_layer_and_nothing_twice(tmp_path):
    exp_dir = tmp_path / "runs" / "normgrad"
    axes = {"model.init_args.norm": "norm"}
    for index, norm in enumerate(("none", "batch")):
        scalars = {"train/loss": [(t, 2.0 - 0.01 * t) for t in range(0, 50, 10)]}
        for i, layer in enumerate(LAYERS):
            ratio = 1.0 if norm == "none" else 0.5 + 0.1 * i
            scalars[f"normgrad/{layer}/ratio"] = [(t, ratio) for t in range(0, 50, 10)]
            scalars[f"normgrad/{layer}/in_norm"] = [(t, 0.01 * (t + 1)) for t in range(0, 50, 10)]
            scalars[f"normgrad/{layer}/out_norm"] = [(t, 0.01 * (t + 1) / ratio) for t in range(0, 50, 10)]
            if norm == "batch":
                scalars[f"normgrad/{layer}/gain"] = [(t, ratio**2) for t in range(0, 50, 10)]
        name = f"norm={norm}"
        write_run(
            exp_dir / name, scalars, record=sweep_record("normgrad", name, index, {"model.init_args.norm": norm}, axes)
        )
    (exp,) = discover(exp_dir.parent)
    figures = {f.name: f for f in make_figures(exp)}
    assert "normgrad" not in figures  # not repeated among the "other scalars"
    fig = figures["norm_gradient"].figure
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3 * len(LAYERS)  # rows ratio, gain, in_norm; one column per layer
    ratio_panel = panels[1]  # second layer's ratio
    by_label = {line.get_label(): line.get_ydata() for line in ratio_panel.lines}
    np.testing.assert_allclose(by_label["norm=none"], 1.0)
    np.testing.assert_allclose(by_label["norm=batch"], 0.6)
    gain_panel = panels[len(LAYERS)]
    assert [line.get_label() for line in gain_panel.lines] == ["norm=batch"]  # only BN has a gain


def test_norm_curvature_figure_draws_curvatures_and_ratio_per_layer_and_nothing_twice(tmp_path):
    exp_dir = tmp_path / "runs" / "normcurv"
    axes = {"model.init_args.norm": "norm"}
    steps = range(0, 50, 10)
    for index, norm in enumerate(("none", "batch")):
        scalars = {"train/loss": [(t, 2.0 - 0.01 * t) for t in steps]}
        for i, layer in enumerate(LAYERS):
            curv_out = 0.2 + 0.1 * i
            curv_in = curv_out if norm == "none" else -0.05 * (i + 1)  # a curvature may be negative
            for key, value in {"curv_in": curv_in, "curv_out": curv_out, "curv_ratio": curv_in / curv_out}.items():
                scalars[f"normcurv/{layer}/{key}"] = [(t, value) for t in steps]
            for key in ("quad_in", "quad_out", "quad_chain", "norm_term"):
                scalars[f"normcurv/{layer}/{key}"] = [(t, 1e-3) for t in steps]
        name = f"norm={norm}"
        write_run(
            exp_dir / name, scalars, record=sweep_record("normcurv", name, index, {"model.init_args.norm": norm}, axes)
        )
    (exp,) = discover(exp_dir.parent)
    figures = {f.name: f for f in make_figures(exp)}
    assert "normcurv" not in figures  # not repeated among the "other scalars"
    panels = [ax for ax in figures["norm_curvature"].figure.axes if ax.get_visible()]
    assert len(panels) == 3 * len(LAYERS)  # rows curv_in, curv_out, curv_ratio; one column per layer
    by_label = {line.get_label(): line.get_ydata() for line in panels[2 * len(LAYERS)].lines}  # first layer's ratio
    np.testing.assert_allclose(by_label["norm=none"], 1.0)
    np.testing.assert_allclose(by_label["norm=batch"], -0.25)
    assert panels[0].get_yscale() == "linear"
