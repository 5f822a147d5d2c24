"""One registry of normalization layers, keyed by name (after timm's norm factory).

Every layer is built as ``factory(num_features, **norm_kwargs)`` and accepts both
``(N, C)`` and ``(N, C, *spatial)`` inputs, so architectures never special-case 1d vs 2d.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_bn.errors import ConfigError

NormFactory = Callable[..., nn.Module]

NORMS: dict[str, NormFactory] = {}


def register_norm(name: str) -> Callable[[NormFactory], NormFactory]:
    """Class/function decorator adding a norm factory to :data:`NORMS` under ``name``."""

    def decorator(factory: NormFactory) -> NormFactory:
        if name in NORMS:
            raise ValueError(f"norm {name!r} is already registered")
        NORMS[name] = factory
        return factory

    return decorator


def create_norm(name: str, num_features: int, **norm_kwargs: Any) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_features`` channels.

    Raises ``ConfigError`` (a ``ValueError``) for an unknown name or an argument the norm
    does not take, naming the norm, the argument and what is allowed.
    """
    if name not in NORMS:
        raise ConfigError(f"norm={name!r} is not a known normalization; choose one of: {', '.join(NORMS)}")
    factory = NORMS[name]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        allowed = [k for k in params if k != "num_features"]
        for key in norm_kwargs:
            if key not in params:
                raise ConfigError(
                    f"norm {name!r} has no argument {key!r}; its arguments are: {', '.join(allowed) or 'none'}"
                )
    return factory(num_features, **norm_kwargs)
