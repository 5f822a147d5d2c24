"""Gradient accumulation: a step of k micro-batches is measured on all k.

Brute-force reference for step t: the micro-batches x_1..x_m Lightning fed to step t (m = k,
or fewer in the last window of an epoch), L(W) = (1/k) sum_j L(W; x_j) with BatchNorm's batch
statistics per micro-batch (as in training), so grad L(W_t) is the g_t the optimizer used.
Every callback's value is compared with that function, computed by torch.func on a copy of
the network, with the Trainer argument and with a GradientAccumulationScheduler changing k
between epochs.
"""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import GradientAccumulationScheduler
from torch.func import functional_call

from callbacks import (
    ActivationStatsCallback,
    HessianCallback,
    ICSCallback,
    KeskarSharpnessCallback,
    LandscapeCallback,
    MeasurementCallback,
)
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    classification_loader,
    image_loader,
    make_trainer,
    one_thread,
)

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]

ETAS = [0.05, 0.2]


class Recorder(pl.Callback):
    """Keeps, per optimizer step t: its micro-batches, k, W_t and W_{t+1} (placed first)."""

    def __init__(self) -> None:
        self.batches: dict[int, list] = {}
        self.k: dict[int, int] = {}
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}
        self.buffers_after: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.setdefault(trainer.global_step, []).append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.k[trainer.global_step] = trainer.accumulate_grad_batches
        self.before[trainer.global_step] = _params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.before and trainer.global_step - 1 not in self.after:
            self.after[trainer.global_step - 1] = _params(pl_module)
            self.buffers_after[trainer.global_step - 1] = {n: b.clone() for n, b in pl_module.net.named_buffers()}


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _step_loss(net, params, batches, k):
    """(1/k) sum_j CE(net(W; x_j), y_j), BatchNorm in train mode on each micro-batch."""
    net = copy.deepcopy(net).train()
    total = 0.0
    for x, y in batches:
        total = total + F.cross_entropy(functional_call(net, params, (x,)), y) / k
    return total


def _grad(net, params, batches, k):
    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    loss = _step_loss(net, p, batches, k)
    return loss.detach(), dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def _norm(d):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))


def _fit(callbacks, max_epochs, n=56, **trainer_kwargs):
    pl.seed_everything(0)
    model = TinyClassifier(norm="batch")
    recorder, log = Recorder(), RecordingLogger()
    trainer = make_trainer(
        max_steps=-1, max_epochs=max_epochs, callbacks=[recorder, *callbacks], logger=log, **trainer_kwargs
    )
    trainer.fit(model, classification_loader(n=n, batch_size=8))
    return model, recorder, log


SETUPS = {
    # 7 batches, k = 2: windows of 2, 2, 2 and a last one of 1 (still scaled by 1/2)
    "trainer-argument": dict(max_epochs=1, accumulate_grad_batches=2),
    # epoch 0 without accumulation, epoch 1 with k = 3 (windows 3, 3, 1)
    "scheduler": dict(max_epochs=2, callbacks=[GradientAccumulationScheduler({0: 1, 1: 3})]),
}


def _setup(name, measurement_callbacks):
    kwargs = dict(SETUPS[name])
    extra = kwargs.pop("callbacks", [])
    model, rec, log = _fit([*extra, *measurement_callbacks], **kwargs)
    return model, rec, log


@pytest.mark.parametrize("setup", list(SETUPS))
def test_landscape_and_ics_see_the_accumulated_step(setup):
    landscape = LandscapeCallback(every_n_steps=1, step_sizes=ETAS, log_each_step_size=True, figure_every_n_steps=None)
    ics = ICSCallback(every_n_steps=1)
    model, rec, log = _setup(setup, [landscape, ics])
    steps = sorted(rec.before)
    assert sorted(log.values("landscape/grad_norm")) == steps  # once per optimizer step, at its t
    assert any(len(rec.batches[t]) > 1 for t in steps) and any(rec.k[t] > len(rec.batches[t]) for t in steps)
    net = model.net
    for t in steps:
        batches, k = rec.batches[t], rec.k[t]
        params_t = {n.removeprefix("net."): v for n, v in rec.before[t].items()}
        params_next = {n.removeprefix("net."): v for n, v in rec.after[t].items()}
        _, g = _grad(net, params_t, batches, k)
        assert log.values("landscape/grad_norm")[t] == pytest.approx(float(_norm(g)), rel=1e-5)
        for eta in ETAS:
            moved = {n: params_t[n] - eta * g[n] for n in params_t}
            loss, g_eta = _grad(net, moved, batches, k)
            diff = _norm({n: g_eta[n] - g[n] for n in g})
            assert log.values(f"landscape/loss/eta_{eta:g}")[t] == pytest.approx(float(loss), rel=1e-5)
            assert log.values(f"landscape/grad_diff/eta_{eta:g}")[t] == pytest.approx(float(diff), rel=1e-4, abs=1e-7)
        # ICS: the first layer has nothing before it (0 / 1 by definition); the second layer's G'
        # has the first layer (and its BN) at W_{t+1}
        assert log.values("ics/net.0/l2_diff")[t] == pytest.approx(0.0, abs=1e-6)
        assert log.values("ics/net.0/cosine")[t] == pytest.approx(1.0, abs=1e-6)
        mixed = {n: (params_next[n] if n.startswith(("0.", "1.")) else params_t[n]) for n in params_t}
        _, g_mixed = _grad(net, mixed, batches, k)
        layer = ["3.weight", "3.bias"]
        a = torch.cat([g[n].reshape(-1) for n in layer]).double()
        b = torch.cat([g_mixed[n].reshape(-1) for n in layer]).double()
        assert log.values("ics/net.3/l2_diff")[t] == pytest.approx(float((a - b).norm()), rel=1e-4, abs=1e-7)
        cos = float(a @ b / (a.norm() * b.norm()))
        assert log.values("ics/net.3/cosine")[t] == pytest.approx(cos, rel=1e-5)


