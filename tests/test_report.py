"""The report on small synthetic TensorBoard logs written here: event reading (resumed runs,
histograms), grouping, the numbers of the tables, which figures appear for which tags, and
the markdown with the commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_bn.report import build_report, discover, make_figures, read_events
from lightning_bn.report.__main__ import main as report_main
from lightning_bn.report.summary import LANDSCAPE, columns_for, format_mean_std, format_number

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = ("features.0", "features.4", "features.8", "features.11", "classifier")


def write_run(run_dir: Path, scalars: dict[str, list[tuple[int, float]]], histograms=None, record=None) -> Path:
    """A run directory with one event file (and a run.json like the sweep writes, if given)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(run_dir)) as writer:
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        for tag, points in (histograms or {}).items():
            for step, values in points:
                writer.add_histogram(tag, values, step)
    if record is not None:
        (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def sweep_record(experiment: str, name: str, index: int, values: dict, axes: dict, **extra) -> dict:
    return {
        "sweep": {"name": experiment, "experiment": experiment},
        "run": name,
        "index": index,
        "values": values,
        "axes": axes,
        "options": dict(values),
        "complete": True,
        "status": "complete",
        "history": [{"command": f"python -m lightning_bn fit --run {name}", "returncode": 0}],
        **extra,
    }


def norm_experiment(root: Path, steps: int = 40) -> Path:
    """2 norms x 2 seeds with every kind of measurement; values follow simple known formulas."""
    exp = root / "norms"
    axes = {"model.init_args.norm": "norm", "seed_everything": "seed"}
    rng = np.random.default_rng(0)
    index = 0
    for k, norm in enumerate(("none", "batch")):
        for seed in (0, 1):
            name = f"norm={norm},seed={seed}"
            s = np.arange(0, steps + 1, 5)
            scalars = {
                "train/loss": [(int(t), 2.3 * np.exp(-t / (20 + 20 * k)) + 0.01 * seed) for t in range(steps)],
                "train/acc": [(10, 0.3 + 0.1 * k), (20, 0.5 + 0.1 * k + 0.02 * seed)],
                "val/acc": [(10, 0.25 + 0.1 * k), (20, 0.4 + 0.1 * k + 0.02 * seed)],
                "landscape/loss_min": [(int(t), 1.0 - 0.01 * t) for t in s],
                "landscape/loss_max": [(int(t), 1.5 - 0.01 * t - 0.2 * k) for t in s],
                "landscape/grad_diff_min": [(int(t), 0.1) for t in s],
                "landscape/grad_diff_max": [(int(t), 2.0 - k) for t in s],
                "landscape/beta_smoothness": [(int(t), 10.0 + 5 * (1 - k) + seed) for t in s],
                "landscape/grad_norm": [(int(t), 1.0 + k) for t in s],
                "sharpness/keskar_eps0.001": [(steps, 5.0 * (k + 1) + seed)],
                "hessian/top_eigenvalue": [(steps, 20.0 + k)],
                "hessian/trace": [(int(t), 100.0 - t) for t in s],
            }
            for i, layer in enumerate(LAYERS):
                scalars[f"ics/{layer}/l2_diff"] = [(int(t), 0.1 * (i + 1) * (2 - k)) for t in s]
                scalars[f"ics/{layer}/cosine"] = [(int(t), 0.9 - 0.1 * i) for t in s]
                scalars[f"activations/{layer}/mean_drift"] = [(int(t), 0.05 * (2 - k)) for t in s]
                scalars[f"activations/{layer}/std_drift"] = [(int(t), 0.02 * (2 - k)) for t in s]
            histograms = {
                f"activations/{layer}/output": [(int(t), rng.normal(0.01 * t * (1 - k), 1.0, 500)) for t in s]
                for layer in LAYERS[:3]
            }
            values = {"model.init_args.norm": norm, "seed_everything": seed}
            write_run(exp / name, scalars, histograms, sweep_record("norms", name, index, values, axes))
            index += 1
    (exp / "sweep.json").write_text(
        json.dumps(
            {
                "name": "norms",
                "experiment": "norms",
                "description": "Standard vs BN.",
                "command": "python -m lightning_bn.sweep configs/experiments/norms.yaml",
                "source": "configs/experiments/norms.yaml",
                "full": False,
            }
        )
    )
    return exp


def batch_size_experiment(root: Path) -> Path:
    """batch size x base lr with lr = base_lr * batch size; accuracy and sharpness are known functions."""
    exp = root / "bs"
    axes = {"data.init_args.batch_size": "batch_size", "base_lr": "base_lr"}
    index = 0
    for bs in (16, 64, 256):
        for base_lr in (0.001, 0.004):
            name = f"batch_size={bs},base_lr={base_lr}"
            acc = 0.8 - 0.05 * np.log2(bs / 16) - (0.1 if base_lr == 0.004 else 0.0)
            scalars = {
                "train/loss": [(t, 1.0 / (t + 1)) for t in range(5)],
                "val/acc": [(4, acc)],
                "sharpness/keskar_eps0.001": [(4, float(bs) / 8)],
            }
            record = sweep_record(
                "bs",
                name,
                index,
                {"data.init_args.batch_size": bs, "base_lr": base_lr},
                axes,
                options={"data.init_args.batch_size": bs, "model.init_args.lr": base_lr * bs},
                variables={"base_lr": base_lr},
            )
            write_run(exp / name, scalars, record=record)
            index += 1
    return exp


# -- events --------------------------------------------------------------------------------
def test_resumed_run_keeps_the_last_written_value_per_step_and_reads_stage_subdirectories(tmp_path):
    run = tmp_path / "run"
    write_run(run, {"train/loss": [(0, 3.0), (1, 2.0), (2, 1.5), (3, 9.9)]})  # crashed after step 3
    write_run(run, {"train/loss": [(3, 1.0), (4, 0.5)]})  # resumed from the checkpoint at step 2
    write_run(run / "test", {"test/acc": [(4, 0.75)]})
    events = read_events(run)
    loss = events.scalars["train/loss"]
    assert loss.steps.tolist() == [0, 1, 2, 3, 4]
    assert loss.values.tolist() == [3.0, 2.0, 1.5, 1.0, 0.5]
    assert events.scalars["test/acc"].final == 0.75


def test_histograms_become_tensorboard_percentiles(tmp_path):
    values = np.linspace(-1.0, 1.0, 2001)
    write_run(tmp_path / "run", {}, {"activations/l/output": [(0, values), (5, values + 10)]})
    dist = read_events(tmp_path / "run").distributions["activations/l/output"]
    assert dist.steps.tolist() == [0, 5]
    assert dist.quantiles.shape == (2, 9)
    assert dist.quantiles[0, 0] == pytest.approx(-1.0) and dist.quantiles[0, -1] == pytest.approx(1.0)
    assert dist.quantiles[0, 4] == pytest.approx(0.0, abs=0.05)  # median of a uniform grid, up to bucketing
    assert dist.quantiles[1, 4] == pytest.approx(10.0, abs=0.5)
    assert np.all(np.diff(dist.quantiles, axis=1) >= 0)


# -- grouping -------------------------------------------------------------------------------
def test_discover_groups_sweep_runs_and_plain_tensorboard_runs(tmp_path):
    norm_experiment(tmp_path, steps=10)
    write_run(tmp_path / "quickstart" / "version_0", {"val/acc": [(5, 0.5)]})
    write_run(tmp_path / "quickstart" / "version_1", {"val/acc": [(5, 0.6)]})
    experiments = {e.name: e for e in discover(tmp_path)}
    assert set(experiments) == {"norms", "quickstart"}
    norms = experiments["norms"]
    names = ["norm=none,seed=0", "norm=none,seed=1", "norm=batch,seed=0", "norm=batch,seed=1"]
    assert [r.name for r in norms.runs] == names
    assert norms.varying == ["model.init_args.norm", "seed_everything"] and norms.seed_key == "seed_everything"
    assert {k: [r.name for r in v] for k, v in norms.configurations().items()} == {
        "norm=none": ["norm=none,seed=0", "norm=none,seed=1"],
        "norm=batch": ["norm=batch,seed=0", "norm=batch,seed=1"],
    }
    assert [r.name for r in experiments["quickstart"].runs] == ["version_0", "version_1"]


# -- tables ---------------------------------------------------------------------------------
def test_table_numbers_are_the_final_and_mean_values_logged(tmp_path):
    norms = discover(norm_experiment(tmp_path, steps=10).parent)[0]
    run = norms.runs[3]  # norm=batch, seed=1 (k=1)
    columns = {c.name: c for c in columns_for([r.events for r in norms.runs])}
    value = {name: column.value(run.events) for name, column in columns.items()}
    assert value["train acc"] == pytest.approx(0.62)
    assert value["val acc"] == pytest.approx(0.52) and value["best val acc"] == pytest.approx(0.52)
    assert value["train loss"] == pytest.approx(2.3 * np.exp(-9 / 40) + 0.01, rel=1e-6)
    assert value["loss range"] == pytest.approx(0.3)  # 1.5 - 0.2 - 1.0 at every step
    assert value["grad. predictiveness (max)"] == pytest.approx(1.0)
    assert value["β-smoothness"] == pytest.approx(11.0)
    assert value["‖g‖"] == pytest.approx(2.0)
    assert value["ICS ℓ2"] == pytest.approx(0.1 * np.mean([1, 2, 3, 4, 5]))
    assert value["ICS cosine"] == pytest.approx(0.7)
    assert value["act. mean drift"] == pytest.approx(0.05)
    assert value["Keskar sharpness (ε = 0.001)"] == pytest.approx(11.0)
    assert value["top Hessian eigenvalue"] == pytest.approx(21.0)
    assert value["Hessian trace"] == pytest.approx(100.0 - 10)
    assert "test acc" not in columns  # nothing logged it


def test_a_layer_whose_ics_is_zero_by_definition_is_left_out_of_table_and_figure(tmp_path):
    """Def. 2.1: the first layer has no preceding layers, so G = G' exactly; its zeros would
    dilute the mean over layers and take a panel of the ICS figure."""
    run = tmp_path / "ics" / "version_0"
    scalars = {"train/loss": [(0, 1.0), (10, 0.5)]}
    for layer, value in (("features.0", 0.0), ("features.4", 0.3), ("classifier", 0.5)):
        scalars[f"ics/{layer}/l2_diff"] = [(t, value) for t in (0, 5, 10)]
        scalars[f"ics/{layer}/cosine"] = [(t, 1.0 if value == 0 else 0.6) for t in (0, 5, 10)]
    write_run(run, scalars)
    exp = discover(tmp_path / "ics")[0]
    columns = {c.name: c for c in columns_for([r.events for r in exp.runs])}
    assert columns["ICS ℓ2"].value(exp.runs[0].events) == pytest.approx(0.4)
    assert columns["ICS cosine"].value(exp.runs[0].events) == pytest.approx(0.6)
    ics = next(f for f in make_figures(exp) if f.name == "ics")
    assert [ax.get_title() for ax in ics.figure.axes[:2]] == ["layer features.4", "layer classifier"]
    # a layer that is 0 at some steps only is measured, not trivial: it stays
    scalars["ics/features.0/l2_diff"] = [(0, 0.0), (5, 0.2), (10, 0.0)]
    write_run(tmp_path / "ics2" / "version_0", scalars)
    exp = discover(tmp_path / "ics2")[0]
    assert columns["ICS ℓ2"].value(exp.runs[0].events) == pytest.approx((0.2 / 3 + 0.3 + 0.5) / 3)


def test_norm_input_and_output_statistics_get_their_own_figure_columns_and_captions(tmp_path):
    run = tmp_path / "act" / "version_0"
    scalars = {"train/loss": [(0, 1.0), (10, 0.5)]}
    for prefix, drift in (("activations", 0.1), ("activations_output", 0.4)):
        for stat, value in (("mean", 0.0), ("std", 1.0), ("mean_drift", drift), ("std_drift", drift / 2)):
            scalars[f"{prefix}/features.1/{stat}"] = [(t, value) for t in (0, 5, 10)]
    values = [(t, np.random.default_rng(t).normal(size=50)) for t in (0, 5)]
    histograms = {"activations_output/features.1/values": values}
    write_run(run, scalars, histograms)
    exp = discover(tmp_path / "act")[0]
    figures = {f.name: f for f in make_figures(exp)}
    assert {"activations", "activations_output", "distributions_activations_output_values"} <= set(figures)
    assert "input of each normalization layer" in figures["activations"].caption
    assert "output of each normalization layer" in figures["activations_output"].caption
    assert "output of each normalization layer" in figures["distributions_activations_output_values"].caption
    columns = {c.name: c for c in columns_for([r.events for r in exp.runs])}
    assert columns["act. mean drift"].value(exp.runs[0].events) == pytest.approx(0.1)
    assert columns["norm output mean drift"].value(exp.runs[0].events) == pytest.approx(0.4)
    assert columns["norm output std drift"].value(exp.runs[0].events) == pytest.approx(0.2)


def test_landscape_figure_states_the_step_size_grid_of_its_callback(tmp_path):
    exp_dir = tmp_path / "grid"
    callbacks = [
        {"class_path": "callbacks.LandscapeCallback", "init_args": {"every_n_steps": 5}},
        {"class_path": "callbacks.LandscapeCallback",
         "init_args": {"direction": "unit", "step_sizes": [0.05, 0.1], "key_suffix": "_unit"}},
    ]  # fmt: skip
    scalars = {f"landscape/{k}{s}": [(0, 1.0), (5, 2.0)] for k in ("loss_min", "loss_max") for s in ("", "_unit")}
    record = sweep_record("grid", "a", 0, {"x": 1}, {"x": "x"})
    record["options"] = {"trainer.callbacks": callbacks, "model.init_args.lr": 0.1}
    write_run(exp_dir / "a", scalars, record=record)
    figures = {f.name: f for f in make_figures(discover(tmp_path)[0])}
    title = lambda name: " ".join(figures[name].figure.get_suptitle().split())  # noqa: E731 (wrapped lines)
    assert title("landscape").endswith("η ∈ {0.05, 0.1, …, 0.4} (8 step sizes)")
    assert title("landscape_unit").endswith("d ∈ {0.05, 0.1} (2 distances)")


def test_stable_learning_rates_per_batch_size(tmp_path):
    """A run trains when its final validation accuracy is finite and at least 1.5x chance."""
    from lightning_bn.report.grids import stable_range

    exp_dir = tmp_path / "ml"
    axes = {"data.init_args.batch_size": "batch_size", "base_lr": "base_lr"}
    # (batch size, base lr) -> final val acc: nan diverged, 0.1 stuck at chance, 0.14 below 1.5x chance
    accuracy = {(8, 0.001): 0.16, (8, 0.01): 0.4, (8, 0.1): float("nan"), (512, 0.001): 0.3, (512, 0.01): 0.14,
                (512, 0.1): 0.1}  # fmt: skip
    for index, ((bs, base_lr), acc) in enumerate(accuracy.items()):
        name = f"batch_size={bs},base_lr={base_lr}"
        values = {"data.init_args.batch_size": bs, "base_lr": base_lr}
        write_run(exp_dir / name, {"val/acc": [(10, acc)]}, record=sweep_record("ml", name, index, values, axes))
    exp = discover(tmp_path)[0]
    assert stable_range(exp.runs, "data.init_args.batch_size", "base_lr") == {8: [0.001, 0.01], 512: [0.001]}
    figure = next(f for f in make_figures(exp) if f.name == "stable_lr_range")
    markers = [len(c.get_offsets()) for c in figure.figure.axes[0].collections]
    assert sum(markers) == 6


def test_heatmap_y_axis_from_the_report_hint(tmp_path):
    exp_dir = tmp_path / "ghost"
    axes = {"data.init_args.batch_size": "batch_size", "bn_batch": "bn_batch"}
    index = 0
    for bs in (32, 64):
        for bn in (4, 8):
            name = f"batch_size={bs},bn_batch={bn}"
            record = sweep_record(
                "ghost",
                name,
                index,
                {"data.init_args.batch_size": bs, "bn_batch": str(bn)},  # a labelled axis: its labels, strings
                axes,
                report={"batch_size": "data.init_args.batch_size", "heatmap_y": "bn_batch"},
            )
            write_run(exp_dir / name, {"val/acc": [(5, 0.5 + bn / 100 + bs / 1000)]}, record=record)
            index += 1
    heatmap = next(f for f in make_figures(discover(tmp_path)[0]) if f.name == "heatmap")
    ax = heatmap.figure.axes[0]
    assert ax.get_ylabel() == "bn_batch" and [t.get_text() for t in ax.get_yticklabels()] == ["4", "8"]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), [[57.2, 60.4], [61.2, 64.4]])


