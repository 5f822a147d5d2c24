"""Loss/gradient along the gradient (callbacks.landscape_math) against closed forms and brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from callbacks import landscape_math
from callbacks.landscape_math import (
    DEFAULT_LR_MULTIPLIERS,
    SUMMARY_KEYS,
    AlongGradient,
    evaluate_along_gradient,
    step_size_grid,
    summarize,
)

METHODS = [("loop", None), ("batched", None), ("batched", 3)]


def test_default_grid_is_the_papers_at_lr_0_1():
    assert DEFAULT_LR_MULTIPLIERS == tuple(0.5 * (i + 1) for i in range(8))
    grid = step_size_grid(0.1)
    assert len(grid) == 8
    assert grid[0] == pytest.approx(0.05) and grid[-1] == pytest.approx(0.4)
    assert step_size_grid(0.1, step_sizes=[0.3, 1]) == (0.3, 1.0)
    assert step_size_grid(2.0, lr_multipliers=[1, 3]) == (2.0, 6.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.1, "step_sizes": []}, "step_sizes"),
        ({"lr": 0.1, "step_sizes": [0.1, -1.0]}, "step_sizes"),
        ({"lr": 0.1, "lr_multipliers": [float("nan")]}, "lr_multipliers"),
        ({"lr": 0.1, "lr_multipliers": "1,2"}, "lr_multipliers"),
        ({"lr": None}, "lr"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_grid_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        step_size_grid(**kwargs)


# -- quadratic: L(x) = 0.5 x^T H x, g = H x, grad L(x - eta g) - g = -eta H g ----------------------


def _quadratic(n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    h = a @ a.T / n + torch.diag(torch.linspace(-1.0, 3.0, n, dtype=torch.float64))  # symmetric, indefinite
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return h, x


@pytest.mark.parametrize(("method", "chunk"), METHODS)
def test_quadratic_closed_form(method, chunk):
    h, x = _quadratic()
    g = h @ x
    etas = step_size_grid(0.1)
    out = evaluate_along_gradient(
        lambda p, b: 0.5 * p["x"] @ h @ p["x"], {"x": x}, {"x": g}, etas, method=method, chunk_size=chunk
    )
    eta = torch.tensor(etas, dtype=torch.float64)
    loss0 = 0.5 * x @ h @ x
    expected_loss = loss0 - eta * (g @ g) + 0.5 * eta**2 * (g @ h @ g)
    torch.testing.assert_close(out.losses, expected_loss, rtol=1e-12, atol=1e-12)
    hg = torch.linalg.vector_norm(h @ g)
    torch.testing.assert_close(out.grad_diff_norms, eta * hg, rtol=1e-12, atol=1e-12)
    stats = summarize(out)
    assert set(stats) == set(SUMMARY_KEYS)
    assert stats["beta_smoothness"] == pytest.approx(float(hg / torch.linalg.vector_norm(g)), rel=1e-12)
    assert stats["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(g)), rel=1e-12)
    assert stats["loss_min"] == pytest.approx(float(expected_loss.min()), rel=1e-12)
    assert stats["loss_max"] == pytest.approx(float(expected_loss.max()), rel=1e-12)
    assert stats["grad_diff_min"] == pytest.approx(etas[0] * float(hg), rel=1e-12)
    assert stats["grad_diff_max"] == pytest.approx(etas[-1] * float(hg), rel=1e-12)


# -- tiny MLP with BatchNorm (train mode) and dropout: brute force on deep copies --------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 3), nn.BatchNorm1d(3)
    ).train()


def _batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)


def _gradient(model, x, y, rng):
    model = copy.deepcopy(model)
    torch.set_rng_state(rng)
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _brute_force(model, x, y, g, etas, rng):
    losses, diffs = [], []
    for eta in etas:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p -= eta * g[n]
        torch.set_rng_state(rng)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        diff = torch.cat([(p.grad - g[n]).flatten() for n, p in m.named_parameters()])
        losses.append(loss.item())
        diffs.append(diff.norm().item())
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(diffs, dtype=torch.float64)


@pytest.mark.parametrize(("method", "chunk"), METHODS)
def test_mlp_matches_brute_force_on_copies(method, chunk):
    model, (x, y) = _mlp(), _batch()
    rng = torch.get_rng_state()
    g = _gradient(model, x, y, rng)
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    before = copy.deepcopy(model.state_dict())
    etas = step_size_grid(0.5)

    def loss_fn(p, b):
        return nn.functional.cross_entropy(functional_call(model, {**p, **b}, (x,)), y)

    out = evaluate_along_gradient(
        loss_fn, params, g, etas, buffers, method=method, chunk_size=chunk, before_each=lambda: torch.set_rng_state(rng)
    )
    losses, diffs = _brute_force(model, x, y, g, etas, rng)
    torch.testing.assert_close(out.losses, losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.grad_diff_norms, diffs, rtol=1e-4, atol=1e-6)
    ratios = diffs / (torch.tensor(etas, dtype=torch.float64) * out.grad_norm)
    assert summarize(out)["beta_smoothness"] == pytest.approx(float(ratios.max()), rel=1e-4)
    for name, value in model.state_dict().items():  # parameters and running statistics untouched
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("rows_bytes", [landscape_math.ROWS_BYTES, 0])
def test_reduce_gives_the_global_batch_values(rows_bytes, monkeypatch):
    """Two simulated data-parallel ranks with a mean loss: the mean over ranks is the full-batch
    value, with every eta's gradients kept (one collective) or one eta at a time (rows_bytes=0)."""
    monkeypatch.setattr(landscape_math, "ROWS_BYTES", rows_bytes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = _batch()
    params = dict(model.named_parameters())
    g = _gradient(model, x, y, torch.get_rng_state())
    etas = (0.1, 0.7, 1.5)

    def loss_on(rows):
        return lambda p, b: nn.functional.cross_entropy(functional_call(model, p, (x[rows],)), y[rows])

    full = evaluate_along_gradient(loss_on(slice(None)), params, g, etas)
    for method in ("loop", "batched"):
        sent = []

        def record(t, sent=sent):
            sent.append(t.clone())
            return t

        evaluate_along_gradient(loss_on(slice(6, None)), params, g, etas, method=method, reduce=record)
        other = iter(sent)
        rank0 = evaluate_along_gradient(
            loss_on(slice(0, 6)), params, g, etas, method=method, reduce=lambda t, other=other: (t + next(other)) / 2
        )
        torch.testing.assert_close(rank0.losses, full.losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank0.grad_diff_norms, full.grad_diff_norms, rtol=1e-4, atol=1e-6)
        # one collective per measurement (loop, gradients kept for all etas), per eta (loop,
        # one at a time) or per vmap call (batched)
        assert len(sent) == (len(etas) if method == "loop" and rows_bytes == 0 else 1)


@pytest.mark.parametrize(("method", "chunk"), METHODS)
def test_cost_is_len_grid_forward_backward_passes(method, chunk):
    """FLOPs of one measurement = len(grid) x FLOPs of one training forward+backward."""
    model, (x, y) = _mlp(), _batch()
    model[3].p = 0.0  # dropout's mask generation is not a FLOP, but keep the count clean
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(copy.deepcopy(model)(x), y).backward()
    one_pass = counter.get_total_flops()
    g = _gradient(model, x, y, torch.get_rng_state())
    etas = step_size_grid(0.1)

    def loss_fn(p, b):
        return nn.functional.cross_entropy(functional_call(model, {**p, **b}, (x,)), y)

    buffers = dict(model.named_buffers())
    with FlopCounterMode(display=False) as counter:
        evaluate_along_gradient(
            loss_fn, dict(model.named_parameters()), g, etas, buffers, method=method, chunk_size=chunk
        )
    assert one_pass > 0
    assert counter.get_total_flops() == len(etas) * one_pass


def test_zero_gradient_gives_nan_beta_and_diverged_eta_shows():
    zero = AlongGradient(
        step_sizes=torch.tensor([0.1, 0.2], dtype=torch.float64),
        losses=torch.tensor([1.0, 1.0], dtype=torch.float64),
        grad_diff_norms=torch.zeros(2, dtype=torch.float64),
        grad_norm=torch.tensor(0.0, dtype=torch.float64),
    )
    assert math.isnan(summarize(zero)["beta_smoothness"])
    diverged = AlongGradient(
        step_sizes=torch.tensor([0.1, 0.2], dtype=torch.float64),
        losses=torch.tensor([1.0, float("nan")], dtype=torch.float64),
        grad_diff_norms=torch.tensor([0.5, float("inf")], dtype=torch.float64),
        grad_norm=torch.tensor(2.0, dtype=torch.float64),
    )
    stats = summarize(diverged)
    assert math.isnan(stats["loss_max"]) and math.isnan(stats["loss_min"])
    assert math.isinf(stats["grad_diff_max"]) and math.isinf(stats["beta_smoothness"])
    assert stats["grad_diff_min"] == 0.5


def test_argument_checks():
    p = {"x": torch.zeros(2)}
    with pytest.raises(ValueError, match="method"):
        evaluate_along_gradient(lambda p, b: p["x"].sum(), p, p, [0.1], method="vmap")
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_along_gradient(lambda p, b: p["x"].sum(), p, p, [0.1], method="batched", chunk_size=0)
    with pytest.raises(ValueError, match="same names"):
        evaluate_along_gradient(lambda p, b: p["x"].sum(), p, {"y": torch.zeros(2)}, [0.1])


class _Awkward(nn.Module):
    """Parameters the packed loop must handle: channels_last, tied, unused, empty, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
        self.a, self.b, self.c = nn.Linear(4 * 25, 7), nn.Linear(7, 7), nn.Linear(7, 7)
        self.c.weight = self.b.weight
        self.unused = nn.Parameter(torch.randn(3))
        self.empty = nn.Parameter(torch.zeros(0))
        self.d = nn.Linear(7, 3).double()

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.d(self.c(torch.tanh(self.b(self.a(h)))).double())


@pytest.mark.parametrize("rows_bytes", [landscape_math.ROWS_BYTES, 0])
def test_loop_is_the_per_tensor_computation(rows_bytes, monkeypatch):
    """The loop moves all parameters with one add into reused buffers: the same bits as one
    fresh torch.add(W_t, g_t, alpha=-eta) per tensor (losses exactly; norms sum in another order),
    whether it keeps every eta's gradients in rows or handles one eta at a time."""
    monkeypatch.setattr(landscape_math, "ROWS_BYTES", rows_bytes)
    torch.manual_seed(0)
    model, x, y = _Awkward(), torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
    named = dict(model.named_parameters())

    def loss_fn(p, b):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    grads = torch.autograd.grad(loss_fn(named, {}), list(named.values()), allow_unused=True)
    g = {n: torch.zeros_like(p) if gr is None else gr for (n, p), gr in zip(named.items(), grads)}
    etas = (0.01, 0.1, 0.5)
    out = evaluate_along_gradient(loss_fn, named, g, etas)
    losses, diffs = [], []
    for eta in etas:
        moved = {n: torch.add(p.detach(), g[n], alpha=-eta).requires_grad_(True) for n, p in named.items()}
        at = torch.autograd.grad(loss := loss_fn(moved, {}), list(moved.values()), allow_unused=True)
        squares = [
            ((gr if gr is not None else torch.zeros_like(m)) - g[n]).double().pow(2).sum()
            for (n, m), gr in zip(moved.items(), at)
        ]
        losses.append(loss.detach().double())
        diffs.append(torch.sqrt(sum(squares)))
    assert torch.equal(out.losses, torch.stack(losses))
    torch.testing.assert_close(out.grad_diff_norms, torch.stack(diffs), rtol=1e-12, atol=0)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) and model.c.weight is model.b.weight


