"""2-D loss surface: lightning_bn.surface vs the PyPI package ``loss-landscapes``, side by side.

Same model, same filter-normalized directions (ours, handed to loss-landscapes'
``planar_interpolation`` as the corners W - d1 - d2, W + d1 - d2, W - d1 + d2), same sample
in one batch, the same grid points: loss-landscapes' own (it walks the plane by in-place
steps, and its even columns are offset by one step along d2, so the points are taken from
where it actually evaluated). Prints the largest relative difference (goal: <= 1e-5) and
the time ratio ours / loss-landscapes (goal: <= 0.5), best of ``--repeats``.

BN modes: ``running`` (eval mode, the checkpoint's statistics: what loss-landscapes does by
itself) and ``recompute`` (statistics re-estimated at each point; loss-landscapes given a
Metric that does it with the same function, since it has no such option).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/surface_vs_loss_landscapes.py [--steps 12] [--repeats 3] [--threads 1] [--only VGG]

On a shared machine pass ``--threads 1``: both tools then run on one core each turn.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn import MLP, VGG
from lightning_bn.interpolate import recompute_running_stats
from lightning_bn.surface import evaluate_points, random_directions


def corners(model: nn.Module, d1, d2) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Copies of ``model`` at W - d1 - d2, W + d1 - d2 and W - d1 + d2."""
    out = []
    for s1, s2 in ((-1, -1), (1, -1), (-1, 1)):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.add_(s1 * d1[name] + s2 * d2[name])
        out.append(m)
    return tuple(out)


def loss_landscapes_points(steps: int) -> torch.Tensor:
    """The (a, b) of loss-landscapes' result [i][j] (steps x steps): a = -1 + 2 i / steps, and
    b = -1 + 2 (j + 1) / steps in even columns i, -1 + 2 j / steps in odd ones (its walk)."""
    rows = []
    for i in range(steps):
        for j in range(steps):
            rows.append((-1 + 2 * i / steps, -1 + 2 * (j + (i % 2 == 0)) / steps))
    return torch.tensor(rows, dtype=torch.float64)


class RecomputingLoss:
    """A loss-landscapes Metric: recompute BN statistics on ``stats`` (as ours), then the loss."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor) -> None:
        self.x, self.y, self.stats = x, y, stats

    def __call__(self, wrapper) -> float:
        model = wrapper.modules[0]
        recompute_running_stats(model, [(self.stats, None)], torch.device("cpu"))
        model.eval()
        return F.cross_entropy(model(self.x), self.y).item()


def run_case(name: str, model: nn.Module, x, y, stats, bn: str, steps: int, repeats: int) -> None:
    from loss_landscapes import planar_interpolation
    from loss_landscapes.metrics import Loss

    model.eval()
    d1, d2 = random_directions(model, seed=0)
    coords = loss_landscapes_points(steps)
    theirs_time, ours_time = float("inf"), float("inf")
    for _ in range(repeats):  # alternate, best of each: the machine may be shared
        start_m, end_one, end_two = corners(model, d1, d2)
        metric = Loss(F.cross_entropy, x, y) if bn == "running" else RecomputingLoss(x, y, stats)
        t = time.perf_counter()
        theirs = planar_interpolation(start_m, end_one, end_two, metric, steps=steps)
        theirs_time = min(theirs_time, time.perf_counter() - t)
        t = time.perf_counter()
        ours = evaluate_points(model, d1, d2, coords, [(x, y)], [(stats, None)] if bn == "recompute" else None)
        ours_time = min(ours_time, time.perf_counter() - t)
    theirs_flat = torch.as_tensor(theirs, dtype=torch.float64).reshape(-1)
    rel = float(((ours[:, 0] - theirs_flat).abs() / theirs_flat.abs()).max())
    print(
        f"{name:<26} bn={bn:<9} {steps * steps:4d} points  max rel diff {rel:.1e} "
        f"({'ok' if rel <= 1e-5 else 'ABOVE 1e-5'})  ours {ours_time:6.2f} s  loss-landscapes {theirs_time:6.2f} s  "
        f"ratio {ours_time / theirs_time:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="loss-landscapes steps per axis (steps^2 points)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared machine")
    parser.add_argument("--only", help="run only the cases whose name contains this, e.g. VGG")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2 * args.samples, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (args.samples,), generator=g)
    flat = torch.randn(2 * args.samples, 784, generator=g)
    torch.manual_seed(0)
    cases = [
        ("MLP 784-32-32-10, BN", MLP(norm="batch"), flat[: args.samples], flat[args.samples :]),
        ("MLP 784-32-32-10, none", MLP(norm="none"), flat[: args.samples], flat[args.samples :]),
        (
            "VGG-11 x0.125, BN",
            VGG(width=0.125, norm="batch", num_classes=10),
            images[: args.samples],
            images[args.samples :],
        ),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, sample {args.samples}, best of {args.repeats}"
    )
    for name, model, x, stats in cases:
        if args.only and args.only not in name:
            continue
        for bn in ("running", "recompute"):
            if bn == "recompute" and "none" in name:
                continue
            run_case(name, model, x, labels, stats, bn, args.steps, args.repeats)


if __name__ == "__main__":
    main()
