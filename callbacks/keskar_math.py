"""Keskar et al. (ICLR 2017) sharpness, Metric 2.1, as pure functions on flat vectors.

    phi(eps, A) = 100 * (max_{y in C} f(x + A y) - f(x)) / (1 + f(x)),
    C = { z in R^p : |z_i| <= eps * (|(A^+ x)_i| + 1) },

x the flattened parameters (n entries), f the training loss on a fixed sample, A = I (full
space, p = n) or a random n x p matrix (subspace). The maximization is approximate, so phi is
a lower bound of the true value: a better maximizer gives a *higher* phi. Two maximizers:

- ``lbfgsb``: SciPy's L-BFGS-B (the paper's choice, 10 iterations), float64 vectors on the
  host; every loss evaluation is copied to and from the device. The faithful reference.
- ``torch``: projected sign ascent on the box (the L-infinity PGD of adversarial training,
  with the step in units of each coordinate's half-width), on the training device.
  Its first step lands on the corner sign(grad f) of the box, the exact maximizer of the
  linearized loss, which is where L-BFGS-B's projected first step also goes; it stops at a
  stationary point of the box, as L-BFGS-B does.

Both return the largest loss among *all* points they evaluated (every one lies in C), so each
is a valid lower bound of the max, and they are compared by that value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ValueAndGrad = Callable[[Tensor], tuple[float, Tensor]]
"""w -> (f(w), grad f(w)) for flat parameter vectors w (loss on the fixed sample)."""

METHODS = ("torch", "lbfgsb")


class RandomSubspace:
    """A random n x p matrix A with i.i.d. N(0, 1) entries, seeded, and its pseudo-inverse action.

    A is generated in blocks of rows, block b from a generator seeded with (seed, b), so it is
    the same on every device and can be regenerated instead of stored: with
    ``materialize=None`` it is kept in memory only while n * p <= ``max_elements``.
    A^+ x is the least-squares solution of min_z ||A z - x||: (A^T A)^{-1} A^T x, with the p x p
    Gram matrix accumulated in float64 and solved by Cholesky (A has full column rank almost
    surely, and a tall Gaussian matrix is well conditioned), never an n x p pseudo-inverse.
    """

    def __init__(
        self,
        n: int,
        p: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        block_rows: int = 65536,
        materialize: bool | None = None,
        max_elements: int = 2**26,
    ) -> None:
        if not 1 <= p <= n:
            raise ValueError(f"subspace dimension p must be in [1, n={n}], got {p!r}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows!r}")
        self.n, self.p, self.seed = n, p, seed
        self.device, self.dtype, self.block_rows = torch.device(device), dtype, block_rows
        keep = n * p <= max_elements if materialize is None else materialize
        self._matrix: Tensor | None = None
        self._matrix = torch.cat(list(self._blocks())) if keep else None
        gram = torch.zeros(p, p, dtype=torch.float64, device=self.device)
        for block in self._blocks():
            block = block.double()
            gram += block.T @ block
        self._cholesky = torch.linalg.cholesky(gram)

    def _blocks(self):
        if self._matrix is not None:
            yield from self._matrix.split(self.block_rows)
            return
        for b, start in enumerate(range(0, self.n, self.block_rows)):
            rows = min(self.block_rows, self.n - start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            yield torch.randn(rows, self.p, generator=generator).to(device=self.device, dtype=self.dtype)

    def matrix(self) -> Tensor:
        """A as a dense n x p tensor (for tests and small n)."""
        return torch.cat(list(self._blocks()))

    def matvec(self, y: Tensor) -> Tensor:
        """A y (n entries)."""
        return torch.cat([block @ y.to(block.dtype) for block in self._blocks()])

    def rmatvec(self, g: Tensor) -> Tensor:
        """A^T g (p entries): the gradient in y of f(x + A y) from the gradient g in w."""
        out = torch.zeros(self.p, dtype=g.dtype, device=g.device)
        for block, part in zip(self._blocks(), g.split(self.block_rows)):
            out += block.T @ part.to(block.dtype)
        return out

    def pinv_apply(self, x: Tensor) -> Tensor:
        """A^+ x by least squares (float64 normal equations with a Cholesky solve)."""
        rhs = torch.zeros(self.p, dtype=torch.float64, device=self.device)
        for block, part in zip(self._blocks(), x.split(self.block_rows)):
            rhs += block.double().T @ part.double().to(self.device)
        return torch.cholesky_solve(rhs[:, None], self._cholesky)[:, 0]


def box_half_widths(x: Tensor, eps: float, subspace: RandomSubspace | None = None) -> Tensor:
    """eps * (|(A^+ x)_i| + 1): the half-width of the box C in each coordinate of y."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    coords = x if subspace is None else subspace.pinv_apply(x).to(x.dtype)
    return eps * (coords.abs() + 1)


@dataclass(frozen=True)
class MaxResult:
    """The best point found in the box, its loss, evaluations used, fraction at the bound."""

    value: float
    y: Tensor
    evaluations: int
    at_bound: float
    seconds: float


