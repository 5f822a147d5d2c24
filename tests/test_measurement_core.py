"""The measurement core: re-evaluation, restoration guards, logging and safety."""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from callbacks import MeasurementCallback, MeasurementWarning, StepContext
from callbacks.guards import (
    buffers_isolated,
    grad_only_for,
    logging_suppressed,
    metrics_preserved,
    modes_set,
    noise_replayed,
    parameters_set_to,
)
from callbacks.writers import histogram_stats
from tests._tiny_modules import (
    RecordingLogger,
    ReplayNoise,
    TinyClassifier,
    TinyDLN,
    classification_loader,
    image_loader,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
    regression_loader,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class AtWt(MeasurementCallback):
    """Re-evaluates loss and gradient at W_t and keeps them next to what training computed."""

    needs_params_t = True
    needs_grads_t = True

    def __init__(self, bn_mode="train", **kwargs):
        super().__init__(1, bn_mode=bn_mode, **kwargs)
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_loss = outputs["loss"].detach()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def measure(self, trainer, pl_module, ctx):
        loss = ctx.loss(ctx.params_t)
        loss2, grads = ctx.loss_and_grad(ctx.params_t)
        self.rows.append((ctx, self.train_loss, loss, loss2, grads))
        return {"at_wt/loss": loss}


def _vgg_noisy():
    from lightning_bn import VGG

    return VGG(norm="noisy_batch", width=1 / 16, num_classes=10, lr=0.05)


@pytest.mark.filterwarnings("error::callbacks.MeasurementWarning")
@pytest.mark.parametrize(
    ("make_model", "loader"),
    [
        (lambda: TinyClassifier(norm="batch", dropout=0.3), classification_loader),
        (lambda: TinyClassifier(norm="noisy", dropout=0.3), classification_loader),
        (TinyDLN, regression_loader),
        (_vgg_noisy, lambda: image_loader(n=16, size=32, num_classes=10, batch_size=8)),
    ],
    ids=["bn-dropout", "replaynoise-dropout", "dln-dict", "vgg-noisy_batch"],
)
def test_reevaluation_at_wt_reproduces_the_training_step_exactly(make_model, loader):
    """Same batch, same dropout masks, same noise realization: bit-identical loss and g_t."""
    torch.manual_seed(0)
    cb = AtWt()
    make_trainer(max_steps=2, callbacks=[cb], logger=RecordingLogger()).fit(make_model(), loader())
    assert len(cb.rows) == 2
    for ctx, train_loss, loss, loss2, grads in cb.rows:
        assert torch.equal(loss, train_loss) and torch.equal(loss2, train_loss)
        assert grads.keys() == ctx.grads_t.keys()
        for name, g in grads.items():
            assert torch.equal(g, ctx.grads_t[name]), name


def test_eval_bn_mode_uses_running_statistics_and_restores_modes():
    torch.manual_seed(0)
    seen = {}

    class Eval(MeasurementCallback):
        def measure(self, trainer, pl_module, ctx):
            reference = copy.deepcopy(pl_module).eval()
            x, y = ctx.batch
            seen["ref"] = F.cross_entropy(reference(x), y)
            seen["eval"] = ctx.loss()  # live parameters: W_{t+1}
            seen["train"] = ctx.loss(bn_mode="train")
            seen["modes"] = [m.training for m in pl_module.modules()]
            seen["buffers"] = [b.clone() for b in pl_module.buffers()]
            return {}

    model = TinyClassifier(norm="batch")
    model.net[1].eval()  # a frozen BN stays frozen in "train" mode measurements and after "eval"
    make_trainer(max_steps=1, callbacks=[Eval(1, bn_mode="eval")], logger=RecordingLogger()).fit(
        model, classification_loader()
    )
    assert torch.equal(seen["eval"], seen["ref"].detach())
    assert not torch.equal(seen["train"], seen["eval"])
    assert seen["modes"] == [m.training for m in model.modules()]
    assert model.net[1].training is False and model.net[4].training is True
    assert all(torch.equal(a, b) for a, b in zip(seen["buffers"], model.buffers()))


def test_measurement_loss_hook_replaces_training_step():
    class WithHook(TinyClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            WithHook.calls += 1
            return super().training_step(batch, batch_idx)

        def measurement_loss(self, batch, batch_idx):
            x, y = batch
            return 2 * F.cross_entropy(self(x), y)

    torch.manual_seed(0)
    cb = AtWt()
    make_trainer(max_steps=2, callbacks=[cb], logger=RecordingLogger()).fit(WithHook(), classification_loader())
    assert WithHook.calls == 2  # only the training steps
    for _, train_loss, loss, _, _ in cb.rows:
        assert torch.allclose(loss, 2 * train_loss)


def test_scalars_reach_every_logger_at_steps_log_every_n_steps_would_drop(tmp_path):
    class Step(MeasurementCallback):
        reevaluates_loss = False

        def measure(self, trainer, pl_module, ctx):
            return {"probe/step": float(ctx.step)}

    recorder, csv = RecordingLogger(), CSVLogger(tmp_path, name="", version=0)
    trainer = make_trainer(max_steps=8, callbacks=[Step(3)], logger=[recorder, csv], log_every_n_steps=50)
    trainer.fit(TinyClassifier(), classification_loader(n=128))
    assert recorder.values("probe/step") == {0: 0.0, 3: 3.0, 6: 6.0}
    lines = (tmp_path / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert sorted(int(r["step"]) for r in rows if r.get("probe/step")) == [0, 3, 6]


def test_measure_now_from_any_hook_measures_live_parameters_and_changes_nothing():
    """The public ``measure_now``: a user's own hook measures the live parameters, outside the
    measurement's step schedule; training is bit-identical to a run without it."""

    class ParamNorm(MeasurementCallback):
        reevaluates_loss = False

        def measure(self, trainer, pl_module, ctx):
            assert ctx.batch is None and ctx.step == trainer.global_step - 1
            torch.rand(3)  # draws from the RNG: the measurement boundary must restore it
            with torch.no_grad():
                norm = torch.cat([p.flatten() for p in pl_module.parameters()]).norm()
            return {"probe/param_norm": norm, "probe/global_step": float(trainer.global_step)}

        def measures_step(self, step):
            return False  # never on the step schedule: only when asked

    probe = ParamNorm(1)

    class EveryThird(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 3:
                return
            values = probe.measure_now(trainer, pl_module)
            expected = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).norm().item()
            assert values["probe/param_norm"] == pytest.approx(expected)

    def run(callbacks):
        pl.seed_everything(0)
        model = TinyClassifier()
        recorder = RecordingLogger()
        make_trainer(max_steps=6, callbacks=callbacks, logger=recorder).fit(model, classification_loader(n=128))
        return model, recorder

    model, recorder = run([probe, EveryThird()])
    reference, _ = run([])
    assert recorder.values("probe/global_step") == {2: 3.0, 5: 6.0}  # written at global_step - 1
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_non_finite_values_are_logged_with_a_single_warning():
    class NaN(MeasurementCallback):
        reevaluates_loss = False

        def measure(self, trainer, pl_module, ctx):
            return {"probe/nan": torch.tensor(float("nan")), "probe/inf": float("inf"), "probe/ok": 1.0}

    recorder = RecordingLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=3, callbacks=[NaN(1)], logger=recorder).fit(TinyClassifier(), classification_loader())
    ours = [w for w in caught if issubclass(w.category, MeasurementWarning)]
    assert len(ours) == 1 and "non-finite" in str(ours[0].message)
    assert len(recorder.values("probe/nan")) == 3
    assert all(v != v for v in recorder.values("probe/nan").values())
    assert recorder.values("probe/inf")[2] == float("inf")


def test_a_failing_measurement_warns_and_training_continues():
    class Broken(MeasurementCallback):
        needs_params_t = True

        def measure(self, trainer, pl_module, ctx):
            with ctx.evaluation({n: p * 0 for n, p in ctx.params_t.items()}):
                raise FloatingPointError("boom")

    torch.manual_seed(0)
    reference = TinyClassifier()
    model = copy.deepcopy(reference)
    pl.seed_everything(0)
    make_trainer(max_steps=3, logger=RecordingLogger()).fit(reference, classification_loader())
    pl.seed_everything(0)
    with pytest.warns(MeasurementWarning, match="boom"):
        make_trainer(max_steps=3, callbacks=[Broken(1)], logger=RecordingLogger()).fit(model, classification_loader())
    for p, q in zip(model.parameters(), reference.parameters()):  # parameters restored after the exception
        assert torch.equal(p, q)


def test_setup_rejects_what_cannot_work():
    class OpaqueNoise(torch.nn.Module):  # replays its noise, but cannot hand out one per micro-batch
        replay_noise = False

        def forward(self, x):
            return x

    noisy = TinyClassifier()
    noisy.net.append(OpaqueNoise())
    with pytest.raises(ValueError, match=r"accumulation.*\['OpaqueNoise'\].*noise_state"):
        make_trainer(callbacks=[AtWt()], accumulate_grad_batches=2, logger=RecordingLogger()).fit(
            noisy, classification_loader()
        )

    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="measurement_loss"):
        make_trainer(callbacks=[AtWt()], logger=RecordingLogger()).fit(Manual(), classification_loader())
    with pytest.warns(MeasurementWarning, match="no TensorBoardLogger"):

        class Hist(MeasurementCallback):
            uses_tensorboard = True
            reevaluates_loss = False

            def measure(self, trainer, pl_module, ctx):
                return {}

        make_trainer(max_steps=1, callbacks=[Hist(1)], logger=RecordingLogger()).fit(
            TinyClassifier(), classification_loader()
        )


def test_training_sample_is_the_first_batches_on_device():
    got = {}

    class Sample(MeasurementCallback):
        reevaluates_loss = False

        def measure(self, trainer, pl_module, ctx):
            got["sample"] = self.training_sample(trainer, 2)
            got["again"] = self.training_sample(trainer, 2)
            return {}

    loader = classification_loader(shuffle=False)
    make_trainer(max_steps=1, callbacks=[Sample(1)], logger=RecordingLogger()).fit(TinyClassifier(), loader)
    expected = list(loader)[:2]
    assert got["again"] is not None and len(got["sample"]) == 2
    for (x, y), (ex, ey) in zip(got["sample"], expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_state_key_tells_instances_apart():
    a, b = AtWt(), AtWt(bn_mode="eval")
    assert a.state_key != b.state_key and "AtWt" in a.state_key


def test_state_key_is_computed_once_per_fit_and_follows_the_arguments_between_fits():
    """Lightning reads state_key at every hook call of every callback: a fit computes it once."""
    cb = AtWt()
    calls = []
    fields = cb.state_key_fields
    cb.state_key_fields = lambda: calls.append(1) or fields()
    before = cb.state_key
    trainer = make_trainer(max_steps=4, callbacks=[cb], logger=RecordingLogger())
    calls.clear()
    trainer.fit(TinyClassifier(), classification_loader())
    assert len(calls) <= 2 and cb.state_key == before  # the setup hook's label and setup itself; none per step
    cb.bn_mode = "eval"  # after the fit, the key follows the arguments again
    assert cb.state_key != before


def test_an_unmeasured_step_captures_no_rng_state(monkeypatch):
    """Capturing the RNG streams (NumPy's get_state alone ~50 µs) only for the steps measured."""
    import callbacks.base as base

    captured_at = []
    capture = base.RNGState.capture
    trainer = make_trainer(max_steps=7, callbacks=[Every3()], logger=RecordingLogger())

    def counting(host=True):
        import sys

        if sys._getframe(1).f_code.co_name == "on_train_batch_start":
            captured_at.append(trainer.global_step)
        return capture(host)

    monkeypatch.setattr(base.RNGState, "capture", staticmethod(counting))
    trainer.fit(TinyClassifier(), classification_loader())
    assert captured_at == [0, 3, 6]


class Every3(MeasurementCallback):
    def __init__(self):
        super().__init__(3)

    def measure(self, trainer, pl_module, ctx):
        return {"every3/loss": ctx.loss()}


# -- the guards, one by one --------------------------------------------------------------
def test_parameters_set_to_restores_bits_and_identity():
    model = TinyClassifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = [id(p) for p in model.parameters()]
    with parameters_set_to(model, {"net.0.weight": torch.zeros_like(before["net.0.weight"])}):
        assert model.net[0].weight.abs().sum() == 0
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(KeyError, match="nope"):
        with parameters_set_to(model, {"nope": torch.zeros(1)}):
            pass


def test_buffers_isolated_keeps_original_buffer_objects_untouched():
    model = TinyClassifier(norm="batch").train()
    originals = [(b, b.clone()) for b in model.buffers()]
    versions = [b._version for b, _ in originals]
    with buffers_isolated(model):
        model(torch.randn(8, 6))
        assert not torch.equal(model.net[1].running_mean, originals[0][1])
    assert [b for b in model.buffers()] == [b for b, _ in originals]
    assert all(torch.equal(b, c) for b, c in originals)
    assert [b._version for b, _ in originals] == versions


def test_modes_grad_noise_and_logging_guards_restore_exactly():
    model = TinyClassifier(norm="noisy").train()
    model.net[1][0].eval()
    modes = [m.training for m in model.modules()]
    with modes_set(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes
    model.net[0].bias.requires_grad_(False)
    with grad_only_for(model, ["net.3.weight"]):
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.3.weight"]
    assert not model.net[0].bias.requires_grad and model.net[0].weight.requires_grad
    noise = [m for m in model.modules() if isinstance(m, ReplayNoise)]
    with noise_replayed(model):
        assert all(m.replay_noise for m in noise)
    assert not any(m.replay_noise for m in noise)
    calls = []
    model.log = lambda *a, **k: calls.append(a)  # an instance attribute set by the user stays
    with logging_suppressed(model):
        model.log("x", 1.0)
        model.log_dict({"x": 1.0})
    model.log("y", 1.0)
    assert calls == [("y", 1.0)]


def test_metrics_preserved_restores_torchmetrics_state():
    model = TinyClassifier()
    model.train_acc(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    before = model.train_acc.compute().clone()
    with metrics_preserved(model):
        model.train_acc(torch.randn(16, 3), torch.randint(0, 3, (16,)))
    assert model.train_acc.update_count == 1
    assert torch.equal(model.train_acc.compute(), before)


def test_evaluation_restores_everything_after_an_exception():
    model = TinyClassifier(norm="batch").train()
    ctx = StepContext(None, model, 0, (torch.randn(8, 6), torch.randint(0, 3, (8,))), 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with ctx.evaluation({n: p + 1 for n, p in model.named_parameters()}, wrt=None, bn_mode="eval") as loss_fn:
            loss_fn()
            raise RuntimeError("inside")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_extract_loss_rejects_non_losses():
    model = nn.Linear(2, 1)
    model.training_step = lambda batch, batch_idx: {"logits": torch.zeros(2)}
    ctx = StepContext(None, model, 0, torch.zeros(2), 0)
    with pytest.raises(TypeError, match="measurement_loss"):
        ctx.loss()


def test_histogram_stats_match_torch_histogram():
    values = torch.tensor([0.0, 1.0, 1.0, 2.0, float("nan"), 4.0])
    stats = histogram_stats(values, bins=4)
    finite = values[torch.isfinite(values)].double()
    counts, _ = torch.histogram(finite, bins=4, range=(0.0, 4.0))
    assert stats["bucket_counts"] == counts.tolist()
    assert stats["num"] == 5 and stats["min"] == 0.0 and stats["max"] == 4.0
    assert stats["sum"] == 8.0 and stats["sum_squares"] == 22.0
    assert histogram_stats(torch.tensor([float("nan")])) is None
    assert histogram_stats(torch.ones(3), bins=2)["num"] == 3


class _HostRandomClassifier(TinyClassifier):
    """Scales its loss by draws from NumPy's and Python's global generators: in every training
    step (``always``) or only while a measurement re-evaluates it."""

    def __init__(self, always: bool, gauss: bool = False, **kwargs):
        super().__init__(norm="batch", **kwargs)
        self.always, self.gauss = always, gauss

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        from callbacks.guards import is_measuring

        if self.always or is_measuring():
            import random

            import numpy as np

            # randn: NumPy draws gaussians in pairs and caches one, which the next step consumes
            # without advancing the generator
            draw = np.random.randn() if self.gauss else np.random.rand()
            loss = loss * (1.0 + 0.01 * float(draw) + 0.01 * random.random())
        return loss


@pytest.mark.filterwarnings("error::callbacks.MeasurementWarning")
@pytest.mark.parametrize("gauss", [False, True], ids=["uniform", "gaussian"])
@pytest.mark.parametrize("always", [True, False], ids=["training-draws", "only-measurement-draws"])
def test_numpy_and_python_random_are_replayed_and_restored_exactly(always, gauss):
    """With host draws in the training step the re-evaluation at W_t replays them (bit-identical
    loss and g_t); either way the live NumPy/Python streams after a measured step are those of a
    run without the callback (one capture of the live state serves the check and the restore)."""
    import random

    import numpy as np

    def run(callbacks):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        model = _HostRandomClassifier(always, gauss)
        make_trainer(max_steps=3, callbacks=callbacks, logger=RecordingLogger()).fit(model, classification_loader())
        return model, np.random.get_state(), random.getstate()

    cb = AtWt()
    model, np_state, py_state = run([cb])
    ref, np_ref, py_ref = run([])
    assert len(cb.rows) == 3
    if always:
        for ctx, train_loss, loss, loss2, grads in cb.rows:
            assert torch.equal(loss, train_loss) and torch.equal(loss2, train_loss)
            for name, g in grads.items():
                assert torch.equal(g, ctx.grads_t[name]), name
    assert np_state[2:] == np_ref[2:] and np.array_equal(np_state[1], np_ref[1]) and py_state == py_ref
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_the_cheap_host_checks_are_exact():
    """RNGState compares NumPy's and Python's streams through their raw states (rng_raw): True
    only when a stream is exactly at the captured state, a consumed cached gaussian included."""
    import random

    import numpy as np

    from callbacks.rng import RNGState

    np.random.seed(0)
    state = RNGState.capture()
    assert state.numpy_raw is not None and state.python_raw is not None  # read raw on this build
    assert state.numpy_unchanged() and state.host_unchanged()
    np.random.rand()
    assert not state.numpy_unchanged()
    state = RNGState.capture()
    np.random.randn()  # draws a pair, caches one
    assert not state.numpy_unchanged()
    cached = RNGState.capture()
    assert cached.numpy[3] == 1 and cached.numpy_unchanged()
    np.random.randn()  # consumes the cached one: the MT19937 words do not move, the state does
    assert not cached.numpy_unchanged() and cached.numpy_raw[:2500] == RNGState.capture().numpy_raw[:2500]
    cached.restore()  # the full state is set back, the cached gaussian included
    again = RNGState.capture()
    assert again.numpy[3] == 1 and again.numpy[4] == cached.numpy[4] and again.host_same_as(cached)
    state = RNGState.capture()
    random.random()
    assert state.numpy_unchanged() and not state.python_unchanged() and not state.host_unchanged()
    random.seed(5)
    state = RNGState.capture()
    random.gauss(0, 1)  # Python caches gauss_next: a raw state that differs in the attribute only
    cached = RNGState.capture()
    random.gauss(0, 1)
    assert not cached.python_unchanged() and not state.python_unchanged()
    cached.restore()
    assert cached.python_unchanged() and random.getstate() == cached.python
