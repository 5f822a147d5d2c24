"""No observer effect: a fit with every measurement callback measuring at every step ends
bit-identical (parameters, buffers, optimizer state, RNG, logged values) to the fit without.

Helpers adding a measurement callback: add it to ``_all_callbacks`` below.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from callbacks import (
    ActivationStatsCallback,
    ICSCallback,
    LandscapeCallback,
    MeasurementCallback,
    NormCurvatureCallback,
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
        NormCurvatureCallback(every_n_steps=1),
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
        (
            step,
            {
                k: v
                for k, v in m.items()
                if not k.startswith(("ics/", "activations/", "probe/", "landscape/", "normcurv/"))
            },
        )
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


# -- gradient accumulation, manual optimization, compiled modules ------------------------------


def _fit_with(make_model, loader, callbacks, tmp_path, **trainer_kwargs):
    """``_fit`` with Trainer arguments (``max_steps``, ``accumulate_grad_batches``, ...)."""
    pl.seed_everything(0)
    model = make_model()
    recorder = RecordingLogger()
    loggers = [recorder, TensorBoardLogger(tmp_path, name="", version=len(callbacks))]
    trainer = make_trainer(callbacks=callbacks, logger=loggers, **trainer_kwargs)
    trainer.fit(model, loader())
    return model, trainer, recorder, torch.get_rng_state()


def _assert_same_end_state(run, ref_run, prefixes=("ics/", "activations/", "probe/", "landscape/", "normcurv/")):
    """Parameters, buffers, every optimizer's state, torch RNG, module modes and the module's own
    logging of ``run`` are bit-identical to those of ``ref_run`` (the fit without callbacks)."""
    (model, trainer, log, rng), (ref_model, ref_trainer, ref_log, ref_rng) = run, ref_run
    assert trainer.global_step == ref_trainer.global_step
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for (n, b), (_, c) in zip(model.named_buffers(), ref_model.named_buffers(), strict=True):
        assert torch.equal(b, c), n
    assert len(trainer.optimizers) == len(ref_trainer.optimizers)
    for i, (opt, ref_opt) in enumerate(zip(trainer.optimizers, ref_trainer.optimizers)):
        state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        assert sorted(state) == sorted(ref_state), i
        for key in ref_state:
            for field, value in ref_state[key].items():
                assert torch.equal(torch.as_tensor(state[key][field]), torch.as_tensor(value)), (i, key, field)
    assert torch.equal(rng, ref_rng)
    own = [(step, {k: v for k, v in m.items() if not k.startswith(prefixes)}) for step, m in log.records]
    assert [r for r in own if r[1]] == ref_log.records
    assert [m.training for m in model.modules()] == [m.training for m in ref_model.modules()]
    noise = [m for m in model.modules() if hasattr(m, "replay_noise")]
    ref_noise = [m for m in ref_model.modules() if hasattr(m, "replay_noise")]
    assert [m.replay_noise for m in noise] == [False] * len(noise)
    assert [getattr(m, "draws", None) for m in noise] == [getattr(m, "draws", None) for m in ref_noise]


def _mlp_noise_dropout():
    return TinyClassifier(norm="noisy", dropout=0.3, optimizer="adam")


def _mlp_loader():
    return classification_loader(shuffle=True)  # 4 batches per epoch


def test_fit_with_all_callbacks_is_bit_identical_under_gradient_accumulation(tmp_path):
    kwargs = {"max_steps": 3, "accumulate_grad_batches": 2}  # 6 batches: one epoch and a half
    ref = _fit_with(_mlp_noise_dropout, _mlp_loader, [], tmp_path, **kwargs)
    callbacks = _all_callbacks()
    run = _fit_with(_mlp_noise_dropout, _mlp_loader, callbacks, tmp_path, **kwargs)
    assert all(cb.last_measured_step == 2 for cb in callbacks)
    assert sorted(run[2].values("probe/loss_moved")) == [0, 1, 2]
    assert sorted(run[2].values("landscape/beta_smoothness")) == [0, 1, 2]
    _assert_same_end_state(run, ref)


def test_fit_with_all_callbacks_is_bit_identical_under_accumulation_scheduler(tmp_path):
    from pytorch_lightning.callbacks import GradientAccumulationScheduler

    def fit(callbacks):
        scheduler = GradientAccumulationScheduler({0: 1, 1: 2})  # epoch 0: 4 steps, epoch 1: 2 steps
        return _fit_with(_mlp_noise_dropout, _mlp_loader, [scheduler, *callbacks], tmp_path, max_steps=-1, max_epochs=2)

    ref = fit([])
    callbacks = _all_callbacks()
    run = fit(callbacks)
    assert run[1].global_step == 6
    assert all(cb.last_measured_step == 5 for cb in callbacks)
    assert sorted(run[2].values("probe/loss_moved")) == list(range(6))
    assert sorted(run[2].values("landscape/beta_smoothness")) == list(range(6))
    _assert_same_end_state(run, ref)


class TinyGAN(pl.LightningModule):
    """GAN-style manual optimization: noise z drawn in the step, BN and dropout in the generator,
    the generator (Adam) and then the discriminator (SGD with momentum) stepped on every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        nn = torch.nn
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 6))
        self.disc = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))

    def _fake(self, n: int) -> torch.Tensor:
        return self.gen(torch.randn(n, 4, device=self.device))

    def measurement_loss(self, batch, batch_idx):
        x, _ = batch
        logits = self.disc(self._fake(x.shape[0]))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def training_step(self, batch, batch_idx):
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        loss_g = self.measurement_loss(batch, batch_idx)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        real, fake = self.disc(x), self.disc(self._fake(x.shape[0]).detach())
        loss_d = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.log_dict({"train/loss_g": loss_g, "train/loss_d": loss_d})
        return loss_g.detach()

    def configure_optimizers(self):
        return [
            torch.optim.Adam(self.gen.parameters(), lr=0.01),
            torch.optim.SGD(self.disc.parameters(), lr=0.05, momentum=0.9),
        ]


