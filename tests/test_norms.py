"""Every normalization: registry, argument checks, exact definitions against brute-force references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm import NORMS, create_norm
from lightning_bn.norm.batch import BatchNorm
from lightning_bn.norm.lp import lp_normalize_reference
from lightning_bn.norm.lp_function import _LpNorm1OrInf, _LpNorm1OrInfFlat

ALL_NORMS = ["none", "batch", "group", "layer", "noisy_batch", "lp", "ghost_batch"]
BATCH_STAT_NORMS = {"batch", "noisy_batch", "lp", "ghost_batch"}
KWARGS = {"ghost_batch": {"virtual_batch_size": 4}}  # batches of 8 below: two virtual batches
SHAPES = [(8, 6), (8, 6, 5), (8, 6, 4, 4)]


def make(name: str, channels: int = 6, **kwargs) -> nn.Module:
    return create_norm(name, channels, **{**KWARGS.get(name, {}), **kwargs})


def test_registry_has_every_norm():
    assert set(ALL_NORMS) <= set(NORMS)


def test_unknown_name_is_a_value_error_listing_every_known_name():
    with pytest.raises(ValueError, match="norm='bogus' is not a known normalization") as info:
        create_norm("bogus", 4)
    for name in ALL_NORMS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("lp", {"q": 1}, "norm 'lp' has no argument 'q'; its arguments are: p, eps, momentum, affine"),
        ("noisy_batch", {"p": 1}, "norm 'noisy_batch' has no argument 'p'"),
        ("ghost_batch", {"virtual_batch": 4}, "norm 'ghost_batch' has no argument 'virtual_batch'"),
        ("lp", {"p": 3}, "norm 'lp': p must be 1, 2 or 'inf', got 3"),
        ("lp", {"p": "two"}, "norm 'lp': p must be 1, 2 or 'inf', got 'two'"),
        ("lp", {"momentum": 0.0}, r"norm 'lp': momentum must be in \(0, 1\], got 0.0"),
        ("noisy_batch", {"mean_range": -0.1}, "norm 'noisy_batch': mean_range must be >= 0, got -0.1"),
        ("noisy_batch", {"scale_range": 0.5}, "norm 'noisy_batch': scale_range must be >= 1, got 0.5"),
        ("ghost_batch", {"virtual_batch_size": 0}, "norm 'ghost_batch': virtual_batch_size must be an integer >= 1"),
        ("group", {"num_groups": 4}, "norm 'group': num_groups=4 does not divide num_features=6"),
    ],
)
def test_bad_arguments_name_the_norm_the_argument_and_the_value(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_norm(name, 6, **kwargs)


@pytest.mark.parametrize("p", [1, 2, "inf", float("inf"), 2.0])
def test_lp_accepts_each_spelling_of_p(p):
    assert create_norm("lp", 3, p=p).p == ("inf" if p in ("inf", float("inf")) else int(p))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("name", ALL_NORMS)
def test_every_norm_any_rank_train_and_eval(name, shape):
    norm = make(name)
    x = torch.randn(*shape, requires_grad=True)
    y = norm(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in norm.parameters())
    # A sample's training output depends on the rest of the batch iff the norm uses batch
    # statistics (samples 0-1 share ghost_batch's first virtual batch with samples 2-3).
    other = torch.cat([x[:2], 3 * x[2:] + 1]).detach()
    depends = not torch.allclose(norm(x)[:2], norm(other)[:2], atol=1e-6)
    assert depends == (name in BATCH_STAT_NORMS)
    # In eval mode every norm treats samples independently.
    norm.eval()
    torch.testing.assert_close(norm(x[:4]), norm(x)[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x)[:2], norm(other)[:2], rtol=1e-5, atol=1e-5)


# -- lp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_lp2_is_batchnorm_in_train_and_eval(shape):
    lp, bn = create_norm("lp", 6, p=2), nn.BatchNorm1d(6) if len(shape) < 4 else nn.BatchNorm2d(6)
    with torch.no_grad():
        for layer in (lp, bn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 6))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    for _ in range(3):
        x = (torch.randn(*shape) * 3 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        g = torch.randn(*shape)
        y, y_ref = lp(x), bn(x_ref)
        torch.testing.assert_close(y, y_ref)
        y.backward(g), y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(lp.weight.grad, bn.weight.grad)
    torch.testing.assert_close(lp.running_mean, bn.running_mean)
    torch.testing.assert_close(lp.running_stat, bn.running_var)
    lp.eval(), bn.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(lp(x), bn(x))


@pytest.mark.parametrize("p", [1, "inf"])
@pytest.mark.parametrize(
    "shape",
    [(6, 4, 3, 3), (7, 3), (300, 5), (5, 2, 4), (4, 3, 4, 4), (2, 2, 16, 16)],
    ids=["4d", "2d", "2d-long", "3d", "4x4-fused-sums", "16x16-fused-sums-direct-reduction"],
)  # the shapes cover both Functions and every branch of the CPU reduction strategy in lp_function.py
def test_lp_fast_path_matches_the_autograd_reference(p, shape):
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.double)
    function = _LpNorm1OrInfFlat if len(shape) == 2 else _LpNorm1OrInf
    # momentum 1: the running buffers become this batch's mean and statistic
    mean, stat = torch.zeros(shape[1], dtype=torch.double), torch.zeros(shape[1], dtype=torch.double)
    y = function.apply(x, w, b, mean, stat, 1.0, p, 1e-5)
    y_ref, mean_ref, stat_ref = lp_normalize_reference(x, w, b, p, 1e-5)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(stat, stat_ref)
    for fast, ref in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        torch.testing.assert_close(fast, ref)


@pytest.mark.parametrize("p", [1, "inf"])
@pytest.mark.parametrize("shape", [(5, 2, 2), (6, 3)], ids=["3d", "2d"])
def test_lp_fast_path_derivatives_by_finite_differences(p, shape):
    """First and second order (create_graph, as Hessian-vector products need) on a tiny input."""
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    function = _LpNorm1OrInfFlat if len(shape) == 2 else _LpNorm1OrInf
    fn = lambda x, w, b: function.apply(x, w, b, None, None, 0.0, p, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_lp_reference_definition_by_hand():
    x = torch.tensor([[1.0], [2.0], [6.0]])  # one channel; mean 3, centred (-2, -1, 3)
    c = torch.tensor([[-2.0], [-1.0], [3.0]])
    for p, d in [(1, 2.0), (2, (14 / 3) ** 0.5), ("inf", 3.0)]:
        y, _, _ = lp_normalize_reference(x, None, None, p, 0.0)
        torch.testing.assert_close(y, c / d)


@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_running_estimates_and_eval(p):
    lp = create_norm("lp", 3, p=p, momentum=1.0)
    x = torch.randn(16, 3, 4, 4) * 2 + 5
    y_train = lp(x)
    c = x - x.mean((0, 2, 3), keepdim=True)
    stat = c.abs().mean((0, 2, 3)) if p == 1 else c.abs().amax((0, 2, 3))
    torch.testing.assert_close(lp.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(lp.running_stat, stat)
    assert lp.num_batches_tracked.item() == 1
    lp.eval()  # momentum 1: the running estimates are this batch's, so eval reproduces training
    torch.testing.assert_close(lp(x), y_train, rtol=1e-5, atol=1e-5)


def test_lp_double_backward_and_torch_func_match_the_reference():
    lp = create_norm("lp", 3, p=1)
    x = torch.randn(8, 3, 2, 2, requires_grad=True)
    v = torch.randn_like(x)

    def hvp(fn):  # Hessian-vector product of sum(fn(x)^3) in direction v, by double backward
        (grad,) = torch.autograd.grad(fn(x).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(grad, x, v)[0]

    reference = lambda t: lp_normalize_reference(t, lp.weight, lp.bias, 1, lp.eps)[0]  # noqa: E731
    torch.testing.assert_close(hvp(lp), hvp(reference))
    # torch.func runs the reference path; buffers are inputs, as BatchNorm needs in train mode.
    params, buffers = dict(lp.named_parameters()), {k: v.clone() for k, v in lp.named_buffers()}
    loss = lambda prm, buf, t: torch.func.functional_call(lp, (prm, buf), (t,)).pow(3).sum()  # noqa: E731
    func_grads = torch.func.grad(loss)(params, buffers, x.detach())
    autograd_grads = torch.autograd.grad(reference(x).pow(3).sum(), list(params.values()))
    for a, b in zip(func_grads.values(), autograd_grads):
        torch.testing.assert_close(a, b)
    # The running mean moved as in any training forward, as BatchNorm's does under torch.func.
    expected = lp.running_mean.lerp(x.detach().mean((0, 2, 3)), lp.momentum)
    torch.testing.assert_close(buffers["running_mean"], expected)


@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_network_trains_identically_on_the_fast_path_and_the_reference(p, monkeypatch):
    """A few SGD steps of a small VGG (float64): the fast path changes nothing but speed."""
    import lightning_bn.norm.lp as lp_module
    from lightning_bn import VGG

    x, y = torch.randn(8, 3, 32, 32, dtype=torch.double), torch.randint(0, 10, (8,))
    losses = {}
    for path in ("fast", "reference"):
        monkeypatch.setattr(lp_module, "_plain_autograd", lambda t, fast=path == "fast": fast)
        torch.manual_seed(0)
        model = VGG(width=1 / 16, norm="lp", norm_kwargs={"p": p}).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[path] = []
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[path].append(loss.item())
        losses[path].append(model.classifier.weight.detach().clone())
    for fast, reference in zip(losses["fast"], losses["reference"]):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)


def test_lp_refuses_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        create_norm("lp", 3, p=1)(torch.randn(1, 3))
    with pytest.raises(ConfigError, match="data.batch_size=1 cannot train a model with norm 'lp'"):
        create_norm("lp", 3, p=1).check_batch_size(1)


# -- ghost batch --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_ghost_with_virtual_size_equal_to_batch_is_batchnorm(shape):
    ghost, bn = create_norm("ghost_batch", 6, virtual_batch_size=8), BatchNorm(6)
    for _ in range(3):
        x = (torch.randn(*shape) * 2 - 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ghost(x), bn(x_ref)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn(*shape)
        y.backward(g), y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    ghost.eval(), bn.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ghost(x), bn(x))


def test_ghost_normalizes_each_virtual_batch_on_its_own():
    ghost = create_norm("ghost_batch", 3, virtual_batch_size=4)
    with torch.no_grad():
        ghost.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        ghost.bias.copy_(torch.tensor([0.1, 0.0, -0.1]))
    x = torch.randn(12, 3, 2, 2) * torch.arange(1, 13).view(12, 1, 1, 1)  # virtual batches differ in scale
    refs = [copy.deepcopy(ghost) for _ in range(3)]
    y = ghost(x)
    bns = []
    for i, ref in enumerate(refs):  # brute force: one BatchNorm per virtual batch
        bn = BatchNorm(3)
        bn.load_state_dict({k: v for k, v in ref.state_dict().items()})
        torch.testing.assert_close(y[4 * i : 4 * i + 4], bn(x[4 * i : 4 * i + 4]))
        bns.append(bn)
    torch.testing.assert_close(ghost.running_mean, torch.stack([b.running_mean for b in bns]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([b.running_var for b in bns]).mean(0))


def test_ghost_batch_size_not_a_multiple_forms_a_smaller_virtual_batch():
    ghost = create_norm("ghost_batch", 3, virtual_batch_size=4)
    assert ghost(torch.randn(10, 3)).shape == (10, 3)  # virtual batches 4, 4, 2 (tests/test_ghost_remainder.py)
    with pytest.warns(UserWarning, match="data.batch_size=10 is not a multiple of norm 'ghost_batch'"):
        ghost.check_batch_size(10)
    ghost.check_batch_size(12)
    ghost.eval()
    assert ghost(torch.randn(10, 3)).shape == (10, 3)  # eval uses running statistics: any batch size


# -- noisy batch --------------------------------------------------------------------------------


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, y.dim())]
    return y.mean(dims), y.var(dims, unbiased=False).sqrt()


@pytest.mark.parametrize("shape", [(64, 16), (32, 16, 3, 3)], ids=["2d", "4d"])
def test_noisy_is_bn_shifted_and_scaled_per_unit(shape):
    noisy = create_norm("noisy_batch", 16, mean_range=0.5, scale_range=2.0)
    reference = BatchNorm(16)
    reference.load_state_dict(noisy.bn.state_dict())
    x = torch.randn(*shape) * 3 + 2
    y = noisy(x)
    view = [1, -1] + [1] * (len(shape) - 2)
    expected = reference(x) * noisy.noise_scale.view(view) + noisy.noise_shift.view(view)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(noisy.bn.running_mean, reference.running_mean)
    torch.testing.assert_close(noisy.bn.running_var, reference.running_var)
    assert noisy.bn.num_batches_tracked == reference.num_batches_tracked == 1
    assert (noisy.noise_shift.abs() <= 0.5).all() and (noisy.noise_shift.abs() > 0).all()
    assert (noisy.noise_scale >= 0.5).all() and (noisy.noise_scale <= 2.0).all()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 3, 3)], ids=["2d", "4d"])
def test_noisy_fused_backward_matches_autograd_through_bn_and_noise(shape, affine):
    """The one-node Function (noisy_function.py) against autograd through BN(x) * scale + shift:
    outputs, running statistics, gradients of x, gamma, beta, and double backward (float64)."""
    noisy = create_norm("noisy_batch", 5, affine=affine).double()
    reference = BatchNorm(5, affine=affine).double()
    if affine:
        with torch.no_grad():
            noisy.bn.weight.uniform_(0.5, 1.5), noisy.bn.bias.uniform_(-1, 1)
    reference.load_state_dict(noisy.bn.state_dict())
    x = (torch.randn(*shape, dtype=torch.double) * 2 + 1).requires_grad_()
    y = noisy(x)
    view = [1, -1] + [1] * (len(shape) - 2)
    expected = reference(x) * noisy.noise_scale.view(view) + noisy.noise_shift.view(view)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(noisy.bn.running_var, reference.running_var)
    params, ref_params = [x, *noisy.parameters()], [x, *reference.parameters()]
    g = torch.randn(*shape, dtype=torch.double)
    for fast, ref in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, ref_params, g)):
        torch.testing.assert_close(fast, ref)
    # second order, as Hessian-vector products need: replay the same noise in both
    noisy.replay_noise = True
    v = torch.randn_like(x)
    hvps = []
    for fn in (noisy, lambda t: reference(t) * noisy.noise_scale.view(view) + noisy.noise_shift.view(view)):
        (grad,) = torch.autograd.grad(fn(x).pow(3).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad(grad, [x, *noisy.parameters()] if fn is noisy else ref_params, v))
    for fast, ref in zip(*hvps):
        torch.testing.assert_close(fast, ref)


def test_noisy_layer_called_twice_in_one_step_backpropagates_both_draws():
    """Weight sharing: two training forwards (two realizations) before one backward."""
    noisy = create_norm("noisy_batch", 3).double()
    x1, x2 = (torch.randn(8, 3, dtype=torch.double, requires_grad=True) for _ in range(2))
    y1 = noisy(x1)
    noise1 = noisy.noise.clone()
    y2 = noisy(x2)
    noise2 = noisy.noise.clone()
    assert not torch.equal(noise1, noise2)
    g1, g2 = torch.randn_like(y1), torch.randn_like(y2)
    grads = torch.autograd.grad([y1, y2], [x1, x2, noisy.bn.weight], [g1, g2])
    bn = BatchNorm(3).double()
    bn.load_state_dict(noisy.bn.state_dict())

    def reference(x, noise):  # BN in train mode (batch statistics), then the given realization
        return bn(x) * noise[1] + noise[0]

    expected = torch.autograd.grad(
        [reference(x1, noise1), reference(x2, noise2)], [x1, x2, bn.weight], [g1, g2]
    )
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_noisy_under_torch_func_matches_autograd():
    noisy = create_norm("noisy_batch", 4)
    x = torch.randn(16, 4)
    noisy(x)  # draw a realization, then replay it in both computations
    noisy.replay_noise = True
    params = dict(noisy.named_parameters())
    buffers = {k: v.clone() for k, v in noisy.named_buffers()}
    loss = lambda prm, buf, t: torch.func.functional_call(noisy, (prm, buf), (t,)).pow(3).sum()  # noqa: E731
    func_grads = torch.func.grad(loss)(params, buffers, x)
    autograd_grads = torch.autograd.grad(noisy(x).pow(3).sum(), list(params.values()))
    for a, b in zip(func_grads.values(), autograd_grads):
        torch.testing.assert_close(a, b)


def test_noisy_unit_mean_and_std_change_at_every_training_step():
    noisy = create_norm("noisy_batch", 32)
    x = torch.randn(64, 32, 2, 2) * 3 + 2
    stats = [_channel_stats(noisy(x)) for _ in range(3)]  # the same input three times
    for (mean_a, std_a), (mean_b, std_b) in zip(stats[:-1], stats[1:]):
        assert (mean_a - mean_b).abs().min() > 0 and (std_a - std_b).abs().min() > 0
    mean, std = stats[-1]
    assert mean.abs().mean() > 0.1  # non-zero mean
    assert (std - 1).abs().mean() > 0.1  # non-unit variance
    assert noisy.num_draws == 3


def test_noisy_eval_is_the_wrapped_batchnorm():
    noisy = create_norm("noisy_batch", 5)
    for _ in range(3):
        noisy(torch.randn(16, 5) * 2 + 1)
    noisy.eval()
    plain = BatchNorm(5)
    plain.load_state_dict(noisy.bn.state_dict())
    plain.eval()
    x = torch.randn(16, 5)
    draws = noisy.num_draws
    torch.testing.assert_close(noisy(x), plain(x))
    assert noisy.num_draws == draws


def test_noisy_replay_reuses_the_last_realization_and_the_rng_stream():
    noisy = create_norm("noisy_batch", 8)
    with pytest.raises(RuntimeError, match="no noise drawn yet"):
        noisy.replay_noise = True
        noisy(torch.randn(4, 8))
    noisy.replay_noise = False
    x = torch.randn(16, 8, 3, 3)
    bn_state = copy.deepcopy(noisy.bn.state_dict())
    rng_before = torch.get_rng_state()
    y = noisy(x)
    noise, draws, rng_after = noisy.noise.clone(), noisy.num_draws, torch.get_rng_state()
    # A measurement restores the step's RNG and BN state, then replays: same output, same noise,
    # no new draw counted, and the RNG advanced exactly as in the step (later random layers agree).
    noisy.bn.load_state_dict(bn_state)
    torch.set_rng_state(rng_before)
    noisy.replay_noise = True
    torch.testing.assert_close(noisy(x), y, rtol=0, atol=0)
    assert torch.equal(noisy.noise, noise) and noisy.num_draws == draws
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert noisy(x[:5]).shape == (5, 8, 3, 3)  # any batch size: the noise is per channel
    assert torch.equal(noisy.noise, noise)
    noisy.replay_noise = False
    assert not torch.allclose(noisy(x), y)
    assert noisy.num_draws == draws + 1


def test_noisy_noise_comes_from_the_global_rng():
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        noisy = create_norm("noisy_batch", 4)
        noisy(torch.randn(8, 4))
        return noisy.noise.clone()

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_noisy_without_noise_is_batchnorm():
    noisy = create_norm("noisy_batch", 4, mean_range=0.0, scale_range=1.0)
    plain = BatchNorm(4)
    x = torch.randn(8, 4)
    torch.testing.assert_close(noisy(x), plain(x))


def test_noisy_generic_path_matches_the_fused_path():
    """After conversion (e.g. to SyncBatchNorm) the noise is applied after ``bn``: same numbers."""
    fused = create_norm("noisy_batch", 6)
    generic = copy.deepcopy(fused)
    generic.bn = nn.BatchNorm2d(6)  # not our BatchNorm class: takes the generic path
    generic.bn.load_state_dict(fused.bn.state_dict())
    x = torch.randn(8, 6, 3, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = fused(x)
    generic.noise.copy_(fused.noise)
    generic.replay_noise, generic.num_draws = True, 1
    y2 = generic(x2)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(fused.bn.weight.grad, generic.bn.weight.grad)
    torch.testing.assert_close(fused.bn.bias.grad, generic.bn.bias.grad)


def test_sync_batchnorm_converts_only_real_batchnorms():
    model = nn.Sequential(
        create_norm("batch", 4), create_norm("noisy_batch", 4), make("ghost_batch", 4), create_norm("lp", 4, p=1)
    )
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], nn.SyncBatchNorm)
    assert type(converted[1]).__name__ == "NoisyBatchNorm" and isinstance(converted[1].bn, nn.SyncBatchNorm)
    assert type(converted[2]).__name__ == "GhostBatchNorm" and type(converted[3]).__name__ == "LpNorm"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm runs only on GPU")
def test_noisy_after_sync_conversion_matches_on_gpu():
    """Without a process group SyncBatchNorm computes plain BatchNorm: the converted layer must agree."""
    noisy = create_norm("noisy_batch", 6).cuda()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(noisy))
    x = torch.randn(8, 6, 3, 3, device="cuda")
    y = noisy(x)
    converted.noise.copy_(noisy.noise)
    converted.replay_noise, converted.num_draws = True, 1
    torch.testing.assert_close(converted(x), y)


# -- group / layer ------------------------------------------------------------------------------


def test_group_norm_default_groups_and_torch_equivalence():
    assert create_norm("group", 64).num_groups == 32
    assert create_norm("group", 8).num_groups == 4  # narrow layers: >= 2 channels per group
    assert create_norm("group", 48).num_groups == 24
    assert create_norm("group", 7).num_groups == 1
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(create_norm("group", 8, num_groups=2)(x), nn.GroupNorm(2, 8)(x))


def test_layer_norm_normalizes_each_sample_over_all_its_features():
    x = torch.randn(4, 6) * 3 + 1
    torch.testing.assert_close(create_norm("layer", 6)(x), nn.LayerNorm(6)(x))
    x = torch.randn(4, 6, 3, 3) * 3 + 1
    torch.testing.assert_close(create_norm("layer", 6)(x), nn.functional.layer_norm(x, (6, 3, 3)))
