"""Fig. 4 figure (callbacks.landscape_plot): reads what was logged and draws exactly that."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from torch.utils.tensorboard import SummaryWriter

from callbacks.landscape_math import SUMMARY_KEYS
from callbacks.landscape_plot import main, plot_landscape, plot_runs, read_landscape_scalars


def _write_run(logdir, scale: float, steps=(0, 10, 20, 30)) -> dict[str, list[float]]:
    values = {key: [scale * (i + 1) + j for j, _ in enumerate(steps)] for i, key in enumerate(SUMMARY_KEYS)}
    writer = SummaryWriter(str(logdir))
    for j, step in enumerate(steps):
        for key in SUMMARY_KEYS:
            writer.add_scalar(f"landscape/{key}", values[key][j], step)
        writer.add_scalar("train/loss", 1.0, step)  # another prefix: ignored
    writer.close()
    return values


def test_read_landscape_scalars_returns_every_logged_value(tmp_path):
    values = _write_run(tmp_path / "run" / "version_0", scale=1.5)
    read = read_landscape_scalars(tmp_path / "run")  # finds the one event directory below
    assert set(read) == set(SUMMARY_KEYS)
    for key in SUMMARY_KEYS:
        steps, got = read[key]
        assert steps == [0, 10, 20, 30]
        np.testing.assert_allclose(got, values[key], rtol=1e-6)


def test_two_runs_side_by_side_draw_the_logged_bands(tmp_path):
    standard = _write_run(tmp_path / "standard", scale=3.0)
    bn = _write_run(tmp_path / "bn", scale=1.0)
    fig = plot_runs({"standard": tmp_path / "standard", "bn": tmp_path / "bn"}, title="VGG")
    loss_ax, grad_ax, beta_ax, norm_ax = fig.axes
    for ax, (lo, hi) in ((loss_ax, ("loss_min", "loss_max")), (grad_ax, ("grad_diff_min", "grad_diff_max"))):
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert [b.get_label() for b in bands] == ["standard", "bn"]
        for band, run in zip(bands, (standard, bn)):
            ys = band.get_paths()[0].vertices[:, 1]
            assert np.isclose(ys.min(), min(run[lo])) and np.isclose(ys.max(), max(run[hi]))
            assert set(np.round(ys, 4)) >= set(np.round(run[lo] + run[hi], 4))
    for ax, key in ((beta_ax, "beta_smoothness"), (norm_ax, "grad_norm")):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["standard", "bn"]
        for line, run in zip(lines, (standard, bn)):
            np.testing.assert_allclose(line.get_xdata(), [0, 10, 20, 30])
            np.testing.assert_allclose(line.get_ydata(), run[key], rtol=1e-6)
    assert fig._suptitle.get_text() == "VGG"
    fig.savefig(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_command_line_writes_the_image(tmp_path, capsys):
    _write_run(tmp_path / "a", scale=1.0)
    _write_run(tmp_path / "b", scale=2.0)
    out = tmp_path / "fig4.png"
    main([f"standard={tmp_path / 'a'}", f"bn={tmp_path / 'b'}", "--out", str(out), "--log-y"])
    assert out.stat().st_size > 0 and "fig4.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), "--out", str(out)])  # no LABEL=


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one run"):
        read_landscape_scalars(tmp_path)  # no event files
    _write_run(tmp_path / "x" / "version_0", scale=1.0)
    _write_run(tmp_path / "x" / "version_1", scale=1.0)
    with pytest.raises(ValueError, match="exactly one run"):
        read_landscape_scalars(tmp_path / "x")
    writer = SummaryWriter(str(tmp_path / "other"))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    with pytest.raises(ValueError, match="no landscape"):
        read_landscape_scalars(tmp_path / "other")
    with pytest.raises(ValueError, match="at least one run"):
        plot_landscape({})
    with pytest.raises(ValueError, match="different steps"):
        plot_landscape({"r": {"loss_min": ([0, 1], [1.0, 2.0]), "loss_max": ([0, 2], [1.0, 2.0])}})
