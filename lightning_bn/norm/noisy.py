"""Noisy BatchNorm (Santurkar et al., 2018, Sec. 2.1): internal covariate shift made on purpose.

The paper injects noise after every BatchNorm layer, with non-zero mean and non-unit
variance, whose distribution changes at every training step, so each unit's input
distribution shifts from step to step. This layer realizes it per channel (unit) c:

    y = scale_c * BN(x) + shift_c,
    shift_c ~ U(-mean_range, mean_range),  log(scale_c) ~ U(-log scale_range, log scale_range)

with a fresh, independent (shift_c, scale_c) for every channel at every training forward,
drawn from torch's global RNG (``seed_everything`` makes runs reproducible). Within a
batch the unit then has batch mean ``scale_c * beta_c + shift_c`` and standard deviation
``scale_c * |gamma_c|``; both move at every step although BN normalized the unit. One draw
per unit and step, shared by the samples of the batch, is what "the distribution moves"
means; it also folds into BatchNorm's affine map, so one fused BatchNorm kernel computes
the layer (:mod:`lightning_bn.norm.noisy_function`; on CPU the draw, the folding and
BatchNorm are one compiled op, :mod:`lightning_bn.norm.kernels`, with the same results).

Eval mode: the noise is off, the layer is exactly BatchNorm with running statistics. The
layers after it learned under shifted and scaled inputs that eval mode removes, so eval
accuracy can fall far below train accuracy (DESIGN.md section 7 saw 50% train vs 20%
eval): compare noisy networks by train accuracy, as the paper does.

Replay (for measurements that must see the noise of the step they measure): while the
boolean attribute ``replay_noise`` is True, a training-mode forward reuses the last
realization and changes no state of its own (no new realization, no counter). It still
draws from the global RNG exactly as a training forward does and discards the draw, so a
caller that restores the RNG state of the measured step (as the measurement callbacks do)
sees every random layer after this one (dropout) repeat that step too. The batch size may
differ from the original forward (the noise is per channel).

DDP: the wrapped ``bn`` is a real BatchNorm, so ``sync_batchnorm`` converts it (the noise is
then applied after the synced BN); the noise is drawn on every rank from its own global
RNG, which Lightning seeds identically on all ranks, so all ranks normally use the same
realization.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm import kernels
from lightning_bn.norm.autograd_mode import plain_autograd
from lightning_bn.norm.batch import BatchNorm
from lightning_bn.norm.noisy_function import _NoisyBatchNorm, fold_noise
from lightning_bn.norm.registry import register_norm


def _momentum_factor(bn: BatchNorm) -> float:
    """Count the batch and return the running-average factor, as torch's BatchNorm.forward does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


