"""Hessian-vector products of a scalar loss, without ever forming the Hessian.

H v = d/dt grad L(W + t v) at t = 0. We compute it by double backward: g = grad L with
``create_graph=True``, then H v = grad(<g, v>). When the loss is a fixed function of fixed
data (every use here: Hessian of a frozen model on a frozen sample), the graph of g does not
depend on v, so it is built once and every product costs one backward pass through it.

Why not torch.func forward-over-reverse (``jvp(grad(f))``): on a VGG-11 at width 1/8 with
BatchNorm (batch 256, CPU; ``benchmarks/hessian_vs_pyhessian.py`` prints it) one product
cost 1.5x a forward+backward with the cached graph, 2.7x when the graph is rebuilt per
product, and 2.8x with forward-over-reverse, which moreover cannot run BatchNorm in train
mode (it refuses the in-place update of the running statistics). So double backward with a
cached graph is what we keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

LossClosure = Callable[[], Tensor]
"""Computes the loss of one chunk of data with the parameters as they currently are."""


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (the parameter order defines the coordinates)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like`` (inverse of :func:`flatten`)."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries but the tensors hold {offset}")
    return out


class HessianVectorProduct:
    """``hvp(v) = H v`` for L = sum_c weights[c] * closures[c](), H its Hessian in ``params``.

    Args:
        closures: one loss closure per chunk of data (e.g. per batch of the sample).
        params: the tensors (requires_grad) the Hessian is taken with respect to; their
            values are read, never written, and their ``.grad`` is never touched.
        weights: weight of each chunk's loss (default: 1 / number of chunks, i.e. the mean of
            equally sized batches; pass ``batch_size / total`` for unequal ones).
        cache_graph: build the gradient graph once and reuse it for every product (one
            backward per product instead of forward + two backwards) at the price of keeping
            the double-backward graph of every chunk in memory. Set False for big samples.

    Attributes:
        loss: the weighted loss at the current parameters (a float).
        grad: its gradient, flat (detached).
        num_products: products computed so far (the cost of a measurement, in HVPs).
    """

    def __init__(
        self,
        closures: Sequence[LossClosure],
        params: Sequence[Tensor],
        weights: Sequence[float] | None = None,
        cache_graph: bool = True,
    ) -> None:
        if not closures:
            raise ValueError("closures must hold at least one loss closure, got none")
        params = list(params)
        if not params or not all(p.requires_grad for p in params):
            raise ValueError("params must be a non-empty list of tensors with requires_grad=True")
        if weights is None:
            weights = [1.0 / len(closures)] * len(closures)
        if len(weights) != len(closures):
            raise ValueError(f"weights has {len(weights)} entries for {len(closures)} closures")
        self.closures, self.params, self.weights = list(closures), params, list(weights)
        self.cache_graph = cache_graph
        self.num_params = sum(p.numel() for p in params)
        self.num_products = 0
        self._graphs: list[tuple[Tensor, ...]] = []
        loss, grad = 0.0, torch.zeros(self.num_params, dtype=params[0].dtype, device=params[0].device)
        for closure, weight in zip(self.closures, self.weights):
            value, grads = self._grad(closure, create_graph=cache_graph)
            if cache_graph:
                self._graphs.append(grads)
            loss += weight * float(value)
            grad += weight * flatten([g.detach() for g in grads])
        self.loss, self.grad = loss, grad

    def _grad(self, closure: LossClosure, create_graph: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        with torch.enable_grad():
            value = closure()
            grads = torch.autograd.grad(value, self.params, create_graph=create_graph, allow_unused=True)
        # A parameter the loss does not use has a zero gradient (and zero Hessian rows).
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params))
        return value.detach(), grads

    def __call__(self, v: Tensor) -> Tensor:
        if v.shape != (self.num_params,):
            raise ValueError(f"v must have shape ({self.num_params},), got {tuple(v.shape)}")
        if self.cache_graph and not self._graphs:
            raise RuntimeError("this HessianVectorProduct was released; build a new one")
        tangent = unflatten(v.to(self.grad.dtype), self.params)
        out = torch.zeros_like(self.grad)
        for i, (closure, weight) in enumerate(zip(self.closures, self.weights)):
            grads = self._graphs[i] if self.cache_graph else self._grad(closure, create_graph=True)[1]
            differentiable = [(g, t) for g, t in zip(grads, tangent) if g.requires_grad]
            if not differentiable:  # the loss is linear in every parameter: H = 0
                continue
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [g for g, _ in differentiable],
                    self.params,
                    grad_outputs=[t for _, t in differentiable],
                    retain_graph=self.cache_graph,
                    allow_unused=True,
                )
            out += weight * flatten([torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)])
        self.num_products += 1
        return out

    def release(self) -> None:
        """Free the cached graphs (the object can no longer compute products)."""
        self._graphs.clear()
        self.closures = []
