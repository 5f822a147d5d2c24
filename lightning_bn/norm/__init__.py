"""Normalization layers, built by name through :func:`create_norm`.

Known names are the keys of :data:`NORMS`. Importing this package registers them all.
"""

# Importing a norm's module registers it: batch/none, ghost_batch, group/layer, lp, noisy_batch.
from lightning_bn.norm import batch, ghost, group_layer, lp, noisy  # noqa: F401
from lightning_bn.norm.registry import NORMS, create_norm, register_norm

__all__ = ["NORMS", "create_norm", "register_norm"]
