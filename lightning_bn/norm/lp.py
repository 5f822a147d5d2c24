"""lp normalization (Santurkar et al., 2018, Sec. 3.3): BatchNorm with another dispersion measure.

Per channel, over the batch (and the spatial positions of a feature map), with the m
values of a channel x_1..x_m, mu = mean(x), c = x - mu:

    y = gamma * c / d_p + beta,   d_p = (mean(|c|^p) + eps)^(1/p)   for p = 1, 2
                                  d_inf = max(|c|) + eps             for p = "inf"

so the activations are divided by the batch average of their lp norm (the max for
p = inf). With p = 2, d_2 = sqrt(var + eps) and the layer *is* BatchNorm (a test checks
it, train and eval). Running estimates of mu and of the statistic ``s = mean(|c|^p)``
(``max|c|`` for inf) are kept with BatchNorm's momentum rule and used in eval mode; for
p = 2, s is updated with Bessel's correction m/(m - 1) exactly as BatchNorm's running_var.

Speed: p = 2 calls PyTorch's fused BatchNorm kernel. p = 1 and inf use hand-written
backwards (:mod:`lightning_bn.norm.lp_function`: one for feature maps, one for ``(N, C)``
activations); on CPU, ``(N, C)`` activations and p = 1 on large feature maps go through a
compiled op instead (:mod:`lightning_bn.norm.kernels`, Python fallback);
``benchmarks/norm_speed.py`` prints the ratio to BatchNorm. Under
``create_graph=True`` (double backward) and under ``torch.func`` transforms the
plain-autograd definition :func:`lp_normalize_reference` is differentiated instead, so
Hessian-vector products work.

DDP: statistics are per rank (like plain BatchNorm); the layer is not a ``_BatchNorm``
subclass, so ``sync_batchnorm`` leaves it alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm import kernels
from lightning_bn.norm.autograd_mode import plain_autograd as _plain_autograd
from lightning_bn.norm.lp_function import (
    P,
    _channel_affine,
    _LpNorm1OrInf,
    _LpNorm1OrInfFlat,
    _update_running,
    lp_normalize_reference,
)
from lightning_bn.norm.registry import register_norm

__all__ = ["LpNorm", "lp_normalize_reference"]


def _parse_p(p: object) -> P:
    if p in ("inf", math.inf):
        return "inf"
    if p in (1, 2) and not isinstance(p, bool):
        return int(p)  # type: ignore[return-value]
    raise ConfigError(f"norm 'lp': p must be 1, 2 or 'inf', got {p!r}")


def _compiled_is_faster(x: torch.Tensor, p: P) -> bool:
    """Where ``benchmarks/norm_speed.py`` measured the compiled op faster than the Python Functions:
    ``(N, C)`` activations (up to 2^24 rows), and feature maps for p = 1 with at least
    :data:`kernels.LP_MAPS_MIN_SPATIAL` positions (VGG's 32x32 and 16x16: 0.8-1.0 x BatchNorm instead
    of 1.3-1.4; 8x8 about equal). On smaller maps, and for p = inf, the Python path's BatchNorm
    kernels are faster (4x4: 1.1 against 2.4)."""
    if x.dim() == 2:
        return x.shape[0] <= kernels.LP_FLAT_MAX_ROWS
    return p == 1 and x.numel() // (x.shape[0] * x.shape[1]) >= kernels.LP_MAPS_MIN_SPATIAL


@register_norm("lp")
class LpNorm(nn.Module):
    """lp normalization of each channel by the batch average of its lp norm (see module doc).

    Args:
        num_features: channels C of an (N, C, ...) input.
        p: 1, 2 (= BatchNorm) or ``"inf"`` (also accepts ``float("inf")``).
        eps: added inside the root (p = 1, 2) or to the max (inf).
        momentum: weight of the newest batch in the running estimates, in (0, 1].
        affine: learn a per-channel gamma and beta.
    """

    def __init__(
        self, num_features: int, p: int | str = 2, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        self.p = _parse_p(p)
        if not eps > 0:
            raise ConfigError(f"norm 'lp': eps must be > 0, got {eps!r}")
        if not 0 < momentum <= 1:
            raise ConfigError(f"norm 'lp': momentum must be in (0, 1], got {momentum!r}")
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        # p = 1: mean|c|, p = 2: variance (BatchNorm's running_var), inf: max|c|; starts at 1.
        self.register_buffer("running_stat", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def check_batch_size(self, batch_size: int) -> None:
        """Called by the model's ``setup``: a batch of one sample has no dispersion to normalize by."""
        if batch_size < 2:
            raise ConfigError(f"data.batch_size={batch_size} cannot train a model with norm 'lp' (batch statistics)")

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p!r}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"lp norm expects (N, {self.num_features}, ...) input, got shape {tuple(x.shape)}")
        if self.p == 2:  # exactly BatchNorm: use its fused kernel
            if self.training:
                self.num_batches_tracked.add_(1)
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_stat, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        if not self.training:
            d = self.running_stat + self.eps
            scale = d.reciprocal() if self.weight is None else self.weight / d
            return _channel_affine(x, self.running_mean, scale, self.bias)
        if x.numel() // x.shape[1] < 2:
            raise ValueError(f"lp norm needs more than 1 value per channel in training, got shape {tuple(x.shape)}")
        self.num_batches_tracked.add_(1)
        if _plain_autograd(x):  # the hand-written backwards; they also update the running estimates
            running = (self.running_mean, self.running_stat, self.momentum)
            if _compiled_is_faster(x, self.p) and kernels.usable(x):  # one C++ op and autograd node
                return torch.ops.lightning_bn.lp_norm(x, self.weight, self.bias, *running, self.p == "inf", self.eps)
            function = _LpNorm1OrInfFlat if x.dim() == 2 else _LpNorm1OrInf
            return function.apply(x, self.weight, self.bias, *running, self.p, self.eps)
        y, mean, stat = lp_normalize_reference(x, self.weight, self.bias, self.p, self.eps)
        _update_running(self.running_mean, self.running_stat, mean.detach(), stat.detach(), self.momentum)
        return y
