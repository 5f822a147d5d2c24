"""Normalization layers, built by name through :func:`create_norm`.

Known names are the keys of :data:`NORMS`. Importing this package registers them all.
"""

from lightning_bn.norm import batch  # noqa: F401  (registers "batch" and "none")
from lightning_bn.norm.registry import NORMS, create_norm, register_norm

__all__ = ["NORMS", "create_norm", "register_norm"]
