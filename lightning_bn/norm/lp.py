"""lp normalization (Santurkar et al., 2018, Sec. 3.3): BatchNorm with another dispersion measure.

Per channel, over the batch (and the spatial positions of a feature map), with the m
values of a channel x_1..x_m, mu = mean(x), c = x - mu:

    y = gamma * c / d_p + beta,   d_p = (mean(|c|^p) + eps)^(1/p)   for p = 1, 2
                                  d_inf = max(|c|) + eps             for p = "inf"

so the activations are divided by the batch average of their lp norm (the max for
p = inf). With p = 2, d_2 = sqrt(var + eps) and the layer *is* BatchNorm (a test checks
it, train and eval). Running estimates of mu and of the statistic ``s = mean(|c|^p)``
(``max|c|`` for inf) are kept with BatchNorm's momentum rule and used in eval mode; for
p = 2, s is updated with Bessel's correction m/(m - 1) exactly as BatchNorm's running_var.

Speed: p = 2 calls PyTorch's fused BatchNorm kernel. p = 1 and inf use a hand-written
backward with few activation-sized passes and allocations (on CPU a fresh tensor can cost
more than the arithmetic); ``benchmarks/norm_speed.py`` prints the ratio to BatchNorm.
Under ``create_graph=True`` (double backward) and under ``torch.func`` transforms the
plain-autograd definition :func:`lp_normalize_reference` is differentiated instead, so
Hessian-vector products work.

DDP: statistics are per rank (like plain BatchNorm); the layer is not a ``_BatchNorm``
subclass, so ``sync_batchnorm`` leaves it alone.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.autograd import forward_ad

from lightning_bn.errors import ConfigError
from lightning_bn.norm.registry import register_norm

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
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p, eps):  # noqa: ANN001 (autograd.Function API)
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
        ctx.save_for_backward(x, weight, bias, mean, d)
        ctx.p, ctx.eps = p, eps
        ctx.mark_non_differentiable(mean, stat)
        return y, mean, stat

    @staticmethod
    def backward(ctx, g, _grad_mean, _grad_stat):  # noqa: ANN001
        x, weight, bias, mean, d = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            return (*_reference_grads(x, weight, bias, ctx.p, ctx.eps, g, wants), None, None)
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
        return (dx if wants[0] else None), grad_w, grad_b, None, None


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
    inputs = [t for t, w in zip((x, weight, bias), wants) if w]
    if not inputs:
        return None, None, None
    with torch.enable_grad():
        y, _, _ = lp_normalize_reference(x, weight, bias, p, eps)
        grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True))
    return tuple(next(grads) if w else None for w in wants)


def _plain_autograd(x: torch.Tensor) -> bool:
    """False under torch.func transforms or forward-mode AD, where the custom Function cannot run."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return forward_ad.unpack_dual(x).tangent is None


def _parse_p(p: object) -> P:
    if p in ("inf", math.inf):
        return "inf"
    if p in (1, 2) and not isinstance(p, bool):
        return int(p)  # type: ignore[return-value]
    raise ConfigError(f"norm 'lp': p must be 1, 2 or 'inf', got {p!r}")


@register_norm("lp")
class LpNorm(nn.Module):
    """lp normalization of each channel by the batch average of its lp norm (see module doc).

    Args:
        num_features: channels C of an (N, C, ...) input.
        p: 1, 2 (= BatchNorm) or ``"inf"`` (also accepts ``float("inf")``).
        eps: added inside the root (p = 1, 2) or to the max (inf).
        momentum: weight of the newest batch in the running estimates, in (0, 1].
        affine: learn a per-channel gamma and beta.
    """

    def __init__(
        self, num_features: int, p: int | str = 2, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        self.p = _parse_p(p)
        if not eps > 0:
            raise ConfigError(f"norm 'lp': eps must be > 0, got {eps!r}")
        if not 0 < momentum <= 1:
            raise ConfigError(f"norm 'lp': momentum must be in (0, 1], got {momentum!r}")
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        # p = 1: mean|c|, p = 2: variance (BatchNorm's running_var), inf: max|c|; starts at 1.
        self.register_buffer("running_stat", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def check_batch_size(self, batch_size: int) -> None:
        """Called by the model's ``setup``: a batch of one sample has no dispersion to normalize by."""
        if batch_size < 2:
            raise ConfigError(f"data.batch_size={batch_size} cannot train a model with norm 'lp' (batch statistics)")

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p!r}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"lp norm expects (N, {self.num_features}, ...) input, got shape {tuple(x.shape)}")
        if self.p == 2:  # exactly BatchNorm: use its fused kernel
            if self.training:
                self.num_batches_tracked.add_(1)
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_stat, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        if not self.training:
            d = self.running_stat + self.eps
            scale = d.reciprocal() if self.weight is None else self.weight / d
            return _channel_affine(x, self.running_mean, scale, self.bias)
        if x.numel() // x.shape[1] < 2:
            raise ValueError(f"lp norm needs more than 1 value per channel in training, got shape {tuple(x.shape)}")
        if _plain_autograd(x):
            y, mean, stat = _LpNorm1OrInf.apply(x, self.weight, self.bias, self.p, self.eps)
        else:
            y, mean, stat = lp_normalize_reference(x, self.weight, self.bias, self.p, self.eps)
        with torch.no_grad():
            torch._foreach_lerp_(
                [self.running_mean, self.running_stat], [mean.detach().view(-1), stat.detach().view(-1)], self.momentum
            )
            self.num_batches_tracked.add_(1)
        return y
