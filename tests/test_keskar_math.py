"""Keskar sharpness (Metric 2.1): the box, the random subspace and both maximizers.

References: dense pseudo-inverses (torch.linalg.pinv), objectives whose maximum over the box
is known in closed form, and a brute-force grid over a 2-D box on a real (tiny) network.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from callbacks.hvp import flatten, unflatten
from callbacks.keskar_math import (
    RandomSubspace,
    box_half_widths,
    fraction_at_bound,
    is_box_kkt,
    keskar_sharpness,
    maximize_lbfgsb,
    maximize_torch,
)

METHODS = ["torch", "lbfgsb"]


def test_subspace_regenerated_in_blocks_equals_the_stored_matrix():
    stored = RandomSubspace(50, 4, seed=3, block_rows=7, materialize=True, dtype=torch.float64)
    streamed = RandomSubspace(50, 4, seed=3, block_rows=7, materialize=False, dtype=torch.float64)
    a = stored.matrix()
    assert a.shape == (50, 4)
    torch.testing.assert_close(streamed.matrix(), a, rtol=0, atol=0)
    y, g = torch.randn(4, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    for sub in (stored, streamed):
        torch.testing.assert_close(sub.matvec(y), a @ y)
        torch.testing.assert_close(sub.rmatvec(g), a.T @ g)
    assert not torch.equal(RandomSubspace(50, 4, seed=4, dtype=torch.float64).matrix(), a)


def test_pinv_by_least_squares_equals_the_dense_pseudo_inverse():
    sub = RandomSubspace(200, 10, seed=0, block_rows=64, materialize=False, dtype=torch.float64)
    x = torch.randn(200, dtype=torch.float64)
    torch.testing.assert_close(sub.pinv_apply(x), torch.linalg.pinv(sub.matrix()) @ x, rtol=1e-9, atol=1e-12)
    # x in the range of A is recovered exactly: A^+ (A z) = z
    z = torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(sub.pinv_apply(sub.matvec(z)), z, rtol=1e-9, atol=1e-12)


def test_box_half_widths_follow_the_definition():
    x = torch.tensor([0.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(box_half_widths(x, 1e-3), 1e-3 * (x.abs() + 1))
    sub = RandomSubspace(3, 2, seed=0, dtype=torch.float64)
    expected = 5e-4 * ((torch.linalg.pinv(sub.matrix()) @ x).abs() + 1)
    torch.testing.assert_close(box_half_widths(x, 5e-4, sub), expected)
    with pytest.raises(ValueError, match="eps must be > 0"):
        box_half_widths(x, 0.0)
    with pytest.raises(ValueError, match="subspace dimension p"):
        RandomSubspace(3, 4)


@pytest.mark.parametrize("method", METHODS)
def test_linear_loss_is_maximized_at_the_corner(method):
    # f(w) = c.w + 1: the max over the box is at y = b sign(c), so phi is known exactly.
    c = torch.tensor([1.0, -2.0, 0.5, -0.25], dtype=torch.float64)
    x = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)

    def value_and_grad(w):
        return float(c @ w + 1), c.clone()

    eps = 1e-2
    b = eps * (x.abs() + 1)
    f0, fmax = float(c @ x + 1), float(c @ (x + b * c.sign()) + 1)
    result = keskar_sharpness(value_and_grad, x, eps, method=method, max_iter=10)
    assert result.loss == pytest.approx(f0, rel=1e-12)
    assert result.max_loss == pytest.approx(fmax, rel=1e-12)
    assert result.phi == pytest.approx(100 * (fmax - f0) / (1 + f0), rel=1e-9)
    assert result.at_bound == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_convex_quadratic_is_maximized_at_the_far_vertex(method):
    # Convex separable f(y) = ||y - c||^2: the maximizer of each term is the bound opposite c_i.
    c = torch.tensor([0.2, -0.7, 0.05], dtype=torch.float64)
    b = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    vertices = [torch.tensor(s, dtype=torch.float64) * b for s in itertools.product([-1, 1], repeat=3)]
    brute = max(float(((v - c) ** 2).sum()) for v in vertices)
    maximize = maximize_torch if method == "torch" else maximize_lbfgsb
    found = maximize(lambda y: (float(((y - c) ** 2).sum()), 2 * (y - c)), b, max_iter=10)
    assert found.value == pytest.approx(brute, rel=1e-12)
    assert found.at_bound == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_interior_maximum_is_approached(method):
    # f(y) = y_2 - (y_1 - 0.3)^2 on [-1, 1]^2: max 1 at y = (0.3, 1), interior in y_1.
    def fun(y):
        return float(y[1] - (y[0] - 0.3) ** 2), torch.stack([-2 * (y[0] - 0.3), torch.ones_like(y[0])])

    maximize = maximize_torch if method == "torch" else maximize_lbfgsb
    found = maximize(fun, torch.ones(2, dtype=torch.float64), max_iter=10)
    f0 = fun(torch.zeros(2, dtype=torch.float64))[0]
    assert 1.0 - 1e-2 * (1.0 - f0) <= found.value <= 1.0
    assert found.at_bound == 0.5


@pytest.mark.parametrize("method", METHODS)
def test_only_points_inside_the_box_are_evaluated(method):
    torch.manual_seed(0)
    x = torch.randn(30, dtype=torch.float64)
    sub = RandomSubspace(30, 5, seed=1, dtype=torch.float64)
    b = box_half_widths(x, 1e-2, sub)
    seen = []

    def value_and_grad(w):
        seen.append(w.clone())
        return float(torch.sin(3 * w).sum()), 3 * torch.cos(3 * w)

    result = keskar_sharpness(value_and_grad, x, 1e-2, sub, method=method, max_iter=10)
    assert result.evaluations == len(seen) >= 2
    assert torch.equal(seen[0], x)
    for w in seen:
        y = sub.pinv_apply(w - x)
        assert bool((y.abs() <= b * (1 + 1e-6) + 1e-12).all())
    assert result.phi >= 0


def test_torch_maximizer_costs_at_most_max_iter_plus_one_evaluations():
    # An interior maximum is never a stationary point of the iterates: every step is taken.
    calls = []

    def fun(y):
        calls.append(1)
        return float(-((y - 0.3) ** 2).sum()), -2 * (y - 0.3)

    found = maximize_torch(fun, torch.ones(3, dtype=torch.float64), max_iter=7)
    assert found.evaluations == len(calls) == 8
    assert found.value > fun(torch.zeros(3, dtype=torch.float64))[0]


def test_torch_maximizer_stops_at_a_stationary_point_of_the_box():
    # Linear f: the first step reaches the maximizing corner, where the projected gradient
    # is zero, so no further evaluation is spent (L-BFGS-B stops there too).
    c = torch.tensor([1.0, -2.0, 0.5])
    found = maximize_torch(lambda y: (float(c @ y), c.clone()), torch.ones(3), max_iter=10)
    assert found.evaluations == 2 and found.at_bound == 1.0
    # A maximum at the centre (zero gradient) costs one evaluation and leaves y = 0.
    found = maximize_torch(lambda y: (float(-(y**2).sum()), -2 * y), torch.ones(3), max_iter=7)
    assert found.evaluations == 1 and found.value == 0.0
    assert fraction_at_bound(found.y, torch.ones(3)) == 0.0


def test_box_stationarity_test():
    b = torch.ones(3)
    assert is_box_kkt(torch.tensor([1.0, -1.0, 0.2]), torch.tensor([2.0, -1.0, 0.0]), b)
    assert not is_box_kkt(torch.tensor([1.0, -1.0, 0.2]), torch.tensor([2.0, 1.0, 0.0]), b)
    assert not is_box_kkt(torch.tensor([1.0, -1.0, 0.2]), torch.tensor([2.0, -1.0, 1e-3]), b)


def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x_data, y_data = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def value_and_grad(w):
        with torch.no_grad():
            for p, v in zip(params, unflatten(w, params)):
                p.copy_(v)
        loss = F.cross_entropy(model(x_data), y_data)
        return float(loss.detach()), flatten(torch.autograd.grad(loss, params))

    def losses(ws):  # the loss at many flat parameter vectors at once (no gradient)
        def one(w):
            out = functional_call(model, dict(zip(names, unflatten(w, params))), (x_data,))
            return F.cross_entropy(out, y_data)

        with torch.no_grad():
            return vmap(one)(ws)

    return flatten([p.detach() for p in params]).clone(), value_and_grad, losses


@pytest.mark.parametrize("method", METHODS)
def test_two_dimensional_subspace_matches_a_brute_force_grid(method):
    # p = 2: the max over the box is found by a 201 x 201 grid; the maximizer must come close
    # (>= 99% of the grid's increase) and can exceed the grid only by the grid's resolution.
    x, value_and_grad, losses = tiny_problem()
    eps = 0.5
    sub = RandomSubspace(x.numel(), 2, seed=0, dtype=torch.float64)
    b = box_half_widths(x, eps, sub)
    f0 = value_and_grad(x)[0]
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 201, dtype=torch.float64)] * 2, indexing="ij"), -1)
    brute = float(losses(x + (grid.reshape(-1, 2) * b) @ sub.matrix().T).max())
    result = keskar_sharpness(value_and_grad, x, eps, sub, method=method, max_iter=10)
    assert result.max_loss - f0 >= 0.99 * (brute - f0)
    assert result.max_loss <= brute + 1e-3 * (brute - f0)


def test_invalid_arguments_are_refused():
    x, value_and_grad, _ = tiny_problem()
    with pytest.raises(ValueError, match="method must be one of"):
        keskar_sharpness(value_and_grad, x, 1e-3, method="adam")
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        maximize_torch(lambda y: (0.0, y), torch.ones(2), max_iter=0)
    with pytest.raises(ValueError, match="rows"):
        keskar_sharpness(value_and_grad, x, 1e-3, RandomSubspace(x.numel() + 1, 2))