def test_per_layer_panels_of_one_quantity_share_the_y_scale_rule(tmp_path):
    """One layer spanning 3 decades puts the whole row on a log axis, not only its panel."""
    scalars = {"train/loss": [(0, 1.0), (10, 0.5)]}
    for layer, values in (("features.4", (1e-3, 1.0)), ("classifier", (0.5, 0.6))):
        scalars[f"ics/{layer}/l2_diff"] = [(0, values[0]), (10, values[1])]
        scalars[f"ics/{layer}/cosine"] = [(0, 0.5), (10, 0.6)]
    write_run(tmp_path / "row" / "version_0", scalars)
    ics = next(f for f in make_figures(discover(tmp_path / "row")[0]) if f.name == "ics")
    l2_row, cosine_row = ics.figure.axes[:2], ics.figure.axes[2:4]
    assert [ax.get_yscale() for ax in l2_row] == ["log", "log"]
    assert [ax.get_yscale() for ax in cosine_row] == ["linear", "linear"]


def test_number_formats():
    assert format_number(0.4567, percent=True) == "45.7%"
    assert format_number(123.456) == "123.5" and format_number(None) == "–" and format_number(float("nan")) == "nan"
    assert format_mean_std([0.5, 0.7], percent=True) == "60.0 ± 14.1%"
    assert format_mean_std([2.0, 4.0]) == "3 ± 1.4"


