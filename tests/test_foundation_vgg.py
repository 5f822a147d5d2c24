import pytest
import torch
from torch import nn

from lightning_bn import VGG
from lightning_bn.errors import ConfigError


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_forward_backward(norm):
    model = VGG(width=0.125, norm=norm)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert has_bn == (norm == "batch")


def test_width_scales_channels_and_layout_has_eight_convs():
    model = VGG(width=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256, 256, 256]


def test_eval_mode_uses_running_statistics():
    model = VGG(width=0.125, norm="batch")
    model.train()
    for _ in range(3):  # give the running statistics some non-trivial values
        model(torch.randn(8, 3, 32, 32) * 2 + 1)
    model.eval()
    batch = torch.randn(8, 3, 32, 32)
    alone = model(batch[:1])
    with_others = model(batch)[:1]
    torch.testing.assert_close(alone, with_others, rtol=1e-5, atol=1e-5)
    model.train()
    assert not torch.allclose(model(batch)[:1], model(torch.cat([batch[:1], 5 * batch[1:]]))[:1])


def test_kaiming_init_is_the_default():
    conv = next(m for m in VGG(width=0.25).modules() if isinstance(m, nn.Conv2d))
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr must be > 0, got 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"width": 0}, "width must be > 0"),
        ({"layout": "vgg99"}, "layout='vgg99' is not allowed; choose one of: 'vgg11'"),
        ({"norm": "bogus"}, "norm='bogus' is not a known normalization"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"task": "regression"}, "VGG is a classifier"),
    ],
)
def test_bad_arguments_fail_at_once(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VGG(**kwargs)