def test_fit_with_all_callbacks_is_bit_identical_with_manual_optimization(tmp_path):
    def loader():
        return classification_loader(in_features=6, shuffle=True)

    def callbacks():
        return [
            ICSCallback(every_n_steps=1),
            ActivationStatsCallback(every_n_steps=1),
            CoreProbe(every_n_steps=1),
            LandscapeCallback(every_n_steps=1, step_sizes=[0.01, 0.05], figure_every_n_steps=2),
        ]

    kwargs = {"max_steps": 6}  # 6 optimizer steps = 3 batches
    ref = _fit_with(TinyGAN, loader, [], tmp_path, **kwargs)
    measuring = callbacks()
    run = _fit_with(TinyGAN, loader, measuring, tmp_path, **kwargs)
    assert all(cb.last_measured_step == 2 for cb in measuring)  # step = batch, not global_step
    assert sorted(run[2].values("probe/loss_moved")) == [0, 1, 2]
    assert sorted(run[2].values("landscape/beta_smoothness")) == [0, 1, 2]
    assert any(k.startswith("ics/disc.") for _, m in run[2].records for k in m)
    _assert_same_end_state(run, ref)


class CompiledMLP(TinyClassifier):
    """TinyClassifier (ReplayNoise, dropout, Adam) with ``net`` compiled (backend="eager")."""

    def __init__(self) -> None:
        super().__init__(norm="noisy", dropout=0.3, optimizer="adam")
        self.net = torch.compile(self.net, backend="eager")


def test_fit_with_all_callbacks_is_bit_identical_with_a_compiled_module(tmp_path):
    torch._dynamo.reset()
    ref = _fit_with(CompiledMLP, _mlp_loader, [], tmp_path, max_steps=3)
    torch._dynamo.reset()
    callbacks = _all_callbacks()
    run = _fit_with(CompiledMLP, _mlp_loader, callbacks, tmp_path, max_steps=3)
    assert all(cb.last_measured_step == 2 for cb in callbacks)
    assert sorted(run[2].values("probe/loss_moved")) == [0, 1, 2]
    assert any(k.startswith("ics/net._orig_mod.") for _, m in run[2].records for k in m)
    _assert_same_end_state(run, ref)
    # and the compiled fit trained exactly as the eager module does
    eager = _fit_with(_mlp_noise_dropout, _mlp_loader, [], tmp_path, max_steps=3)
    for (n, p), (_, q) in zip(run[0].named_parameters(), eager[0].named_parameters(), strict=True):
        assert torch.equal(p, q), n
