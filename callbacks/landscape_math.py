"""Loss and gradient along the gradient direction: the math of Santurkar et al. (2018), Sec. 3, Fig. 4.

For parameters W_t, the gradient g_t = grad L(W_t) that training uses and step sizes eta,
W(eta) = W_t - eta g_t. Per measurement we evaluate, on the training step's batch,

- the loss landscape: L(W(eta)) for every eta (Fig. 4a, its min and max over eta);
- gradient predictiveness: ||grad L(W(eta)) - g_t||_2 (Fig. 4b, min and max over eta);
- the effective beta-smoothness: max over eta of ||grad L(W(eta)) - g_t||_2 / ||eta g_t||_2 (Fig. 4c).

Everything here is a pure function of a loss closure ``loss_fn(params, buffers) -> scalar``
(``params``/``buffers``: name -> tensor dicts, e.g. through ``torch.func.functional_call``), so it
serves any model. ``buffers`` are throw-away copies the closure may mutate (BatchNorm in train
mode updates its running statistics in the forward pass; the caller's buffers stay untouched).

Two evaluation methods with the same cost, len(step_sizes) forward+backward passes:
``loop`` evaluates one eta after the other (one extra parameter copy); ``batched`` evaluates
``chunk_size`` etas in one ``torch.func.vmap`` call (chunk_size parameter copies) and needs a
closure that vmap can trace (no ``.item()``, no in-place update of captured tensors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

Params = Mapping[str, Tensor]
LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]
Method = Literal["loop", "batched"]

DEFAULT_LR_MULTIPLIERS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
"""8 values evenly spaced over [0.5, 4]: the paper's [0.05, 0.4] at learning rate 0.1."""

SUMMARY_KEYS: tuple[str, ...] = (
    "loss_min",
    "loss_max",
    "grad_diff_min",
    "grad_diff_max",
    "beta_smoothness",
    "grad_norm",
)


