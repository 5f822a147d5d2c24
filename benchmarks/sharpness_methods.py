"""Keskar sharpness: our torch maximizer vs SciPy's L-BFGS-B (the paper's), same model and data.

Trains a small VGG on the embedded CIFAR-10 subset twice (small and large batch), then
computes phi(eps) in the full space and in a random 100-d subspace with both maximizers,
on the same fixed sample, and prints the values (higher = better estimate of the max) and
times, with the ratios torch / L-BFGS-B. The default maximizer must reach >= 0.99x.

    python benchmarks/sharpness_methods.py            # ~3-6 min on 2 CPU cores
    python benchmarks/sharpness_methods.py --width 0.25 --steps 400 --samples 2048
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from callbacks.hvp import flatten, unflatten
from callbacks.keskar_math import RandomSubspace, keskar_sharpness
from lightning_bn import VGG
from lightning_bn.data.base import CIFAR10_MEAN, CIFAR10_STD, normalize_uint8
from lightning_bn.data.embedded import load_embedded_cifar10


def train(width: float, batch_size: int, steps: int, lr: float, data: tuple[torch.Tensor, torch.Tensor]) -> VGG:
    torch.manual_seed(0)
    model = VGG(width=width, norm="batch", lr=lr, weight_decay=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    images, labels = data
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,))
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def objective(model: VGG, sample: list[tuple[torch.Tensor, torch.Tensor]]):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    like = [p.detach() for n, p in model.named_parameters() if p.requires_grad]

    def value_and_grad(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        w = w.detach().requires_grad_()
        params = dict(zip(names, unflatten(w, like)))
        total, grad = 0.0, torch.zeros_like(w)
        for x, y in sample:
            loss = F.cross_entropy(functional_call(model, params, (x,)), y) / len(sample)
            grad += torch.autograd.grad(loss, w)[0]
            total += float(loss.detach())
        return total, grad

    return flatten(like).clone(), value_and_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--samples", type=int, default=1024, help="size of the fixed sample f is computed on")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1e-3, 5e-4])
    parser.add_argument("--subspace-dim", type=int, default=100)
    parser.add_argument("--max-iter", type=int, default=10)
    args = parser.parse_args()

    raw = load_embedded_cifar10()["train"]
    images, labels = normalize_uint8(raw[0], CIFAR10_MEAN, CIFAR10_STD), raw[1]
    sample = list(zip(images[: args.samples].split(256), labels[: args.samples].split(256)))
    print(
        f"{'model':<14}{'space':<8}{'eps':>8}{'phi torch':>12}{'phi lbfgsb':>12}{'ratio':>8}"
        f"{'at bound t/l':>14}{'evals t/l':>11}{'s torch':>9}{'s lbfgsb':>10}{'time ratio':>11}"
    )
    ratios, time_ratios = [], []
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        model = train(args.width, batch_size, args.steps, 0.05, (images, labels))
        x, value_and_grad = objective(model, sample)
        label = f"batch {batch_size}"
        print(
            f"# {label}: {x.numel()} parameters, trained in {time.perf_counter() - start:.0f} s, "
            f"f(x) = {value_and_grad(x)[0]:.4f}"
        )
        subspace = RandomSubspace(x.numel(), args.subspace_dim, seed=0)
        for space, sub in (("full", None), (f"sub{args.subspace_dim}", subspace)):
            for eps in args.epsilons:
                ours = keskar_sharpness(value_and_grad, x, eps, sub, "torch", args.max_iter)
                ref = keskar_sharpness(value_and_grad, x, eps, sub, "lbfgsb", args.max_iter)
                ratio = ours.phi / ref.phi if ref.phi > 0 else float("nan")
                time_ratio = ours.seconds / ref.seconds
                ratios.append(ratio)
                time_ratios.append(time_ratio)
                print(
                    f"{label:<14}{space:<8}{eps:>8g}{ours.phi:>12.4f}{ref.phi:>12.4f}{ratio:>8.3f}"
                    f"{ours.at_bound:>7.2f}/{ref.at_bound:<6.2f}{ours.evaluations:>5}/{ref.evaluations:<5}"
                    f"{ours.seconds:>9.2f}{ref.seconds:>10.2f}{time_ratio:>11.2f}"
                )
    print(f"phi ratio torch / L-BFGS-B: min {min(ratios):.4f}, max {max(ratios):.4f} (target >= 0.99)")
    print(f"time ratio torch / L-BFGS-B: min {min(time_ratios):.2f}, max {max(time_ratios):.2f}")


if __name__ == "__main__":
    main()
