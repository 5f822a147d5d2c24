"""Manual optimization with several optimizers (GAN-style): the measured step is the batch.

Semantics pinned here (issue 16), against brute-force references written from scratch with
``torch.nn.functional`` and ``torch.autograd`` in float64:

* step ``t`` = batches completed before the batch (not ``global_step``, which advances once per
  optimizer step: twice per batch here), so ``every_n_steps=1`` writes at 0, 1, 2, ...;
* ``W_t`` = the parameters when the batch starts (before either optimizer moved them),
  ``g_t`` = the gradient of ``measurement_loss`` at ``W_t`` on the batch (computed by the
  callback, not read from ``.grad``), ``W_{t+1}`` = the parameters when the batch ends.

The module steps its "generator" (SGD with momentum) on ``measurement_loss`` and then its
"discriminator" (Adam) on a different loss computed with the already-updated generator, so the
``.grad`` left behind, the parameters at the second ``optimizer.step`` and ``global_step`` all
differ from the quantities above.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import HessianCallback, ICSCallback, LandscapeCallback
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    classification_loader,
    make_trainer,
    one_thread,
)

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]

NUM_BATCHES = 4
LAYERS = ["gen.0", "gen.3", "disc.0", "disc.2"]  # weight layers in forward order
ETAS = [0.01, 0.1, 0.5]


class TwoOptimizerModule(pl.LightningModule):
    """GAN-style: ``gen`` (Linear-BN-Tanh-Linear) feeds ``disc`` (Linear-ReLU-Linear); two
    optimizers stepped one after the other in ``training_step``. Records, per batch, the batch,
    W_t (at batch start), W_{t+1} and the buffers (at batch end)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6))
        self.disc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.buffers_after: list[dict[str, torch.Tensor]] = []

    def measurement_loss(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.disc(self.gen(x)), y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append((x.clone(), y.clone()))
        self.before.append(_snapshot(self.named_parameters()))
        opt_g, opt_d = self.optimizers()
        loss_g = self.measurement_loss(batch, batch_idx)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        # the discriminator's turn, on the output of the generator that has just moved
        loss_d = F.cross_entropy(self.disc(self.gen(x).detach()), (y + 1) % 3)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.after.append(_snapshot(self.named_parameters()))
        self.buffers_after.append(_snapshot(self.named_buffers()))
        self.log("train/loss_g", loss_g)
        return loss_g.detach()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.gen.parameters(), lr=0.2, momentum=0.9),
            torch.optim.Adam(self.disc.parameters(), lr=0.05),
        ]


def _snapshot(named) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named}


def _reference_logits(p: dict[str, torch.Tensor], x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
    """The module's forward written out (float64). BN: batch statistics, or the running ones given."""
    h = F.linear(x, p["gen.0.weight"], p["gen.0.bias"])
    mean = var = None
    if buffers is not None:
        mean, var = buffers["gen.1.running_mean"].double(), buffers["gen.1.running_var"].double()
    h = F.batch_norm(h, mean, var, p["gen.1.weight"], p["gen.1.bias"], training=buffers is None, eps=1e-5)
    h = F.linear(torch.tanh(h), p["gen.3.weight"], p["gen.3.bias"])
    h = torch.relu(F.linear(h, p["disc.0.weight"], p["disc.0.bias"]))
    return F.linear(h, p["disc.2.weight"], p["disc.2.bias"])


def _reference_loss(p, batch, buffers=None) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(_reference_logits(p, x.double(), buffers), y)


def _leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().double().requires_grad_(True) for n, t in params.items()}


def _grad(params, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = _leaves(params)
    loss = _reference_loss(leaves, batch)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def _fit(callbacks):
    pl.seed_everything(0)
    model = TwoOptimizerModule()
    logger = RecordingLogger()
    trainer = make_trainer(max_steps=-1, max_epochs=1, callbacks=callbacks, logger=logger)
    trainer.fit(model, classification_loader(n=16 * NUM_BATCHES, batch_size=16))
    return model, trainer, logger


def test_module_really_has_two_optimizer_steps_per_batch():
    """The premise of the tests below: global_step counts 2 per batch, so it cannot be ``t``."""
    model, trainer, _ = _fit([])
    assert len(model.batches) == NUM_BATCHES
    assert trainer.global_step == 2 * NUM_BATCHES
    # the second optimizer saw parameters the first had already moved
    assert not torch.equal(model.before[0]["gen.0.weight"], model.after[0]["gen.0.weight"])
    assert not torch.equal(model.before[0]["disc.0.weight"], model.after[0]["disc.0.weight"])


@pytest.mark.parametrize("every_n_steps", [1, 2])
def test_ics_steps_are_batches_and_values_match_brute_force(every_n_steps):
    ics = ICSCallback(every_n_steps=every_n_steps)
    model, _, logger = _fit([ics])
    expected_steps = list(range(0, NUM_BATCHES, every_n_steps))
    for layer in LAYERS:
        assert sorted(logger.values(f"ics/{layer}/l2_diff")) == expected_steps, layer
        assert sorted(logger.values(f"ics/{layer}/cosine")) == expected_steps, layer
    names = list(model.before[0])
    for t in expected_steps:
        w_t, w_next, batch = model.before[t], model.after[t], model.batches[t]
        _, g = _grad(w_t, batch)
        # the first layer has nothing before it: G' is G, bit for bit
        assert logger.values("ics/gen.0/l2_diff")[t] == 0.0, t
        assert logger.values("ics/gen.0/cosine")[t] == pytest.approx(1.0, abs=1e-12), t
        for layer in LAYERS[1:]:
            own = [n for n in names if _layer_of(n) == layer]
            first = names.index(own[0])
            config = {n: (w_next[n] if i < first else w_t[n]) for i, n in enumerate(names)}
            _, g_prime = _grad(config, batch)
            a, b = _flat(g, own), _flat(g_prime, own)
            l2 = float(torch.linalg.vector_norm(a - b))
            cosine = float(torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))
            assert l2 > 1e-4, (t, layer)  # the earlier layers' update does shift this layer
            assert logger.values(f"ics/{layer}/l2_diff")[t] == pytest.approx(l2, rel=1e-4, abs=1e-7), (t, layer)
            assert logger.values(f"ics/{layer}/cosine")[t] == pytest.approx(cosine, rel=1e-5, abs=1e-7), (t, layer)


