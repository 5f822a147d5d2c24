"""Hessian-vector products, Lanczos, power iteration and Hutchinson against dense Hessians.

The reference is ``torch.autograd.functional.hessian`` on a model with < 1,000 parameters,
in float64 so that agreement can be asked to near machine precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from callbacks.hessian_math import block_matvec, hutchinson_trace, lanczos, power_iteration
from callbacks.hvp import HessianVectorProduct, flatten, unflatten


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 4)).double().eval()
    with torch.no_grad():  # non-trivial running statistics, as after training
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def dense_hessian(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        values = dict(zip(names, unflatten(flat, params)))
        return sum(w * F.cross_entropy(functional_call(model, values, (x,)), y) for (x, y), w in zip(batches, weights))

    return torch.autograd.functional.hessian(loss, flatten(params))


def closures(model: nn.Module, batches):
    return [lambda x=x, y=y: F.cross_entropy(model(x), y) for x, y in batches]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    batches = [data(24, 1), data(8, 2)]
    weights = [24 / 32, 8 / 32]
    h = dense_hessian(model, batches, weights)
    return model, batches, weights, h


def test_model_is_small_enough_for_a_dense_reference(setup):
    model, _, _, h = setup
    n = sum(p.numel() for p in model.parameters())
    assert n < 1000 and h.shape == (n, n)
    assert torch.allclose(h, h.T, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_hvp_matches_dense_hessian(setup, cache_graph):
    model, batches, weights, h = setup
    hvp = HessianVectorProduct(closures(model, batches), list(model.parameters()), weights, cache_graph=cache_graph)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(h.shape[0], generator=g, dtype=torch.float64)
        torch.testing.assert_close(hvp(v), h @ v, rtol=1e-10, atol=1e-10)
    assert hvp.num_products == 3
    with torch.no_grad():
        expected_loss = sum(w * float(F.cross_entropy(model(x), y)) for (x, y), w in zip(batches, weights))
    assert hvp.loss == pytest.approx(expected_loss, rel=1e-12)


def test_hvp_leaves_parameters_and_grad_untouched(setup):
    model, batches, weights, h = setup
    before = [p.detach().clone() for p in model.parameters()]
    hvp = HessianVectorProduct(closures(model, batches), list(model.parameters()), weights)
    hvp(torch.ones(h.shape[0], dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    hvp.release()
    with pytest.raises(RuntimeError, match="released"):
        hvp(torch.ones(h.shape[0], dtype=torch.float64))


def test_hvp_unused_parameter_has_zero_rows_and_bad_shape_is_refused():
    model = nn.Linear(3, 2).double()
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64)
    hvp = HessianVectorProduct([lambda: (model(x) ** 2).sum()], [*model.parameters(), unused])
    out = hvp(torch.ones(hvp.num_params, dtype=torch.float64))
    assert torch.equal(out[-2:], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        hvp(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="closures"):
        HessianVectorProduct([], list(model.parameters()))


def test_lanczos_top_k_equals_dense_eigenvalues(setup):
    _, _, _, h = setup
    exact = torch.linalg.eigvalsh(h).flip(0)
    result = lanczos(lambda v: h @ v, h[0], k=3, max_iter=h.shape[0], tol=1e-12)
    torch.testing.assert_close(result.eigenvalues, exact[:3], rtol=1e-8, atol=1e-10)
    # Ritz vectors are unit eigenvectors: H u = lambda u
    for value, u in zip(result.eigenvalues, result.eigenvectors):
        assert float(u.norm()) == pytest.approx(1.0, abs=1e-8)
        torch.testing.assert_close(h @ u, value * u, rtol=0, atol=1e-6)


def test_lanczos_with_pyhessian_defaults_is_within_one_percent(setup):
    _, _, _, h = setup
    exact = torch.linalg.eigvalsh(h).flip(0)
    result = lanczos(lambda v: h @ v, h[0], k=2)  # tol 1e-3, max_iter 100
    assert result.converged and result.num_products < h.shape[0]
    torch.testing.assert_close(result.eigenvalues, exact[:2], rtol=1e-2, atol=0)


@pytest.mark.parametrize(
    ("decay", "tol"),
    [(0.5, 1e-2), (0.5, 1e-3), (0.5, 1e-4), (0.9, 1e-2), (0.9, 1e-3), (0.9, 1e-4), (0.99, 1e-3), (0.99, 1e-4)],
)
def test_lanczos_stopping_bound_holds(decay, tol):
    """The a-posteriori bound stops early but honestly: each returned top Ritz value is within
    tol (relative) of the true eigenvalue, on spectra from well separated to clustered, as long
    as tol is below the relative gap 1 - decay (with eigenvalues closer than tol, a Krylov
    method cannot tell them apart; the change rule PyHessian uses fails on the clustered
    spectrum at every tol here)."""
    g = torch.Generator().manual_seed(1)
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    noise = torch.rand(n, generator=g, dtype=torch.float64)
    spectrum = 100 * decay ** torch.arange(n, dtype=torch.float64) - 0.5 * noise
    h = q @ torch.diag(spectrum) @ q.T
    exact = spectrum.sort(descending=True).values
    for k in (1, 3):
        result = lanczos(lambda v: h @ v, h[0], k=k, max_iter=n, tol=tol, generator=torch.Generator().manual_seed(0))
        assert result.converged and result.num_products < n
        error = ((result.eigenvalues - exact[:k]).abs() / exact[:k]).max()
        assert error <= tol


def test_lanczos_start_direction_speeds_up_and_never_hides_an_eigenvector():
    g = torch.Generator().manual_seed(2)
    n = 200
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    spectrum = 100 * 0.9 ** torch.arange(n, dtype=torch.float64)
    h = q @ torch.diag(spectrum) @ q.T
    run = lambda start: lanczos(lambda v: h @ v, h[0], k=1, max_iter=n, tol=1e-6, start=start)  # noqa: E731
    cold = run(None)
    # a gradient-like direction: mostly the top eigenvector
    warm = run(q[:, 0] + 0.1 * torch.randn(n, dtype=torch.float64, generator=g))
    assert warm.eigenvalues.item() == pytest.approx(100.0, rel=1e-6)
    assert warm.num_products < cold.num_products
    # a direction orthogonal to the top eigenvector still finds it (the random half of the start)
    blind = run(q[:, 1])
    assert blind.eigenvalues.item() == pytest.approx(100.0, rel=1e-6)
    # zero or non-finite directions fall back to the random start alone
    for bad in (torch.zeros(n, dtype=torch.float64), torch.full((n,), float("nan"), dtype=torch.float64)):
        assert torch.equal(run(bad).eigenvalues, cold.eigenvalues)


def test_power_iteration_finds_largest_magnitude_with_deflation():
    # A spectrum with a negative eigenvalue of large magnitude: power iteration (PyHessian's
    # method) ranks by |lambda|, Lanczos by value.
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([10.0, -6.0, 3.0], dtype=torch.float64), torch.linspace(-1, 1, 27).double()])
    h = q @ torch.diag(spectrum) @ q.T
    result = power_iteration(lambda v: h @ v, h[0], k=3, max_iter=500, tol=1e-10)
    expected = torch.tensor([10.0, -6.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=0)
    assert result.converged
    top = lanczos(lambda v: h @ v, h[0], k=2, max_iter=30, tol=1e-12).eigenvalues
    torch.testing.assert_close(top, torch.tensor([10.0, 3.0], dtype=torch.float64), rtol=1e-8, atol=0)


def test_hutchinson_is_exact_for_a_diagonal_operator():
    # v^T D v = sum_i d_i v_i^2 = tr(D) for every Rademacher v: each sample is exact.
    d = torch.linspace(-2, 5, 40, dtype=torch.float64)
    result = hutchinson_trace(lambda v: d * v, d, max_iter=10, block_sizes=[10, 30])
    assert result.trace == pytest.approx(float(d.sum()), rel=1e-12)
    assert result.block_traces == pytest.approx([float(d[:10].sum()), float(d[10:].sum())], rel=1e-12)
    assert result.num_products == 2 and result.stderr == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_estimates_the_dense_trace_and_block_traces(setup):
    model, batches, weights, h = setup
    hvp = HessianVectorProduct(closures(model, batches), list(model.parameters()), weights)
    sizes = [p.numel() for p in model.parameters()]
    result = hutchinson_trace(hvp, hvp.grad, max_iter=400, tol=0.0, block_sizes=sizes)
    assert result.num_products == 400
    assert abs(result.trace - float(h.trace())) < 4 * result.stderr
    assert sum(result.block_traces) == pytest.approx(result.trace, rel=1e-9)
    exact_blocks = [float(b.trace()) for b in _diagonal_blocks(h, sizes)]
    scale = max(abs(t) for t in exact_blocks)
    assert result.block_traces == pytest.approx(exact_blocks, abs=0.1 * scale)


def test_block_matvec_is_the_dense_diagonal_block(setup):
    _, _, _, h = setup
    u = torch.randn(30, dtype=torch.float64)
    torch.testing.assert_close(block_matvec(lambda v: h @ v, h[0], 60, 90)(u), h[60:90, 60:90] @ u)
    with pytest.raises(ValueError, match="block"):
        block_matvec(lambda v: h @ v, h[0], 10, 10)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: lanczos(m, torch.zeros(5), k=0), "k must be >= 1"),
        (lambda m: lanczos(m, torch.zeros(5), k=6), "k must be <="),
        (lambda m: power_iteration(m, torch.zeros(5), max_iter=0), "max_iter"),
        (lambda m: hutchinson_trace(m, torch.zeros(5), block_sizes=[2, 2]), "block_sizes"),
        (lambda m: hutchinson_trace(m, torch.zeros(5), tol=-1.0), "tol"),
    ],
)
def test_invalid_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(lambda v: v)


def _diagonal_blocks(h: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield h[start : start + size, start : start + size]
        start += size
