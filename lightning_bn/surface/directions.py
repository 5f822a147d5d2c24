"""Directions of a 2-D slice of the loss: filter-normalized random ones (Li et al., 2018).

A direction is a dict shaped like the model's parameters (``named_parameters()`` names and
shapes). Filter normalization: draw d ~ N(0, I) and, for every filter i of a weight (a conv
output channel ``W[i]``, a linear row ``W[i]``), rescale

    d[i] <- d[i] / ||d[i]|| * ||W[i]||,

so a step of size 1 along d changes every filter by as much as its own norm, whatever the
filter's scale (which BN makes arbitrary). Biases and BatchNorm affine parameters (every
parameter with at most one dimension) get direction 0 by default, as in Li et al.'s
``ignore='biasbn'``; with ``include_bn_and_bias=True`` each such vector is treated as one
filter (a random vector with the norm of the parameter).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_bn.errors import ConfigError

Direction = dict[str, Tensor]


def filter_normalize(direction: Tensor, weight: Tensor) -> Tensor:
    """``direction`` with every filter (slice along dim 0) rescaled to the norm of the same
    filter of ``weight``; a 0-d or 1-d tensor counts as one filter. A zero filter stays 0."""
    if direction.dim() <= 1:
        d_norm, w_norm = direction.norm(), weight.norm()
    else:
        d_norm = direction.flatten(1).norm(dim=1).view(-1, *[1] * (direction.dim() - 1))
        w_norm = weight.flatten(1).norm(dim=1).view_as(d_norm)
    # a random filter of norm 0 has probability 0; guard it anyway so the result is finite
    return direction * (w_norm / d_norm.clamp_min(torch.finfo(direction.dtype).tiny))


def varied_names(model: nn.Module, include_bn_and_bias: bool = False) -> list[str]:
    """Names of the parameters a direction moves: the weights of dimension >= 2 (filters),
    plus biases and norm affine parameters when ``include_bn_and_bias``."""
    return [n for n, p in model.named_parameters() if include_bn_and_bias or p.dim() > 1]


def random_direction(model: nn.Module, generator: torch.Generator, include_bn_and_bias: bool = False) -> Direction:
    """One filter-normalized Gaussian direction (float64 draw, cast to each parameter's dtype,
    so the same seed gives the same direction on any device)."""
    varied = set(varied_names(model, include_bn_and_bias))
    out: Direction = {}
    for name, param in model.named_parameters():
        weight = param.detach()
        if name not in varied:
            out[name] = torch.zeros_like(weight)
            continue
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        out[name] = filter_normalize(draw, weight.cpu().double()).to(weight.device, weight.dtype)
    return out


def random_directions(
    model: nn.Module, seed: int = 0, include_bn_and_bias: bool = False
) -> tuple[Direction, Direction]:
    """Two independent filter-normalized directions d1, d2 drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return (
        random_direction(model, generator, include_bn_and_bias),
        random_direction(model, generator, include_bn_and_bias),
    )


def check_direction(model: nn.Module, direction: Mapping[str, Tensor], label: str) -> None:
    """Raise ``ConfigError`` (one line) unless ``direction`` has the model's parameter names and shapes."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(direction)), sorted(set(direction) - set(params))
    if missing or extra:
        raise ConfigError(
            f"{label}: parameter names differ from the model's (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, param in params.items():
        if tuple(direction[name].shape) != tuple(param.shape):
            raise ConfigError(
                f"{label}: {name} has shape {tuple(direction[name].shape)}, the model's is {tuple(param.shape)}"
            )