def test_landscape_with_step_sizes_matches_brute_force_along_measurement_loss_gradient():
    landscape = LandscapeCallback(every_n_steps=1, step_sizes=ETAS, log_each_step_size=True, figure_every_n_steps=None)
    model, _, logger = _fit([landscape])
    assert sorted(logger.values("landscape/beta_smoothness")) == list(range(NUM_BATCHES))
    for t in range(NUM_BATCHES):
        w_t, batch = model.before[t], model.batches[t]
        _, g = _grad(w_t, batch)
        g_norm = float(torch.sqrt(sum((v**2).sum() for v in g.values())))
        losses, diffs = [], []
        for eta in ETAS:
            moved = {n: w_t[n].double() - eta * g[n] for n in w_t}
            loss, g_eta = _grad(moved, batch)
            losses.append(float(loss))
            diffs.append(float(torch.sqrt(sum(((g_eta[n] - g[n]) ** 2).sum() for n in g))))
            assert logger.values(f"landscape/loss/eta_{eta:g}")[t] == pytest.approx(losses[-1], rel=1e-5), (t, eta)
            assert logger.values(f"landscape/grad_diff/eta_{eta:g}")[t] == pytest.approx(diffs[-1], rel=1e-4), (t, eta)
        expected = {
            "loss_min": min(losses),
            "loss_max": max(losses),
            "grad_diff_min": min(diffs),
            "grad_diff_max": max(diffs),
            "beta_smoothness": max(d / (eta * g_norm) for d, eta in zip(diffs, ETAS)),
            "grad_norm": g_norm,
        }
        for key, value in expected.items():
            assert logger.values(f"landscape/{key}")[t] == pytest.approx(value, rel=1e-4), (t, key)


def test_landscape_lr_multipliers_with_two_optimizers_refuse_at_train_start():
    model = TwoOptimizerModule()
    landscape = LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)
    trainer = make_trainer(max_steps=-1, max_epochs=1, callbacks=[landscape], logger=RecordingLogger())
    with pytest.raises(ValueError, match="optimizers") as info:
        trainer.fit(model, classification_loader(n=32, batch_size=16))
    assert "step_sizes" in str(info.value)
    assert model.batches == []  # refused before the first batch


def test_hessian_on_fixed_sample_is_written_at_batch_index_and_matches_brute_force():
    """A fixed-sample measurement of step t sees W_{t+1} (and the BN running statistics at
    batch end) and is written at t; the epoch-end measurement is skipped (same parameters)."""
    hessian = HessianCallback(
        top_k=1, trace=False, max_iter=100, tol=1e-6, num_batches=1, every_n_steps=1, every_n_epochs=1
    )
    model, trainer, logger = _fit([hessian])
    top = logger.values("hessian/top_eigenvalue")
    assert sorted(top) == list(range(NUM_BATCHES))
    sample = model.batches[0]  # the first batch of a fresh, unshuffled pass
    names = list(model.before[0])
    shapes = [model.before[0][n].shape for n in names]
    sizes = [s.numel() for s in shapes]
    for t in range(NUM_BATCHES):
        w, buffers = model.after[t], model.buffers_after[t]

        def loss_of_flat(v, buffers=buffers):
            parts = dict(zip(names, (c.reshape(s) for c, s in zip(torch.split(v, sizes), shapes))))
            return _reference_loss(parts, sample, buffers)

        flat = torch.cat([w[n].double().reshape(-1) for n in names])
        h = torch.autograd.functional.hessian(loss_of_flat, flat)
        expected = float(torch.linalg.eigvalsh(h).max())
        assert top[t] == pytest.approx(expected, rel=1e-4), t
    assert math.isfinite(hessian.last_values["hessian/top_eigenvalue"])
