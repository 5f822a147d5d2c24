"""1-D interpolation between two checkpoints (Keskar et al., Fig. 2/3): function and command.

Tiny VGGs trained for two steps on synthetic images; references are the checkpoints'
own models evaluated directly (alpha = 0 and 1) and running statistics averaged by hand.
"""

from __future__ import annotations

import copy
import csv

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_bn import VGG
from lightning_bn import interpolate as interpolate_module
from lightning_bn.data.base import InMemoryImageDataModule
from lightning_bn.errors import ConfigError
from lightning_bn.interpolate import (
    build_parser,
    check_compatible,
    default_alphas,
    default_labels,
    evaluate,
    interpolate,
    interpolated_state,
    main,
    recompute_running_stats,
)


class SyntheticImages(InMemoryImageDataModule):
    """64 train / 32 test random 32x32 RGB images in 3 classes (deterministic, not shuffled)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0 if train else 1)
        n = 64 if train else 32
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return images, torch.randint(0, 3, (n,), generator=g)


def tiny_vgg(seed: int, width: float = 0.0625, layout: str = "vgg11", norm: str = "batch") -> VGG:
    torch.manual_seed(seed)
    return VGG(layout=layout, width=width, num_classes=3, lr=0.05, norm=norm)


def train_and_save(model: pl.LightningModule, path, batch_size: int = 16):
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, SyntheticImages(batch_size=batch_size))
    trainer.save_checkpoint(path)
    return model.eval()


@pytest.fixture(scope="module")
def solutions(tmp_path_factory):
    root = tmp_path_factory.mktemp("solutions")
    a = train_and_save(tiny_vgg(0), root / "small.ckpt", batch_size=8)
    b = train_and_save(tiny_vgg(1), root / "large.ckpt", batch_size=32)
    return a, b, root


def batches(split: str, batch_size: int = 16):
    dm = SyntheticImages(batch_size=batch_size)
    dm.setup("fit")
    return list(dm.train_dataloader() if split == "train" else dm.test_dataloader())


def test_end_points_are_the_two_solutions_with_interpolated_statistics(solutions):
    a, b, _ = solutions
    rows = interpolate(a, b, SyntheticImages(batch_size=16), alphas=[0.0, 1.0], bn="interpolate")
    for row, model in zip(rows, (a, b)):
        train_loss, train_acc = evaluate(copy.deepcopy(model), batches("train"), torch.device("cpu"))
        test_loss, test_acc = evaluate(copy.deepcopy(model), batches("test"), torch.device("cpu"))
        assert row["train_loss"] == pytest.approx(train_loss, rel=1e-6)
        assert row["test_loss"] == pytest.approx(test_loss, rel=1e-6)
        assert (row["train_acc"], row["test_acc"]) == (train_acc, test_acc)
    assert rows[0]["train_loss"] != rows[1]["train_loss"]


def test_recomputed_statistics_at_alpha_zero_equal_a_with_recomputed_statistics(solutions):
    a, b, _ = solutions
    (row,) = interpolate(a, b, SyntheticImages(batch_size=16), alphas=[0.0])
    reference = copy.deepcopy(a)
    for m in reference.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # torch's cumulative average over the batches
    reference.train()
    with torch.no_grad():
        for x, _ in batches("train"):
            reference(x)
    loss, acc = evaluate(reference, batches("test"), torch.device("cpu"))
    assert row["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["test_acc"] == acc


def test_interpolated_state_is_linear_in_parameters_and_keeps_a_counters(solutions):
    a, b, _ = solutions
    sa, sb = a.state_dict(), b.state_dict()
    buffers = [n for n, _ in a.named_buffers()]
    state = interpolated_state(sa, sb, -0.5, buffers, "recompute")
    key = "features.0.weight"
    torch.testing.assert_close(state[key], 1.5 * sa[key] - 0.5 * sb[key])
    assert torch.equal(state["features.1.running_mean"], sa["features.1.running_mean"])
    mixed = interpolated_state(sa, sb, 2.0, buffers, "interpolate")
    mean_a, mean_b = sa["features.1.running_mean"], sb["features.1.running_mean"]
    torch.testing.assert_close(mixed["features.1.running_mean"], 2 * mean_b - mean_a)
    assert (mixed["features.1.running_var"] >= 0).all()
    assert torch.equal(mixed["features.1.num_batches_tracked"], sa["features.1.num_batches_tracked"])


def test_recompute_running_stats_averages_the_batch_statistics():
    bn = nn.BatchNorm1d(4, momentum=0.3)
    data = [torch.randn(5, 4) * (i + 1) + i for i in range(3)]
    count = recompute_running_stats(bn, [(x, None) for x in data], torch.device("cpu"))
    assert count == 3 and bn.momentum == 0.3 and bn.training
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in data]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0, unbiased=True) for x in data]).mean(0))


def test_default_grid_is_keskars():
    alphas = default_alphas()
    assert len(alphas) == 25 and alphas[0] == -1.0 and alphas[-1] == 2.0
    assert 0.0 in alphas and 1.0 in alphas


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: tiny_vgg(0, width=0.125), "parameter shapes differ: features.0.weight is"),
        (lambda: tiny_vgg(0, layout="vgg13"), "different architectures: entries only in"),
        (lambda: nn.Linear(2, 2), "different architectures: A is VGG, B is Linear"),
    ],
)
def test_incompatible_models_are_refused_with_one_line(solutions, other, message):
    a, _, _ = solutions
    with pytest.raises(ConfigError, match=message) as err:
        check_compatible(a, other())
    assert "\n" not in str(err.value)


def test_command_writes_csv_figure_and_tensorboard(solutions, tmp_path, capsys):
    _, _, root = solutions
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: lightning_bn.VGG\n"
        "data:\n  class_path: tests.test_interpolate.SyntheticImages\n  init_args:\n    batch_size: 16\n"
    )
    out = tmp_path / "out"
    argv = [str(root / "small.ckpt"), str(root / "large.ckpt"), "--config", str(config), "--out", str(out)]
    rows = main(argv + ["--alphas", "-1", "2", "4", "--bn-batches", "2", "--tensorboard", str(tmp_path / "tb")])
    assert [r["alpha"] for r in rows] == pytest.approx([-1.0, 0.0, 1.0, 2.0])
    table = list(csv.DictReader(open(out / "interpolation.csv")))
    assert [float(r["alpha"]) for r in table] == pytest.approx([-1.0, 0.0, 1.0, 2.0])
    assert set(table[0]) == {"alpha", "train_loss", "train_acc", "test_loss", "test_acc"}
    assert (out / "interpolation.png").stat().st_size > 1000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "wrote" in capsys.readouterr().out


def test_command_errors_are_one_line(solutions, tmp_path, capsys):
    _, _, root = solutions
    other = train_and_save(tiny_vgg(2, width=0.125), tmp_path / "wide.ckpt")
    assert other is not None
    small, large, wide, missing = (
        str(p) for p in (root / "small.ckpt", root / "large.ckpt", tmp_path / "wide.ckpt", tmp_path / "no.ckpt")
    )
    vgg = ["--model-class", "lightning_bn.VGG"]
    cases = [
        ([missing, large, *vgg], "checkpoint not found"),
        ([small, large], "does not name its model class; pass --model-class"),
        ([small, wide, *vgg], "parameter shapes differ"),
        ([small, large, "--model-class", "lightning_bn.Nope"], "cannot import class"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--out", str(tmp_path / "never")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()


def test_invalid_function_arguments_are_refused(solutions):
    a, b, _ = solutions
    with pytest.raises(ConfigError, match="bn must be"):
        interpolate(a, b, SyntheticImages(), bn="freeze")
    with pytest.raises(ConfigError, match="max_batches must be >= 1"):
        interpolate(a, b, SyntheticImages(), max_batches=0)


def test_every_option_has_help_text():
    undocumented = [a.dest for a in build_parser()._actions if not a.help]
    assert undocumented == []


def test_labels_tell_apart_two_checkpoints_of_the_same_name():
    assert default_labels("runs/small.ckpt", "runs/large.ckpt") == ("small", "large")
    assert default_labels("sb/checkpoints/last.ckpt", "lb/checkpoints/last.ckpt") == (
        "sb/checkpoints/last",
        "lb/checkpoints/last",
    )
    assert default_labels("a/last.ckpt", "a/last.ckpt") == ("a/last.ckpt", "a/last.ckpt")


def test_error_about_two_checkpoints_of_the_same_name_shows_their_paths(solutions, tmp_path, capsys):
    _, _, root = solutions
    (tmp_path / "sb").mkdir()
    (tmp_path / "sb" / "last.ckpt").write_bytes((root / "small.ckpt").read_bytes())
    (tmp_path / "wide").mkdir()
    train_and_save(tiny_vgg(2, width=0.125), tmp_path / "wide" / "last.ckpt")
    a, b = str(tmp_path / "sb" / "last.ckpt"), str(tmp_path / "wide" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main([a, b, "--model-class", "lightning_bn.VGG", "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parameter shapes differ: ") and err.count("\n") == 1, err
    assert f"in {a} but" in err and err.rstrip().endswith(f"in {b}"), err


def test_no_bn_statistics_title_for_a_model_without_bn(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  class_path: tests.test_interpolate.SyntheticImages\n  init_args:\n    batch_size: 16\n")
    paths = [tmp_path / "a.ckpt", tmp_path / "b.ckpt"]
    for seed, path in enumerate(paths):
        train_and_save(tiny_vgg(seed, norm="none"), path)
    titles = []
    real_plot = interpolate_module.plot

    def recording_plot(rows, labels, title=None):
        titles.append(title)
        return real_plot(rows, labels, title)

    monkeypatch.setattr(interpolate_module, "plot", recording_plot)
    argv = [*map(str, paths), "--config", str(config), "--alphas", "0", "1", "2", "--max-batches", "1"]
    main([*argv, "--model-class", "lightning_bn.VGG", "--out", str(tmp_path / "out")])
    assert titles == [None]
