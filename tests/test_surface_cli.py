"""``python -m lightning_bn.surface``: outputs, a grid point checked by hand from directions.pt,
one-line errors, trajectory mode from a run's checkpoints, and the grid split over 2 ranks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_bn.interpolate import evaluate, load_model
from lightning_bn.surface import fixed_sample
from lightning_bn.surface.cli import main
from tests.test_surface_helpers import SurfaceImages, fit_quietly, tiny_vgg

DATA = "data:\n  class_path: tests.test_surface_helpers.SurfaceImages\n  init_args:\n    batch_size: 16\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny VGG-BN trained 4 steps, a checkpoint after every step, and a config naming the data."""
    root = tmp_path_factory.mktemp("run")
    model = tiny_vgg(0).train()
    every_step = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = fit_quietly(model, SurfaceImages(batch_size=16), 4, callbacks=[every_step])
    trainer.save_checkpoint(root / "final.ckpt")
    config = root / "config.yaml"
    config.write_text("model:\n  class_path: lightning_bn.VGG\n" + DATA)
    return root, config


def table(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(path))]


def test_outputs_and_a_grid_point_checked_by_hand(run, tmp_path, capsys):
    root, config = run
    out = tmp_path / "out"
    argv = [str(root / "final.ckpt"), "--config", str(config), "--out", str(out), "--resolution", "3"]
    main(argv + ["--num-samples", "32", "--bn-samples", "16", "--test-samples", "16", "--tensorboard", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "cost: 9 grid points x (48 eval + 16 train-mode) sample-forwards" in printed
    rows = table(out / "surface.csv")
    assert list(rows[0]) == ["a", "b", "train_loss", "train_acc", "test_loss", "test_acc"] and len(rows) == 9
    for name in ("contour.png", "surface3d.png"):
        assert 5_000 < (out / name).stat().st_size <= 200 * 1024
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # by hand: W + a d1 + b d2 from directions.pt, torch's cumulative BN average, plain eval
    saved = torch.load(out / "directions.pt")
    assert saved["bn"] == "recompute" and saved["mode"] == "random" and saved["samples"]["bn"] == 16
    row = rows[7]
    model = load_model(root / "final.ckpt", "lightning_bn.VGG")
    assert set(saved["d1"]) == {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p + row["a"] * saved["d1"][name] + row["b"] * saved["d2"][name])
    dm = SurfaceImages(batch_size=16)
    dm.setup("fit")
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # torch's cumulative moving average: the plain mean over batches
    model.train()
    with torch.no_grad():
        for x, _ in fixed_sample(dm.train_dataloader(), 16, saved["seed"] + 1):
            model(x)
    loss, acc = evaluate(model, fixed_sample(dm.train_dataloader(), 32, saved["seed"]), torch.device("cpu"))
    test_loss, _ = evaluate(model, fixed_sample(dm.test_dataloader(), 16, saved["seed"]), torch.device("cpu"))
    assert [row["train_loss"], row["train_acc"], row["test_loss"]] == pytest.approx([loss, acc, test_loss], rel=1e-5)


def test_bad_inputs_end_with_one_line_and_status_2(run, tmp_path, capsys):
    root, config = run
    ckpt, cfg = str(root / "final.ckpt"), ["--config", str(config)]
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("not a checkpoint")
    few = tmp_path / "few"
    few.mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [
        ([str(tmp_path / "missing.ckpt"), *cfg], "checkpoint not found"),
        ([str(not_ckpt), *cfg], "cannot read checkpoint"),
        (cfg, "give either CKPT"),
        ([ckpt, "--trajectory", str(root / "ckpts"), *cfg], "give either CKPT"),
        ([ckpt, *cfg, "--resolution", "1"], "--resolution must be >= 2, got 1"),
        ([ckpt, *cfg, "--resolution", "3", "4", "5"], "--resolution takes 1 or 2 numbers"),
        ([ckpt, *cfg, "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        ([ckpt, *cfg, "--bn-samples", "-2"], "--bn-samples must be >= 1, got -2"),
        ([ckpt, *cfg, "--span", "1", "-1", "0", "1"], "a_min < a_max"),
        ([ckpt, *cfg, "--bn", "batch"], "argument --bn: invalid choice"),
        ([ckpt, *cfg, "--devices", "0"], "--devices must be >= 1, got 0"),
        ([ckpt, "--config", str(tmp_path / "none.yaml")], "config not found"),
        (["--trajectory", str(tmp_path / "nowhere"), *cfg], "not a directory"),
        (["--trajectory", str(few), *cfg], "needs at least 3 checkpoints"),
        ([ckpt, *cfg, "--resolution", "2", "--num-samples", "8", "--out", str(tmp_path / "a_file")], "cannot write"),
    ]
    for argv, message in cases:
        out = [] if "--out" in argv else ["--out", str(tmp_path / "never")]
        with pytest.raises(SystemExit) as exit_info:
            main(argv + out)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (argv, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
    assert not (tmp_path / "never").exists()


def test_trajectory_from_a_directory_of_checkpoints(run, tmp_path, capsys):
    root, config = run
    out = tmp_path / "traj"
    main(
        ["--trajectory", str(root / "ckpts"), "--config", str(config), "--out", str(out), "--resolution", "3"]
        + ["--num-samples", "16", "--bn", "running"]
    )
    assert "explained variance:" in capsys.readouterr().out
    saved = torch.load(out / "directions.pt")
    steps = sorted(root.joinpath("ckpts").glob("epoch=*.ckpt"), key=lambda p: torch.load(p)["global_step"])
    assert saved["mode"] == "trajectory" and len(saved["path"]) == len(steps) == 4  # last.ckpt kept once
    final = dict(load_model(steps[-1], "lightning_bn.VGG").named_parameters())
    for k, path in enumerate(steps):  # each path point: <W_k - W_final, d> for d = d1, d2
        model = dict(load_model(path, "lightning_bn.VGG").named_parameters())
        for axis, d in enumerate((saved["d1"], saved["d2"])):
            dot = sum(float(((model[n] - final[n]).double() * d[n].double()).sum()) for n in d)
            assert float(saved["path"][k, axis]) == pytest.approx(dot, abs=1e-6)
    assert (out / "contour.png").stat().st_size <= 200 * 1024


@pytest.mark.slow
@pytest.mark.ddp
def test_grid_split_over_two_ranks_equals_one_process(run, tmp_path):
    root, config = run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = [str(root / "final.ckpt"), "--config", str(config), "--resolution", "3", "--num-samples", "16"]
    main(common + ["--out", str(tmp_path / "1")])
    argv = [sys.executable, "-m", "lightning_bn.surface", *common, "--devices", "2", "--accelerator", "cpu"]
    done = subprocess.run(argv + ["--out", str(tmp_path / "2")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = table(tmp_path / "1" / "surface.csv"), table(tmp_path / "2" / "surface.csv")
    flat = [[v for r in rows for v in r.values()] for rows in (one, two)]
    assert flat[1] == pytest.approx(flat[0], rel=1e-6)
