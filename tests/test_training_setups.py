"""The configurations real projects train with: each measured exactly, and never changed.

For every setup a probe re-evaluates the step's loss and gradient at W_t (they must be the
training step's: same batch, masks, autocast, scaling) and the fit with every callback
measuring at every step must end bit-identical to the fit without them. The table in
docs/callbacks.md ("Supported training setups") points here.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import ICSCallback, LandscapeCallback, MeasurementCallback, MeasurementWarning
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    classification_loader,
    make_trainer,
    one_thread,
)

pytestmark = [pytest.mark.usefixtures("one_thread")]


class AtWt(MeasurementCallback):
    """Loss and gradient of the step at W_t, next to what training computed."""

    needs_params_t = True
    needs_grads_t = True

    def __init__(self) -> None:
        super().__init__(every_n_steps=1)
        self.errors: list[tuple[float, float]] = []

    def measure(self, trainer, pl_module, ctx):
        loss, grads = ctx.loss_and_grad(ctx.params_t)
        train = float(ctx.train_loss)
        g_err = max(float((grads[n] - ctx.grads_t[n]).abs().max()) for n in grads)
        self.errors.append((abs(float(loss) - train) / max(abs(train), 1e-12), g_err))
        return {"probe/loss": loss}


class FrozenTied(TinyClassifier):
    """A frozen first layer and a layer used twice (tied weights), dropout and BN."""

    def __init__(self) -> None:
        super().__init__(norm="batch", dropout=0.2)
        self.net[0].requires_grad_(False)
        self.tied = nn.Linear(8, 8)

    def forward(self, x):
        h = self.net[:3](x)
        h = torch.relu(self.tied(torch.relu(self.tied(h))))
        return self.net[3:](h)


class DictSyncDist(TinyClassifier):
    """training_step returns a dict, logs with sync_dist and a torchmetrics metric."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        self.log("train/loss", loss, sync_dist=True, prog_bar=True)
        self.train_acc(out.detach(), y)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return {"loss": loss, "logits": out.detach()}


class AdamOneCycle(TinyClassifier):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


SETUPS: dict[str, tuple[Any, dict[str, Any]]] = {
    "bf16-mixed": (lambda: TinyClassifier(norm="batch"), {"precision": "bf16-mixed"}),
    "gradient-clipping": (lambda: TinyClassifier(norm="batch", lr=1.0), {"gradient_clip_val": 0.05}),
    "adam-onecycle": (AdamOneCycle, {}),
    "frozen-tied-dropout-bn": (FrozenTied, {}),
    "dict-sync_dist-torchmetrics": (DictSyncDist, {}),
}


def _fit(make_model, kwargs, callbacks):
    pl.seed_everything(0)
    model = make_model()
    log = RecordingLogger()
    make_trainer(max_steps=4, callbacks=callbacks, logger=log, **kwargs).fit(model, classification_loader(n=32))
    return model, log


@pytest.mark.filterwarnings("error::callbacks.MeasurementWarning")
@pytest.mark.parametrize("setup", list(SETUPS))
def test_setup_is_measured_exactly_and_not_changed(setup):
    make_model, kwargs = SETUPS[setup]
    reference, ref_log = _fit(make_model, kwargs, [])
    probe = AtWt()
    others = [
        ICSCallback(every_n_steps=1),
        LandscapeCallback(every_n_steps=1, step_sizes=[0.01, 0.1], figure_every_n_steps=None),
    ]
    model, log = _fit(make_model, kwargs, [probe, *others])
    assert len(probe.errors) == 4
    # bf16 rounds the loss to 8 bits of mantissa: the same autocast gives the same rounding
    for loss_err, grad_err in probe.errors:
        assert loss_err <= 1e-6 and grad_err <= 1e-6, (loss_err, grad_err)
    assert sorted(log.values("landscape/beta_smoothness")) == [0, 1, 2, 3]
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
    own = [(s, {k: v for k, v in m.items() if k.split("/")[0] in ("train", "epoch")}) for s, m in log.records]
    assert [r for r in own if r[1]] == [
        (s, {k: v for k, v in m.items() if k.split("/")[0] in ("train", "epoch")}) for s, m in ref_log.records
    ]


def test_warnings_about_the_setup_point_at_the_users_code():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(max_steps=1, callbacks=[ICSCallback(every_n_steps=1)], logger=False)
        trainer.fit(TinyClassifier(), classification_loader())  # the warned line
    ours = [w for w in caught if issubclass(w.category, MeasurementWarning)]
    assert ours and "no logger" in str(ours[0].message)
    assert ours[0].filename == __file__
