"""Hessian eigenvalue density (stochastic Lanczos quadrature): ours vs PyHessian, side by side.

Same frozen model as benchmarks/hessian_vs_pyhessian.py (a VGG briefly trained on the embedded
CIFAR-10 subset, eval mode), same batch, PyHessian's settings (``iter=100`` Lanczos steps,
``n_v`` runs, Gaussian broadening with sigma^2 = 1e-5 on 10000 bins). Compared:

* time: ours (``callbacks.density.slq`` on the cached-graph Hessian-vector product +
  ``broadened_density``) / PyHessian (``hessian.density()`` + its ``density_generate``);
* shape: the extreme nodes (both converge to lambda_min, lambda_max), the first two moments
  (tr(H)/n, ||H||_F^2/n estimates), and the L1 distance between the two densities on one grid
  (broadened wider, 1e-3 x range, so that the distance measures shape, not spike positions),
  next to the L1 distance between two of our own runs with different seeds: the spread of
  the estimator. PyHessian draws its Rademacher vectors from torch's global RNG (seeded 0 here),
  parameter by parameter; ours from a generator seeded 0, in one draw: the same CPU stream in
  the same order, so with seed 0 both start from the same vector and should agree to rounding.

PyHessian's ``density()`` calls ``torch.eig``, removed from torch (its issue #17); we give it
``torch.linalg.eigh`` under that name for the run. Its ``density_generate`` lives in the
repository's ``density_plot.py``, not in the pip package: :func:`pyhessian_density_generate`
re-implements it with the same loops and conventions.

    pip install -e '.[bench]'
    python benchmarks/hessian_density_vs_pyhessian.py               # ~2-4 min on 2 CPU cores
    python benchmarks/hessian_density_vs_pyhessian.py --runs 3 --width 0.25
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from hessian_vs_pyhessian import PyHessianRun, frozen_model, timed

from callbacks.density import SpectralQuadrature, broadened_density, slq
from callbacks.hvp import HessianVectorProduct


@contextlib.contextmanager
def torch_eig_shim():
    """``torch.eig(T, eigenvectors=True)`` as PyHessian calls it: (n, 2) real/imaginary values,
    eigenvectors as columns; T is symmetric, so eigh gives both."""
    had = hasattr(torch, "eig")
    previous = getattr(torch, "eig", None)

    def eig(matrix, eigenvectors=True):
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    torch.eig = eig
    try:
        yield
    finally:
        if had:
            torch.eig = previous
        else:
            del torch.eig


def pyhessian_density_generate(eigenvalues, weights, num_bins=10000, sigma_squared=1e-5, overhead=0.01):
    """PyHessian's density_plot.density_generate: Python loops over runs and bins."""
    eigenvalues, weights = np.array(eigenvalues), np.array(weights)
    lambda_max = np.mean(np.max(eigenvalues, axis=1), axis=0) + overhead
    lambda_min = np.mean(np.min(eigenvalues, axis=1), axis=0) - overhead
    grids = np.linspace(lambda_min, lambda_max, num=num_bins)
    sigma = sigma_squared * max(1, (lambda_max - lambda_min))
    density_output = np.zeros((eigenvalues.shape[0], num_bins))
    for i in range(eigenvalues.shape[0]):
        for j in range(num_bins):
            kernel = np.exp(-((grids[j] - eigenvalues[i, :]) ** 2) / (2.0 * sigma)) / np.sqrt(2 * np.pi * sigma)
            density_output[i, j] = np.sum(kernel * weights[i, :])
    density = np.mean(density_output, axis=0)
    return density / (np.sum(density) * (grids[1] - grids[0])), grids


def ours(model, x, y, runs: int, steps: int, seed: int) -> tuple[SpectralQuadrature, np.ndarray]:
    params = [p for p in model.parameters() if p.requires_grad]
    hvp = HessianVectorProduct([lambda: F.cross_entropy(model(x), y)], params)
    quadrature = slq(hvp, hvp.grad, runs, steps, torch.Generator().manual_seed(seed))
    _, density = broadened_density(quadrature)
    hvp.release()
    return quadrature, density.numpy()


