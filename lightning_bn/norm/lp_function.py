"""The lp normalization as functions: the plain-autograd definition and fast hand-written backwards.

Notation (per channel, over the m values of the batch and spatial positions): mu = mean(x),
c = x - mu, d = (mean|c|^p + eps)^(1/p) (p = 1, 2) or max|c| + eps (p = inf),
x_hat = c / d, y = gamma * x_hat + beta. See :mod:`lightning_bn.norm.lp` for the layer.

Why hand-written backwards: autograd through the definition records a graph node per op and
runs some 25 ops in backward, most allocating an activation-sized tensor; on CPU that
bookkeeping, not arithmetic, dominates. Two
``torch.autograd.Function`` s cover the two regimes, both tested against
:func:`lp_normalize_reference` (values, gradients, double backward) in tests/test_norms.py:

* :class:`_LpNorm1OrInf` for ``(N, C, *spatial)`` feature maps: reductions and affine maps
  through BatchNorm's fused CPU kernels;
* :class:`_LpNorm1OrInfFlat` for ``(N, C)`` activations (MLP, DLN), where each op costs a
  few microseconds of dispatch: the fewest ops, all on contiguous rows.

Under ``create_graph=True`` (double backward, e.g. Hessian-vector products) both
differentiate the reference instead, so second derivatives are exact.
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_bn.norm.autograd_mode import grads_with_graph

P = Literal[1, 2, "inf"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def lp_normalize_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, p: P, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition in plain autograd ops: returns (y, batch mean, batch statistic s) per channel.

    Slow (every op allocates) but composable with double backward and ``torch.func``;
    the fast path is tested against it.
    """
    dims, shape = _reduce_dims(x), _channel_shape(x)
    mean = x.mean(dims, keepdim=True)
    c = x - mean
    if p == 1:
        stat = c.abs().mean(dims, keepdim=True)
        d = stat + eps
    elif p == 2:
        stat = c.square().mean(dims, keepdim=True)
        d = (stat + eps).sqrt()
    else:
        stat = c.abs().amax(dims, keepdim=True)
        d = stat + eps
    y = c / d
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y, mean.reshape(-1), stat.reshape(-1)


