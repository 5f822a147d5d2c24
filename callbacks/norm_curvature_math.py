"""Santurkar et al.'s Theorem 4.2 (Sec. 4.1): the curvature of the loss along the gradient with
respect to a normalization layer's input and output activations, as pure functions.

For a layer z = f(y) (pre-norm activations y of the whole batch, output z), the loss L as a
function of y (everything upstream fixed, other users of y fixed) and as a function of z, with
g_y = dL/dy, g_z = dL/dz, H_yy and H_zz the Hessians of L with respect to y and to z:

* ``quad_in``  = g_y^T H_yy g_y: the theorem's left-hand side, the quadratic form of the loss
  Hessian with respect to the BN input, along the gradient there;
* ``quad_out`` = g_z^T H_zz g_z: the same at the layer's output, along its own gradient (what the
  network without this layer sees at that point: z plays the role of the standard network's
  activations, as in Lemma 4.1);
* the chain rule splits the left-hand side exactly in two, with J = dz/dy:

      quad_in = (J g_y)^T H_zz (J g_y)  +  sum_k g_z,k  g_y^T (d^2 z_k / dy^2) g_y
              =        quad_chain       +         norm_term

  For BatchNorm with batch statistics (per unit, m values, z = gamma y_hat + beta), J g_y =
  (gamma / sigma) g_y and the paper evaluates the second term as
  ``norm_term_paper`` = - sum_u gamma_u / (m sigma_u^2) <g_z,u, y_hat_u> ||g_y,u||^2, so

      quad_in = (gamma/sigma)^2 g_y^T H_zz g_y - gamma / (m sigma^2) <g_z, y_hat> ||g_y||^2,

  Theorem 4.2's first statement (stated there as a bound). Both closed forms use
  g_y orthogonal to 1 and y_hat per unit, which BN's eps breaks by eps / (sigma^2 + eps): we
  compute ``quad_chain`` and ``norm_term`` by autograd (exact, they add up to ``quad_in`` to float
  rounding) and ``norm_term_paper`` from the closed form, so the paper's evaluation is checked.

Cost: one forward and one backward with ``create_graph`` for all layers together, then per layer
three Hessian-vector products (double backward from the layer to the loss) and two through the
layer alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from callbacks.norm_gradient_math import normalized, torch_batch_norm_units, units_by_samples

#: the per-layer sums one measurement yields (float64), in this order
COLUMNS = ("quad_in", "quad_out", "quad_chain", "norm_term", "norm_term_paper", "in_sq", "out_sq", "calls", "bn_calls")
#: quadratic forms (cubic in the loss: scaled by 1/R^3 over R ranks) and squared norms (1/R^2)
CUBIC = ("quad_in", "quad_out", "quad_chain", "norm_term", "norm_term_paper")
SQUARED = ("in_sq", "out_sq")


@dataclass
class LayerCall:
    """One call of a measured layer: its input as a variable of the graph (``y``: a view of
    the input, or a fresh leaf where the input needs no grad) and its output node ``z``
    (downstream code received a copy, so in-place operations after the layer leave ``z`` alone);
    ``bn``: (y_hat, gamma, sigma) of a torch BatchNorm using batch statistics, for the closed form."""

    y: Tensor
    z: Tensor | None = None
    bn: tuple[Tensor, Tensor, Tensor] | None = None


@dataclass
class Recorder:
    """What :func:`activation_variables` recorded: layer name -> its calls, in call order."""

    calls: dict[str, list[LayerCall]] = field(default_factory=dict)


@contextmanager
def activation_variables(modules: Mapping[str, nn.Module]) -> Iterator[Recorder]:
    """While inside, every call of ``modules`` (name -> module) takes its input through a
    variable of the autograd graph and records it with its output (:class:`LayerCall`), so that
    gradients and Hessian-vector products with respect to the layer's input and output can be
    taken after the forward. The hooks are removed on exit."""
    recorder = Recorder({name: [] for name in modules})
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(_pre_hook(recorder.calls[name])))
        handles.append(module.register_forward_hook(_post_hook(recorder.calls[name])))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(calls: list[LayerCall]):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        # A view: its gradient flows through this layer only (not through a skip connection).
        y = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        bn = None
        if x.dim() >= 2 and torch_batch_norm_units(module):
            with torch.no_grad():
                y_hat, sigma = normalized(units_by_samples(x), module.eps)
            gamma = module.weight.detach().reshape(-1).double() if module.weight is not None else torch.ones_like(sigma)
            bn = (y_hat, gamma, sigma)
        calls.append(LayerCall(y, None, bn))
        return (y, *args[1:])

    return hook


def _post_hook(calls: list[LayerCall]):
    def hook(module: nn.Module, args: tuple, output: object) -> Tensor | None:
        if not calls or calls[-1].z is not None or not isinstance(output, Tensor):
            return None
        calls[-1].z = output
        return output.clone()  # what follows (ReLU(inplace=True)) writes the copy, not z

    return hook


def quadratic_forms(loss: Tensor, calls: Mapping[str, Sequence[LayerCall]]) -> Tensor:
    """Per layer the sums of :data:`COLUMNS` over its calls, as a float64 (layers, columns) table.

    ``loss``: the scalar the calls' graph leads to. A layer's calls together are one variable
    (under gradient accumulation, each micro-batch's forward is a call; L is then a sum over
    micro-batches, each depending on its own call, so the forms add up over them). A layer whose
    calls the loss does not reach gets a row of zeros (``calls`` column 0).
    """
    names = list(calls)
    used = {n: [c for c in calls[n] if c.z is not None and c.z.requires_grad] for n in names}
    ys = [c.y for n in names for c in used[n]]
    zs = [c.z for n in names for c in used[n]]
    table = torch.zeros(len(names), len(COLUMNS), dtype=torch.float64)
    if not ys or not loss.requires_grad:  # no measured layer reaches the loss
        return table
    grads = torch.autograd.grad(loss, ys + zs, create_graph=True, allow_unused=True)
    g_y, g_z = dict(zip(map(id, ys), grads[: len(ys)])), dict(zip(map(id, zs), grads[len(ys) :]))
    for row, name in enumerate(names):
        layer = [c for c in used[name] if g_y[id(c.y)] is not None and g_z[id(c.z)] is not None]
        if layer:
            table[row] = _layer_row(layer, [g_y[id(c.y)] for c in layer], [g_z[id(c.z)] for c in layer])
    return table


def _layer_row(calls: list[LayerCall], g_y: list[Tensor], g_z: list[Tensor]) -> Tensor:
    ys, zs = [c.y for c in calls], [c.z for c in calls]
    v_y, v_z = [g.detach() for g in g_y], [g.detach() for g in g_z]
    quad_in = _dot(v_y, _hvp(g_y, ys, v_y))
    quad_out = _dot(v_z, _hvp(g_z, zs, v_z))
    jv = [_jvp(c.z, c.y, v) for c, v in zip(calls, v_y)]
    quad_chain = _dot(jv, _hvp(g_z, zs, jv))
    # sum_k g_z,k v^T (d^2 z_k / dy^2) v: the Hessian of <g_z (fixed), z(y)> through the layer alone
    inner = [(gz * c.z).sum() for c, gz in zip(calls, v_z)]
    first = torch.autograd.grad(inner, ys, create_graph=True, allow_unused=True)
    norm_term = _dot(v_y, _hvp(list(first), ys, v_y))
    paper, bn_calls = 0.0, 0
    for c, gy, gz in zip(calls, v_y, v_z):
        if c.bn is not None:
            paper += _paper_norm_term(units_by_samples(gz), units_by_samples(gy), *c.bn)
            bn_calls += 1
    in_sq = sum(float(g.double().square().sum()) for g in v_y)
    out_sq = sum(float(g.double().square().sum()) for g in v_z)
    values = (quad_in, quad_out, quad_chain, norm_term, paper, in_sq, out_sq, float(len(calls)), float(bn_calls))
    return torch.tensor(values, dtype=torch.float64)


def _hvp(grads: Sequence[Tensor], inputs: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """H v: the derivative of sum_i <grads_i, vectors_i> with respect to ``inputs`` (grads
    carry their graph); zeros where it does not depend on an input."""
    live = [(g, v) for g, v in zip(grads, vectors) if g is not None and g.requires_grad]
    if not live:  # the gradients do not depend on the inputs (L linear there): H = 0
        return [torch.zeros_like(x) for x in inputs]
    out = torch.autograd.grad(
        [g for g, _ in live], list(inputs), grad_outputs=[v for _, v in live], retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(x) if h is None else h for h, x in zip(out, inputs)]


def _jvp(z: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """J v = (dz/dy) v through the layer, by the double-vjp trick (the vjp is linear in its
    cotangent w, so differentiating it with respect to w along v gives J v)."""
    w = torch.zeros_like(z, requires_grad=True)
    (vjp,) = torch.autograd.grad(z, y, grad_outputs=w, create_graph=True, allow_unused=True)
    if vjp is None or not vjp.requires_grad:  # z does not depend on y
        return torch.zeros_like(z)
    (jv,) = torch.autograd.grad(vjp, w, grad_outputs=v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(z) if jv is None else jv


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def _paper_norm_term(g_z: Tensor, g_y: Tensor, y_hat: Tensor, gamma: Tensor, sigma: Tensor) -> float:
    """- sum_u gamma_u / (m sigma_u^2) <g_z,u, y_hat_u> ||g_y,u||^2 ((units, m) float64 inputs)."""
    m = g_z.shape[1]
    per_unit = gamma / (m * sigma.square()) * (g_z * y_hat).sum(1) * g_y.square().sum(1)
    return -float(per_unit.sum())
