"""2-D loss surfaces (Li et al., 2018): directions, grid evaluation, BN re-estimation, rank split.

References are brute force: parameters W + a d1 + b d2 written into a copy of the model,
running statistics averaged by hand from forward hooks, torch's own eval forward.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.interpolate import evaluate
from lightning_bn.surface import (
    evaluate_points,
    filter_normalize,
    fixed_sample,
    grid_coordinates,
    loss_surface,
    random_directions,
)
from lightning_bn.surface.distributed import evaluate_split, share
from tests.test_surface_helpers import GaussianClasses, SurfaceImages, tiny_mlp, tiny_vgg


def moved(model: nn.Module, d1, d2, a: float, b: float) -> nn.Module:
    """A copy of ``model`` at W + a d1 + b d2 (buffers as the model's)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(p + a * d1[name] + b * d2[name])
    return out


@torch.no_grad()
def set_statistics_by_hand(model: nn.Module, batches) -> None:
    """Each BN's running mean / variance := the mean over ``batches`` of its batch mean and
    unbiased batch variance, seen by hooks on train-mode forwards (which use batch statistics)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen = {m: [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach())) for m in bns]
    model.train()
    for x, _ in batches:
        model(x)
    for h in hooks:
        h.remove()
    for m in bns:
        dims = [0] + list(range(2, seen[m][0].dim()))
        means = torch.stack([t.mean(dims) for t in seen[m]])
        variances = torch.stack([t.var(dims, unbiased=True) for t in seen[m]])
        m.running_mean.copy_(means.mean(0))
        m.running_var.copy_(variances.mean(0))
    model.eval()


def test_filter_normalization_is_exact():
    model = tiny_vgg()
    with torch.no_grad():  # biases and BN affine parameters of different sizes
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-1.0, 1.0)
    d1, d2 = random_directions(model, seed=3)
    params = dict(model.named_parameters())
    assert set(d1) == set(params) and not torch.equal(d1[next(iter(d1))], d2[next(iter(d2))])
    for name, w in params.items():
        if w.dim() <= 1:  # biases and BN affine: not moved by default
            assert torch.count_nonzero(d1[name]) == 0 and torch.count_nonzero(d2[name]) == 0
            continue
        for d in (d1, d2):
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-6, atol=0)
    with_bn, _ = random_directions(model, seed=3, include_bn_and_bias=True)
    for name, w in params.items():
        if w.dim() == 1:  # one filter per vector, not one per element (loss-landscapes does both)
            torch.testing.assert_close(with_bn[name].norm(), w.detach().norm(), rtol=1e-6, atol=0)
            if w.detach().abs().std() > 0:
                assert not torch.allclose(with_bn[name].abs(), w.detach().abs())
    assert torch.equal(random_directions(model, seed=3)[0][name], d1[name])  # seeded


def test_filter_normalize_by_hand():
    d = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    w = torch.tensor([[0.0, 10.0], [0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(filter_normalize(d, w), torch.tensor([[6.0, 8.0], [0.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("make, data, method", [(tiny_vgg, SurfaceImages, "loop"), (tiny_mlp, GaussianClasses, "vmap")])
def test_grid_points_by_hand_with_recomputed_statistics(make, data, method):
    model, dm = make(), data(batch_size=16)
    surface = loss_surface(
        model,
        dm,
        resolution=(3, 2),
        span=(-0.5, 1.0, -1.0, 0.25),
        num_samples=40,
        bn_samples=24,
        test_samples=20,
        method=method,
    )
    assert surface.a == pytest.approx([-0.5, 0.25, 1.0]) and surface.b == pytest.approx([-1.0, 0.25])
    assert surface.samples == {"train": 40, "bn": 24, "test": 20}
    dm.setup("fit")
    train = fixed_sample(dm.train_dataloader(), 40, 0)
    stats = fixed_sample(dm.train_dataloader(), 24, 1)
    test = fixed_sample(dm.test_dataloader(), 20, 0)
    assert sum(len(y) for _, y in train) == 40 and not torch.equal(train[0][0], stats[0][0])
    for i, j in [(0, 0), (2, 1), (1, 0)]:
        point = moved(model, surface.d1, surface.d2, surface.a[i], surface.b[j])
        set_statistics_by_hand(point, stats)
        loss, acc = evaluate(point, train, torch.device("cpu"))
        test_loss, test_acc = evaluate(point, test, torch.device("cpu"))
        got = [float(surface.values[c][i, j]) for c in ("train_loss", "train_acc", "test_loss", "test_acc")]
        assert got == pytest.approx([loss, acc, test_loss, test_acc], rel=1e-5, abs=1e-6)


def test_running_statistics_mode_keeps_the_checkpoints():
    model, dm = tiny_mlp(), GaussianClasses()
    surface = loss_surface(model, dm, resolution=3, num_samples=32, bn="running")
    assert "running statistics" in surface.bn_label() and surface.samples["bn"] == 0
    dm.setup("fit")
    train = fixed_sample(dm.train_dataloader(), 32, 0)
    for i, j in [(1, 1), (0, 2)]:
        loss, acc = evaluate(moved(model, surface.d1, surface.d2, surface.a[i], surface.b[j]), train, "cpu")
        assert float(surface.values["train_loss"][i, j]) == pytest.approx(loss, rel=1e-5)
        assert float(surface.values["train_acc"][i, j]) == pytest.approx(acc)
    assert model[1].running_mean.abs().sum() > 0  # the model itself was not touched (still eval, same stats)


@pytest.mark.parametrize("bn_batches", [True, False])
def test_vmap_and_loop_agree_for_any_chunk_size(bn_batches):
    model = tiny_vgg(1)
    dm = SurfaceImages(batch_size=8)
    dm.setup("fit")
    train = fixed_sample(dm.train_dataloader(), 16, 0)
    stats = fixed_sample(dm.train_dataloader(), 16, 1) if bn_batches else None
    d1, d2 = random_directions(model, seed=1)
    coords = grid_coordinates([-1.0, 0.0, 0.5], [0.2, 1.0])
    loop = evaluate_points(model, d1, d2, coords, train, stats, method="loop")
    for chunk in (1, 4, 16):
        batched = evaluate_points(model, d1, d2, coords, train, stats, method="vmap", chunk_size=chunk)
        torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)


def test_no_normalization_needs_no_statistics_pass():
    model = tiny_vgg(norm="none")
    surface = loss_surface(model, SurfaceImages(batch_size=16), resolution=2, num_samples=16)
    assert surface.samples["bn"] == 0 and surface.bn_label() == "no running statistics in the model"
    assert "train-mode" not in surface.cost()


class FakeRank:
    """A rank of a 2-process strategy, run one after the other: rank 1 stores its share, rank 0's
    all_gather stacks both (what a real all_gather returns on every rank)."""

    world_size = 2
    store: dict[int, torch.Tensor] = {}

    def __init__(self, rank: int) -> None:
        self.global_rank = rank

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.store[self.global_rank] = tensor
        return torch.stack([self.store.get(0, tensor), self.store.get(1, tensor)])


@pytest.mark.parametrize("total", [1, 5, 6])
def test_grid_split_over_ranks_covers_every_point_once(total):
    shares = [share(total, 2, r) for r in range(2)]
    assert sum((list(range(total))[s] for s in shares), []) == list(range(total))
    coords = grid_coordinates(torch.arange(total).tolist(), [0.0])

    def evaluate(points):  # a stand-in for the network: the coordinates themselves
        return points.clone()

    FakeRank.store.clear()
    evaluate_split(evaluate, coords, 2, FakeRank(1))
    torch.testing.assert_close(evaluate_split(evaluate, coords, 2, FakeRank(0)), coords)


def test_invalid_arguments_are_refused_with_one_line():
    model, dm = tiny_mlp(), GaussianClasses()
    cases = [
        (dict(bn="batch"), "bn must be 'recompute' or 'running'"),
        (dict(resolution=1), "resolution must be an integer >= 2"),
        (dict(span=(1.0, -1.0, -1.0, 1.0)), "a_min < a_max"),
        (dict(span=(0.0, 1.0)), "span must be 4 finite numbers"),
        (dict(num_samples=0), "num_samples must be an integer >= 1"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(method="fast"), "method must be"),
        (dict(directions=({}, {})), "d1: parameter names differ"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            loss_surface(model, dm, **kwargs)
        assert "\n" not in str(err.value)
    assert math.isfinite(float(loss_surface(model, dm, resolution=2, num_samples=8).values["train_loss"][0, 0]))


@pytest.mark.parametrize("budget", [2**26, 0])
def test_loop_with_the_input_layer_from_three_products_is_brute_force(budget, monkeypatch):
    """A 256-wide input layer behind nn.Flatten (a view of the batch): its output is computed
    from 3 products per batch (or, over the memory budget, directly); biases move too."""
    from lightning_bn.surface import evaluate as surface_evaluate

    monkeypatch.setattr(surface_evaluate.FirstLayerCache.__init__, "__defaults__", (budget,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(2)
    train = [(torch.randn(12, 4, 64, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(2)]
    stats = [(torch.randn(10, 4, 64, generator=g), None)]
    d1, d2 = random_directions(model, seed=3, include_bn_and_bias=True)
    assert d1["1.bias"].abs().sum() > 0
    coords = grid_coordinates([-1.0, 0.5], [0.25, 1.0])
    made = []
    real_init = surface_evaluate.FirstLayerCache.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(surface_evaluate.FirstLayerCache, "__init__", spy)
    got = evaluate_points(model, d1, d2, coords, train, stats, method="loop")
    assert len([k for k, v in made[0].parts.items() if v is not None]) == (3 if budget else 0)  # 2 train + 1 BN batch
    for k, (a, b) in enumerate(coords.tolist()):
        point = moved(model, d1, d2, a, b)
        set_statistics_by_hand(point, stats)
        assert got[k].tolist() == pytest.approx(list(evaluate(point, train, torch.device("cpu"))), rel=1e-5, abs=1e-6)
