"""Extra time of a LandscapeCallback measurement in a real fit, in units of len(grid) forward+backward passes.

A measurement is documented to cost len(grid) forward+backward passes of the step's batch (8
by default). This script checks how close the callback comes to that on the models of our
experiments, side by side in one run:

    fb         one plain forward+backward of the same module and batch (the unit):
               ``torch.autograd.grad(module.loss_fn(module(x), y), parameters)``, best of
               rounds of len(grid) in a tight loop
    hooks      the time a measured step spends in the callback's hooks (on_train_batch_start
               + on_before_optimizer_step + on_train_batch_end: W_t and g_t copies,
               finiteness checks, RNG, the measurement, logging), in a fit where
               ``LandscapeCallback(every_n_steps=2)`` measures the even steps and a reference
               callback runs exactly len(grid) plain forward+backward passes at the odd ones
               (so both see the same machine state); median over the steps
    fit        the step time of a fit with ``LandscapeCallback(every_n_steps=1)`` minus that
               of the same fit without it (median step times, between consecutive
               ``on_train_batch_start`` calls; fits alternate); the same for the reference

Printed: hooks / (len(grid) x fb) and fit / (len(grid) x fb), for the callback and the
reference; next to the hooks' median step also their best step ("best step"), the statistic
fb itself is taken with (best of its rounds): on a machine shared with other jobs the median
carries their interference, which the best-of fb does not. The "like for like" line divides
statistics of one kind: the hooks' median step by the median round of fb, the best step by
the best round (the first line's median over best is the strictest reading). The reference shows what a
measurement costing exactly its passes and nothing else would score on this machine: above 1
where the model is so small that Lightning's step between measurements leaves the caches cold
(and, in the fit column, where the training step itself runs slower after a burst of work).
The next line divides the callback's hooks by the reference's, measured in the same fits: the
cost beyond the passes with the machine's state in both. The last line is what an unmeasured
step costs: fits of 150 steps with ``every_n_steps=10**9`` minus fits without the callback
(best of 4 alternating rounds each).
Target of issue 16: the callback's hooks ratio <= 1.3 for the MLP and the DLN, <= 1.1 for VGG.

    python benchmarks/landscape_cost.py                      # mlp, mlp467, dln, vgg; 1 thread
    python benchmarks/landscape_cost.py --models mlp dln --steps 60 --repeats 5
    python benchmarks/landscape_cost.py --method batched     # vmap over the grid (not bit-exact)
    python benchmarks/landscape_cost.py --tight --models mlp  # measure() alone, warm caches
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import LandscapeCallback
from callbacks.context import MicroBatch, StepContext
from callbacks.guards import measuring
from callbacks.landscape_math import DEFAULT_LR_MULTIPLIERS
from callbacks.module_index import ModuleIndex
from callbacks.rng import RNGState
from lightning_bn import MLP, VGG, DeepLinearNet

K = len(DEFAULT_LR_MULTIPLIERS)
WARM = 6  # steps left out of every median (caches, autograd's thread state)


def build(name: str, norm: str) -> tuple[pl.LightningModule, tuple[torch.Tensor, torch.Tensor], str]:
    """Model, one batch (the loader repeats it) and a label."""
    torch.manual_seed(0)
    if name == "mlp":  # 64-64-64-10, batch 128
        model = MLP(hidden_sizes=[64, 64], input_shape=[64], norm=norm)
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
        label = "MLP 64-64-64-10, batch 128"
    elif name == "mlp467":  # 8-16-16-3: 467 parameters without a norm
        model = MLP(hidden_sizes=[16, 16], input_shape=[8], num_classes=3, norm=norm)
        x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
        label = f"MLP 8-16-16-3 ({sum(p.numel() for p in model.parameters())} parameters), batch 128"
    elif name == "dln":  # the paper's DLN: 25 layers of width 32, full batch of 1000 (configs/dln)
        model = DeepLinearNet(width=32, depth=25, norm=norm)
        x = torch.randn(1000, 10)
        y = x @ torch.randn(10, 10)
        label = "DLN 25 x 32, full batch 1000"
    elif name == "vgg":
        model = VGG(width=0.125, norm=norm)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        label = "VGG-11 x0.125, batch 64"
    else:
        raise ValueError(f"unknown model {name!r}")
    return model, (x, y), f"{label}, norm {norm}"


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())


class _PassesOnly(pl.Callback):
    """The reference: exactly K plain forward+backward passes of the step's batch, nothing else
    (at every step, or at the odd steps only)."""

    def __init__(self, odd_steps_only: bool = False) -> None:
        self.odd_steps_only = odd_steps_only

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.odd_steps_only and trainer.global_step % 2 == 1:  # global_step is t + 1 here
            return
        x, y = batch
        params = [p for p in pl_module.parameters() if p.requires_grad]
        for _ in range(K):
            torch.autograd.grad(pl_module.loss_fn(pl_module(x), y), params)


class _HookTimer:
    """Wraps a callback's per-step hooks; ``per_step`` collects their total time per step."""

    HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")

    def __init__(self, callback: pl.Callback) -> None:
        self.per_step: list[float] = []  # one entry per training step
        self._pending = 0.0
        for name in self.HOOKS:
            setattr(callback, name, self._wrap(getattr(callback, name), closes_step=name == self.HOOKS[-1]))

    def _wrap(self, hook: Callable[..., Any], closes_step: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self._pending += time.perf_counter() - start
                if closes_step:
                    self.per_step.append(self._pending)
                    self._pending = 0.0

        return timed


class _NullLogger(pl.loggers.Logger):
    """A logger that keeps nothing: the callback's write path runs, no file I/O is timed."""

    name, version = "null", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def fit(model_name: str, norm: str, steps: int, callbacks: list[pl.Callback]) -> tuple[float, list[list[float]]]:
    """(median step time, per callback its hook time at every step) of a short fit."""
    model, (x, y), _ = build(model_name, norm)
    data = DataLoader(TensorDataset(x.expand(steps, *x.shape), y.expand(steps, *y.shape)), batch_size=None)
    timer = _StepTimer()
    hooks = [_HookTimer(callback).per_step for callback in callbacks]
    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=_NullLogger(),
        callbacks=[timer, *callbacks],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, data)
    step = statistics.median(b - a for a, b in zip(timer.starts[WARM:], timer.starts[WARM + 1 :]))
    return step, hooks


