"""2-D loss surfaces L(W + a d1 + b d2) and optimization trajectories (Li et al., NeurIPS 2018).

Random mode: d1, d2 filter-normalized Gaussian directions (:mod:`.directions`), (a, b) on a
grid over [-1, 1]^2 (25 x 25 by default). Trajectory mode: d1, d2 the top-2 PCA directions of
the checkpoints of one run around the final one (:mod:`.trajectory`), the grid covering the
path. Loss and accuracy on a fixed, seeded sample of training data (and optionally test data).

BN statistics (``bn``): ``"recompute"`` (default) re-estimates every running statistic at every
grid point on a fixed sample of training data (the statistics the network at that point would
have); ``"running"`` keeps the checkpoint's, which belong to W only.

Cost per call: P grid points x (one eval forward over the train (+ test) sample + with
``recompute`` one train-mode forward over the BN sample); no backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_bn.errors import ConfigError, format_value
from lightning_bn.interpolate import _limited, check_compatible, running_stat_modules
from lightning_bn.surface.directions import Direction, check_direction, random_directions, varied_names
from lightning_bn.surface.distributed import evaluate_split
from lightning_bn.surface.evaluate import Method, evaluate_points, grid_coordinates
from lightning_bn.surface.trajectory import pca_plane

BNStats = Literal["recompute", "running"]
DEFAULT_SAMPLES = 1024


@dataclass
class Surface:
    """A computed surface: the grid, the values, the directions and how they were obtained.

    ``values[name]`` is a (len(a), len(b)) float64 tensor for every column of ``columns``;
    ``path`` the (n, 2) trajectory coordinates (trajectory mode) or None.
    """

    a: list[float]
    b: list[float]
    values: dict[str, Tensor]
    d1: Direction
    d2: Direction
    bn: BNStats
    mode: Literal["random", "trajectory"]
    samples: dict[str, int]
    explained_variance: tuple[float, float] | None = None
    path: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.values)

    def rows(self) -> list[dict[str, float]]:
        """One dict per grid point (a-major), keys ``a``, ``b`` and :attr:`columns`."""
        out = []
        for i, a in enumerate(self.a):
            for j, b in enumerate(self.b):
                out.append({"a": a, "b": b, **{c: float(v[i, j]) for c, v in self.values.items()}})
        return out

    def bn_label(self) -> str:
        """What every figure says about the normalization statistics it used."""
        if self.bn == "running":
            return "BN statistics: the checkpoint's running statistics"
        if self.samples.get("bn", 0) == 0:
            return "no running statistics in the model"
        return f"BN statistics: recomputed at each point on {self.samples['bn']} training samples"

    def cost(self) -> str:
        """The work done, in sample-forwards (no backward)."""
        points = len(self.a) * len(self.b)
        per_point = self.samples["train"] + self.samples.get("test", 0)
        text = f"{points} grid points x ({per_point} eval"
        if self.bn == "recompute" and self.samples.get("bn", 0):
            text += f" + {self.samples['bn']} train-mode"
        return text + ") sample-forwards, no backward"


def fixed_sample(loader: Iterable[Any], num_samples: int | None, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``num_samples`` samples (all: None) of a pass over ``loader`` seeded by ``seed``
    (the same ones at every call), as its batches; the last one cut to size."""
    batches = []
    count = 0
    for x, y in _limited(loader, None, seed) if num_samples is None else _first(loader, num_samples, seed):
        if num_samples is not None and count + len(y) > num_samples:
            x, y = x[: num_samples - count], y[: num_samples - count]
        batches.append((x, y))
        count += len(y)
        if num_samples is not None and count >= num_samples:
            break
    if not batches:
        raise ConfigError("the data loader yielded no batch")
    return batches


def _first(loader: Iterable[Any], num_samples: int, seed: int) -> list[Any]:
    # the loader's batch size is unknown before its first batch: take batches until enough
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out, count = [], 0
        for batch in loader:
            out.append(batch)
            count += len(batch[1])
            if count >= num_samples:
                break
    return out