def test_one_leaf_per_buffer_gives_the_padded_concatenation_of_the_gradients():
    """The loop differentiates with respect to one leaf per buffer, through views made once:
    at every eta (written through the alias, the same eta twice included) the views hold
    W_t - eta g_t bit for bit, and the gradient is the padded concatenation of the views'
    gradients, zeros for the padding and for a view the loss does not reach."""
    from callbacks.landscape_math import _MovedParams

    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 3)]  # 15, 7 and 12 floats: padded to 16 each (64 bytes)
    p = {f"p{i}": torch.randn(s) for i, s in enumerate(shapes)}
    g = {n: torch.randn_like(t) for n, t in p.items()}
    moved = _MovedParams(p, g, rows=2)
    (packed,) = moved._buffers
    assert moved.inputs == [packed.w] and packed.w.numel() == 48
    for row, eta in enumerate((0.1, 0.7, 0.7)):
        row %= 2
        moved.move_to(eta)
        views = list(moved.params.values())
        for view, n in zip(views, p):
            assert torch.equal(view.detach(), torch.add(p[n], g[n], alpha=-eta)) and view.shape == p[n].shape
        with torch.enable_grad():
            loss = (views[0] ** 2).sum() + (3 * views[2]).sum()  # p1 is not reached
            grads = torch.autograd.grad(loss, moved.inputs, allow_unused=True)
        moved.store_grads(row, grads)
        expected = torch.cat(
            [2 * views[0].detach().reshape(-1), torch.zeros(1 + 16), torch.full((12,), 3.0), torch.zeros(4)]
        )
        assert torch.equal(packed.rows[row], expected)


