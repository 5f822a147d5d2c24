"""Top eigenvalues and trace of a symmetric operator known only through products ``matvec(v)``.

Pure functions on flat vectors; the Hessian callback feeds them a Hessian-vector product
(:class:`callbacks.hvp.HessianVectorProduct`). Random vectors come from an explicit
``torch.Generator`` on the CPU, so a measurement never touches the global RNG streams and
gives the same numbers on every device.

- :func:`lanczos`: symmetric Lanczos with full re-orthogonalization; the top-k Ritz values
  of the tridiagonal matrix estimate the k largest (algebraic) eigenvalues.
- :func:`power_iteration`: PyHessian's method (power iteration, deflation by
  orthogonalization against the eigenvectors already found); finds the eigenvalues of
  largest *magnitude*. Kept as the reference our benchmark compares against.
- :func:`lanczos_tridiagonal`: the Lanczos iteration itself (the tridiagonal matrix T and the
  basis), shared with the spectral density (:mod:`callbacks.density`).
- :func:`hutchinson_trace`: tr(H) = E[v^T H v] for Rademacher v (Hutchinson, 1990),
  optionally split into the trace of each diagonal block (per layer) at no extra cost.

Stopping rules follow PyHessian (relative change below ``tol``, at most ``max_iter`` products).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class EigenResult:
    """k eigenvalue estimates (descending), their unit eigenvectors (k x n), products used."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_products: int
    converged: bool


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of tr(H), its standard error, products used, per-block traces."""

    trace: float
    stderr: float
    num_products: int
    block_traces: list[float]


def _check(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _random_unit(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
    return v / v.norm()


def _start_vector(n: int, generator: torch.Generator, like: Tensor, start: Tensor | None) -> Tensor:
    v = _random_unit(n, generator, like)
    if start is None:
        return v
    norm = start.norm()
    if not (torch.isfinite(norm) and norm > 0):
        return v
    v = v + start.to(v) / norm
    return v / v.norm()


def lanczos(
    matvec: MatVec,
    like: Tensor,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
) -> EigenResult:
    """The k largest eigenvalues of a symmetric operator by Lanczos (full re-orthogonalization).

    Args:
        matvec: v -> H v for flat vectors shaped like ``like``.
        like: a flat tensor giving n, dtype and device.
        k: number of eigenvalues.
        max_iter: at most this many products (Krylov dimension), capped at n.
        tol: stop once each of the k top Ritz values theta has an a-posteriori error bound
            below ``tol * |theta|``: min(r, r^2 / gap) with r = ||H y - theta y|| = |beta_m s_m|
            (the next Lanczos coefficient times the last entry of the Ritz vector in the Krylov
            basis) and gap the distance to the nearest other Ritz value (Parlett, The Symmetric
            Eigenvalue Problem, 1998, ch. 11). PyHessian's tol asks the same relative accuracy
            of its estimate but infers it from the change between iterations; the bound checks
            it, and usually stops a product or two earlier.
        generator: CPU generator of the start vector (default: seeded with 0).
        start: a direction to start from, mixed in equal parts with the seeded random unit
            vector (which keeps every eigenvector reachable). The loss gradient is a good one:
            it leans toward the top eigenvectors of the Hessian (Gur-Ari et al., 2018), so the
            first Ritz value is already large and the bound above is met a product or two
            sooner. None (or a zero/non-finite vector): the random vector alone.

    Memory: the Krylov basis, up to ``max_iter`` vectors of n entries (re-orthogonalizing
    against all of them is what keeps the Ritz values free of spurious copies).
    """
    n = like.numel()
    _check("k", k, 1)
    if k > n:
        raise ValueError(f"k must be <= the dimension {n}, got {k}")
    _check("max_iter", max_iter, k)
    _check("tol", tol, 0.0)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def bounds_met(alphas: list[float], betas: list[float], beta: float) -> bool:
        return len(alphas) >= k and bool((_error_bounds(alphas, betas, beta, k) < tol).all())

    run = lanczos_tridiagonal(matvec, _start_vector(n, generator, like, start), min(max_iter, n), bounds_met)
    alphas, betas = run.alphas, run.betas
    converged = run.stopped or (run.invariant and len(alphas) >= k)
    if len(alphas) < k:
        raise ValueError(f"the operator has an invariant subspace of dimension {len(alphas)} < k={k}")
    values, vectors = tridiagonal_eigh(alphas, betas)
    order = values.argsort(descending=True)[:k]
    ritz_vectors = vectors[:, order].T.to(dtype=like.dtype, device=like.device) @ run.basis
    converged = converged or len(alphas) == n
    return EigenResult(values[order].to(like.dtype), ritz_vectors, len(alphas), converged)


@dataclass(frozen=True)
class Tridiagonal:
    """m Lanczos steps: T's diagonal ``alphas`` (m), off-diagonal ``betas`` (m - 1), the basis
    (m x n, orthonormal rows); ``stopped``: the stop rule ended it; ``invariant``: the Krylov
    space became invariant (T's eigenvalues are then exact eigenvalues of H)."""

    alphas: list[float]
    betas: list[float]
    basis: Tensor
    stopped: bool
    invariant: bool


StopRule = Callable[[list[float], list[float], float], bool]


def lanczos_tridiagonal(matvec: MatVec, start: Tensor, steps: int, stop: StopRule | None = None) -> Tridiagonal:
    """At most ``steps`` steps of symmetric Lanczos from the unit vector ``start``, with full
    re-orthogonalization; one product per step. ``stop(alphas, betas, beta)`` (beta: the next
    off-diagonal entry) may end it early. Shared by :func:`lanczos` (top eigenvalues) and
    :func:`callbacks.density.slq` (spectral density)."""
    # The basis lives in one matrix whose capacity doubles as needed: re-stacking a list of
    # vectors at every step cost as much as the re-orthogonalization itself.
    basis = start.new_empty((min(steps, 8), start.numel()))
    basis[0] = start
    alphas: list[float] = []
    betas: list[float] = []
    stopped = invariant = False
    for j in range(steps):
        w = matvec(basis[j])
        alphas.append(float(w @ basis[j]))
        # Two passes of classical Gram-Schmidt against the whole basis ("twice is enough").
        active = basis[: j + 1]
        for _ in range(2):
            w = w - active.T @ (active @ w)
        beta = float(w.norm())
        if stop is not None and stop(alphas, betas, beta):
            stopped = True
            break
        # An invariant subspace: the Ritz values are exact eigenvalues of H.
        if beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas)):
            invariant = True
            break
        if j + 1 < steps:
            betas.append(beta)
            if j + 1 == basis.shape[0]:
                grown = basis.new_empty((min(steps, 2 * basis.shape[0]), basis.shape[1]))
                grown[: j + 1] = basis
                basis = grown
            basis[j + 1] = w / beta
    return Tridiagonal(alphas, betas, basis[: len(alphas)], stopped, invariant)