class _LpNorm1OrInf(torch.autograd.Function):
    """Fast training-mode lp normalization for p = 1 and p = inf.

    Backward, with x_hat = c / d, S = sum(g * x_hat), k = gamma / d (per channel):
        dL/dc_j = k (g_j - S * dd/dc_j),  dL/dx = dL/dc - mean(dL/dc)
    with dd/dc_j = sign(c_j) / m for p = 1 (the signs are kept from forward: one tensor the
    size of the input); for p = inf, dd/dc_j = sign(c_j) at one position where |c| is
    maximal and 0 elsewhere (at ties this picks one valid subgradient, while autograd's
    ``amax`` would split it; ties do not occur for continuous activations).
    Per-channel affine maps y = a * x + b run through BatchNorm's fused eval-mode kernel,
    several times faster on CPU than the equivalent broadcasting ``addcmul``.

    ``apply(x, weight, bias, running_mean, running_stat, momentum, p, eps)`` returns y and,
    when the running buffers are given, moves them toward this batch's mean and statistic
    (``lerp`` by ``momentum``), as BatchNorm's kernel does in its forward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_stat, momentum, p, eps):  # noqa: ANN001 (Function API)
        shape = _channel_shape(x)
        m = x.numel() // x.shape[1]
        mean = (_channel_reduce(x, "sum") / m).view(shape)
        if p == 1:
            sign = (x - mean).sign_()  # kept for backward: dd/dc = sign / m
            sign_sum, abs_sum = _sums_g_and_g_centered(sign, x, mean)  # sum(sign * c) = sum(|c|)
            stat = (abs_sum / m).view(shape)
            ctx.extremes = (sign, sign_sum.view(shape))
        else:  # max|c| = max(max(x) - mu, mu - min(x)); keep the per-position extremes to find it again
            top, bottom = x.amax(0).view(x.shape[1], -1), x.amin(0).view(x.shape[1], -1)  # (C, positions)
            above, below = top.amax(1) - mean.view(-1), mean.view(-1) - bottom.amin(1)
            stat = torch.maximum(above, below).view(shape)
            ctx.extremes = (top, bottom, above >= below)
        d = stat + eps
        k = d.reciprocal() if weight is None else weight.view(shape) / d
        y = _channel_affine(x, mean, k, bias)
        _update_running(running_mean, running_stat, mean, stat, momentum)
        ctx.save_for_backward(x, weight, bias, mean, d)
        ctx.p, ctx.eps = p, eps
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, bias, mean, d = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            return (*_reference_grads(x, weight, bias, ctx.p, ctx.eps, g, wants), *_NO_GRADS)
        shape = _channel_shape(x)
        m = x.numel() // x.shape[1]
        g = g.contiguous()
        sum_g, sum_gc = _sums_g_and_g_centered(g, x, mean)
        s = sum_gc / d.view(-1)  # S = sum(g * x_hat), also the gradient of gamma
        k = d.reciprocal() if weight is None else weight.view(shape) / d
        g_mean = sum_g.view(shape) / m
        if ctx.p == 1:
            sign, sign_sum = ctx.extremes
            a = s.view(shape) / m
            # k (g - mean(g) - a (sign - mean(sign))) = k g + const - k a sign
            const = k * (a * sign_sum / m - g_mean)
            dx = _channel_affine(g, torch.zeros_like(mean), k, const).addcmul_(sign, -k * a)
        else:
            idx, u = _argmax_abs_centered(x, *ctx.extremes)
            # k (g - mean(g) - S (u - mean(u))), u = dd/dc: +-1 at the argmax, 0 elsewhere
            dx = _channel_affine(g, torch.zeros_like(mean), k, k * (s.view(shape) * u.view(shape) / m - g_mean))
            dx[idx] -= k.view(-1) * s * u
        grad_w = s if weight is not None and wants[1] else None
        grad_b = sum_g if bias is not None and wants[2] else None
        return (dx if wants[0] else None), grad_w, grad_b, *_NO_GRADS


_NO_GRADS = (None,) * 5  # running_mean, running_stat, momentum, p, eps


def _update_running(
    running_mean: torch.Tensor | None,
    running_stat: torch.Tensor | None,
    mean: torch.Tensor,
    stat: torch.Tensor,
    momentum: float,
) -> None:
    """BatchNorm's rule, running = (1 - momentum) running + momentum batch (two ``lerp_``: on tiny
    tensors cheaper than one ``_foreach_lerp_``). Statistics without autograd history: inside
    ``Function.forward``, or detached by the caller."""
    if running_mean is not None:
        running_mean.lerp_(mean.view(-1), momentum)
    if running_stat is not None:
        running_stat.lerp_(stat.view(-1), momentum)


# CPU reductions over (N, H, W) per channel are slow when the innermost run H * W is short:
# below _SHORT_RUN positions, reduce over N first (contiguous, vectorized). BatchNorm's fused
# backward kernel gets both sums of _sums_g_and_g_centered in one pass, but is slow below
# _FUSED_MIN positions. Both thresholds measured with benchmarks/norm_speed.py on CPU.
_SHORT_RUN = 256
_FUSED_MIN = 16


def _channel_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    """``sum``/``amax``/``amin`` over every dimension but 1, as a flat (C,) tensor."""
    if x.dim() == 2 or x[0, 0].numel() < _SHORT_RUN:
        first = getattr(x, op)(0)
        return first if first.dim() == 1 else getattr(first.view(first.shape[0], -1), op)(1)
    return getattr(x, op)(_reduce_dims(x))


def _sums_g_and_g_centered(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: sum(g) and sum(g * (x - mean)), as flat (C,) tensors."""
    if x.dim() > 2 and x[0, 0].numel() >= _FUSED_MIN:  # BatchNorm's backward kernel: one fused pass
        _, sum_gc, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, None, None, None, mean.view(-1), torch.ones_like(mean.view(-1)), True, 0.0, [False, True, True]
        )
        return sum_g, sum_gc
    return _channel_reduce(g, "sum"), _channel_reduce(g * (x - mean), "sum")


