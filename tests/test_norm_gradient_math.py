"""Lemma 4.1's identity per unit against autograd through torch's own BatchNorm (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from callbacks.norm_gradient_math import (
    batch_norm_input_grad,
    batch_norm_terms,
    normalized,
    torch_batch_norm_units,
    units_by_samples,
)


def bn_gradients(shape: tuple[int, ...], eps: float, seed: int = 0):
    """y, gamma and g = dL/dz drawn at random; dL/dy by autograd through F.batch_norm."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    y = (3.0 * torch.randn(shape, generator=gen, dtype=torch.float64) + 1.5).requires_grad_()
    gamma = torch.randn(channels, generator=gen, dtype=torch.float64)
    beta = torch.randn(channels, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3  # non-zero mean: a mean term to remove
    z = F.batch_norm(y, None, None, gamma, beta, training=True, eps=eps)
    (dy,) = torch.autograd.grad(z, y, grad_outputs=g)
    return y.detach(), gamma, g, dy


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 5), (6, 4, 7)])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_identity_per_unit_equals_autograd(shape, eps):
    y, gamma, g, dy = bn_gradients(shape, eps)
    y_hat, sigma = normalized(units_by_samples(y), eps)
    g_units, dy_units = units_by_samples(g), units_by_samples(dy)
    terms = batch_norm_terms(g_units, y_hat, gamma, sigma)
    exact = dy_units.square().sum(1)
    torch.testing.assert_close(terms.in_sq, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(batch_norm_input_grad(g_units, y_hat, gamma, sigma), dy_units, rtol=1e-10, atol=1e-12)
    assert torch.all(terms.mean_term > 0) and torch.all(terms.scale_term > 0)


def test_with_eps_near_zero_it_is_the_papers_lemma_and_with_eps_the_papers_form_bounds_it():
    y, gamma, g, dy = bn_gradients((32, 4), eps=1e-30, seed=1)  # torch refuses eps = 0
    y_hat, sigma = normalized(units_by_samples(y), 1e-30)
    gu, m = units_by_samples(g), units_by_samples(g).shape[1]
    paper = (gamma**2 / sigma**2) * (gu.square().sum(1) - gu.sum(1).square() / m - (gu * y_hat).sum(1).square() / m)
    torch.testing.assert_close(paper, units_by_samples(dy).square().sum(1), rtol=1e-10, atol=0)
    # eps > 0: c > 1, so the paper's right-hand side (c = 1) is an upper bound (Theorem 4.1)
    y, gamma, g, dy = bn_gradients((32, 4), eps=0.5, seed=1)
    y_hat, sigma = normalized(units_by_samples(y), 0.5)
    gu = units_by_samples(g)
    paper = (gamma**2 / sigma**2) * (gu.square().sum(1) - gu.sum(1).square() / m - (gu * y_hat).sum(1).square() / m)
    assert torch.all(paper >= units_by_samples(dy).square().sum(1))


def test_which_modules_the_terms_apply_to():
    bn = torch.nn.BatchNorm2d(3)
    assert torch_batch_norm_units(bn)
    assert not torch_batch_norm_units(bn.eval())  # running statistics: dL/dy = gamma/sigma_run * g
    assert torch_batch_norm_units(torch.nn.BatchNorm1d(3, track_running_stats=False).eval())
    assert not torch_batch_norm_units(torch.nn.GroupNorm(1, 3))
    assert not torch_batch_norm_units(torch.nn.SyncBatchNorm(3))


def test_units_by_samples_refuses_vectors():
    with pytest.raises(ValueError, match="expected"):
        units_by_samples(torch.zeros(3))
