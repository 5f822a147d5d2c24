"""The report's surface figures: outputs of ``python -m lightning_bn.surface`` (the command and its
functions, on tiny VGGs) found below the run directories, one panel per run with shared contour
levels, the trajectory's path and explained variance, and no figure without outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_bn.report import build_report, discover
from lightning_bn.report.surfaces import surface_dirs, surface_figures
from lightning_bn.surface import loss_surface, trajectory_surface
from lightning_bn.surface.cli import main as surface_main
from lightning_bn.surface.outputs import read_outputs, write_outputs
from lightning_bn.surface.plot import shared_levels
from tests.test_surface_helpers import SurfaceImages, fit_quietly, tiny_vgg

SMALL = dict(resolution=3, num_samples=16, bn_samples=16)


def write_events(run_dir) -> None:
    """A plain run for the report: one event file with a training loss."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(run_dir)) as writer:
        for step in range(3):
            writer.add_scalar("train/loss", 2.0 - 0.1 * step, step)


def path_of_checkpoints(model):
    """4 copies of ``model``, each moved by its own random step: a path that spans more than a
    line (with 3 checkpoints the centred PCA rows always do)."""
    g = torch.Generator().manual_seed(1)
    models = []
    for k in range(4):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * (3 - k) * torch.randn(p.shape, generator=g))
        models.append(m)
    return models


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/vgg/{standard,bn}: a random surface each (BN's through the command line, from a
    checkpoint) and a trajectory plane each, in <run>/surface and <run>/extra/surface_trajectory."""
    root = tmp_path_factory.mktemp("runs")
    dm = SurfaceImages(batch_size=16)
    for name, norm in (("standard", "none"), ("bn", "batch")):
        run = root / "vgg" / name
        write_events(run)
        model = tiny_vgg(0, norm)
        if norm == "batch":  # the --out convention, through the real command
            trainer = fit_quietly(model.train(), dm, 1)
            trainer.save_checkpoint(run / "final.ckpt")
            config = run / "config.yaml"
            config.write_text(
                "model:\n  class_path: lightning_bn.VGG\ndata:\n"
                "  class_path: tests.test_surface_helpers.SurfaceImages\n  init_args:\n    batch_size: 16\n"
            )
            argv = [str(run / "final.ckpt"), "--config", str(config), "--out", str(run / "surface")]
            surface_main(argv + ["--resolution", "3", "--num-samples", "16", "--bn-samples", "16"])
            model = model.eval()
        else:
            write_outputs(loss_surface(model, dm, **SMALL), run / "surface")
        trajectory = trajectory_surface(path_of_checkpoints(model), dm, bn="running", **SMALL)
        write_outputs(trajectory, run / "extra" / "surface_trajectory")
    return root


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def contour_levels(ax) -> np.ndarray:
    return np.asarray(next(c for c in ax.collections if hasattr(c, "levels") and c.filled).levels)


def test_outputs_found_at_most_two_levels_down(runs, tmp_path):
    bn = runs / "vgg" / "bn"
    assert surface_dirs(bn) == [bn / "extra" / "surface_trajectory", bn / "surface"]
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for name in ("surface.csv", "directions.pt"):
        (deep / name).write_bytes((bn / "surface" / name).read_bytes())
    (tmp_path / "a" / "surface.csv").write_bytes((bn / "surface" / "surface.csv").read_bytes())  # no directions.pt
    assert surface_dirs(tmp_path) == []


def test_saved_outputs_read_back_as_the_surface(tmp_path):
    dm = SurfaceImages(batch_size=16)
    surface = trajectory_surface(path_of_checkpoints(tiny_vgg(0)), dm, bn="running", **SMALL)
    write_outputs(surface, tmp_path)
    back = read_outputs(tmp_path)
    assert (back.mode, back.bn, back.a, back.b) == (surface.mode, surface.bn, surface.a, surface.b)
    assert back.explained_variance == pytest.approx(surface.explained_variance)
    assert torch.allclose(back.path, surface.path.double())
    for column, values in surface.values.items():
        assert torch.allclose(back.values[column], values, rtol=1e-12, equal_nan=True)


def test_one_panel_per_run_with_shared_levels(runs):
    (exp,) = discover(runs)
    figures = {f.name: f for f in surface_figures(exp)}
    assert sorted(figures) == ["surface", "surface_trajectory"]
    for name, figure in figures.items():
        axes = panels(figure.figure)
        assert len(axes) == 2 and [ax.get_title().splitlines()[0] for ax in axes] == ["bn", "standard"]
        levels = [contour_levels(ax) for ax in axes]
        np.testing.assert_array_equal(levels[0], levels[1])
        losses = [read_outputs(d).values["train_loss"].numpy() for r in exp.runs for d in surface_dirs(r.dir)
                  if read_outputs(d).mode == ("trajectory" if name == "surface_trajectory" else "random")]  # fmt: skip
        np.testing.assert_allclose(levels[0], shared_levels(losses))
        assert levels[0][0] <= min(z.min() for z in losses) and levels[0][-1] >= max(z.max() for z in losses)
    bn, standard = (ax.get_title() for ax in panels(figures["surface"].figure))
    assert "recomputed at each point on 16 training samples" in bn
    assert "no running statistics in the model" in standard and "explained" not in standard
    for ax in panels(figures["surface_trajectory"].figure):
        assert "PCA explained variance" in ax.get_title()
        assert any(len(line.get_xdata()) == 4 for line in ax.lines)  # the path of 4 checkpoints
    assert "the checkpoint's running statistics" in panels(figures["surface_trajectory"].figure)[0].get_title()


def test_report_draws_them_and_nothing_without_outputs(runs, tmp_path):
    report = build_report(runs, tmp_path / "report").read_text()
    assert "2-D loss surface (Li et al. 2018)" in report and "trajectory on its PCA plane" in report
    assert (tmp_path / "report" / "vgg" / "surface.png").stat().st_size > 5_000
    assert (tmp_path / "report" / "vgg" / "surface_trajectory.png").is_file()
    plain = tmp_path / "plain"
    write_events(plain / "exp" / "run0")
    (exp,) = discover(plain)
    assert surface_figures(exp) == []
    assert "2-D loss surface" not in build_report(plain).read_text()
