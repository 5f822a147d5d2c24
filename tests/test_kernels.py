"""The compiled CPU kernels (lightning_bn/norm/csrc, loaded by lightning_bn.norm.kernels).

Each op is checked against the plain-autograd definition (values, running estimates, first and
second derivatives) and against the Python path it replaces; the noisy op must be bit-identical
to the Python path (same random numbers, same arithmetic). The build itself is required wherever
a C++ compiler exists: a silent fallback would leave these paths untested.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import lightning_bn.norm.kernels as kernels
from lightning_bn import MLP
from lightning_bn.errors import ConfigError
from lightning_bn.norm import create_norm
from lightning_bn.norm.lp import lp_normalize_reference

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernels"
)


LP_NODE = "torch::autograd::CppNode<lightning_bn::(anonymous namespace)::LpNorm>"


@pytest.fixture
def python_path(monkeypatch):
    """Run the norms as if the kernels were not built."""
    monkeypatch.setattr(kernels, "_loaded", False)


@needs_compiler
def test_the_kernels_build_on_a_machine_with_a_compiler():
    assert kernels.available(), "the C++ kernels did not build; run with LIGHTNING_BN_KERNELS=require to see why"
    assert hasattr(torch.ops.lightning_bn, "lp_norm") and hasattr(torch.ops.lightning_bn, "noisy_batch_norm")


def _lp_inputs(shape, dtype, affine):
    x = (torch.randn(*shape, dtype=dtype) * 2 + 1).requires_grad_()
    w = torch.empty(shape[1], dtype=dtype).uniform_(0.5, 1.5).requires_grad_() if affine else None
    b = torch.randn(shape[1], dtype=dtype).requires_grad_() if affine else None
    return x, w, b


@needs_compiler
@pytest.mark.parametrize("p", [1, "inf"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "shape", [(2, 3), (7, 3), (300, 5), (128, 32), (40, 600), (2, 3, 1), (5, 3, 7), (6, 4, 3, 3), (4, 3, 16, 16)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lp_op_matches_the_definition(p, affine, shape, dtype):
    """Values, running estimates and gradients of x, gamma, beta against lp_normalize_reference:
    (N, C) activations from 2 rows (the least training allows) to 300 and from 3 channels to 600,
    feature maps with runs shorter and longer than the kernel's 8 accumulators."""
    assert kernels.available()
    x, w, b = _lp_inputs(shape, dtype, affine)
    mean, stat = torch.full((shape[1],), 0.5, dtype=dtype), torch.full((shape[1],), 2.0, dtype=dtype)
    y = torch.ops.lightning_bn.lp_norm(x, w, b, mean, stat, 0.25, p == "inf", 1e-5)
    y_ref, mean_ref, stat_ref = lp_normalize_reference(x, w, b, p, 1e-5)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(mean, 0.75 * 0.5 + 0.25 * mean_ref.detach(), **tol)
    torch.testing.assert_close(stat, 0.75 * 2.0 + 0.25 * stat_ref.detach(), **tol)
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs, g)):
        torch.testing.assert_close(got, want, **tol)


@needs_compiler
@pytest.mark.parametrize("p", [1, "inf"])
@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 3, 3)], ids=["2d", "4d"])
def test_lp_op_first_and_second_derivatives_by_finite_differences(p, shape):
    assert kernels.available()
    x, w, b = _lp_inputs(shape, torch.float64, True)
    fn = lambda x, w, b: torch.ops.lightning_bn.lp_norm(x, w, b, None, None, 0.0, p == "inf", 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    no_affine = lambda x: torch.ops.lightning_bn.lp_norm(x, None, None, None, None, 0.0, p == "inf", 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(no_affine, (x,))
    assert torch.autograd.gradgradcheck(no_affine, (x,))


@needs_compiler
def test_lp_op_inf_backpropagates_through_the_first_extreme_row_by_hand():
    """One channel, x = (0, 1, 5): mean 2, c = (-2, -1, 3), d = max|c| = 3 at row 2 (eps 0).
    With g = (1, 0, 0): S = sum(g c / d) = -2/3, dx = (1/d)(g - mean(g) - S (u - mean(u))), u = (0, 0, 1)."""
    assert kernels.available()
    x = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64, requires_grad=True)
    y = torch.ops.lightning_bn.lp_norm(x, None, None, None, None, 0.0, True, 0.0)
    torch.testing.assert_close(y, torch.tensor([[-2.0], [-1.0], [3.0]], dtype=torch.float64) / 3)
    (dx,) = torch.autograd.grad(y, x, torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64))
    s, u = -2 / 3, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    expected = (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) - 1 / 3 - s * (u - 1 / 3)) / 3
    torch.testing.assert_close(dx.view(-1), expected)