@register_norm("noisy_batch")
class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by per-unit noise that changes at every training step (see module doc).

    Args:
        num_features: channels C of an (N, C, ...) input.
        mean_range: shifts are drawn from U(-mean_range, mean_range) (>= 0; 0 = no shift).
        scale_range: scales are log-uniform in [1/scale_range, scale_range] (>= 1; 1 = no scaling).
        eps, momentum, affine: of the wrapped :class:`~lightning_bn.norm.batch.BatchNorm`.

    Attributes:
        bn: the wrapped BatchNorm (its running statistics serve eval mode).
        replay_noise: reuse the last realization in training-mode forwards (default False).
        noise: the last realization, a non-persistent (2, C) buffer: row 0 the shifts, row 1 the
            scales (also as the views ``noise_shift`` and ``noise_scale``).
        num_draws: how many realizations were drawn so far.
    """

    def __init__(
        self,
        num_features: int,
        mean_range: float = 0.5,
        scale_range: float = 1.5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if not (isinstance(mean_range, (int, float)) and mean_range >= 0):
            raise ConfigError(f"norm 'noisy_batch': mean_range must be >= 0, got {mean_range!r}")
        if not (isinstance(scale_range, (int, float)) and scale_range >= 1):
            raise ConfigError(f"norm 'noisy_batch': scale_range must be >= 1, got {scale_range!r}")
        self.num_features, self.mean_range, self.scale_range = num_features, float(mean_range), float(scale_range)
        self.bn = BatchNorm(num_features, eps=eps, momentum=momentum, affine=affine)
        self.replay_noise = False
        self.num_draws = 0
        # Row 0: shift, row 1: scale. Non-persistent: a realization only matters within its step.
        initial = torch.stack([torch.zeros(num_features), torch.ones(num_features)])
        self.register_buffer("noise", initial, persistent=False)
        # A draw is low + span * U(0, 1) row-wise, then exp() of the scale row (log-uniform).
        log_scale = math.log(self.scale_range)
        self.register_buffer("noise_low", torch.tensor([[-self.mean_range], [-log_scale]]), persistent=False)
        self.register_buffer("noise_span", torch.tensor([[2 * self.mean_range], [2 * log_scale]]), persistent=False)

    @property
    def noise_shift(self) -> torch.Tensor:
        return self.noise[0]

    @property
    def noise_scale(self) -> torch.Tensor:
        return self.noise[1]

    def extra_repr(self) -> str:
        return f"mean_range={self.mean_range}, scale_range={self.scale_range}, replay_noise={self.replay_noise}"

    def noise_state(self) -> torch.Tensor:
        """A copy of the last realization: under gradient accumulation a measurement keeps one
        per micro-batch and replays each with its own micro-batch (replay protocol)."""
        return self._buffers["noise"].clone()

    def load_noise_state(self, state: torch.Tensor) -> None:
        """Make ``state`` (from :meth:`noise_state`) the last realization. In place, so that the
        buffer stays the object DDP and the compiled op hold."""
        with torch.no_grad():
            self._buffers["noise"].copy_(state)

    def draw_noise(self) -> torch.Tensor:
        """One training forward's use of the global RNG: a new realization, or (replay) a discarded
        draw of the same size. Returns the realization in use as a fresh (2, C) tensor and keeps
        a copy in the ``noise`` buffer: autograd may save the returned tensor for backward, and a
        later draw must not change it in place (a layer called twice in one step, e.g. with shared
        weights, would otherwise fail in backward). Buffers only, no autograd: no ``no_grad``
        needed, which matters at a few microseconds per layer."""
        noise = self._buffers["noise"]
        uniform = torch.rand(noise.shape, device=noise.device, dtype=noise.dtype)
        if self.replay_noise:  # same RNG consumption as the measured step, so later random layers see its stream
            return noise.clone()
        fresh = torch.addcmul(self._buffers["noise_low"], uniform, self._buffers["noise_span"], out=uniform)
        fresh[1].exp_()
        noise.copy_(fresh)
        self.num_draws += 1
        return fresh

    def _compiled_forward(self, bn: BatchNorm, x: torch.Tensor) -> torch.Tensor:
        """Draw, fold and BatchNorm (its batch count and running averages too) in one compiled op.
        Parameters and buffers are read from the modules' dicts, not through ``Module.__getattr__``,
        and ``num_draws`` is set without ``Module.__setattr__``: each saves about a microsecond, and
        this layer runs on activations where BatchNorm itself takes some 40."""
        bn._check_input_dim(x)
        params, buffers, own = bn._parameters, bn._buffers, self._buffers
        noise = (own["noise"], own["noise_low"], own["noise_span"], self.replay_noise)
        running = (buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"])
        op = torch.ops.lightning_bn.noisy_batch_norm
        y = op(x, params["weight"], params["bias"], *noise, *running, bn.momentum, bn.eps)
        if not self.replay_noise:
            self.__dict__["num_draws"] += 1  # a plain int attribute
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        if self.replay_noise and self.num_draws == 0:
            raise RuntimeError("noisy_batch: replay_noise=True but no noise drawn yet; run a training forward first")
        bn = self._modules["bn"]
        if type(bn) is BatchNorm and kernels.usable(x) and plain_autograd(x):
            return self._compiled_forward(bn, x)
        noise = self.draw_noise()
        shift, scale = noise if noise.dtype == x.dtype else noise.to(x.dtype)
        if type(bn) is BatchNorm:  # fold the noise into BN's affine map: one fused kernel
            bn._check_input_dim(x)
            factor = _momentum_factor(bn)
            running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
            if plain_autograd(x):
                return _NoisyBatchNorm.apply(x, bn.weight, bn.bias, shift, scale, *running, factor, bn.eps)
            weight, bias = fold_noise(bn.weight, bn.bias, shift, scale)  # torch.func: plain autograd ops
            return F.batch_norm(x, *running, weight, bias, True, factor, bn.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)  # bn was converted (e.g. to SyncBatchNorm)
        return torch.addcmul(shift.view(shape), self.bn(x), scale.view(shape))
