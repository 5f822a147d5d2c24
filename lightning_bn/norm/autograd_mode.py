"""When a norm may run its hand-written ``torch.autograd.Function`` instead of plain autograd ops."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import forward_ad


def plain_autograd(x: torch.Tensor) -> bool:
    """False under torch.func transforms (vmap, grad) or forward-mode AD, where a custom Function
    with a hand-written backward cannot run; the norms then use their plain-autograd definition."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return forward_ad.unpack_dual(x).tangent is None


def grads_with_graph(
    definition: Callable[..., torch.Tensor],
    tensors: tuple[torch.Tensor | None, ...],
    wants: tuple[bool, ...],
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``definition(*tensors)`` (plain autograd ops) w.r.t. the tensors ``wants``
    marks, with ``create_graph=True``: what a hand-written backward returns when it is itself
    differentiated (double backward, Hessian-vector products)."""
    inputs = [t for t, w in zip(tensors, wants) if w]
    if not inputs:
        return (None,) * len(tensors)
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(definition(*tensors), inputs, grad_output, create_graph=True))
    return tuple(next(grads) if w else None for w in wants)
