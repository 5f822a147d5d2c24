"""Deep linear network (DLN) of Santurkar et al. (2018), used for the ICS and lp experiments.

``depth`` linear layers with no nonlinearity, a normalization after every layer but the
last (``norm="none"``: the plain DLN). Trained by default on
:class:`~lightning_bn.data.GaussianRegressionDataModule` with MSE and full-batch gradient
descent (plain GD: momentum 0, no weight decay).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_bn.errors import ConfigError, check_choice, check_positive
from lightning_bn.module import NormStudyModule, Task
from lightning_bn.norm import create_norm


def init_orthogonal(module: nn.Module) -> None:
    """Norm-preserving init of every Linear: (semi-)orthogonal weights, zero biases.

    A square orthogonal W keeps ||W x|| = ||x||; a wide-to-narrow W (out < in) is scaled by
    sqrt(in / out) so E||W x||^2 = ||x||^2 for isotropic x. Why: with PyTorch's default init
    the signal vanishes through 25 layers and the plain DLN does not train at all (DESIGN.md
    section 7), which would make it look trivially stable.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain=max(1.0, m.in_features / m.out_features) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DeepLinearNet(NormStudyModule):
    """A deep linear network: in_features -> width -> ... -> width -> out_features.

    Args:
        in_features: input dimension (the data module's ``in_features``).
        out_features: output dimension (regression targets, or classes for classification).
        width: hidden width of the ``depth - 1`` hidden layers.
        depth: number of linear layers k (>= 1; the paper's DLN has 25).
        norm: normalization after each of the first k - 1 layers, by name from
            :data:`lightning_bn.norm.NORMS` (``none`` = the plain DLN).
        norm_kwargs: keyword arguments for the norm.
        bias: give the linear layers a bias (off: the classic DLN is purely multiplicative).
        init: ``orthogonal`` (default, norm-preserving) or ``default`` (PyTorch's layer init).
        lr, momentum, weight_decay: of the SGD optimizer; defaults give plain gradient descent.
        task: ``regression`` (MSE, default) or ``classification`` (cross-entropy over
            ``out_features`` classes).
        **kwargs: further options of :class:`~lightning_bn.module.NormStudyModule`.
    """

    def __init__(
        self,
        in_features: int = 10,
        out_features: int = 10,
        width: int = 32,
        depth: int = 25,
        norm: str = "batch",
        norm_kwargs: dict[str, Any] | None = None,
        bias: bool = False,
        init: Literal["orthogonal", "default"] = "orthogonal",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        task: Task = "regression",
        **kwargs: Any,
    ) -> None:
        if task == "classification":
            if kwargs.setdefault("num_classes", out_features) != out_features:
                raise ConfigError(
                    f"DeepLinearNet classifies into out_features={out_features} classes; got num_classes="
                    f"{kwargs['num_classes']!r}"
                )
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, task=task, **kwargs)
        for name, value in (("in_features", in_features), ("out_features", out_features), ("width", width)):
            check_positive(name, value)
        if depth < 1:
            raise ConfigError(f"depth must be >= 1 linear layers, got {depth!r}")
        check_choice("init", init, ("orthogonal", "default"))
        self.save_hyperparameters()
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if i < depth - 1:
                layers.append(create_norm(norm, fan_out, **(norm_kwargs or {})))
        self.layers = nn.Sequential(*layers)
        if init == "orthogonal":
            init_orthogonal(self)
        self.example_input_array = torch.zeros(2, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