def pyhessian(model, x, y, runs: int, steps: int) -> tuple[SpectralQuadrature, np.ndarray]:
    with PyHessianRun(model, x, y) as run, torch_eig_shim():
        eigenvalues, weights = run.h.density(iter=steps, n_v=runs)
    density, _ = pyhessian_density_generate(eigenvalues, weights)
    as_tensor = {"dtype": torch.float64}
    quadrature = SpectralQuadrature(torch.tensor(eigenvalues, **as_tensor), torch.tensor(weights, **as_tensor), 0)
    return quadrature, density


def l1_distance(a: SpectralQuadrature, b: SpectralQuadrature, low: float, high: float) -> float:
    """Integral of |phi_a - phi_b| on one grid, both broadened with variance 1e-3 x range."""
    grid = torch.linspace(low, high, 4000, dtype=torch.float64)
    variance = 1e-3 * (high - low)

    def smooth(q: SpectralQuadrature) -> torch.Tensor:
        kernel = torch.exp(-((grid[:, None] - q.nodes.reshape(-1)[None, :]) ** 2) / (2 * variance))
        phi = kernel @ q.weights.reshape(-1) / len(q.nodes)
        return phi / (phi.sum() * (grid[1] - grid[0]))

    return float((smooth(a) - smooth(b)).abs().sum() * (grid[1] - grid[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=200, help="training steps before freezing")
    parser.add_argument("--batch", type=int, default=256, help="the batch the Hessian is computed on")
    parser.add_argument("--iter", type=int, default=100, help="Lanczos steps per SLQ run (PyHessian's iter)")
    parser.add_argument("--runs", type=int, default=1, help="SLQ runs (PyHessian's n_v)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    args = parser.parse_args()

    model, x, y, n = frozen_model(args.width, args.steps, args.batch)
    print(f"VGG width {args.width}: {n} parameters, batch {args.batch}, {args.runs} SLQ run(s) x {args.iter} steps")

    # interleaved, so that a change of machine load between phases does not bias the ratio
    times_ours, times_peer = [], []
    for _ in range(args.repeats):
        (mine, mine_density), seconds = timed(lambda: ours(model, x, y, args.runs, args.iter, 0))
        times_ours.append(seconds)
        (peer, peer_density), seconds = timed(lambda: pyhessian(model, x, y, args.runs, args.iter))
        times_peer.append(seconds)
    t_ours, t_peer = float(np.median(times_ours)), float(np.median(times_peer))
    ratios = sorted(a / b for a, b in zip(times_ours, times_peer))
    other, _ = ours(model, x, y, args.runs, args.iter, 1)
    _, t_broaden_ours = timed(lambda: broadened_density(mine), args.repeats)
    _, t_broaden_peer = timed(lambda: pyhessian_density_generate(peer.nodes.numpy(), peer.weights.numpy()), 1)

    print(f"\n{'':<26}{'lambda_min':>12}{'lambda_max':>12}{'mean':>12}{'2nd moment':>12}{'neg. mass':>10}")
    for label, q in (("ours (seed 0)", mine), ("ours (seed 1)", other), ("PyHessian", peer)):
        low, high = q.support()
        print(f"{label:<26}{low:>12.4f}{high:>12.4f}{q.moment(1):>12.3e}{q.moment(2):>12.3e}{q.negative_mass():>10.3f}")
    low = min(q.support()[0] for q in (mine, other, peer)) - 0.05
    high = max(q.support()[1] for q in (mine, other, peer)) + 0.05
    floor, gap = l1_distance(mine, other, low, high), l1_distance(mine, peer, low, high)
    print(f"\nL1 distance of the densities: ours vs PyHessian {gap:.3f}; ours seed 0 vs 1 {floor:.3f} (noise floor)")
    finite = [bool(np.isfinite(d).all()) for d in (mine_density, peer_density)]
    print(f"densities finite: ours {finite[0]}, PyHessian {finite[1]}")

    print(f"\nseconds (median of {args.repeats}): ours {t_ours:.2f} (broadening {t_broaden_ours:.3f}), ", end="")
    print(f"PyHessian {t_peer:.2f} (broadening {t_broaden_peer:.2f})")
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"time ours / PyHessian: {t_ours / t_peer:.2f} (per repetition: {shown}; same products, target <= 1)")


if __name__ == "__main__":
    main()