def _error_bounds(alphas: list[float], betas: list[float], beta: float, k: int) -> Tensor:
    """Relative a-posteriori error bounds min(r, r^2 / gap) / |theta| of the k top Ritz values."""
    values, vectors = tridiagonal_eigh(alphas, betas)
    residuals = (beta * vectors[-1, -k:]).abs().flip(0)  # r_i = |beta_m s_{m,i}|
    top = values[-k:].flip(0)
    bounds = residuals.clone()
    if len(values) > 1:
        distance = (top[:, None] - values[None, :]).abs()
        distance[distance == 0] = float("inf")  # itself (Ritz values of an unreduced T are distinct)
        gaps = distance.min(1).values
        bounds = torch.minimum(residuals, residuals.square() / gaps)
    return bounds / top.abs().clamp_min(1e-300)


def tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition (ascending) of the Lanczos tridiagonal matrix, in float64."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def power_iteration(
    matvec: MatVec,
    like: Tensor,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """PyHessian's deflated power iteration: the k eigenvalues of largest magnitude.

    For each eigenvalue: start from a random unit vector, repeat v <- H v / ||H v|| (after
    projecting out the eigenvectors already found) until the Rayleigh quotient changes by
    less than ``tol`` (relative), at most ``max_iter`` products per eigenvalue.
    """
    n = like.numel()
    _check("k", k, 1)
    if k > n:
        raise ValueError(f"k must be <= the dimension {n}, got {k}")
    _check("max_iter", max_iter, 1)
    _check("tol", tol, 0.0)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    found: list[Tensor] = []
    values: list[float] = []
    products, converged = 0, True
    for _ in range(k):
        v = _random_unit(n, generator, like)
        value: float | None = None
        done = False
        for _ in range(max_iter):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm().clamp_min(1e-30)
            hv = matvec(v)
            products += 1
            estimate = float(hv @ v)
            norm = hv.norm()
            if float(norm) == 0.0:  # v is in the null space (after deflation): eigenvalue 0
                value, done = 0.0, True
                break
            v = hv / norm
            if value is not None and abs(value - estimate) / (abs(value) + 1e-6) < tol:
                value, done = estimate, True
                break
            value = estimate
        converged = converged and done
        values.append(float(value))
        found.append(v)
    order = sorted(range(k), key=lambda i: -abs(values[i]))
    eigenvalues = torch.tensor([values[i] for i in order], dtype=like.dtype)
    return EigenResult(eigenvalues, torch.stack([found[i] for i in order]), products, converged)


