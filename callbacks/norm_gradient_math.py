"""Santurkar et al.'s Lemma 4.1 (Sec. 4): BatchNorm's backward, per unit, as pure functions.

For one unit (channel) of a BatchNorm layer over a batch of m values (batch x spatial
positions): pre-norm activations y, mu and sigma^2 their mean and biased variance,
sigma = sqrt(sigma^2 + eps), y_hat = (y - mu) / sigma, output z = gamma y_hat + beta and
g = dL/dz. BN's backward is

    dL/dy = (gamma / sigma) (g - (1/m) <1, g> 1 - (1/m) <g, y_hat> y_hat),

so (using <1, y_hat> = 0)

    ||dL/dy||^2 = (gamma^2 / sigma^2) (||g||^2 - (1/m) <1, g>^2 - c (1/m) <g, y_hat>^2),
    c = 2 - ||y_hat||^2 / m = 1 + eps / (sigma^2 + eps).

With eps = 0, c = 1 and this is the paper's Lemma 4.1 (Theorem 4.1 states it as the bound
||dL/dy||^2 <= (gamma^2/sigma^2)(||g||^2 - (1/m)<1, g>^2 - (1/m)<g, y_hat>^2)); with BN's eps
the exact identity needs c, which differs from 1 by eps / (sigma^2 + eps) (1e-5 relative for
unit-variance inputs). We keep c so the identity holds to float rounding and can be tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def units_by_samples(x: Tensor) -> Tensor:
    """``x`` as (units, m) in float64: the unit is dimension 1, the m samples are the batch and
    every further dimension (BatchNorm's statistics axes)."""
    x = x.detach().double()
    if x.dim() < 2:
        raise ValueError(f"expected (N, C, ...) activations, got shape {tuple(x.shape)}")
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def normalized(y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(y_hat, sigma)`` per unit of (units, m) activations: BatchNorm's batch statistics
    (biased variance, sigma = sqrt(var + eps))."""
    mean = y.mean(1, keepdim=True)
    sigma = (y.var(1, unbiased=False, keepdim=True) + eps).sqrt()
    return (y - mean) / sigma, sigma.squeeze(1)


@dataclass(frozen=True)
class UnitTerms:
    """Per-unit terms of the identity (float64 vectors, one entry per unit).

    ``out_sq`` = ||g||^2, ``mean_term`` = (1/m) <1, g>^2, ``scale_term`` = c (1/m) <g, y_hat>^2,
    ``gain`` = gamma^2 / sigma^2; :attr:`in_sq` = the right-hand side, ||dL/dy||^2."""

    out_sq: Tensor
    mean_term: Tensor
    scale_term: Tensor
    gain: Tensor

    @property
    def in_sq(self) -> Tensor:
        return self.gain * (self.out_sq - self.mean_term - self.scale_term)


def batch_norm_terms(g: Tensor, y_hat: Tensor, gamma: Tensor, sigma: Tensor) -> UnitTerms:
    """The identity's terms for output gradients ``g`` and ``y_hat`` (both (units, m))."""
    m = g.shape[1]
    c = 2.0 - y_hat.square().sum(1) / m
    return UnitTerms(
        out_sq=g.square().sum(1),
        mean_term=g.sum(1).square() / m,
        scale_term=c * (g * y_hat).sum(1).square() / m,
        gain=gamma.double().square() / sigma.square(),
    )


def batch_norm_input_grad(g: Tensor, y_hat: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """dL/dy from the closed form above ((units, m) in, (units, m) out): the reference the
    identity is derived from, used by the tests next to autograd."""
    mean_g = g.mean(1, keepdim=True)
    mean_gy = (g * y_hat).mean(1, keepdim=True)
    return (gamma.double() / sigma)[:, None] * (g - mean_g - y_hat * mean_gy)


def torch_batch_norm_units(module: torch.nn.Module) -> bool:
    """Whether the identity's terms apply: a torch ``_BatchNorm`` (BatchNorm1d/2d/3d and
    subclasses) normalizing with the statistics of its own input (training mode, or no running
    statistics). Not SyncBatchNorm: its statistics span every rank's shard."""
    bn = torch.nn.modules.batchnorm._BatchNorm
    if not isinstance(module, bn) or isinstance(module, torch.nn.SyncBatchNorm):
        return False
    return module.training or (module.running_mean is None and module.running_var is None)
