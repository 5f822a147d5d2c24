"""Eigenvalue spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

Definition (Ghorbani, Krishnan & Xiao, ICML 2019; Yao et al., PyHessian, 2020): for an
n x n symmetric H with eigenpairs (lambda_i, q_i), the spectral density is
phi(t) = (1/n) sum_i delta(t - lambda_i), and its Gaussian broadening
phi_s(t) = (1/n) sum_i N(t; lambda_i, s^2).

For a unit vector v, v^T f(H) v = sum_i (q_i^T v)^2 f(lambda_i): an integral against the
spectral measure of v, whose expectation over v = r / sqrt(n), r Rademacher, is phi. m steps of
Lanczos from v give the tridiagonal T_m = S diag(theta) S^T; the Gauss quadrature with nodes
theta_j and weights w_j = S_1j^2 (sum 1) integrates every polynomial of degree <= 2m - 1 exactly
against v's measure. Averaging the quadratures of several v estimates phi (each run is one
sample). Exact consequences the tests check against a dense Hessian:

- sum_j w_j theta_j = v^T H v and sum_j w_j theta_j^2 = ||H v||^2 (m >= 2), whose expectations
  are tr(H) / n and ||H||_F^2 / n;
- the extreme nodes converge to the extreme eigenvalues first (Lanczos), so the density's
  support ends near lambda_min and lambda_max.

Pure functions on flat vectors (the Hessian callback feeds a Hessian-vector product); random
vectors from an explicit CPU ``torch.Generator``, never the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor

from callbacks.hessian_math import MatVec, lanczos_tridiagonal, tridiagonal_eigh


@dataclass(frozen=True)
class SpectralQuadrature:
    """Gauss quadrature of each SLQ run: ``nodes`` and ``weights`` (runs x m, float64, CPU;
    each row of weights sums to 1). A run that ended early (its Krylov space became invariant:
    its nodes are exact eigenvalues) is padded with weight-0 copies of its first node."""

    nodes: Tensor
    weights: Tensor
    num_products: int

    def moment(self, order: int) -> float:
        """Mean over runs of sum_j w_j theta_j^order: the estimate of (1/n) tr(H^order)."""
        return float((self.weights * self.nodes**order).sum(1).mean())

    def negative_mass(self, relative: float = 0.01) -> float:
        """Spectral mass clearly below zero: of nodes < -relative x the spectral radius (max |node|).

        Ghorbani et al.'s negative-eigenvalue ratio, with a threshold: a trained network's bulk
        of near-zero eigenvalues is represented by a few nodes whose sign is noise (one node at
        -1e-4 can carry most of the weight), so mass below exactly 0 would measure that noise."""
        threshold = -relative * float(self.nodes.abs().max())
        return float((self.weights * (self.nodes < threshold)).sum(1).mean())

    def support(self) -> tuple[float, float]:
        """Mean over runs of the smallest and largest node (PyHessian's range of the density)."""
        live = self.weights > 0
        low = torch.where(live, self.nodes, torch.inf).min(1).values
        high = torch.where(live, self.nodes, -torch.inf).max(1).values
        return float(low.mean()), float(high.mean())


def rademacher_unit(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """r / sqrt(n) for r uniform in {-1, 1}^n (PyHessian's SLQ start vector)."""
    r = torch.randint(0, 2, (n,), generator=generator).to(device=like.device, dtype=like.dtype) * 2 - 1
    return r / n**0.5


def slq(
    matvec: MatVec,
    like: Tensor,
    num_runs: int = 1,
    num_steps: int = 100,
    generator: torch.Generator | None = None,
) -> SpectralQuadrature:
    """Stochastic Lanczos quadrature: ``num_runs`` runs of ``num_steps`` Lanczos steps (full
    re-orthogonalization) from Rademacher vectors; PyHessian's ``density(iter, n_v)``.

    No early stop: a run's quadrature is exact for more moments the longer it runs (a run
    stops early only when its Krylov space is invariant, where it is exact). Costs
    ``num_runs * min(num_steps, n)`` products.
    """
    n = like.numel()
    if not (isinstance(num_runs, int) and num_runs >= 1):
        raise ValueError(f"num_runs must be an integer >= 1, got {num_runs!r}")
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = min(num_steps, n)
    nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, steps, dtype=torch.float64)
    products = 0
    for run in range(num_runs):
        result = lanczos_tridiagonal(matvec, rademacher_unit(n, generator, like), steps)
        products += len(result.alphas)
        values, vectors = tridiagonal_eigh(result.alphas, result.betas)
        m = len(values)
        nodes[run, :m], nodes[run, m:] = values, values[0]
        weights[run, :m] = vectors[0] ** 2  # squared first components: the Gauss weights
    return SpectralQuadrature(nodes, weights, products)


def broadened_density(
    quadrature: SpectralQuadrature, num_bins: int = 10000, sigma_squared: float = 1e-5, overhead: float = 0.01
) -> tuple[Tensor, Tensor]:
    """``(grid, density)``: the quadrature smoothed by Gaussians, PyHessian's ``density_generate``.

    Its conventions, so that figures compare: the grid spans the mean (over runs) smallest to
    largest node, widened by ``overhead`` on each side; the kernel's *variance* is
    ``sigma_squared * max(1, range)``; the density is the mean over runs, normalized so its
    Riemann sum over the grid is 1. Vectorized (PyHessian loops over bins in Python).
    """
    low, high = quadrature.support()
    low, high = low - overhead, high + overhead
    grid = torch.linspace(low, high, num_bins, dtype=torch.float64)
    variance = sigma_squared * max(1.0, high - low)
    density = torch.zeros(num_bins, dtype=torch.float64)
    for nodes, weights in zip(quadrature.nodes, quadrature.weights):
        kernel = torch.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2 * variance))
        density += kernel @ weights / (2 * torch.pi * variance) ** 0.5
    density /= len(quadrature.nodes)
    step = float(grid[1] - grid[0]) if num_bins > 1 else 1.0
    return grid, density / (density.sum() * step)


def density_figure(grid: Tensor, density: Tensor, title: str) -> Figure:
    """The density on a log scale, as PyHessian's ``get_esd_plot`` draws it."""
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axis = figure.subplots()
    axis.semilogy(grid.numpy(), density.numpy() + 1e-7)  # + 1e-7: empty bins stay on a log axis
    axis.set_xlabel("eigenvalue")
    axis.set_ylabel("density (log scale)")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.5)
    return figure