def idle_step_cost(model_name: str, norm: str, steps: int = 150, rounds: int = 4) -> float:
    """The median step time of a fit with a LandscapeCallback that never measures
    (``every_n_steps=10**9``) minus that of the same fit without it: longer fits than the
    others, alternating, best of ``rounds`` each (the difference is small next to the noise)."""
    with_cb, without = float("inf"), float("inf")
    for _ in range(rounds):
        without = min(without, fit(model_name, norm, steps, [])[0])
        idle = LandscapeCallback(every_n_steps=10**9, figure_every_n_steps=None)
        with_cb = min(with_cb, fit(model_name, norm, steps, [idle])[0])
    return with_cb - without


def forward_backward(model_name: str, norm: str, repeats: int) -> tuple[float, float]:
    """One plain forward+backward of the module on its batch: (best, median) over ``repeats``
    rounds of K passes (each round's mean per pass)."""
    model, (x, y), _ = build(model_name, norm)
    model.train()
    params = list(model.parameters())
    rounds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(K):
            torch.autograd.grad(model.loss_fn(model(x), y), params)
        if i:  # the first round warms up
            rounds.append((time.perf_counter() - start) / K)
    return min(rounds), statistics.median(rounds)


def tight_loop(model_name: str, norm: str, rounds: int) -> float:
    """``LandscapeCallback.measure`` alone on a hand-made step context, against K plain
    forward+backward passes in the same loop (alternating, best of ``rounds`` each): the
    callback's own cost without Lightning's step in between (warm caches)."""
    model, (x, y), _ = build(model_name, norm)
    model.train()
    params = list(model.parameters())
    grads = torch.autograd.grad(model.loss_fn(model(x), y), params)
    callback = LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)
    rng = RNGState.capture(host=False)
    index = ModuleIndex()  # kept from one measurement to the next, as a callback in a fit keeps it

    def measure() -> None:
        ctx = StepContext(None, model, 0, (x, y), 0, rng=rng, index=index)
        ctx.micro_batches.append(MicroBatch((x, y), 0, rng))
        ctx.params_t = {n: p.detach().clone() for n, p in model.named_parameters()}
        ctx.grads_t = {n: g.clone() for (n, _), g in zip(model.named_parameters(), grads)}
        ctx.lrs_t = [0.1]
        with measuring():
            callback.measure(None, model, ctx)

    def passes() -> None:
        for _ in range(K):
            torch.autograd.grad(model.loss_fn(model(x), y), params)

    best = {"measure": float("inf"), "passes": float("inf")}
    for _ in range(rounds):
        for key, fn in (("measure", measure), ("passes", passes)):
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best["measure"] / best["passes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "mlp467", "dln", "vgg"])
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--method", choices=["loop", "batched"], default="loop")
    parser.add_argument("--steps", type=int, default=40, help="training steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (with, reference, without) fits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    parser.add_argument(
        "--tight", action="store_true", help="only measure() in a tight loop vs the passes (no fit; 300 rounds)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(
        f"{torch.get_num_threads()} thread(s), grid of {K} step sizes, method={args.method}, "
        f"{args.steps} steps per fit, best of {args.repeats} rounds"
    )
    for name in args.models:
        label = build(name, args.norm)[2]
        if args.tight:
            print(f"{label}: measure() / ({K} plain passes), tight loop = {tight_loop(name, args.norm, 300):.2f}")
            continue
        best: dict[str, float] = {}

        def keep(key: str, value: float, best: dict[str, float] = best) -> None:
            best[key] = min(best.get(key, float("inf")), value)

        for _ in range(args.repeats):
            fb_best, fb_median = forward_backward(name, args.norm, 15)
            keep("fb", fb_best)
            keep("fb median", fb_median)
            # hooks: the callback on even steps, the reference passes on odd steps, one fit
            callback = LandscapeCallback(every_n_steps=2, method=args.method, figure_every_n_steps=None)
            _, (ours, ref) = fit(name, args.norm, 2 * args.steps, [callback, _PassesOnly(odd_steps_only=True)])
            keep("hooks", statistics.median(ours[WARM::2]))
            keep("ref hooks", statistics.median(ref[WARM + 1 :: 2]))
            keep("hooks best", min(ours[WARM::2]))
            keep("ref hooks best", min(ref[WARM + 1 :: 2]))
            # fit: every step measured vs none (and the reference at every step)
            callback = LandscapeCallback(every_n_steps=1, method=args.method, figure_every_n_steps=None)
            keep("with", fit(name, args.norm, args.steps, [callback])[0])
            keep("ref", fit(name, args.norm, args.steps, [_PassesOnly()])[0])
            keep("without", fit(name, args.norm, args.steps, [])[0])
        unit, idle = K * best["fb"], idle_step_cost(name, args.norm)
        print(
            f"{label} (a training step without the callback: {best['without'] / best['fb']:.1f} fb):\n"
            f"  LandscapeCallback     hooks / ({K} x fb) = {best['hooks'] / unit:5.2f}"
            f" (best step {best['hooks best'] / unit:4.2f})"
            f"   fit (with - without) / ({K} x fb) = {(best['with'] - best['without']) / unit:5.2f}\n"
            f"  reference: {K} passes  hooks / ({K} x fb) = {best['ref hooks'] / unit:5.2f}"
            f" (best step {best['ref hooks best'] / unit:4.2f})"
            f"   fit (with - without) / ({K} x fb) = {(best['ref'] - best['without']) / unit:5.2f}\n"
            f"  like for like: hooks median / ({K} x fb median) = {best['hooks'] / (K * best['fb median']):5.2f}"
            f", best step / ({K} x fb best) = {best['hooks best'] / unit:4.2f}\n"
            f"  callback hooks / reference hooks (same fits) = {best['hooks'] / best['ref hooks']:5.2f}"
            f" (best step {best['hooks best'] / best['ref hooks best']:4.2f})\n"
            f"  an unmeasured step (every_n_steps=10**9) - a step without the callback = "
            f"{idle * 1e6:+.0f} us ({idle / best['fb']:+.2f} fb)"
        )


if __name__ == "__main__":
    main()