@needs_compiler
def test_lp_op_takes_non_contiguous_input_and_gradient():
    assert kernels.available()
    base = torch.randn(5, 9, dtype=torch.float64)
    x = base.t().requires_grad_()  # (9, 5), not contiguous
    w, b = torch.ones(5, dtype=torch.float64, requires_grad=True), torch.zeros(5, dtype=torch.float64)
    y = torch.ops.lightning_bn.lp_norm(x, w, b, None, None, 0.0, False, 1e-5)
    g = torch.randn(5, 9, dtype=torch.float64).t()
    y_ref = lp_normalize_reference(x, w, b, 1, 1e-5)[0]
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(y_ref, (x, w), g)):
        torch.testing.assert_close(got, want)


def _assert_same_layer_results(x, compiled_run, python_run):
    """Two lp layers (the op, the Python Function) that ran on x: same outputs, gradients of x and
    of the parameters, running estimates and batch counts."""
    (y, compiled), (y_py, python) = compiled_run, python_run
    torch.testing.assert_close(y, y_py)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *compiled.parameters()], g)
    for got, want in zip(grads, torch.autograd.grad(y_py, [x, *python.parameters()], g)):
        torch.testing.assert_close(got, want)
    for name in ("running_mean", "running_stat", "num_batches_tracked"):
        torch.testing.assert_close(getattr(compiled, name), getattr(python, name))


@needs_compiler
@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_layer_on_1d_activations_uses_the_op_and_equals_the_python_path(p, monkeypatch):
    """The layer dispatches (N, C) CPU float inputs to the op; the Python Function gives the same
    values, gradients and running estimates; above LP_FLAT_MAX_ROWS rows the layer falls back."""
    assert kernels.available()
    compiled = create_norm("lp", 4, p=p).double()
    python = copy.deepcopy(compiled)
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    assert y.grad_fn.name() == LP_NODE
    monkeypatch.setattr(kernels, "_loaded", False)
    y_py = python(x)
    assert "LpNorm1OrInfFlat" in y_py.grad_fn.name()
    _assert_same_layer_results(x, (y, compiled), (y_py, python))
    monkeypatch.setattr(kernels, "_loaded", True)
    monkeypatch.setattr(kernels, "LP_FLAT_MAX_ROWS", 8)
    assert "LpNorm1OrInfFlat" in compiled(x).grad_fn.name()


@needs_compiler
@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_layer_on_feature_maps_uses_the_op_where_it_is_faster(p, monkeypatch):
    """p = 1 on maps of LP_MAPS_MIN_SPATIAL positions or more: the op, with the Python Function's
    values, gradients and running estimates; smaller maps and p = inf: the Python Function."""
    assert kernels.available()
    compiled = create_norm("lp", 3, p=p).double()
    python = copy.deepcopy(compiled)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    assert (y.grad_fn.name() == LP_NODE) == (p == 1)
    assert "LpNorm1OrInfBackward" in compiled(x[:, :, :4, :4]).grad_fn.name()
    monkeypatch.setattr(kernels, "_loaded", False)
    y_py = python(x)
    python(x[:, :, :4, :4])
    _assert_same_layer_results(x, (y, compiled), (y_py, python))


@needs_compiler
@pytest.mark.parametrize("norm, kwargs", [("lp", {"p": 1}), ("lp", {"p": "inf"}), ("noisy_batch", {})])
def test_mlp_trains_identically_with_and_without_the_kernels(norm, kwargs, monkeypatch):
    """Five SGD steps of the 784-32-32-10 MLP in float64: the kernels change nothing but speed."""
    assert kernels.available()
    x, y = torch.randn(32, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (32,))
    runs = {}
    for loaded in (True, False):
        monkeypatch.setattr(kernels, "_loaded", loaded)
        torch.manual_seed(0)
        model = MLP(norm=norm, norm_kwargs=kwargs).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        runs[loaded] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()])
    tol = {"rtol": 0, "atol": 0} if norm == "noisy_batch" else {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(runs[True][0], runs[False][0], **tol)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, **tol)


def _noisy_step(layer, x, g, seed):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    return y, grads, torch.get_rng_state()


