"""Stochastic Lanczos quadrature (callbacks.density) against the dense Hessian of a tiny model.

The model of test_hessian_math (148 parameters, float64, BN in eval mode); its dense Hessian
is the reference: per-run quadrature moments are exact (v^T H v, ||H v||^2), their means
estimate tr(H)/n and ||H||_F^2/n, and the extreme nodes sit on the extreme eigenvalues.
"""

from __future__ import annotations

import pytest
import torch

from callbacks.density import SpectralQuadrature, broadened_density, density_figure, rademacher_unit, slq
from tests.test_hessian_math import setup  # noqa: F401  (fixture: tiny model, its batches, dense Hessian)


@pytest.fixture(scope="module")
def dense(setup):  # noqa: F811
    h = setup[3]
    return h, torch.linalg.eigvalsh(h)


def test_each_run_integrates_the_first_two_moments_of_its_start_vector_exactly(dense):
    h, _ = dense
    n = h.shape[0]
    q = slq(lambda v: h @ v, torch.zeros(n, dtype=torch.float64), num_runs=3, num_steps=20)
    generator = torch.Generator().manual_seed(0)  # slq's default: the same start vectors
    for run in range(3):
        v = rademacher_unit(n, generator, torch.zeros(n, dtype=torch.float64))
        assert float(v.norm()) == pytest.approx(1.0)
        w, nodes = q.weights[run], q.nodes[run]
        assert float(w.sum()) == pytest.approx(1.0, rel=1e-12)
        assert float((w * nodes).sum()) == pytest.approx(float(v @ h @ v), rel=1e-9)
        assert float((w * nodes**2).sum()) == pytest.approx(float((h @ v).square().sum()), rel=1e-9)
    assert q.num_products == 60


def test_density_moments_estimate_trace_and_frobenius_norm_over_n(dense):
    h, _ = dense
    n = h.shape[0]
    runs = 40
    q = slq(lambda v: h @ v, torch.zeros(n, dtype=torch.float64), num_runs=runs, num_steps=30)
    first = (q.weights * q.nodes).sum(1)
    second = (q.weights * q.nodes**2).sum(1)
    for samples, exact in ((first, float(h.trace()) / n), (second, float(h.square().sum()) / n)):
        stderr = float(samples.std()) / runs**0.5
        assert abs(float(samples.mean()) - exact) < 4 * stderr
        assert float(samples.mean()) == pytest.approx(exact, rel=0.15)
    assert q.moment(1) == pytest.approx(float(first.mean())) and q.moment(2) == pytest.approx(float(second.mean()))


def test_support_ends_at_the_extreme_eigenvalues(dense):
    h, spectrum = dense
    n = h.shape[0]
    q = slq(lambda v: h @ v, torch.zeros(n, dtype=torch.float64), num_runs=2, num_steps=60)
    low, high = q.support()
    scale = float(spectrum.abs().max())
    assert low == pytest.approx(float(spectrum[0]), abs=1e-3 * scale)
    assert high == pytest.approx(float(spectrum[-1]), abs=1e-3 * scale)
    assert float(q.nodes.min()) >= float(spectrum[0]) - 1e-9 * scale  # Ritz values interlace: never outside
    assert float(q.nodes.max()) <= float(spectrum[-1]) + 1e-9 * scale
    exact_negative = float((spectrum < -0.01 * scale).double().mean())
    assert q.negative_mass() == pytest.approx(exact_negative, abs=0.1)
    assert q.negative_mass(relative=0.0) >= q.negative_mass()


def test_broadened_density_is_normalized_and_keeps_the_mean(dense):
    h, spectrum = dense
    n = h.shape[0]
    q = slq(lambda v: h @ v, torch.zeros(n, dtype=torch.float64), num_runs=4, num_steps=40)
    grid, density = broadened_density(q, num_bins=4000, sigma_squared=1e-4)
    step = float(grid[1] - grid[0])
    assert float(density.sum()) * step == pytest.approx(1.0, rel=1e-12)
    assert float(grid[0]) == pytest.approx(q.support()[0] - 0.01) and float(grid[-1]) == pytest.approx(
        q.support()[1] + 0.01
    )
    assert float((grid * density).sum()) * step == pytest.approx(q.moment(1), abs=1e-3 * float(spectrum.abs().max()))
    assert bool((density >= 0).all())
    figure = density_figure(grid, density, "test")
    assert figure.axes[0].get_yscale() == "log"


def test_an_invariant_krylov_space_ends_a_run_with_the_exact_eigenvalues():
    h = torch.diag(torch.tensor([2.0, 2.0, -1.0, 5.0, 5.0, 5.0], dtype=torch.float64))  # three distinct
    q = slq(lambda v: h @ v, torch.zeros(6, dtype=torch.float64), num_runs=1, num_steps=6)
    live = q.weights[0] > 0
    assert q.num_products == 3 and int(live.sum()) == 3
    assert sorted(q.nodes[0][live].tolist()) == pytest.approx([-1.0, 2.0, 5.0])
    # Rademacher start: the weight of each eigenvalue is its multiplicity / n
    assert sorted(q.weights[0][live].tolist()) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert q.negative_mass() == pytest.approx(1 / 6)


@pytest.mark.parametrize("kwargs", [{"num_runs": 0}, {"num_steps": 0}, {"num_runs": 1.5}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        slq(lambda v: v, torch.zeros(3), **kwargs)


def test_quadrature_type_is_what_slq_returns():
    q = slq(lambda v: 3 * v, torch.zeros(4, dtype=torch.float64), num_steps=4)
    assert isinstance(q, SpectralQuadrature) and q.support() == pytest.approx((3.0, 3.0))