def check_positive_values(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """Return ``values`` as a tuple of floats; ValueError unless a non-empty list of finite numbers > 0."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of positive numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must contain finite numbers > 0, got {v!r} in {list(values)!r}")
        out.append(float(v))
    return tuple(out)


def step_size_grid(
    lr: float | None,
    lr_multipliers: Sequence[float] = DEFAULT_LR_MULTIPLIERS,
    step_sizes: Sequence[float] | None = None,
) -> tuple[float, ...]:
    """The etas of one measurement: ``step_sizes`` if given, else ``lr_multipliers`` x ``lr``."""
    if step_sizes is not None:
        return check_positive_values("step_sizes", step_sizes)
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0 to scale lr_multipliers, got {lr!r}")
    return tuple(lr * m for m in check_positive_values("lr_multipliers", lr_multipliers))


@dataclass(frozen=True)
class AlongGradient:
    """One measurement: per-eta values (1-D tensors of length len(step_sizes)) and ||g_t||."""

    step_sizes: Tensor
    losses: Tensor
    grad_diff_norms: Tensor
    grad_norm: Tensor


def grad_norm(grad: Params) -> Tensor:
    """||g||_2 over all tensors of ``grad`` (in float64 so large models do not lose digits)."""
    return torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grad.values()))


def evaluate_along_gradient(
    loss_fn: LossFn,
    params: Params,
    grad: Params,
    step_sizes: Sequence[float],
    buffers: Params | None = None,
    *,
    method: Method = "loop",
    chunk_size: int | None = None,
    before_each: Callable[[], None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> AlongGradient:
    """Evaluate L(W(eta)) and ||grad L(W(eta)) - g|| for W(eta) = params - eta * grad.

    Args:
        loss_fn: ``loss_fn(params, buffers) -> scalar`` on the measured batch.
        params: W_t, name -> tensor (only the tensors to move; not modified).
        grad: g_t, the same names and shapes as ``params``.
        step_sizes: the etas.
        buffers: name -> tensor passed to ``loss_fn`` as fresh copies at every evaluation.
        method: ``loop`` (one eta per forward+backward) or ``batched`` (vmap over etas).
        chunk_size: etas per vmap call for ``batched`` (None: all at once).
        before_each: called before every ``loss_fn`` evaluation (loop) or vmap call
            (batched), e.g. to restore the training step's RNG state so that dropout and
            noise see the same realization.
        reduce: maps a tensor to its mean over data-parallel ranks (DDP); applied once per
            loop step or vmap call to the losses and gradients at W(eta), flattened into one
            tensor (one collective), before the difference to g is taken.

    Cost: exactly len(step_sizes) forward+backward passes.
    """
    if method not in ("loop", "batched"):
        raise ValueError(f"method must be 'loop' or 'batched', got {method!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if set(params) != set(grad):
        raise ValueError(f"params and grad must have the same names, got {sorted(params)} and {sorted(grad)}")
    etas = check_positive_values("step_sizes", list(step_sizes))
    names = list(params)
    p = {n: params[n].detach() for n in names}
    g = {n: grad[n].detach() for n in names}
    bufs = {n: b.detach() for n, b in (buffers or {}).items()}
    run = _loop if method == "loop" else _batched
    size = len(etas) if method == "loop" or chunk_size is None else chunk_size
    losses, diffs = [], []
    for start in range(0, len(etas), size):
        chunk_losses, chunk_diffs = run(loss_fn, p, g, bufs, etas[start : start + size], before_each, reduce)
        losses.append(chunk_losses)
        diffs.append(chunk_diffs)
    device = next(iter(p.values())).device if p else torch.device("cpu")
    return AlongGradient(
        step_sizes=torch.tensor(etas, dtype=torch.float64, device=device),
        losses=torch.cat(losses),
        grad_diff_norms=torch.cat(diffs),
        grad_norm=grad_norm(g).to(device),
    )


def _loop(loss_fn, p, g, bufs, etas, before_each, reduce) -> tuple[Tensor, Tensor]:
    losses, diffs = [], []
    for eta in etas:
        with torch.no_grad():
            moved = {n: torch.add(p[n], g[n], alpha=-eta).requires_grad_(True) for n in p}
        if before_each is not None:
            before_each()
        with torch.enable_grad():
            loss = loss_fn(moved, {n: b.clone() for n, b in bufs.items()})
            grads = torch.autograd.grad(loss, list(moved.values()), allow_unused=True)
        grads = [torch.zeros_like(m) if gr is None else gr for gr, m in zip(grads, moved.values())]
        del moved  # at most one moved copy of the parameters is alive at a time
        loss, grads = _reduced(reduce, loss.detach().reshape(1), [gr.unsqueeze(0) for gr in grads])
        losses.append(loss.double())
        diffs.append(_diff_norm(grads, g))
    return torch.cat(losses), torch.cat(diffs)


def _batched(loss_fn, p, g, bufs, etas, before_each, reduce) -> tuple[Tensor, Tensor]:
    k = len(etas)
    with torch.no_grad():
        moved = {}
        for n in p:
            eta = torch.tensor(etas, dtype=p[n].dtype, device=p[n].device).view(k, *([1] * p[n].dim()))
            moved[n] = p[n].unsqueeze(0) - eta * g[n].unsqueeze(0)
        # One private copy of every buffer per eta: BN in train mode updates them in place,
        # which vmap allows only on batched tensors.
        stacked_bufs = {n: b.unsqueeze(0).expand(k, *b.shape).clone() for n, b in bufs.items()}
    if before_each is not None:
        before_each()
    # randomness="same": one dropout/noise draw for all etas, the draw the loop makes
    # after before_each() restored the RNG.
    grads, losses = vmap(grad_and_value(loss_fn), randomness="same")(moved, stacked_bufs)
    losses, grads = _reduced(reduce, losses.detach().reshape(k), [grads[n] for n in p])
    return losses.double(), _diff_norm(grads, g)


def _diff_norm(stacked: Sequence[Tensor], g: Params) -> Tensor:
    """||stacked[i] - g||_2 for every leading index i (sums of squares in float64)."""
    total = 0.0
    for a, b in zip(stacked, g.values()):
        total = total + (a - b.unsqueeze(0)).double().pow(2).reshape(a.shape[0], -1).sum(1)
    return torch.sqrt(total)


def _reduced(
    reduce: Callable[[Tensor], Tensor] | None, losses: Tensor, grads: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """Apply ``reduce`` to losses (k,) and stacked gradients (k, ...) in one call (one collective)."""
    if reduce is None:
        return losses, grads
    k = losses.shape[0]
    dtype = functools.reduce(torch.promote_types, [gr.dtype for gr in grads], losses.dtype)
    flat = reduce(torch.cat([losses.reshape(k, 1).to(dtype)] + [gr.reshape(k, -1).to(dtype) for gr in grads], dim=1))
    parts = flat.split([1] + [gr[0].numel() for gr in grads], dim=1)
    return parts[0].reshape(k).to(losses.dtype), [p.reshape(gr.shape).to(gr.dtype) for p, gr in zip(parts[1:], grads)]


def summarize(result: AlongGradient) -> dict[str, float]:
    """The logged statistics of one measurement (keys :data:`SUMMARY_KEYS`, no prefix).

    beta_smoothness = max over eta of ||grad L(W(eta)) - g|| / (eta ||g||); nan if g = 0
    (every W(eta) is W_t, the ratio is undefined). min/max propagate nan, so a diverged eta
    shows up in the log instead of being skipped.
    """
    losses, diffs = result.losses.double(), result.grad_diff_norms.double()
    ratios = diffs / (result.step_sizes.double().to(diffs.device) * result.grad_norm.double())
    return {
        "loss_min": float(losses.min()),
        "loss_max": float(losses.max()),
        "grad_diff_min": float(diffs.min()),
        "grad_diff_max": float(diffs.max()),
        "beta_smoothness": float(ratios.max()),
        "grad_norm": float(result.grad_norm),
    }
