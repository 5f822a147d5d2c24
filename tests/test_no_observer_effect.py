"""No observer effect: a fit with every measurement callback measuring at every step ends
bit-identical (parameters, buffers, optimizer state, RNG, logged values) to the fit without.

Helpers adding a measurement callback: add it to ``_all_callbacks`` below.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from callbacks import ActivationStatsCallback, ICSCallback, LandscapeCallback, MeasurementCallback
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    classification_loader,
    image_loader,
    make_trainer,
    one_thread,
)

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]


class CoreProbe(MeasurementCallback):
    """Exercises every primitive of the core that the shipped callbacks may not: loss and
    gradient at perturbed parameters, a Hessian-vector product, a fixed training sample in
    eval mode, the measurement's own random draws, histograms."""

    needs_params_t = True
    needs_grads_t = True
    uses_tensorboard = True

    def measure(self, trainer, pl_module, ctx):
        names = list(ctx.grads_t)
        moved = {n: ctx.params_t[n] - 0.1 * ctx.grads_t[n] for n in names}
        loss_moved, grad_moved = ctx.loss_and_grad(moved)
        direction = {n: torch.randn_like(ctx.params_t[n]) for n in names}  # draws from the live RNG
        with ctx.evaluation(ctx.params_t, wrt=names) as loss_fn:
            tensors = ctx.parameters(names)
            g = torch.autograd.grad(loss_fn(), tensors, create_graph=True)
            hv = torch.autograd.grad(g, tensors, grad_outputs=[direction[n] for n in names])
        hv = ctx.reduce_mean(dict(zip(names, hv)))
        sample_loss = ctx.loss(batches=self.training_sample(trainer, 2), bn_mode="eval")
        self.log_histogram(trainer, "probe/grad", torch.cat([x.reshape(-1) for x in grad_moved.values()]), ctx.step)
        return {
            "probe/loss_moved": loss_moved,
            "probe/vHv": sum((hv[n] * direction[n]).sum() for n in names),
            "probe/sample_loss": sample_loss,
        }


def _all_callbacks():
    return [
        ICSCallback(every_n_steps=1),
        ActivationStatsCallback(every_n_steps=1),
        CoreProbe(every_n_steps=1),
        LandscapeCallback(every_n_steps=1, figure_every_n_steps=2),
    ]


def _fit(make_model, loader, callbacks, tmp_path, steps):
    pl.seed_everything(0)
    model = make_model()
    recorder = RecordingLogger()
    loggers = [recorder, TensorBoardLogger(tmp_path, name="", version=len(callbacks))]
    trainer = make_trainer(max_steps=steps, callbacks=callbacks, logger=loggers)
    trainer.fit(model, loader())
    return model, trainer, recorder, torch.get_rng_state()


def _vgg_batch():
    from lightning_bn import VGG

    return VGG(norm="batch", width=1 / 16, num_classes=10, lr=0.05)


def _vgg_noisy():
    from lightning_bn import VGG

    return VGG(norm="noisy_batch", width=1 / 16, num_classes=10, lr=0.05)


MODELS = {
    "vgg-bn": (_vgg_batch, lambda: image_loader(n=24, size=32, num_classes=10, batch_size=8, shuffle=True)),
    "vgg-noisy_batch": (_vgg_noisy, lambda: image_loader(n=24, size=32, num_classes=10, batch_size=8, shuffle=True)),
    "mlp-replaynoise-dropout": (
        lambda: TinyClassifier(norm="noisy", dropout=0.3, optimizer="adam"),
        lambda: classification_loader(shuffle=True),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_with_all_callbacks_is_bit_identical(name, tmp_path):
    make_model, loader = MODELS[name]
    ref_model, ref_trainer, ref_log, ref_rng = _fit(make_model, loader, [], tmp_path, steps=3)
    callbacks = _all_callbacks()
    model, trainer, log, rng = _fit(make_model, loader, callbacks, tmp_path, steps=3)

    assert all(cb.last_measured_step == 2 for cb in callbacks)
    assert sorted(log.values("probe/loss_moved")) == [0, 1, 2]
    assert any(k.startswith("ics/") for _, m in log.records for k in m)
    assert any(k.endswith("/mean_drift") for _, m in log.records for k in m)
    assert sorted(log.values("landscape/beta_smoothness")) == [0, 1, 2]
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), n
    for (n, b), (_, c) in zip(model.named_buffers(), ref_model.named_buffers()):
        assert torch.equal(b, c), n
    state, ref_state = trainer.optimizers[0].state_dict()["state"], ref_trainer.optimizers[0].state_dict()["state"]
    for key in ref_state:
        for field, value in ref_state[key].items():
            assert torch.equal(torch.as_tensor(state[key][field]), torch.as_tensor(value)), (key, field)
    assert torch.equal(rng, ref_rng)
    # the module's own logging (train/loss per step, torchmetrics train/acc per epoch) is unchanged
    own = [
        (step, {k: v for k, v in m.items() if not k.startswith(("ics/", "activations/", "probe/", "landscape/"))})
        for step, m in log.records
    ]
    assert [r for r in own if r[1]] == ref_log.records
    assert any("train/acc" in m for _, m in ref_log.records)
    assert [m.training for m in model.modules()] == [m.training for m in ref_model.modules()]
    noise = [m for m in model.modules() if hasattr(m, "replay_noise")]
    ref_noise = [m for m in ref_model.modules() if hasattr(m, "replay_noise")]
    assert [m.replay_noise for m in noise] == [False] * len(noise)
    assert [getattr(m, "num_draws", getattr(m, "draws", None)) for m in noise] == [
        getattr(m, "num_draws", getattr(m, "draws", None)) for m in ref_noise
    ]
