"""Speed of every normalization relative to BatchNorm: forward + backward on the same input.

For each input shape, every norm layer runs forward and backward (gradients of the input
and of the layer's parameters, as in training) on the same tensor, the norms interleaved
round after round so machine load hits them alike; the best time of each is compared with
BatchNorm's. Times are this process's CPU time (``time.process_time``), which other
processes on a shared machine disturb far less than wall-clock time; use ``--threads 1``
there. Target: lp (p = 1, 2, inf) and noisy_batch within 1.5 x BatchNorm.

Shapes: the conv activations of VGG-11 at the given width and batch size (CIFAR, 32x32),
then small 1-d activations (MLP hidden layer, full-batch DLN), where fixed per-op overhead
of a few microseconds, not arithmetic, decides. Finally, whole models forward+backward with
each norm: VGG-11, the 784-32-32-10 MLP (batch 128) and the 25-layer DLN (full batch 1000).

    python benchmarks/norm_speed.py                       # width 0.5, batch 128
    python benchmarks/norm_speed.py --threads 1 --repeats 40   # on a busy shared machine
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_bn import MLP, VGG, DeepLinearNet
from lightning_bn.norm import create_norm

TARGET = 1.5
CHECKED = ("lp1", "lp2", "lpinf", "noisy_batch")
NORMS: dict[str, tuple[str, dict]] = {
    "batch": ("batch", {}),
    "lp1": ("lp", {"p": 1}),
    "lp2": ("lp", {"p": 2}),
    "lpinf": ("lp", {"p": "inf"}),
    "noisy_batch": ("noisy_batch", {}),
    "ghost_batch": ("ghost_batch", {"virtual_batch_size": 32}),
    "group": ("group", {}),
    "layer": ("layer", {}),
}


def vgg_shapes(width: float, batch: int) -> list[tuple[int, ...]]:
    """Distinct conv output shapes of VGG-11 on 32x32 inputs."""
    shapes, size = [], 32
    for item in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if item == "M":
            size //= 2
            continue
        shape = (batch, max(1, round(int(item) * width)), size, size)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def best_times(fns: dict[str, Callable[[], object]], repeats: int, calls: int = 1) -> dict[str, float]:
    """Best time per call of each function over ``repeats`` interleaved rounds of ``calls`` calls:
    blocks of calls for microsecond-scale functions, where one call's time jitters by tens of %."""
    for fn in fns.values():  # warm-up: allocator, thread pool, first-call dispatch
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            times[name].append((time.process_time() - start) / calls)
    return {name: min(values) for name, values in times.items()}


def layer_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    inputs = [x, *layer.parameters()]
    return lambda: torch.autograd.grad(layer(x), inputs, grad)


def bench_layers(shape: tuple[int, ...], repeats: int, calls: int = 1) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)
    fns = {}
    for label, (name, kwargs) in NORMS.items():
        if name == "ghost_batch" and shape[0] % kwargs["virtual_batch_size"]:
            continue
        fns[label] = layer_step(create_norm(name, shape[1], **kwargs), x, grad)
    return best_times(fns, repeats, calls)


def bench_model(
    build: Callable[..., nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int, calls: int = 1
) -> dict[str, float]:
    """A whole model's forward+backward (loss by the model's task) with each checked norm."""
    loss = nn.functional.cross_entropy if y.dtype == torch.long else nn.functional.mse_loss
    fns = {}
    for label in ("batch", *CHECKED):
        name, kwargs = NORMS[label]
        torch.manual_seed(0)
        model = build(norm=name, norm_kwargs=kwargs)
        params = list(model.parameters())
        fns[label] = lambda m=model, p=params, f=loss: torch.autograd.grad(f(m(x), y), p)
    return best_times(fns, repeats, calls)


def report(title: str, times: dict[str, float]) -> float:
    """Print one row of ratios to BatchNorm; return the worst ratio among the checked norms."""
    base = times["batch"]
    cells = [f"{label}={times[label] / base:4.2f}" for label in times if label != "batch"]
    print(f"{title:<22} batch {base * 1e3:8.3f} ms | " + "  ".join(cells))
    return max(times[label] / base for label in CHECKED if label in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5, help="VGG width multiplier (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="rounds per shape; the best time counts")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"forward+backward time / BatchNorm's, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"checked: {', '.join(CHECKED)} (target <= {TARGET}); others for information")
    print(f"-- VGG-11 width {args.width} conv activations, batch {args.batch_size}")
    conv_worst = max(
        report("x".join(map(str, s)), bench_layers(s, args.repeats)) for s in vgg_shapes(args.width, args.batch_size)
    )
    print("-- small 1-d activations (per-op overhead dominates)")
    small_worst = max(
        report("x".join(map(str, s)), bench_layers(s, args.repeats, calls=20)) for s in [(128, 32), (1000, 32)]
    )
    print("-- whole models (forward+backward of the loss)")
    torch.manual_seed(0)
    images, classes = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    vgg = bench_model(lambda **kw: VGG(width=args.width, **kw), images, classes, max(3, args.repeats // 4))
    mnist, digits = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    mlp = bench_model(MLP, mnist, digits, args.repeats, calls=10)
    gaussian, targets = torch.randn(1000, 10), torch.randn(1000, 10)
    dln = bench_model(DeepLinearNet, gaussian, targets, args.repeats)
    model_worst = max(report(f"vgg11 x{args.width}", vgg), report("mlp 784-32-32-10", mlp), report("dln 25x32", dln))
    print(f"worst checked ratio (target <= {TARGET}): conv activations {conv_worst:.2f}, ", end="")
    print(f"small 1-d activations {small_worst:.2f}, whole models {model_worst:.2f}")


if __name__ == "__main__":
    main()