def hutchinson_trace(
    matvec: MatVec,
    like: Tensor,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    block_sizes: Sequence[int] | None = None,
    min_samples: int = 2,
) -> TraceResult:
    """Hutchinson's estimate tr(H) ~ mean over Rademacher v of v^T H v.

    Stops (PyHessian's rule) once the running mean changed by less than ``tol`` relative to
    its previous value, after at least ``min_samples`` and at most ``max_iter`` products.
    ``block_sizes`` (summing to n) splits each sample v^T H v into sum_b v_b^T (H v)_b: the
    unbiased estimate of each diagonal block's trace (a layer's own curvature), for free.
    """
    n = like.numel()
    _check("max_iter", max_iter, 1)
    _check("tol", tol, 0.0)
    _check("min_samples", min_samples, 1)
    sizes = list(block_sizes) if block_sizes is not None else [n]
    if sum(sizes) != n or any(s < 1 for s in sizes):
        raise ValueError(f"block_sizes must be positive and sum to the dimension {n}, got sum {sum(sizes)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    samples: list[Tensor] = []
    mean = 0.0
    for i in range(max_iter):
        v = torch.randint(0, 2, (n,), generator=generator).to(device=like.device, dtype=like.dtype) * 2 - 1
        products = v * matvec(v)
        samples.append(torch.stack([part.sum() for part in products.split(sizes)]).double().cpu())
        new_mean = float(torch.stack(samples).sum(1).mean())
        if i + 1 >= min_samples and abs(new_mean - mean) / (abs(mean) + 1e-6) < tol:
            mean = new_mean
            break
        mean = new_mean
    table = torch.stack(samples)
    totals = table.sum(1)
    stderr = float(totals.std() / math.sqrt(len(totals))) if len(totals) > 1 else float("nan")
    return TraceResult(float(totals.mean()), stderr, len(samples), table.mean(0).tolist())


def block_matvec(matvec: MatVec, like: Tensor, start: int, stop: int) -> MatVec:
    """The diagonal block H[start:stop, start:stop] as an operator on vectors of its size."""
    if not 0 <= start < stop <= like.numel():
        raise ValueError(f"block [{start}, {stop}) is not inside [0, {like.numel()})")

    def product(u: Tensor) -> Tensor:
        v = torch.zeros_like(like)
        v[start:stop] = u
        return matvec(v)[start:stop]

    return product
