"""Batch-independent norms: GroupNorm (Wu & He, 2018) and LayerNorm (Ba et al., 2016).

Both normalize each sample on its own (no batch statistics, same in train and eval, no
DDP interaction) and have a per-channel affine map; they accept (N, C) and (N, C, ...).
"""

from __future__ import annotations

from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm.registry import register_norm


def default_num_groups(num_features: int, preferred: int = 32) -> int:
    """The largest divisor G of C = ``num_features`` with G <= ``preferred`` (32, Wu & He's default)
    and at least two channels per group (one channel of an (N, C) input has nothing to normalize)."""
    limit = max(1, min(preferred, num_features // 2))
    return max(g for g in range(1, limit + 1) if num_features % g == 0)


@register_norm("group")
class GroupNorm(nn.GroupNorm):
    """Mean and variance over each group of C / G channels (and all positions) of one sample.

    Args:
        num_features: channels C.
        num_groups: groups G, which must divide C; default: the largest divisor of C that
            is <= 32 and leaves >= 2 channels per group (so narrow layers still work).
        eps, affine: as ``torch.nn.GroupNorm``.
    """

    def __init__(self, num_features: int, num_groups: int | None = None, eps: float = 1e-5, affine: bool = True):
        if num_groups is None:
            num_groups = default_num_groups(num_features)
        elif isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ConfigError(f"norm 'group': num_groups must be an integer >= 1, got {num_groups!r}")
        elif num_features % num_groups:
            raise ConfigError(
                f"norm 'group': num_groups={num_groups} does not divide num_features={num_features}; "
                "use a divisor or leave num_groups unset"
            )
        super().__init__(num_groups, num_features, eps=eps, affine=affine)


@register_norm("layer")
class LayerNorm(nn.GroupNorm):
    """Mean and variance over all channels and positions of one sample, per-channel affine.

    For (N, C) inputs this is ``torch.nn.LayerNorm(C)``; for feature maps it normalizes over
    (C, H, W) as Ba et al. define it (GroupNorm with one group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(1, num_features, eps=eps, affine=affine)