@needs_compiler
@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 3, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_op_is_bit_identical_to_the_python_path(shape, affine, momentum, dtype, monkeypatch):
    """Same random numbers, outputs, gradients, noise buffer, counters and running statistics
    (momentum None: BatchNorm's cumulative average), for a new draw and for a replay."""
    assert kernels.available()
    compiled = create_norm("noisy_batch", 5, affine=affine, momentum=momentum).to(dtype)
    if affine:
        with torch.no_grad():
            compiled.bn.weight.uniform_(0.5, 1.5), compiled.bn.bias.uniform_(-1, 1)
    python = copy.deepcopy(compiled)
    x, g = torch.randn(*shape, dtype=dtype) * 2 + 1, torch.randn(*shape, dtype=dtype)
    for seed, replay in enumerate((False, False, True)):
        compiled.replay_noise = python.replay_noise = replay
        monkeypatch.setattr(kernels, "_loaded", True)
        y, grads, rng = _noisy_step(compiled, x, g, seed)
        assert y.grad_fn.name() == "torch::autograd::CppNode<lightning_bn::(anonymous namespace)::NoisyBatchNorm>"
        monkeypatch.setattr(kernels, "_loaded", False)
        y_py, grads_py, rng_py = _noisy_step(python, x, g, seed)
        assert y_py.grad_fn.name() == "_NoisyBatchNormBackward"
        exact = {"rtol": 0, "atol": 0}
        torch.testing.assert_close(y, y_py, **exact)
        for got, want in zip(grads, grads_py):
            torch.testing.assert_close(got, want, **exact)
        assert torch.equal(rng, rng_py)
        assert torch.equal(compiled.noise, python.noise) and compiled.num_draws == python.num_draws
        for name, buffer in compiled.bn.named_buffers():
            assert torch.equal(buffer, python.bn.get_buffer(name)), name


@needs_compiler
def test_noisy_op_second_derivatives_by_finite_differences():
    assert kernels.available()
    layer = create_norm("noisy_batch", 3).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    layer(x)  # draw a realization, then replay it
    layer.replay_noise = True
    w, b = layer.bn.weight, layer.bn.bias

    def fn(x, w, b):
        buffers = layer._buffers
        noise = (buffers["noise"], buffers["noise_low"], buffers["noise_span"], True)
        return torch.ops.lightning_bn.noisy_batch_norm(x, w, b, *noise, None, None, None, 0.1, 1e-5)

    inputs = (x.requires_grad_(), w, b)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@needs_compiler