@dataclass(frozen=True)
class SharpnessResult:
    """phi (Metric 2.1) with the numbers it is made of."""

    phi: float
    loss: float
    max_loss: float
    at_bound: float
    evaluations: int
    seconds: float


def fraction_at_bound(y: Tensor, half_widths: Tensor) -> float:
    """Share of coordinates with |y_i| at its bound (relative tolerance 1e-4)."""
    return float((y.abs() >= half_widths * (1 - 1e-4)).double().mean())


def is_box_kkt(y: Tensor, grad: Tensor, half_widths: Tensor) -> bool:
    """Whether y is a first-order stationary point of max f over the box (projected gradient
    zero): every coordinate with a non-zero gradient sits at the bound the gradient points to."""
    blocked = ((y >= half_widths) & (grad >= 0)) | ((y <= -half_widths) & (grad <= 0)) | (grad == 0)
    return bool(blocked.all())


def maximize_torch(fun: ValueAndGrad, half_widths: Tensor, max_iter: int = 10) -> MaxResult:
    """Projected sign ascent over the box |y_i| <= b_i, at most ``max_iter`` gradient steps.

    y_1 = b * sign(grad f(0)) (the linearized maximizer); then y <- clip(y + s b sign(grad)),
    with s = 1 while the loss improves and halved after each step that did not improve it
    (the step then restarts from the best point). Stops early at a stationary point of the
    box (projected gradient zero, L-BFGS-B's own test), typically a corner. Costs at most
    ``max_iter + 1`` evaluations.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    start = time.perf_counter()
    b = half_widths
    y = torch.zeros_like(b)
    best_value, grad = fun(y)
    best_y, best_grad = y, grad
    step, evaluations = 2.0, 1  # 2 b from the centre is clipped to b: the corner of the box
    for _ in range(max_iter):
        if is_box_kkt(best_y, best_grad, b):
            break
        direction = torch.sign(best_grad)
        candidate = torch.clamp(best_y + step * b * direction, -b, b)
        value, grad = fun(candidate)
        evaluations += 1
        if value > best_value:
            best_value, best_y, best_grad = value, candidate, grad
            step = min(step, 1.0)
        else:
            step /= 2
    seconds = time.perf_counter() - start
    return MaxResult(best_value, best_y, evaluations, fraction_at_bound(best_y, b), seconds)


def maximize_lbfgsb(fun: ValueAndGrad, half_widths: Tensor, max_iter: int = 10) -> MaxResult:
    """SciPy L-BFGS-B on -f over the box (float64 on the host), ``max_iter`` iterations.

    Keeps the best of all evaluated points: a line search may evaluate a better point than
    the iterate it returns.
    """
    from scipy.optimize import minimize

    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    start = time.perf_counter()
    b = half_widths.detach().double().cpu().numpy()
    device, dtype = half_widths.device, half_widths.dtype
    best = {"value": -math.inf, "y": np.zeros_like(b), "evaluations": 0}

    def negative(y: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = fun(torch.from_numpy(y).to(device=device, dtype=dtype))
        best["evaluations"] += 1
        if value > best["value"]:
            best["value"], best["y"] = value, y.copy()
        if not math.isfinite(value):  # L-BFGS-B cannot step on inf/nan: report and stop
            raise FloatingPointError(value)
        return -value, -grad.detach().double().cpu().numpy()

    try:
        minimize(
            negative,
            np.zeros_like(b),
            jac=True,
            method="L-BFGS-B",
            bounds=np.stack([-b, b], axis=1),
            options={"maxiter": max_iter},
        )
    except FloatingPointError:
        pass
    y = torch.from_numpy(best["y"]).to(device=device, dtype=dtype)
    seconds = time.perf_counter() - start
    return MaxResult(best["value"], y, best["evaluations"], fraction_at_bound(y, half_widths), seconds)


def keskar_sharpness(
    value_and_grad: ValueAndGrad,
    x: Tensor,
    eps: float,
    subspace: RandomSubspace | None = None,
    method: str = "torch",
    max_iter: int = 10,
) -> SharpnessResult:
    """phi(eps, A) of Metric 2.1 at the flat parameters ``x`` (A = I when ``subspace`` is None).

    ``value_and_grad`` evaluates the loss and its gradient at flat parameters w; it is called
    at w = x + A y only. The loss at x is the first evaluation of the maximizer (y = 0).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if subspace is not None and subspace.n != x.numel():
        raise ValueError(f"subspace has n={subspace.n} rows but x has {x.numel()} entries")
    b = box_half_widths(x, eps, subspace)
    loss0: list[float] = []

    def fun(y: Tensor) -> tuple[float, Tensor]:
        w = x + (y if subspace is None else subspace.matvec(y).to(x.dtype))
        value, grad = value_and_grad(w)
        if not loss0:
            loss0.append(value)
        return value, (grad if subspace is None else subspace.rmatvec(grad).to(y.dtype))

    maximize = maximize_torch if method == "torch" else maximize_lbfgsb
    found = maximize(fun, b, max_iter)
    loss = loss0[0]
    phi = 100.0 * (found.value - loss) / (1.0 + loss)
    return SharpnessResult(phi, loss, found.value, found.at_bound, found.evaluations, found.seconds)
