"""Telling a diverged run from a failed measurement.

When training diverges (the loss or the parameters become inf/nan) every later measurement is
meaningless; the contract is that each still writes nan at its step, with one warning that
names the cause. A measurement that detects the cause itself (e.g. a non-finite loss on its
fixed sample, which no check of the training step sees) raises :class:`NonFiniteError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class NonFiniteError(ArithmeticError):
    """The measured function is not finite where the measurement starts; the message names
    what (e.g. "non-finite loss on the fixed sample (nan)")."""


def non_finite_names(tensors: Mapping[str, Tensor] | None) -> list[str]:
    """Names of the tensors holding an inf or nan (one host sync for all of them)."""
    if not tensors:
        return []
    names = list(tensors)
    values = list(tensors.values())
    if all(v.dtype.is_floating_point for v in values):
        # One fused pass first: a 1-norm is finite only if every element is (a nan or inf
        # propagates through the sum of absolute values); a finite tensor whose sum overflows
        # falls through to the exact per-tensor check below.
        with torch.no_grad():
            if bool(torch.isfinite(torch.stack(torch._foreach_norm(values, 1, dtype=torch.float64))).all()):
                return []
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(v).all() for v in values])
    if bool(flags.all()):
        return []
    return [n for n, ok in zip(names, flags.tolist()) if not ok]