# -- figures and the document ---------------------------------------------------------------
def test_figures_follow_the_logged_tags(tmp_path):
    norms, bs = sorted(discover(norm_experiment(tmp_path / "a", steps=10).parent) + discover(
        batch_size_experiment(tmp_path / "b").parent), key=lambda e: e.name != "norms")  # fmt: skip
    # hessian/trace has a curve over training; sharpness, logged once per run, has none
    assert [f.name for f in make_figures(norms)] == [
        "curves", "landscape", "ics", "activations", "distributions_activations_output", "hessian",
    ]  # fmt: skip
    assert [f.name for f in make_figures(bs)] == [
        "curves",
        "heatmap",
        "stable_lr_range",
        "accuracy_vs_batch_size",
        "sharpness_vs_batch_size",
    ]
    plain = tmp_path / "plain"
    write_run(plain / "x" / "version_0", {"train/loss": [(0, 1.0), (1, 0.5)]})
    assert [f.name for f in make_figures(discover(plain)[0])] == ["curves"]


def test_heatmap_cells_are_the_final_validation_accuracies(tmp_path):
    bs = discover(batch_size_experiment(tmp_path).parent)[0]
    assert bs.axis_for("batch_size") == "data.init_args.batch_size" and bs.axis_for("lr") == "base_lr"
    heatmap = next(f for f in make_figures(bs) if f.name == "heatmap")
    image = heatmap.figure.axes[0].images[0].get_array()
    expected = [[100 * (0.8 - 0.05 * np.log2(b / 16) - (0.1 if lr == 0.004 else 0)) for b in (16, 64, 256)]
                for lr in (0.001, 0.004)]  # fmt: skip
    np.testing.assert_allclose(np.asarray(image), expected)
    cells = [t.get_text() for t in heatmap.figure.axes[0].texts]
    assert cells[:3] == ["80.0", "70.0", "60.0"]