def _check(name: str, value: int | None, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {format_value(value)}")


def _resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    rows, cols = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    _check("resolution", rows, 2, optional=False)
    _check("resolution", cols, 2, optional=False)
    return rows, cols


def _axis(low: float, high: float, count: int) -> list[float]:
    """linspace(low, high, count), with the centre of a symmetric span exactly 0 (not 5.6e-17)."""
    values = torch.linspace(low, high, count, dtype=torch.float64).tolist()
    return [0.0 if abs(v) < 1e-12 * (high - low) else v for v in values]


def _check_span(span: Sequence[float]) -> tuple[float, float, float, float]:
    if len(span) != 4 or not all(math.isfinite(float(v)) for v in span):
        raise ConfigError(f"span must be 4 finite numbers (a_min, a_max, b_min, b_max), got {format_value(span)}")
    a0, a1, b0, b1 = (float(v) for v in span)
    if not (a0 < a1 and b0 < b1):
        raise ConfigError(f"span must have a_min < a_max and b_min < b_max, got {format_value(tuple(span))}")
    return a0, a1, b0, b1


def _samples(datamodule: pl.LightningDataModule, num_samples, bn_samples, test_samples, bn, seed, needs_bn):
    datamodule.setup("fit")
    train = fixed_sample(datamodule.train_dataloader(), num_samples, seed)
    stats = None
    if bn == "recompute" and needs_bn:  # seed + 1: other batches than the evaluation's, as interpolate
        stats = fixed_sample(datamodule.train_dataloader(), bn_samples or num_samples, seed + 1)
    test = None
    if test_samples != 0:
        datamodule.setup("test")
        test = fixed_sample(datamodule.test_dataloader(), test_samples, seed)
    return train, stats, test


def _surface(
    model,
    d1,
    d2,
    a,
    b,
    datamodule,
    *,
    num_samples,
    bn,
    bn_samples,
    test_samples,
    seed,
    method,
    chunk_size,
    device,
    strategy,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    if bn not in ("recompute", "running"):
        raise ConfigError(f"bn must be 'recompute' or 'running', got {format_value(bn)}")
    _check("num_samples", num_samples, 1)
    _check("bn_samples", bn_samples, 1)
    _check("test_samples", test_samples, 0)
    _check("chunk_size", chunk_size, 1)
    if method not in ("auto", "vmap", "loop"):
        raise ConfigError(f"method must be 'auto', 'vmap' or 'loop', got {format_value(method)}")
    needs_bn = bool(running_stat_modules(model))
    train, stats, test = _samples(datamodule, num_samples, bn_samples, test_samples, bn, seed, needs_bn)
    coords = grid_coordinates(a, b)
    columns = ["train_loss", "train_acc"] + (["test_loss", "test_acc"] if test is not None else [])

    def run(points: Tensor) -> Tensor:
        return evaluate_points(
            model, d1, d2, points, train, stats, test, method=method, chunk_size=chunk_size, device=device, seed=seed
        )

    table = evaluate_split(run, coords, len(columns), strategy)
    values = {c: table[:, k].reshape(len(a), len(b)) for k, c in enumerate(columns)}
    samples = {"train": sum(len(y) for _, y in train), "bn": sum(len(y) for _, y in stats or [])}
    if test is not None:
        samples["test"] = sum(len(y) for _, y in test)
    return values, samples


def loss_surface(
    model: nn.Module,
    datamodule: pl.LightningDataModule,
    *,
    resolution: int | tuple[int, int] = 25,
    span: Sequence[float] = (-1.0, 1.0, -1.0, 1.0),
    directions: tuple[Direction, Direction] | None = None,
    include_bn_and_bias: bool = False,
    bn: BNStats = "recompute",
    num_samples: int | None = DEFAULT_SAMPLES,
    bn_samples: int | None = None,
    test_samples: int | None = 0,
    seed: int = 0,
    method: Method = "auto",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    strategy: Any = None,
) -> Surface:
    """Loss and accuracy of ``model`` over the plane W + a d1 + b d2 (Li et al., 2018).

    Args:
        model: the network at W (not modified); its ``loss_fn`` if it has one, else cross-entropy.
        datamodule: ``train_dataloader()`` (and ``test_dataloader()``) yielding ``(input, target)``.
        resolution: grid points per axis (or (along a, along b)); default 25 x 25.
        span: (a_min, a_max, b_min, b_max); default [-1, 1]^2.
        directions: (d1, d2) as dicts shaped like ``named_parameters()``; default filter-normalized
            random ones drawn from ``seed`` (:func:`~lightning_bn.surface.directions.random_directions`).
        include_bn_and_bias: give biases and norm affine parameters a random direction too.
        bn: ``"recompute"`` statistics at every point (default) or the checkpoint's ``"running"`` ones.
        num_samples: training samples evaluated (the first of a pass seeded by ``seed``; None: all).
        bn_samples: training samples the statistics are recomputed on (default: ``num_samples``;
            other samples than the evaluated ones, from a pass seeded by ``seed + 1``).
        test_samples: also evaluate on this many test samples (0: no; None: all).
        method: ``auto``, ``vmap`` or ``loop`` (see :mod:`.evaluate`).
        chunk_size: points per vmap call (None: as many as 64 MB of stacked parameters hold).
        device: where to evaluate.
        strategy: a Lightning strategy (``trainer.strategy``) or Fabric: the grid is split over its
            ranks and all-gathered, so every rank returns the whole surface.
    """
    rows, cols = _resolution(resolution)
    a0, a1, b0, b1 = _check_span(span)
    if directions is None:
        directions = random_directions(model, seed, include_bn_and_bias)
    d1, d2 = directions
    check_direction(model, d1, "d1")
    check_direction(model, d2, "d2")
    a, b = _axis(a0, a1, rows), _axis(b0, b1, cols)
    options = dict(bn=bn, bn_samples=bn_samples, test_samples=test_samples, seed=seed, method=method)
    options.update(chunk_size=chunk_size, device=device, strategy=strategy)
    values, samples = _surface(model, d1, d2, a, b, datamodule, num_samples=num_samples, **options)
    meta = {"seed": seed, "include_bn_and_bias": include_bn_and_bias, "normalization": "filter"}
    return Surface(a, b, values, d1, d2, bn, "random", samples, meta=meta)


def trajectory_surface(
    models: Sequence[nn.Module],
    datamodule: pl.LightningDataModule,
    *,
    resolution: int | tuple[int, int] = 25,
    margin: float = 0.2,
    include_bn_and_bias: bool = False,
    bn: BNStats = "recompute",
    num_samples: int | None = DEFAULT_SAMPLES,
    bn_samples: int | None = None,
    test_samples: int | None = 0,
    seed: int = 0,
    method: Method = "auto",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    strategy: Any = None,
) -> Surface:
    """The surface of the PCA plane of a run's checkpoints around the last one, with the path.

    ``models`` are the checkpoints in training order (the last is W_final, the plane's origin).
    The grid covers the path's coordinates plus ``margin`` x their range on each side. The
    directions are unit vectors: a and b are distances in parameter space. Other arguments
    as :func:`loss_surface`.
    """
    if len(models) < 3:
        raise ConfigError(f"a trajectory needs at least 3 checkpoints, got {len(models)}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a number >= 0, got {format_value(margin)}")
    final = models[-1]
    for k, other in enumerate(models[:-1]):
        check_compatible(other, final, (f"checkpoint {k}", "the final checkpoint"))
    names = varied_names(final, include_bn_and_bias)
    plane = pca_plane([dict(m.named_parameters()) for m in models], names)
    low, high = plane.path.min(0).values, plane.path.max(0).values
    pad = margin * (high - low)
    span = (float(low[0] - pad[0]), float(high[0] + pad[0]), float(low[1] - pad[1]), float(high[1] + pad[1]))
    surface = loss_surface(
        final,
        datamodule,
        resolution=resolution,
        span=span,
        directions=(plane.d1, plane.d2),
        include_bn_and_bias=include_bn_and_bias,
        bn=bn,
        num_samples=num_samples,
        bn_samples=bn_samples,
        test_samples=test_samples,
        seed=seed,
        method=method,
        chunk_size=chunk_size,
        device=device,
        strategy=strategy,
    )
    surface.mode, surface.path, surface.explained_variance = "trajectory", plane.path, plane.explained_variance
    surface.meta = {"seed": seed, "include_bn_and_bias": include_bn_and_bias, "checkpoints": len(models)}
    return surface
