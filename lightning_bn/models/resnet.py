"""CIFAR ResNet-(6n+2) of He et al. (2016, Sec. 4.2), as trained by Masters & Luschi (2018).

A 3x3 conv with 16 channels, three stages of n basic blocks (16, 32, 64 channels; stride 2
at the start of stages 2 and 3), global average pooling and one linear layer. Depths 8, 20
and 32 are the ones Masters & Luschi use; ResNet-20/32 have 0.27M/0.46M parameters with
the paper's parameter-free shortcut (option A).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.errors import ConfigError, check_choice, check_positive
from lightning_bn.module import NormStudyModule, init_kaiming
from lightning_bn.norm import create_norm


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut, then ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm: str, norm_kwargs: dict, shortcut: str
    ) -> None:
        super().__init__()
        bias = norm == "none"  # a norm's affine map makes a conv bias redundant; without one keep it
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1 = create_norm(norm, out_channels, **norm_kwargs)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = create_norm(norm, out_channels, **norm_kwargs)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()  # not in-place: hooks keep activations
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_channels, out_channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                    create_norm(norm, out_channels, **norm_kwargs),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(NormStudyModule):
    """CIFAR ResNet with ``depth = 6n + 2`` layers.

    Args:
        depth: 6n + 2 >= 8 (8, 20, 32 in Masters & Luschi; 20 -> 0.27M parameters).
        width: channels of the first stage (16 in the paper; stages use width, 2x, 4x).
        norm: normalization name from :data:`lightning_bn.norm.NORMS`; ``none`` gives the
            un-normalized ResNet (convs then get biases).
        norm_kwargs: keyword arguments for the norm.
        shortcut: ``A`` (paper: strided identity + zero channel padding, no parameters) or
            ``B`` (1x1 conv + norm projection where the shape changes).
        in_channels: input channels (3 for CIFAR).
        init: ``kaiming`` (default) or ``default`` (PyTorch's layer defaults).
        **kwargs: optimizer/loss options of :class:`~lightning_bn.module.NormStudyModule`.
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        norm: str = "batch",
        norm_kwargs: dict[str, Any] | None = None,
        shortcut: Literal["A", "B"] = "A",
        in_channels: int = 3,
        init: Literal["kaiming", "default"] = "kaiming",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("task", "classification") != "classification":
            raise ConfigError(f"ResNet is a classifier; task={kwargs['task']!r} is not supported")
        super().__init__(**kwargs)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, 32, ...), got {depth!r}")
        check_positive("width", width)
        check_choice("shortcut", shortcut, ("A", "B"))
        check_choice("init", init, ("kaiming", "default"))
        self.save_hyperparameters()
        norm_kwargs = norm_kwargs or {}
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=norm == "none"),
            create_norm(norm, width, **norm_kwargs),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        channels = width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride, norm, norm_kwargs, shortcut))
                channels = stage_width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, self.num_classes)
        if init == "kaiming":
            init_kaiming(self)
        self.example_input_array = torch.zeros(2, in_channels, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