def _flat_hessian(net, params, buffers, batches):
    """Full Hessian of the mean eval-mode loss over ``batches`` in the flat parameter vector
    (BatchNorm with the running statistics ``buffers``)."""
    net = copy.deepcopy(net).eval()
    net.load_state_dict({**params, **buffers})
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        parts = dict(zip(names, (c.view(s) for c, s in zip(torch.split(flat, sizes), shapes))))
        return sum(F.cross_entropy(functional_call(net, parts, (x,)), y) for x, y in batches) / len(batches)

    flat = torch.cat([params[n].reshape(-1) for n in names]).double()
    net.double()
    batches = [(x.double(), y) for x, y in batches]
    return f(flat), torch.autograd.functional.hessian(f, flat)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_hessian_and_sharpness_measure_once_per_optimizer_step_at_its_parameters(setup):
    hessian = HessianCallback(
        top_k=1,
        trace=False,
        max_iter=60,
        tol=1e-6,
        num_batches=2,
        every_n_steps=1,
        every_n_epochs=None,
        at_train_end=False,
    )
    sharpness = KeskarSharpnessCallback(
        epsilons=[1e-3], num_batches=2, every_n_steps=1, every_n_epochs=None, at_train_end=False, max_iter=3
    )
    model, rec, log = _setup(setup, [hessian, sharpness])
    steps = sorted(rec.before)
    assert sorted(log.values("hessian/top_eigenvalue")) == steps
    assert sorted(log.values("sharpness/loss")) == steps
    sample = rec.batches[0][:1] + (rec.batches[1][:1] if len(rec.batches[0]) == 1 else rec.batches[0][1:2])
    for t in (steps[0], steps[-1]):
        params = {n.removeprefix("net."): v for n, v in rec.after[t].items()}
        loss, h = _flat_hessian(model.net, params, rec.buffers_after[t], sample)
        assert log.values("sharpness/loss")[t] == pytest.approx(float(loss), rel=1e-5)
        top = float(torch.linalg.eigvalsh(h).max())
        assert log.values("hessian/top_eigenvalue")[t] == pytest.approx(top, rel=1e-3)
        assert math.isfinite(log.values("sharpness/keskar_eps0.001")[t])


class StepReplay(MeasurementCallback):
    """Re-evaluates the step's loss and gradient at W_t: under accumulation with dropout and
    noise they must be the training step's (each micro-batch with its own masks and noise)."""

    needs_params_t = True
    needs_grads_t = True

    def __init__(self) -> None:
        super().__init__(every_n_steps=1)
        self.max_grad_error: list[float] = []
        self.losses: dict[int, float] = {}

    def measure(self, trainer, pl_module, ctx):
        loss, grads = ctx.loss_and_grad(ctx.params_t)
        scale = max(float(_norm(ctx.grads_t)), 1e-12)
        self.max_grad_error.append(float(_norm({n: grads[n] - ctx.grads_t[n] for n in grads})) / scale)
        self.losses[ctx.step] = float(loss)
        return {}


class TrainLosses(pl.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # outputs["loss"] is the micro-batch's loss already divided by k (Lightning's closure)
        step = trainer.global_step - (0 if trainer.fit_loop.epoch_loop._should_accumulate() else 1)
        self.by_step[step] = self.by_step.get(step, 0.0) + float(outputs["loss"])


@pytest.mark.parametrize("norm", ["noisy", "noisy_batch"])
def test_reevaluated_step_is_the_training_step_with_dropout_and_noise(norm):
    pl.seed_everything(0)
    if norm == "noisy":
        model, loader = TinyClassifier(norm="noisy", dropout=0.3), classification_loader(n=40, batch_size=8)
    else:
        from lightning_bn import VGG

        model = VGG(norm="noisy_batch", width=1 / 16, num_classes=10, lr=0.05)
        loader = image_loader(n=24, size=32, num_classes=10, batch_size=4)
    replay, train = StepReplay(), TrainLosses()
    trainer = make_trainer(
        max_steps=-1, max_epochs=1, callbacks=[train, replay], accumulate_grad_batches=3, logger=RecordingLogger()
    )
    trainer.fit(model, loader)
    assert sorted(replay.losses) == sorted(train.by_step)
    for step, loss in replay.losses.items():
        assert loss == pytest.approx(train.by_step[step], rel=1e-5)
    assert max(replay.max_grad_error) < 1e-5


def test_activation_statistics_cover_every_micro_batch_of_the_step():
    inputs: list[torch.Tensor] = []
    stats = ActivationStatsCallback(every_n_steps=1, layers=["net.1"], histograms=False)
    pl.seed_everything(0)
    model = TinyClassifier(norm="batch")
    model.net[1].register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    log = RecordingLogger()
    trainer = make_trainer(max_steps=2, callbacks=[stats], logger=log, accumulate_grad_batches=2)
    trainer.fit(model, classification_loader(n=32, batch_size=8))
    for t in (0, 1):
        x = torch.cat(inputs[2 * t : 2 * t + 2]).double()
        assert log.values("activations/net.1/mean")[t] == pytest.approx(float(x.mean(0).mean()), rel=1e-9)
        assert log.values("activations/net.1/std")[t] == pytest.approx(float(x.std(0, unbiased=False).mean()), rel=1e-9)
