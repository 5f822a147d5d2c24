"""Telling a diverged run from a failed measurement.

When training diverges (the loss or the parameters become inf/nan) every later measurement is
meaningless; the contract is that each still writes nan at its step, with one warning that
names the cause. A measurement that detects the cause itself (e.g. a non-finite loss on its
fixed sample, which no check of the training step sees) raises :class:`NonFiniteError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors


class NonFiniteError(ArithmeticError):
    """The measured function is not finite where the measurement starts; the message names
    what (e.g. "non-finite loss on the fixed sample (nan)")."""


FLATTEN_NUMEL = 1 << 22
"""Tensors of one dtype and device with at most this many elements in all are checked with one
sum over their concatenation (one operation instead of one per tensor; a temporary copy of at
most 16 MB in float32); larger groups per tensor."""


def all_finite(values: Sequence[Tensor]) -> bool:
    """Whether every element of ``values`` is finite, decided cheaply where that is exact: True
    means all are finite; False means some may not be (a non-finite element, or a finite
    tensor whose sum overflows): then ask :func:`non_finite_names`. One host sync."""
    if not values:
        return True
    kinds = {(v.dtype, v.device) for v in values}
    with torch.no_grad():
        if len(kinds) == 1 and sum(map(Tensor.numel, values)) <= FLATTEN_NUMEL:
            # One dtype and device, few elements (the common case): a sum is finite only if
            # every element is (a nan or inf propagates through it), in four operations.
            if next(iter(kinds))[0].is_floating_point:
                return bool(torch.isfinite(_flatten_dense_tensors(list(values)).sum()))
        elif all(dtype.is_floating_point for dtype, _ in kinds):
            # The same test per dtype and device, fused where that is cheap (see _group_sums).
            return bool(torch.isfinite(torch.cat(_group_sums(list(values)))).all())
    return False


def non_finite_names(tensors: Mapping[str, Tensor] | None) -> list[str]:
    """Names of the tensors holding an inf or nan (one host sync for all of them)."""
    if not tensors or all_finite(list(tensors.values())):
        return []
    names = list(tensors)
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(v).all() for v in tensors.values()])
    if bool(flags.all()):
        return []
    return [n for n, ok in zip(names, flags.tolist()) if not ok]


def _group_sums(values: list[Tensor]) -> list[Tensor]:
    """Finite iff every element of ``values`` is (up to overflow): per dtype and device the sum
    of the concatenation (small groups) or the 1-norms of the tensors (float64, fused on GPU)."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for v in values:
        groups.setdefault((v.dtype, v.device), []).append(v)
    sums = []
    for group in groups.values():
        if sum(v.numel() for v in group) <= FLATTEN_NUMEL:
            sums.append(_flatten_dense_tensors(group).sum().double().reshape(1))
        else:
            sums.append(torch.stack(torch._foreach_norm(group, 1, dtype=torch.float64)))
    return [s.to(sums[0].device) for s in sums] if len({s.device for s in sums}) > 1 else sums