def test_report_writes_markdown_with_tables_figures_and_commands(tmp_path):
    norm_experiment(tmp_path / "runs", steps=20)
    batch_size_experiment(tmp_path / "runs")
    report = build_report(tmp_path / "runs")
    assert report == tmp_path / "runs" / "report" / "report.md"
    text = report.read_text()
    assert "## bs" in text and "## norms" in text and "Standard vs BN." in text
    assert "Made by `python -m lightning_bn.sweep configs/experiments/norms.yaml`" in text
    # per-run row of norm=batch, seed=1 and the mean over seeds of norm=batch
    assert re.search(r"\| batch \| 1 \| [^|]+ \| 62\.0% \| 52\.0% \| 52\.0% \|\n", text)
    assert "**Loss landscape (means over the measured steps)**" in text
    assert "| batch | 1 | 0.3 | 1 | 11 | 2 |\n" in text  # band width, grad. predictiveness, β, ‖g‖
    assert re.search(r"\| batch \| 2 \| [^|]+ \| 61\.0 ± 1\.4% \| 51\.0 ± 1\.4% \|", text)
    assert "python -m lightning_bn fit --run norm=batch,seed=1" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "norms/landscape.png" in images and "bs/heatmap.png" in images
    for image in images:
        assert (report.parent / image).read_bytes().startswith(PNG)


