"""Landscape measurement: vmap over step sizes vs a loop over step sizes, and its cost in passes.

1. Math level (``callbacks.landscape_math``): on the same model, batch and parameters,
   evaluates L(W - eta g) and grad L(W - eta g) for the default 8-value grid with
   ``method="loop"`` and ``method="batched"`` (vmap, in chunks), alternating them, and prints
   the best time of each and the ratio batched / loop (< 1: batched is faster).
2. Callback level: one ``LandscapeCallback.measure`` through the measurement core (the
   module's ``training_step`` as the loss, BN in train mode, every state restored), timed
   against len(grid) plain forward+backward passes of the same batch: ratio ours / reference.

For both it counts FLOPs with ``torch.utils.flop_counter`` and prints cost =
FLOPs(measurement) / FLOPs(one training forward+backward), which must equal len(grid).

    python benchmarks/landscape_batched_vs_loop.py --model vgg --width 0.25 --batch-size 128
    python benchmarks/landscape_batched_vs_loop.py --model mlp
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from callbacks import LandscapeCallback, StepContext
from callbacks.landscape_math import evaluate_along_gradient, step_size_grid
from lightning_bn import VGG

LR = 0.1


class MLP(pl.LightningModule):
    """784-32-32-10 with the norm before each ReLU (the classic MNIST tutorial shape)."""

    def __init__(self, norm: str) -> None:
        super().__init__()

        def bn(n: int) -> nn.Module:
            return nn.BatchNorm1d(n) if norm == "batch" else nn.Identity()

        self.net = nn.Sequential(
            nn.Linear(784, 32), bn(32), nn.ReLU(), nn.Linear(32, 32), bn(32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def _setup(model_name: str, width: float, norm: str, batch_size: int):
    torch.manual_seed(0)
    if model_name == "vgg":
        model, x = VGG(width=width, norm=norm), torch.randn(batch_size, 3, 32, 32)
    else:
        model, x = MLP(norm), torch.randn(batch_size, 784)
    model.train()
    y = torch.randint(0, 10, (batch_size,))
    return model, x, y


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vgg", "mlp"], default="vgg")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8], help="vmap chunk sizes to try")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, x, y = _setup(args.model, args.width, args.norm, args.batch_size)
    etas = step_size_grid(LR)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_fn(p, b):
        return F.cross_entropy(functional_call(model, {**p, **b}, (x,)), y)

    def forward_backward():
        loss = loss_fn(dict(model.named_parameters()), {n: b.clone() for n, b in buffers.items()})
        return torch.autograd.grad(loss, list(model.parameters()))

    with FlopCounterMode(display=False) as counter:
        grad = dict(zip(params, forward_backward()))
    one_pass = counter.get_total_flops()
    print(
        f"{args.model} width {args.width} norm {args.norm}, batch {args.batch_size}, grid of {len(etas)} step sizes, "
        f"{torch.get_num_threads()} threads"
    )

    # -- 1. math level: loop vs batched ----------------------------------------------------
    def run(method: str, chunk: int | None = None):
        return evaluate_along_gradient(loss_fn, params, grad, etas, buffers, method=method, chunk_size=chunk)

    methods = [("loop", None)] + [("batched", c) for c in args.chunks]
    reference = run("loop")
    for method, chunk in methods:
        with FlopCounterMode(display=False) as counter:
            out = run(method, chunk)
        torch.testing.assert_close(out.losses, reference.losses, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.grad_diff_norms, reference.grad_diff_norms, rtol=1e-3, atol=1e-5)
        name = method if chunk is None else f"{method} chunk {chunk}"
        print(f"  cost {name:18s} {counter.get_total_flops() / one_pass:6.3f} forward+backward passes")
    times = {m: float("inf") for m in methods}
    for _ in range(args.repeats):  # alternate, so that machine load hits every method alike
        for method, chunk in methods:
            times[(method, chunk)] = min(times[(method, chunk)], _time(lambda m=method, c=chunk: run(m, c)))
    loop = times[("loop", None)]
    print(f"  time loop               {loop * 1e3:8.1f} ms")
    for (method, chunk), seconds in times.items():
        if method == "batched":
            print(
                f"  time batched chunk {chunk:<4d} {seconds * 1e3:8.1f} ms   ratio batched / loop {seconds / loop:.3f}"
            )

    # -- 2. callback level: through the measurement core ------------------------------------
    ctx = StepContext(None, model, 0, (x, y), 0, bn_mode="train")
    ctx.params_t, ctx.grads_t, ctx.lrs_t = params, grad, [LR]
    for method in ("loop", "batched"):
        callback = LandscapeCallback(every_n_steps=1, method=method, figure_every_n_steps=None)
        with FlopCounterMode(display=False) as counter:
            callback.measure(None, model, ctx)
        cost = counter.get_total_flops() / one_pass
        ours = plain = float("inf")
        for _ in range(args.repeats):
            plain = min(plain, _time(lambda: [forward_backward() for _ in etas]))
            ours = min(ours, _time(lambda cb=callback: cb.measure(None, model, ctx)))
        print(
            f"  callback method={method:8s} cost {cost:6.3f} passes, {ours * 1e3:8.1f} ms vs {len(etas)} plain "
            f"forward+backward {plain * 1e3:8.1f} ms: ratio ours / reference {ours / plain:.3f}"
        )


if __name__ == "__main__":
    main()
