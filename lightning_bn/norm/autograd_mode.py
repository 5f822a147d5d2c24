"""When a norm may run its hand-written ``torch.autograd.Function`` instead of plain autograd ops."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad


def plain_autograd(x: torch.Tensor) -> bool:
    """False under torch.func transforms (vmap, grad) or forward-mode AD, where a custom Function
    with a hand-written backward cannot run; the norms then use their plain-autograd definition."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return forward_ad.unpack_dual(x).tangent is None
