"""Ghost BatchNorm (Hoffer, Hubara & Soudry, 2017): BatchNorm statistics over virtual batches.

In training, a batch of N samples is split in order into consecutive virtual batches of
``virtual_batch_size`` (v) samples; each is normalized with its own per-channel mean and
variance, exactly as a BatchNorm layer seeing only that virtual batch would. This
decouples the batch that BatchNorm normalizes over from the SGD batch (Masters & Luschi,
2018, study the two separately). With virtual_batch_size = N it is BatchNorm (a test
checks it).

Remainder rule, for batches v does not divide (a last partial batch with
``drop_last=False``, an ``example_input_array`` of 2): the N mod v samples left after the
full virtual batches form their own, smaller virtual batch; a remainder of one sample
cannot be normalized alone, so it joins the previous virtual batch (N = 2v + 1 gives
virtual batches of v and v + 1). A batch smaller than v is one virtual batch; a batch of
one sample then fails with torch's own BatchNorm error unless spatial dimensions give
more than one value per channel, as in BatchNorm. The model's ``setup`` warns when
``data.batch_size`` is not a multiple of v, since the smaller virtual batch is normalized
with noisier statistics than the others.

Running estimates: after each training forward, running_mean and running_var move by
``momentum`` towards the plain average over the virtual batches of their means and unbiased
variances (one update per forward, as BatchNorm). Every virtual batch counts once whatever
its size (the smaller remainder too), and each variance is unbiased over its own values
(divided by its sample count times spatial size, minus 1). Eval mode uses them like
BatchNorm, for any batch size.

DDP: each virtual batch lives on one rank, so the statistics are per rank by design; the
layer is not a ``_BatchNorm`` subclass and ``sync_batchnorm`` leaves it alone.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm.registry import register_norm


def split_virtual_batches(batch_size: int, virtual_batch_size: int) -> tuple[int, int]:
    """(number of full virtual batches, size of the last, different one or 0) by the remainder rule.

    A remainder of one sample joins the previous virtual batch, so the last size may be
    virtual_batch_size + 1; a batch smaller than virtual_batch_size is (0, batch_size).
    """
    full, rest = divmod(batch_size, virtual_batch_size)
    if rest == 1 and full:
        return full - 1, virtual_batch_size + 1
    return full, rest


@register_norm("ghost_batch")
class GhostBatchNorm(nn.Module):
    """BatchNorm over virtual batches of ``virtual_batch_size`` samples (see module doc).

    Args:
        num_features: channels C of an (N, C, ...) input.
        virtual_batch_size: samples per virtual batch (>= 1); a remainder forms a smaller one.
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
        """Called by the model's ``setup``: warn before training that every batch has a smaller virtual batch."""
        if batch_size % self.virtual_batch_size:
            warnings.warn(
                f"data.batch_size={batch_size} is not a multiple of norm 'ghost_batch' "
                f"virtual_batch_size={self.virtual_batch_size}: the remainder of each batch forms a smaller "
                "virtual batch (a single leftover sample joins the previous one), with noisier statistics",
                stacklevel=2,
            )

    def _normalize(self, x: torch.Tensor, groups: int, v: int) -> tuple[torch.Tensor, ...]:
        """Normalize ``groups`` consecutive virtual batches of ``v`` samples in one BatchNorm call.

        Returns the output and the (groups, C) means and unbiased variances.
        """
        c, rest = x.shape[1], x.shape[2:]
        # (G*v, C, ...) -> (v, G*C, ...): each (virtual batch, channel) pair becomes one BN channel.
        xg = x.reshape(groups, v, c, *rest).transpose(0, 1).reshape(v, groups * c, *rest)
        # momentum 1 makes F.batch_norm write the plain batch statistics into these buffers.
        means = torch.zeros(groups * c, device=x.device, dtype=x.dtype)
        variances = torch.ones(groups * c, device=x.device, dtype=x.dtype)
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        y = F.batch_norm(xg, means, variances, weight, bias, True, 1.0, self.eps)
        y = y.reshape(v, groups, c, *rest).transpose(0, 1).reshape(groups * v, c, *rest)
        return y, means.view(groups, c), variances.view(groups, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"ghost_batch expects (N, {self.num_features}, ...) input, got shape {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        v = self.virtual_batch_size
        full, last = split_virtual_batches(x.shape[0], v)
        if not last:  # fast path: one BatchNorm call, no concatenation
            y, means, variances = self._normalize(x, full, v)
        else:  # full virtual batches in one call, the different last one in another
            parts = [self._normalize(x[: full * v], full, v)] if full else []
            parts.append(self._normalize(x[full * v :], 1, last))
            y, means, variances = (torch.cat(t) for t in zip(*parts))
        with torch.no_grad():
            self.running_mean.lerp_(means.mean(0).to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(variances.mean(0).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return y
