"""Every architecture x every normalization, and each architecture's defining properties."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightning_bn
from lightning_bn import MLP, VGG, DeepLinearNet, GaussianRegressionDataModule, ResNet
from lightning_bn.errors import ConfigError
from lightning_bn.norm import NORMS, create_norm

NORM_NAMES = sorted(NORMS)
BATCH_STAT_NORMS = {"batch", "noisy_batch", "lp", "ghost_batch"}


def tiny(arch: str, norm: str) -> tuple[pl.LightningModule, torch.Tensor]:
    """A small instance of ``arch`` with ``norm`` and a batch of 8 inputs."""
    kwargs = {"virtual_batch_size": 4} if norm == "ghost_batch" else {}
    if arch == "VGG":
        return VGG(width=0.125, norm=norm, norm_kwargs=kwargs), torch.randn(8, 3, 32, 32)
    if arch == "ResNet":
        return ResNet(depth=8, width=4, norm=norm, norm_kwargs=kwargs), torch.randn(8, 3, 32, 32)
    if arch == "MLP":
        return MLP(hidden_sizes=[8, 8], norm=norm, norm_kwargs=kwargs), torch.randn(8, 1, 28, 28)
    model = DeepLinearNet(in_features=5, out_features=3, width=6, depth=4, norm=norm, norm_kwargs=kwargs)
    return model, torch.randn(8, 5)


def test_public_exports():
    assert {"VGG", "DeepLinearNet", "MLP", "ResNet", "GaussianRegressionDataModule"} <= set(lightning_bn.__all__)
    assert lightning_bn.norm.create_norm is create_norm


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("arch", ["VGG", "DeepLinearNet", "MLP", "ResNet"])
def test_every_architecture_with_every_norm(arch, norm):
    model, x = tiny(arch, norm)
    assert model.hparams.norm == norm
    out = model(x)
    expected = (8, 3) if arch == "DeepLinearNet" else (8, 10)
    assert out.shape == expected and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Training mode: a sample's output depends on the batch iff the norm uses batch statistics
    # (sample 0 shares ghost_batch's first virtual batch with samples 1-3).
    changed = torch.cat([x[:1], 2 * x[1:] + 1])
    with torch.no_grad():
        depends = not torch.allclose(model(x)[:1], model(changed)[:1], atol=1e-5)
    assert depends == (norm in BATCH_STAT_NORMS)
    # Eval mode: samples are independent under every norm.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(changed)[:1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)
    # The example input (used by model summaries) runs.
    assert model(model.example_input_array).shape[0] == model.example_input_array.shape[0]


@pytest.mark.parametrize("arch", ["VGG", "DeepLinearNet", "MLP", "ResNet"])
def test_norm_none_has_no_normalization_layers(arch):
    model, _ = tiny(arch, "none")
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in model.modules())


# -- ResNet ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, published", [(20, 0.27), (32, 0.46), (56, 0.85)])
def test_resnet_parameter_counts_match_he_et_al(depth, published):
    count = sum(p.numel() for p in ResNet(depth=depth).parameters())
    assert round(count / 1e6, 2) == published
    # Option-B projections add parameters; option A (the paper's CIFAR nets) has none.
    assert sum(p.numel() for p in ResNet(depth=depth, shortcut="B").parameters()) > count


def test_resnet_layout():
    model = ResNet(depth=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 8  # 6n + 1 convs and one linear layer, n = 1
    assert [c.out_channels for c in convs] == [16, 16, 16, 32, 32, 64, 64]
    assert all(c.bias is None for c in convs)  # BatchNorm's beta makes conv biases redundant
    assert all(c.bias is not None for c in ResNet(depth=8, norm="none").modules() if isinstance(c, nn.Conv2d))
    x = torch.randn(2, 3, 32, 32)
    assert model.stages(model.stem(x)).shape == (2, 64, 8, 8)


@pytest.mark.parametrize("depth", [7, 9, 10, 2])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ConfigError, match=f"depth must be 6n \\+ 2 with n >= 1.*got {depth}"):
        ResNet(depth=depth)


# -- deep linear network ----------------------------------------------------------------------------


def test_dln_layout_and_norm_placement():
    model = DeepLinearNet(in_features=10, out_features=3, width=16, depth=25, norm="batch")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 25 and all(m.bias is None for m in linears)
    assert (linears[0].in_features, linears[0].out_features, linears[-1].out_features) == (10, 16, 3)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(norms) == 24  # after every layer but the last
    assert isinstance(model.layers[-1], nn.Linear)
    assert not any(isinstance(m, (nn.ReLU, nn.Tanh, nn.Sigmoid)) for m in model.modules())
    assert model.task == "regression" and model.hparams.momentum == 0.0


def test_dln_orthogonal_init_preserves_the_norm():
    model = DeepLinearNet(in_features=16, out_features=16, width=16, depth=25, norm="none")
    x = torch.randn(100, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).norm(dim=1), x.norm(dim=1), rtol=1e-4, atol=1e-4)


def _full_batch_gd_losses(init: str, steps: int = 60) -> list[float]:
    torch.manual_seed(0)
    model = DeepLinearNet(norm="none", init=init)
    data = GaussianRegressionDataModule(num_samples=200)
    data.setup()
    x, y = data.train_set.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=model.lr)
    losses = []
    for _ in range(steps):
        loss = model.loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_plain_dln_trains_only_with_the_variance_preserving_init():
    """Why orthogonal init is the default: with PyTorch's default init the signal vanishes through 25 layers."""
    orthogonal = _full_batch_gd_losses("orthogonal")
    default = _full_batch_gd_losses("default")
    assert orthogonal[-1] < 1e-3 * orthogonal[0]
    assert default[-1] > 0.9 * default[0]


