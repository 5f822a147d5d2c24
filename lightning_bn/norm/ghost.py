"""Ghost BatchNorm (Hoffer, Hubara & Soudry, 2017): BatchNorm statistics over virtual batches.

In training, a batch of N samples is split in order into G = N / virtual_batch_size
consecutive virtual batches; each is normalized with its own per-channel mean and
variance, exactly as a BatchNorm layer seeing only that virtual batch would. This
decouples the batch that BatchNorm normalizes over from the SGD batch (Masters & Luschi,
2018, study the two separately). With virtual_batch_size = N it is BatchNorm (a test
checks it).

The batch size must be a multiple of ``virtual_batch_size``: anything else raises
``ValueError`` (and the model's ``setup`` checks ``data.batch_size`` before training), since
a smaller remainder batch would be normalized with noisier statistics than the others.

Running estimates: after each training forward, running_mean and running_var move by
``momentum`` towards the average over the virtual batches of their means and unbiased
variances (one update per forward, as BatchNorm). Eval mode uses them like BatchNorm.

DDP: each virtual batch lives on one rank, so the statistics are per rank by design; the
layer is not a ``_BatchNorm`` subclass and ``sync_batchnorm`` leaves it alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm.registry import register_norm


@register_norm("ghost_batch")
class GhostBatchNorm(nn.Module):
    """BatchNorm over virtual batches of ``virtual_batch_size`` samples (see module doc).

    Args:
        num_features: channels C of an (N, C, ...) input.
        virtual_batch_size: samples per virtual batch (>= 1; the batch size must be a multiple).
        eps, momentum, affine: as in BatchNorm (momentum in (0, 1]).
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ConfigError(
                f"norm 'ghost_batch': virtual_batch_size must be an integer >= 1, got {virtual_batch_size!r}"
            )
        if not 0 < momentum <= 1:
            raise ConfigError(f"norm 'ghost_batch': momentum must be in (0, 1], got {momentum!r}")
        self.num_features, self.virtual_batch_size = num_features, virtual_batch_size
        self.eps, self.momentum, self.affine = eps, momentum, affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, eps={self.eps}"

    def check_batch_size(self, batch_size: int) -> None:
        """Called by the model's ``setup`` so a bad batch size fails before training starts."""
        if batch_size % self.virtual_batch_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is not a multiple of norm 'ghost_batch' "
                f"virtual_batch_size={self.virtual_batch_size}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"ghost_batch expects (N, {self.num_features}, ...) input, got shape {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        v = self.virtual_batch_size
        if n % v:
            raise ValueError(f"ghost_batch: batch size {n} is not a multiple of virtual_batch_size={v}")
        groups = n // v
        # (G*v, C, ...) -> (v, G*C, ...): each (virtual batch, channel) pair becomes one BN channel.
        xg = x.reshape(groups, v, c, *rest).transpose(0, 1).reshape(v, groups * c, *rest)
        # momentum 1 makes F.batch_norm write the plain batch statistics into these buffers.
        means = torch.zeros(groups * c, device=x.device, dtype=x.dtype)
        variances = torch.ones(groups * c, device=x.device, dtype=x.dtype)
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        y = F.batch_norm(xg, means, variances, weight, bias, True, 1.0, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(means.view(groups, c).mean(0).to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(variances.view(groups, c).mean(0).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return y.reshape(v, groups, c, *rest).transpose(0, 1).reshape(n, c, *rest)