def test_report_command_line(tmp_path, capsys):
    batch_size_experiment(tmp_path / "runs")
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "bs" / "heatmap.png").is_file()
    assert f"--out {tmp_path / 'out'}" in (tmp_path / "out" / "report.md").read_text()
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_second_landscape_callback_gets_its_own_figure_and_table(tmp_path):
    """Keys of a LandscapeCallback with key_suffix="_unit" beside the default one: one Fig. 4 and
    one landscape table per suffix, with the suffixed values (not the default's)."""
    exp = norm_experiment(tmp_path / "runs", steps=10)
    for run_dir in sorted(p for p in exp.iterdir() if p.is_dir()):
        write_run(run_dir, {
            "landscape/loss_min_unit": [(0, 1.0), (5, 1.0)], "landscape/loss_max_unit": [(0, 1.25), (5, 1.75)],
            "landscape/grad_diff_min_unit": [(0, 0.1), (5, 0.1)], "landscape/grad_diff_max_unit": [(0, 0.5), (5, 0.5)],
            "landscape/beta_smoothness_unit": [(0, 3.0), (5, 5.0)], "landscape/grad_norm_unit": [(0, 2.0), (5, 2.0)],
        })  # fmt: skip
    norms = discover(exp.parent)[0]
    figures = {f.name: f for f in make_figures(norms)}
    assert "landscape" in figures and "landscape_unit" in figures
    assert figures["landscape_unit"].title == "Optimization landscape (keys ending in _unit)"
    columns = columns_for([r.events for r in norms.runs])
    unit = {c.name: c.value(norms.runs[0].events) for c in columns if c.group.endswith("keys ending in _unit")}
    expected = {"loss range": 0.5, "grad. predictiveness (max)": 0.5, "β-smoothness": 4.0, "‖g‖": 2.0}
    assert unit == pytest.approx(expected)
    plain = {c.name: c.value(norms.runs[0].events) for c in columns if c.group == LANDSCAPE}
    assert plain["β-smoothness"] == pytest.approx(15.0)  # the default callback's, norm=none seed 0
    text = build_report(exp.parent).read_text()
    assert "Optimization landscape (keys ending in _unit)" in text
    assert "keys ending in _unit**" in text and "norms/landscape_unit.png" in text
