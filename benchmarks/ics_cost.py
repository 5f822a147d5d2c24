"""Cost of one ICS measurement in units of one training forward+backward, against the naive count.

Naive ICS (Santurkar Def. 2.1 read literally) is one full forward+backward per weight layer:
k passes for k layers. ICSCallback records one forward at W_{t+1} and then, per layer, runs
only the forward after the layer (the prefix is replayed) and the backward down to it.
This script times, on the same model, batch and machine, in one run:

    step    one training forward+backward (the unit)
    shared  ICSCallback.measure, share_forward=True (the default)
    prefix  ICSCallback.measure, share_forward=False (prefix recomputed, backward still partial)

and prints shared / step, prefix / step, and both against the naive count k.

    python benchmarks/ics_cost.py                 # VGG-11 width 0.25, batch 64, and 25-layer DLNs
    python benchmarks/ics_cost.py --threads 2 --repeats 10
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from callbacks.context import StepContext
from callbacks.ics import ICSCallback
from callbacks.rng import RNGState
from lightning_bn import VGG


def _best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs: on a shared machine the minimum is the least disturbed."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class _DLN(torch.nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(depth)])
        for layer in self.layers:
            torch.nn.init.orthogonal_(layer.weight)

    def forward(self, x):
        return self.layers(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


def bench(name: str, model: torch.nn.Module, batch, loss_fn, repeats: int) -> None:
    model.train()
    x, y = batch

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    t_step = _best_time(step, repeats)
    params_t = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    grads_t = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # W_{t+1}: an SGD step
        for p in model.parameters():
            p.add_(p.grad, alpha=-0.05)
    # torch streams only, as MeasurementCallback does when the step drew nothing from NumPy/Python
    rng = RNGState.capture().torch_only()
    ctx = StepContext(None, model, 0, batch, 0, rng=rng, params_t=params_t, grads_t=grads_t)
    results = {}
    for share in (True, False):
        cb = ICSCallback(every_n_steps=1, share_forward=share)
        cb.setup_measurement(None, model)
        results[share] = _best_time(lambda cb=cb: cb.measure(None, model, ctx), repeats)
    k = len(cb._layer_params)
    shared, prefix = results[True] / t_step, results[False] / t_step
    print(f"{name}: k = {k} layers, one training forward+backward = {t_step * 1e3:.1f} ms")
    print(f"  ICS shared (default)       = {shared:5.2f} fwd+bwd  -> {shared / k:.2f} x naive ({k} fwd+bwd)")
    print(f"  ICS share_forward=False    = {prefix:5.2f} fwd+bwd  -> {prefix / k:.2f} x naive")
    print(f"  shared / share_forward=False = {results[True] / results[False]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vgg = VGG(norm="batch", width=args.width, num_classes=10)
    images = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
    vgg.training_step = lambda batch, batch_idx: F.cross_entropy(vgg(batch[0]), batch[1])  # no self.log outside fit
    bench(f"VGG-11 width {args.width}, BN, batch {args.batch}", vgg, images, F.cross_entropy, args.repeats)

    # the small one is bound by per-evaluation Python overhead, the larger one by compute
    for width, batch in ((64, 256), (256, 1024)):
        data = (torch.randn(batch, width), torch.randn(batch, width))
        bench(f"DLN 25 x {width}, batch {batch}", _DLN(width=width, depth=25), data, F.mse_loss, args.repeats)


if __name__ == "__main__":
    main()
