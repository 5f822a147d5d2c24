"""The LightningCLI entry: a short real fit, and one-line errors for user mistakes."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_bn.cli import _LogDirBefore, fit_summary, main, summarize_error

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
DLN = str(ROOT / "configs" / "dln" / "none.yaml")  # builds and fails at setup in about a second


def _short_fit_args(tmp_path: Path) -> list[str]:
    return [
        "--config", QUICKSTART,
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.init_args.batch_size", "16",
    ]  # fmt: skip


def test_three_batch_fit_logs_to_tensorboard_and_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *_short_fit_args(tmp_path)])
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.logger.log_dir)
    # fit ends on a few plain lines: final metrics, the checkpoint, the log directory
    summary = capsys.readouterr().out.splitlines()[-5:]
    assert summary[0] == "fit finished: 1 epoch, 3 steps"
    assert re.fullmatch(r"  train +loss \d\.\d+ \(last step\), acc \d+\.\d%", summary[1]), summary
    assert re.fullmatch(r"  val +loss \d\.\d+, acc \d+\.\d%", summary[2]), summary
    assert summary[3].split() == ["checkpoint", str(next(log_dir.glob("checkpoints/*.ckpt")))]
    assert summary[4].split() == ["logs", str(log_dir)]
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/acc", "train/acc"} <= tags
    checkpoints = list(log_dir.glob("checkpoints/*.ckpt"))
    assert checkpoints
    assert (log_dir / "config.yaml").exists()
    # The checkpoint is usable by the other subcommands.
    cli = main(["test", *_short_fit_args(tmp_path), "--ckpt_path", str(checkpoints[0])])
    assert "test/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.class_path", "lightning_bn.Nope"], "model: Problem with given class_path 'lightning_bn.Nope'"),
        (["--model.init_args.norm", "foo"], "norm='foo' is not a known normalization; choose one of:"),
        (["--model.init_args.lr", "-0.1"], "lr must be > 0, got -0.1"),
        (["--model.init_args.lr", "0"], "lr must be > 0, got 0"),
        (["--model.init_args.widht", "3"], "model.init_args.widht (VGG): not an option; did you mean 'width'?"),
        (["--trainer.max_epocs", "3"], "max_epocs"),
        (["--data.init_args.batch_size", "1"], "data.batch_size=1 cannot train a model with BatchNorm"),
        (
            ["--data", "lightning_bn.CIFAR10DataModule", "--data.init_args.download", "false",
             "--data.init_args.root", "NO_SUCH_DIR"],
            "CIFAR-10 not found in data.root=",
        ),
    ],
)  # fmt: skip
def test_user_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, capsys, extra, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_short_fit_args(tmp_path), "--trainer.fast_dev_run", "1", *extra])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, err_lines
    assert expected in err_lines[0]


def test_summarize_error_keeps_key_and_innermost_reason():
    nested = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [A, NoneType]\n  Errors:\n    - Problem with given class_path 'x.Y':\n"
        "        module 'x' has no attribute 'Y'\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'str'>\n  Given value: x.Y"
    )
    line = summarize_error(nested)
    assert line.startswith("model: Problem with given class_path 'x.Y': module 'x' has no attribute 'Y'")
    assert "\n" not in line


def test_lightningcli_optimizer_and_scheduler_flags_replace_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *_short_fit_args(tmp_path), "--trainer.fast_dev_run", "1"]
    cli = main([*args, "--optimizer", "Adam", "--optimizer.lr", "0.001", "--lr_scheduler", "StepLR",
                "--lr_scheduler.step_size", "5"])  # fmt: skip
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "Adam" and optimizer.param_groups[0]["lr"] == 0.001
    assert type(cli.trainer.lr_scheduler_configs[0].scheduler).__name__ == "StepLR"


def test_fit_summary_names_best_and_last_checkpoint_and_skips_missing_metrics():
    ckpt = pl.callbacks.ModelCheckpoint(monitor="val/loss", save_last=True)
    ckpt.best_model_path, ckpt.best_model_score, ckpt.last_model_path = "b.ckpt", torch.tensor(0.25), "last.ckpt"
    trainer = SimpleNamespace(
        callback_metrics={"train/loss": torch.tensor(0.5), "val/loss": torch.tensor(0.25), "per_class": torch.ones(3)},
        current_epoch=3, global_step=1, checkpoint_callback=ckpt, logger=None,
    )  # fmt: skip
    assert fit_summary(trainer) == [
        "fit finished: 3 epochs, 1 step",
        "  train       loss 0.5 (last step)",
        "  val         loss 0.25",
        "  best ckpt   b.ckpt (val/loss=0.25)",
        "  last ckpt   last.ckpt",
    ]


def test_a_run_failing_at_setup_removes_only_the_directories_it_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    (tmp_path / "late.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.ICSCallback\n      init_args: {layers: [net.99]}\n"
    )
    args = ["fit", "--config", DLN, "--config", "late.yaml", "--trainer.logger.init_args.save_dir", "runs"]
    with pytest.raises(SystemExit):
        main(args)
    assert not (tmp_path / "runs").exists()  # version_0, dln/none and runs were all new
    # A directory that was there before (a sweep run being resumed) stays, with what it held.
    kept = tmp_path / "runs" / "dln" / "none" / "resumed"
    kept.mkdir(parents=True)
    (kept / "train.log").write_text("earlier attempt")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.logger.init_args.version", "resumed"])
    assert exit_info.value.code == 2
    assert [p.name for p in kept.iterdir()] == ["train.log"]  # its new event file is gone
    assert "error: trainer.callbacks[0] (ICSCallback)" in capsys.readouterr().err


def test_removing_a_new_log_directory_keeps_parents_another_run_writes_into(tmp_path):
    mine, other = tmp_path / "exp" / "version_1", tmp_path / "exp" / "version_2"
    other.mkdir(parents=True)
    before = _LogDirBefore(mine, None, [mine.parent])
    mine.mkdir()
    (mine / "events.out.tfevents.x").write_text("")
    before.restore()
    assert not mine.exists() and other.is_dir()
