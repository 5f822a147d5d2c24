"""Training-mode BatchNorm whose affine map carries per-channel noise, as one autograd node.

With the noise (shift, scale) of :class:`~lightning_bn.norm.noisy.NoisyBatchNorm` folded
into BatchNorm's affine map, ``y = scale * (gamma * x_hat + beta) + shift
= (gamma * scale) * x_hat + (beta * scale + shift)``, so one fused BatchNorm kernel computes
the layer. Autograd through the folding would add two graph nodes (a ``mul`` and an
``addcmul``) whose bookkeeping costs about as much as BatchNorm itself on small ``(N, C)``
inputs; here the chain rule for them is two per-channel multiplications in backward:
dL/dgamma = scale * dL/dweight and dL/dbeta = scale * dL/dbias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_bn.norm.autograd_mode import grads_with_graph


class _NoisyBatchNorm(torch.autograd.Function):
    """``apply(x, weight, bias, shift, scale, running_mean, running_var, momentum, eps)``.

    The running buffers (or None) are updated in place exactly as :func:`F.batch_norm` does;
    shift and scale are constants of the step (no gradient). Under ``create_graph=True`` the
    backward differentiates the same computation in plain autograd ops, so second derivatives
    (Hessian-vector products) are exact.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, running_mean, running_var, momentum, eps):  # noqa: ANN001
        folded_w, folded_b = fold_noise(weight, bias, shift, scale)
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, folded_w, folded_b, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, shift, scale, folded_w, save_mean, save_invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, bias, shift, scale, folded_w, save_mean, save_invstd = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the plain-autograd computation, differentiated
            return (*_plain_grads(x, weight, bias, shift, scale, ctx.eps, g, wants), *_NO_GRADS)
        mask = [wants[0], weight is not None and wants[1], bias is not None and wants[2]]
        dx, d_folded_w, d_folded_b = torch.ops.aten.native_batch_norm_backward(
            g, x, folded_w, None, None, save_mean, save_invstd, True, ctx.eps, mask
        )
        grad_w = d_folded_w * scale if mask[1] else None
        grad_b = d_folded_b * scale if mask[2] else None
        return dx, grad_w, grad_b, *_NO_GRADS


_NO_GRADS = (None,) * 6  # shift, scale, running_mean, running_var, momentum, eps


def fold_noise(
    weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's affine map with the noise folded in: (gamma * scale, beta * scale + shift)."""
    folded_w = scale if weight is None else weight * scale
    folded_b = shift if bias is None else torch.addcmul(shift, bias, scale)
    return folded_w, folded_b


def _plain_grads(x, weight, bias, shift, scale, eps, g, wants):  # noqa: ANN001
    def definition(x, weight, bias):  # noqa: ANN001, ANN202
        return F.batch_norm(x, None, None, *fold_noise(weight, bias, shift, scale), True, 0.0, eps)

    return grads_with_graph(definition, (x, weight, bias), wants, g)
