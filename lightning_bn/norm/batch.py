"""BatchNorm (Ioffe & Szegedy, 2015) for inputs of any rank, and the ``none`` placeholder."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bn.norm.registry import register_norm


@register_norm("batch")
class BatchNorm(_BatchNorm):
    """BatchNorm over all dimensions but the channel dimension 1.

    y = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta, with mu_B, sigma_B^2 the batch
    mean and (biased) variance per channel in training, running estimates in eval mode.
    One class for ``(N, C)`` and ``(N, C, H, W)`` inputs; it stays a ``_BatchNorm`` so
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` and Lightning's ``sync_batchnorm`` convert it.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")


@register_norm("none")
class NoNorm(nn.Identity):
    """The un-normalized ("standard") network: the identity where a norm would be."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
