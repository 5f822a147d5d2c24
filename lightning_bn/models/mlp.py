"""Multilayer perceptron for 28x28 images (MNIST, Fashion-MNIST): 784-32-32-10 by default.

Each hidden layer is Linear -> norm -> ReLU, the norm before the nonlinearity as in the
classic MNIST BatchNorm tutorial; the input is flattened.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from lightning_bn.errors import ConfigError, check_choice
from lightning_bn.module import NormStudyModule
from lightning_bn.norm import create_norm


def init_kaiming_linear(module: nn.Module, output_layer: nn.Linear) -> None:
    """Kaiming-normal (fan_in, ReLU) hidden layers, variance-preserving (fan_in, linear) output layer.

    Why not PyTorch's default: its uniform init shrinks the signal by about sqrt(3) per ReLU
    layer, so the un-normalized network starts worse off than the normalized one for reasons
    that have nothing to do with normalization.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            relu = m is not output_layer
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if relu else "linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLP(NormStudyModule):
    """Fully connected classifier: flatten -> [Linear -> norm -> ReLU] x len(hidden_sizes) -> Linear.

    Args:
        hidden_sizes: widths of the hidden layers (default ``[32, 32]``).
        input_shape: shape of one input sample (default ``[1, 28, 28]``: 784 inputs).
        norm: normalization name from :data:`lightning_bn.norm.NORMS` (``none`` = plain MLP).
        norm_kwargs: keyword arguments for the norm.
        init: ``kaiming`` (default) or ``default`` (PyTorch's layer defaults).
        **kwargs: optimizer/loss options of :class:`~lightning_bn.module.NormStudyModule`
            (``lr``, ``momentum``, ``num_classes``, ...).
    """

    def __init__(
        self,
        hidden_sizes: list[int] | None = None,
        input_shape: list[int] | None = None,
        norm: str = "batch",
        norm_kwargs: dict[str, Any] | None = None,
        init: Literal["kaiming", "default"] = "kaiming",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("task", "classification") != "classification":
            raise ConfigError(f"MLP is a classifier; task={kwargs['task']!r} is not supported")
        super().__init__(**kwargs)
        hidden_sizes = [32, 32] if hidden_sizes is None else list(hidden_sizes)
        input_shape = [1, 28, 28] if input_shape is None else list(input_shape)
        if any(not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ConfigError(f"hidden_sizes must be positive integers, got {hidden_sizes!r}")
        if not input_shape or any(not isinstance(s, int) or s < 1 for s in input_shape):
            raise ConfigError(f"input_shape must be positive integers, got {input_shape!r}")
        check_choice("init", init, ("kaiming", "default"))
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for width in hidden_sizes:
            layers += [nn.Linear(fan_in, width), create_norm(norm, width, **(norm_kwargs or {})), nn.ReLU()]
            fan_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(fan_in, self.num_classes)
        if init == "kaiming":
            init_kaiming_linear(self, output_layer=self.classifier)
        self.example_input_array = torch.zeros(2, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