def _channel_affine(x: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None):
    """(x - center) * scale + shift per channel, through BatchNorm's fused eval-mode kernel."""
    flat_center = center.reshape(-1)
    return torch.nn.functional.batch_norm(
        x,
        flat_center,
        torch.ones_like(flat_center),
        scale.reshape(-1),
        None if shift is None else shift.reshape(-1),
        False,
        0.0,
        0.0,
    )


def _argmax_abs_centered(x: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor, above: torch.Tensor):
    """One argmax of |x - mean| per channel (an index tuple for advanced indexing) and its sign.

    ``top``/``bottom``: (C, positions) max/min over the batch; ``above``: whether the channel's
    max |c| lies above the mean (at its maximum) rather than below (at its minimum).
    """
    n, channels = x.shape[0], x.shape[1]
    channel = torch.arange(channels, device=x.device)
    position = torch.where(above, top.argmax(1), bottom.argmin(1))  # (C,)
    column = x.view(n, channels, -1)[:, channel, position]  # (N, C): every sample at that position
    sample = torch.where(above, column.argmax(0), column.argmin(0))
    sign = above.to(x.dtype) * 2 - 1
    return (sample, channel, *torch.unravel_index(position, x.shape[2:])), sign


def _reference_grads(x, weight, bias, p, eps, g, wants):  # noqa: ANN001
    return grads_with_graph(lambda *t: lp_normalize_reference(*t, p, eps)[0], (x, weight, bias), wants, g)


class _LpNorm1OrInfFlat(torch.autograd.Function):
    """Fast training-mode lp normalization (p = 1, inf) of ``(N, C)`` inputs: the backward of
    :class:`_LpNorm1OrInf` in the fewest ops (each small op costs microseconds of dispatch).

    Saves c, d, k = gamma / d and, for p = 1, sign(c); for p = inf, the row of max |c| per
    channel (``Tensor.max`` returns it with the maximum). Backward, with S = sum(g * x_hat):
        p = 1:   dx = k g + k (S mean(sign) / m - mean(g)) - (k S / m) sign
        p = inf: dx = k g + k (S u / m - mean(g)), minus k S u at the argmax row (u = its sign)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_stat, momentum, p, eps):  # noqa: ANN001 (Function API)
        mean = x.mean(0)
        c = x - mean
        if p == 1:
            extreme = c.sign()
            stat = c.abs().mean(0)
        else:
            stat, extreme = c.abs().max(0)
        d = stat + eps
        k = d.reciprocal() if weight is None else weight / d
        y = c * k if bias is None else torch.addcmul(bias, c, k)
        _update_running(running_mean, running_stat, mean, stat, momentum)
        ctx.save_for_backward(x, weight, bias, c, extreme, d, k)
        ctx.p, ctx.eps = p, eps
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, bias, c, extreme, d, k = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            return (*_reference_grads(x, weight, bias, ctx.p, ctx.eps, g, wants), *_NO_GRADS)
        m = c.shape[0]
        sum_g = g.sum(0)
        s = torch.linalg.vecdot(g, c, dim=0).div_(d)  # S = sum(g * x_hat), also the gradient of gamma
        if ctx.p == 1:
            ks_m = k * s / m
            dx = torch.addcmul((ks_m * extreme.mean(0)).sub_(k * sum_g / m), g, k)
            dx.addcmul_(extreme, ks_m, value=-1)
        else:
            row = extreme.unsqueeze(0)
            ksu = (k * s).mul_(c.gather(0, row).squeeze(0).sign_())
            dx = torch.addcmul((ksu - k * sum_g).div_(m), g, k)
            dx.scatter_add_(0, row, ksu.neg_().unsqueeze(0))
        grad_w = s if weight is not None and wants[1] else None
        grad_b = sum_g if bias is not None and wants[2] else None
        return (dx if wants[0] else None), grad_w, grad_b, *_NO_GRADS