def test_workspace_keeps_a_small_models_buffers_with_the_values_of_fresh_ones():
    """With a workspace the loop's buffers are made once and refilled with the next W_t and
    g_t: the values equal a fresh computation bit for bit; another layout gets new buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = _batch()

    def loss_fn(p, b):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    workspace: dict = {}
    etas = (0.1, 0.5, 2.0)
    kept = []
    for scale in (1.0, 3.0):  # two measurements at different W_t and g_t
        params = {n: t.detach() * scale for n, t in model.named_parameters()}
        g = {n: torch.randn_like(t) for n, t in params.items()}
        fresh = evaluate_along_gradient(loss_fn, params, g, etas)
        reused = evaluate_along_gradient(loss_fn, params, g, etas, workspace=workspace)
        assert torch.equal(reused.losses, fresh.losses)
        assert torch.equal(reused.grad_diff_norms, fresh.grad_diff_norms)
        kept.append(workspace["moved"])
    assert kept[0] is kept[1]
    fewer = {n: t.detach() for n, t in list(model.named_parameters())[:2]}
    other_g = {n: torch.randn_like(t) for n, t in fewer.items()}
    evaluate_along_gradient(loss_fn, fewer, other_g, etas, workspace=workspace)
    assert workspace["moved"] is not kept[0]


@pytest.mark.parametrize("rows_bytes", [landscape_math.ROWS_BYTES, 0])
def test_reduce_covers_the_tensors_outside_the_packed_buffers(rows_bytes, monkeypatch):
    """Two simulated ranks on a model with a channels_last weight (kept outside the packed
    buffers) and a float64 layer: the mean over ranks of every kept gradient row, the packed
    ones and the others, is the full-batch gradient."""
    monkeypatch.setattr(landscape_math, "ROWS_BYTES", rows_bytes)
    torch.manual_seed(0)
    model, x, y = _Awkward(), torch.randn(8, 3, 5, 5), torch.randint(0, 3, (8,))
    named = dict(model.named_parameters())

    def loss_on(rows):
        return lambda p, b: nn.functional.cross_entropy(functional_call(model, p, (x[rows],)), y[rows])

    grads = torch.autograd.grad(loss_on(slice(None))(named, {}), list(named.values()), allow_unused=True)
    g = {n: torch.zeros_like(p) if gr is None else gr for (n, p), gr in zip(named.items(), grads)}
    etas = (0.01, 0.1, 0.5)
    full = evaluate_along_gradient(loss_on(slice(None)), named, g, etas)
    sent = []
    evaluate_along_gradient(loss_on(slice(4, None)), named, g, etas, reduce=lambda t: sent.append(t.clone()) or t)
    other = iter(sent)
    rank0 = evaluate_along_gradient(loss_on(slice(0, 4)), named, g, etas, reduce=lambda t: (t + next(other)) / 2)
    torch.testing.assert_close(rank0.losses, full.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0.grad_diff_norms, full.grad_diff_norms, rtol=1e-4, atol=1e-6)
    assert len(sent) == (1 if rows_bytes else len(etas))


def _summary_in_torch(result: AlongGradient) -> list[float]:
    """The statistics as tensor operations (the definition the host computation must match)."""
    losses, diffs = result.losses.double(), result.grad_diff_norms.double()
    ratios = diffs / (result.step_sizes.double() * result.grad_norm.double())
    return [float(v) for v in (losses.min(), losses.max(), diffs.min(), diffs.max(), ratios.max(), result.grad_norm)]


@pytest.mark.parametrize(
    ("losses", "diffs", "g_norm"),
    [
        ([0.3, 0.1, 0.7], [0.2, 1e-300, 3.5], 0.7),  # an ordinary measurement
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 0.0),  # g = 0: 0 / 0 is nan
        ([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], 0.0),  # g = 0 with differences: inf
        ([1.0, float("nan"), 3.0], [0.5, float("nan"), 2.0], 1.3),  # a diverged eta propagates
        ([float("inf"), 2.0, 3.0], [float("inf"), 1.0, 2.0], 1.3),
    ],
)
def test_summarize_matches_tensor_formula_bit_for_bit(losses, diffs, g_norm):
    etas = torch.tensor([0.05, 0.1, 0.4], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    noise = 1 + 1e-3 * torch.rand(3, generator=gen, dtype=torch.float64)  # digits beyond the obvious
    result = AlongGradient(
        step_sizes=etas,
        losses=torch.tensor(losses, dtype=torch.float64) * noise,
        grad_diff_norms=torch.tensor(diffs, dtype=torch.float64) * noise,
        grad_norm=torch.tensor(g_norm, dtype=torch.float64),
    )
    got = list(summarize(result).values())
    want = _summary_in_torch(result)
    assert [math.isnan(v) for v in got] == [math.isnan(v) for v in want]
    assert [v for v in got if not math.isnan(v)] == [v for v in want if not math.isnan(v)]  # exact


def test_a_loss_that_changes_a_parameter_in_place_runs_with_a_leaf_per_tensor():
    """Views of a split refuse a parameter changed in place inside the loss (a clamp under
    no_grad, say): the loop then runs again with a leaf per tensor, and keeps doing so for
    this workspace; the values are those of fresh tensors at every eta."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = _batch()

    def loss_fn(p, b):
        with torch.no_grad():
            p["0.weight"].clamp_(-0.3, 0.3)
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    params = {n: t.detach().clone() for n, t in model.named_parameters()}
    g = {n: torch.randn_like(t) for n, t in params.items()}
    etas = (0.1, 0.5)
    losses, diffs = [], []
    for eta in etas:
        moved = {n: torch.add(params[n], g[n], alpha=-eta).requires_grad_(True) for n in params}
        loss = loss_fn(moved, {})
        at = torch.autograd.grad(loss, list(moved.values()))
        losses.append(loss.detach().double())
        diffs.append(torch.sqrt(sum(((a - g[n]).double() ** 2).sum() for a, n in zip(at, moved))))
    workspace: dict = {}
    for _ in range(2):  # the first call falls back, the second starts with a leaf per tensor
        out = evaluate_along_gradient(loss_fn, params, g, etas, workspace=workspace)
        assert torch.equal(out.losses, torch.stack(losses))
        torch.testing.assert_close(out.grad_diff_norms, torch.stack(diffs), rtol=1e-12, atol=0)
        assert workspace["per_tensor"] is True
    fresh = evaluate_along_gradient(loss_fn, params, g, etas)  # no workspace: the same fallback
    assert torch.equal(fresh.losses, out.losses) and torch.equal(fresh.grad_diff_norms, out.grad_diff_norms)


def test_a_leaf_per_tensor_stores_the_same_rows_as_one_leaf_per_buffer():
    from callbacks.landscape_math import _MovedParams

    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 3)]
    p = {f"p{i}": torch.randn(s) for i, s in enumerate(shapes)}
    g = {n: torch.randn_like(t) for n, t in p.items()}
    rows = []
    for flat in (True, False):
        moved = _MovedParams(p, g, rows=1, flat=flat)
        moved.move_to(0.3)
        views = list(moved.params.values())
        with torch.enable_grad():
            loss = (views[0] ** 2).sum() + (3 * views[2]).sum()  # p1 is not reached
            moved.store_grads(0, torch.autograd.grad(loss, moved.inputs, allow_unused=True))
        rows.append(moved._buffers[0].rows[0])
        assert len(moved.inputs) == (1 if flat else 3)
    assert torch.equal(rows[0], rows[1])