def test_dln_classification_uses_out_features_classes():
    model = DeepLinearNet(out_features=4, depth=3, task="classification")
    assert model.num_classes == 4 and model.task == "classification"
    with pytest.raises(ConfigError, match="classifies into out_features=4 classes; got num_classes=10"):
        DeepLinearNet(out_features=4, task="classification", num_classes=10)


def test_dln_full_batch_fit_with_lightning_and_ghost_batch_checked_at_setup():
    data = GaussianRegressionDataModule(num_samples=64, num_val_samples=16)
    model = DeepLinearNet(depth=3, norm="ghost_batch", norm_kwargs={"virtual_batch_size": 16})
    trainer = pl.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, data)
    assert trainer.global_step == 3  # full batch: one step per epoch
    bad = DeepLinearNet(depth=3, norm="ghost_batch", norm_kwargs={"virtual_batch_size": 48})
    with pytest.warns(UserWarning, match="data.batch_size=64 is not a multiple of norm 'ghost_batch'"):
        pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(bad, data)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 0}, "depth must be >= 1 linear layers, got 0"),
        ({"width": 0}, "width must be > 0, got 0"),
        ({"init": "xavier"}, "init='xavier' is not allowed"),
        ({"norm": "lp", "norm_kwargs": {"p": 0}}, "norm 'lp': p must be 1, 2 or 'inf', got 0"),
    ],
)
def test_dln_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DeepLinearNet(**kwargs)


# -- MLP ------------------------------------------------------------------------------------------


def test_mlp_default_is_784_32_32_10_with_norm_before_relu():
    model = MLP()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 32), (32, 32), (32, 10)]
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Flatten", "Linear", "BatchNorm", "ReLU", "Linear", "BatchNorm", "ReLU"]
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert tuple(model.example_input_array.shape) == (2, 1, 28, 28)
    assert MLP(hidden_sizes=[64], input_shape=[3, 8, 8])(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_sizes": [32, 0]}, r"hidden_sizes must be positive integers, got \[32, 0\]"),
        ({"input_shape": []}, "input_shape must be positive integers"),
        ({"task": "regression"}, "MLP is a classifier"),
    ],
)
def test_mlp_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MLP(**kwargs)


# -- VGG gains every norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("norm, kind", [("noisy_batch", "NoisyBatchNorm"), ("lp", "LpNorm"), ("group", "GroupNorm")])
def test_vgg_places_the_chosen_norm_after_every_conv(norm, kind):
    model = VGG(width=0.125, norm=norm)
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(type(layers[i + 1]).__name__ == kind for i in convs)
