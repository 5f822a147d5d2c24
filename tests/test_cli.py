"""The LightningCLI entry: a short real fit, and one-line errors for user mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_bn.cli import main, summarize_error

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


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


def test_three_batch_fit_logs_to_tensorboard_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *_short_fit_args(tmp_path)])
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.logger.log_dir)
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