@pytest.mark.parametrize("op", ["lp", "noisy"])
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (True, False, True)])
def test_double_backward_when_only_some_inputs_need_a_gradient(op, wants):
    """Hessian-vector products with respect to activations alone (frozen affine parameters) or to
    the parameters of a norm that sees data directly: the double-backward path asks autograd only
    for the inputs that need a gradient (it used to ask for all three, and autograd refused)."""
    assert kernels.available()
    torch.manual_seed(0)
    x, w, b = (t.detach().requires_grad_(want) for t, want in zip(_lp_inputs((6, 3), torch.float64, True), wants))
    if op == "lp":
        fn = lambda x, w, b: torch.ops.lightning_bn.lp_norm(x, w, b, None, None, 0.0, False, 1e-5)  # noqa: E731
    else:
        layer = create_norm("noisy_batch", 3).double()
        layer(x.detach())  # draw a realization, then replay it
        noise = (layer.noise, layer.noise_low, layer.noise_span, True)
        fn = lambda x, w, b: torch.ops.lightning_bn.noisy_batch_norm(x, w, b, *noise, None, None, None, 0.1, 1e-5)  # noqa: E731
    needed = [t for t in (x, w, b) if t.requires_grad]

    def of_needed(*args):
        it = iter(args)
        return fn(*(next(it) if t.requires_grad else t for t in (x, w, b)))

    g = torch.randn(6, 3, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(of_needed, tuple(needed))
    (first,) = torch.autograd.grad((fn(x, w, b) * g).sum(), needed[:1], create_graph=True)
    # the double backward's graph exists where the gradient depends on the inputs (y is linear
    # in gamma and beta: with x fixed the second derivative is zero)
    assert first.requires_grad or not x.requires_grad
    if op == "lp" and x.requires_grad:  # and equals the plain definition's
        ref = lp_normalize_reference(x, w, b, 1, 1e-5)[0]
        (ref_first,) = torch.autograd.grad((ref * g).sum(), needed[:1], create_graph=True)
        v = torch.randn_like(first)
        got = torch.autograd.grad(first, needed, v, allow_unused=True)
        want = torch.autograd.grad(ref_first, needed, v, allow_unused=True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@needs_compiler
@pytest.mark.parametrize("norm, kwargs", [("lp", {"p": 1}), ("noisy_batch", {})])
def test_layers_run_under_no_grad_and_inference_mode(norm, kwargs):
    assert kernels.available()
    layer = create_norm(norm, 4, **kwargs)
    x = torch.randn(8, 4)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        y_inference = layer(x)
    assert y.shape == y_inference.shape == (8, 4) and y_inference.is_inference()
    assert layer.num_batches_tracked.item() == 2 if norm == "lp" else layer.bn.num_batches_tracked.item() == 2


@needs_compiler
def test_the_ops_refuse_non_cpu_tensors_with_an_error_not_a_crash():
    assert kernels.available()
    for shape in [(4, 3), (4, 3, 2, 2)]:
        with pytest.raises(RuntimeError, match="CPU kernel got a tensor on meta"):
            torch.ops.lightning_bn.lp_norm(torch.zeros(shape, device="meta"), None, None, None, None, 0.1, False, 1e-5)


def test_kernels_are_used_only_for_cpu_float_tensors_outside_compile():
    assert not kernels.usable(torch.zeros(2, 2, device="meta"))
    assert not kernels.usable(torch.zeros(2, 2, dtype=torch.float16))
    assert not kernels.usable(torch.zeros(2, 2, dtype=torch.bfloat16))


def test_python_path_runs_without_the_kernels(python_path):
    for norm, kwargs in [("lp", {"p": 1}), ("lp", {"p": "inf"}), ("noisy_batch", {})]:
        y = create_norm(norm, 3, **kwargs)(torch.randn(8, 3, requires_grad=True))
        assert "CppNode" not in y.grad_fn.name() and "lightning_bn" not in y.grad_fn.name()


def test_off_mode_never_builds(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "off")
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("built although off"))
    assert not kernels.available()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken() -> None:
        raise RuntimeError("Error building extension:\nlp_flat_op.cpp:3:1: error: something\nninja: build stopped")

    monkeypatch.setenv(kernels.ENV, "auto")
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_build", broken)
    with pytest.warns(RuntimeWarning, match=r"could not build the CPU kernels .*error: something.*Python path"):
        assert not kernels.available()
    assert not kernels.available()  # decided once: no second attempt, no second warning
    y = create_norm("lp", 3, p=1)(torch.randn(8, 3))
    assert y.shape == (8, 3)


def test_require_mode_raises_on_a_failed_build(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "require")
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_build", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    match = "building the CPU kernels failed .*LIGHTNING_BN_KERNELS=require.*no compiler"
    with pytest.raises(RuntimeError, match=match):
        kernels.available()


def test_a_bad_mode_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "fast")
    match = "LIGHTNING_BN_KERNELS='fast' is not allowed; choose one of: auto, off, require"
    with pytest.raises(ConfigError, match=match):
        kernels.mode()


def test_build_directory_is_per_torch_and_python_version(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    directory = kernels.build_directory(str(tmp_path))
    assert directory.parent == tmp_path and directory.name.startswith(kernels.NAME)
    assert f"torch{torch.__version__}" in directory.name
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "elsewhere"))
    assert kernels.build_directory(str(tmp_path)).parent == tmp_path / "elsewhere"


@needs_compiler
@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_op_float32_sums_stay_accurate_over_many_rows(p):
    """100,000 rows far from zero: per-channel sums in float32 blocks added up in double keep the
    batch mean and statistic (and so the output) at float32 accuracy."""
    assert kernels.available()
    x = torch.randn(100_000, 3, dtype=torch.float64) * 0.5 + 1000
    mean, stat = torch.zeros(3), torch.zeros(3)
    y = torch.ops.lightning_bn.lp_norm(x.float(), None, None, mean, stat, 1.0, p == "inf", 1e-5)
    y_ref, mean_ref, stat_ref = lp_normalize_reference(x, None, None, p, 1e-5)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(stat.double(), stat_ref, rtol=2e-3, atol=0)  # c = x - mean: 1000 * 2^-24 absolute
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=2e-3)


@needs_compiler
@pytest.mark.parametrize("p", [1, "inf"])
def test_lp_op_splits_channels_across_threads(p):
    """4 x 20,000 exceeds one task's channels (32,768 values / 4 rows): with two threads the
    channels run in several chunks, each of which must see every row."""
    assert kernels.available()
    torch.set_num_threads(2)  # the autouse fixture sets one thread again for the next test
    x, w, b = _lp_inputs((4, 20_000), torch.float64, True)
    y = torch.ops.lightning_bn.lp_norm(x, w, b, None, None, 0.0, p == "inf", 1e-5)
    y_ref = lp_normalize_reference(x, w, b, p, 1e-5)[0]
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        torch.testing.assert_close(got, want)
