"""CIFAR VGG (Simonyan & Zisserman, 2015) as used by Santurkar et al. (2018).

Layout "A" (VGG-11) by default: conv3x3 blocks with a norm after every conv and before its
ReLU, max-pooling between stages, global 1x1 feature map, one linear classifier.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_bn.errors import ConfigError, check_choice, check_positive
from lightning_bn.module import NormStudyModule, init_kaiming
from lightning_bn.norm import create_norm

LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(NormStudyModule):
    """VGG for 32x32 images.

    Args:
        layout: ``vgg11`` (VGG-A, the paper's), ``vgg13`` or ``vgg16``.
        width: channel multiplier (0.5 halves every conv); CPU runs want <= 0.5.
        norm: normalization name from :data:`lightning_bn.norm.NORMS` (``none`` = standard VGG).
        norm_kwargs: keyword arguments for the norm (e.g. ``{"p": 1}`` for ``lp``).
        in_channels: input channels (3 for CIFAR).
        init: ``kaiming`` (default; the un-normalized VGG does not train otherwise) or
            ``default`` (PyTorch's layer defaults).
        **kwargs: optimizer/loss options of :class:`~lightning_bn.module.NormStudyModule`
            (``lr``, ``momentum``, ``weight_decay``, ``lr_schedule``, ``num_classes``, ...).
    """

    def __init__(
        self,
        layout: Literal["vgg11", "vgg13", "vgg16"] = "vgg11",
        width: float = 1.0,
        norm: str = "batch",
        norm_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        init: Literal["kaiming", "default"] = "kaiming",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("task", "classification") != "classification":
            raise ConfigError(f"VGG is a classifier; task={kwargs['task']!r} is not supported")
        super().__init__(**kwargs)
        check_choice("layout", layout, LAYOUTS)
        check_positive("width", width)
        check_choice("init", init, ("kaiming", "default"))
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in LAYOUTS[layout]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, round(int(item) * width))
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                create_norm(norm, out, **(norm_kwargs or {})),
                nn.ReLU(),  # not in-place: measurement hooks keep the norm's output,
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, self.num_classes)
        if init == "kaiming":
            init_kaiming(self)
        self.example_input_array = torch.zeros(2, in_channels, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
