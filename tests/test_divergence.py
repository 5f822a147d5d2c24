"""Diverged training: every scheduled measurement writes nan, with one warning naming the cause.

Contract (DESIGN.md section 4.6, issue 16): once the training loss, the parameters or the loss
on a fixed sample are inf/nan, every callback still writes nan at every scheduled step, for
every key it writes when it can measure, until the end of the run; each callback warns exactly
once (a ``MeasurementWarning`` naming the cause); training is not stopped. Before the
divergence the values are finite. The Hessian used to fail inside ``linalg.eigh`` and write
nothing.
"""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch

from callbacks import (
    ActivationStatsCallback,
    HessianCallback,
    ICSCallback,
    KeskarSharpnessCallback,
    LandscapeCallback,
    MeasurementWarning,
    NormCurvatureCallback,
)
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    TinyDLN,
    classification_loader,
    make_trainer,
    one_thread,
    regression_loader,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
ETAS = [0.01, 0.1]

CLASSIFIER_KEYS = {
    ICSCallback: [f"ics/net.{i}/{s}" for i in (0, 3, 6) for s in ("l2_diff", "cosine")],
    LandscapeCallback: [
        f"landscape/{k}"
        for k in ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta_smoothness", "grad_norm")
    ]
    + [f"landscape/{kind}/eta_{eta:g}" for eta in ETAS for kind in ("loss", "grad_diff")],
    ActivationStatsCallback: [f"activations/net.{i}/{s}" for i in (1, 4) for s in ("mean", "std")],
    HessianCallback: ["hessian/top_eigenvalue", "hessian/trace", "hessian/trace_stderr", "hessian/num_hvps"],
    KeskarSharpnessCallback: [
        "sharpness/keskar_eps0.001",
        "sharpness/keskar_eps0.001_at_bound",
        "sharpness/keskar_eps0.0005",
        "sharpness/keskar_eps0.0005_at_bound",
        "sharpness/loss",
    ],
    NormCurvatureCallback: [
        f"normcurv/net.{i}/{s}"
        for i in (1, 4)
        for s in (
            "quad_in",
            "quad_out",
            "quad_chain",
            "norm_term",
            "curv_in",
            "curv_out",
            "curv_ratio",
            "norm_term_paper",
        )
    ],
}
# written from the second measurement on: at every step >= 1
DRIFT_KEYS = [f"activations/net.{i}/{s}" for i in (1, 4) for s in ("mean_drift", "std_drift")]


def _callbacks(activation_layers=None):
    return [
        ICSCallback(every_n_steps=1),
        LandscapeCallback(every_n_steps=1, step_sizes=ETAS, log_each_step_size=True, figure_every_n_steps=None),
        ActivationStatsCallback(every_n_steps=1, layers=activation_layers, histograms=False),
        HessianCallback(max_iter=30, num_batches=1, every_n_steps=1),
        KeskarSharpnessCallback(max_iter=2, num_batches=1, every_n_steps=1),
        NormCurvatureCallback(every_n_steps=1, layers=activation_layers),
    ]


class Sabotage(pl.Callback):
    """At the end of step ``at``, overwrite the tensor ``target(pl_module)`` with ``value`` (in
    place): before the measurements of step ``at`` when placed before them, else after."""

    def __init__(self, at: int, target, value: float) -> None:
        self.at, self.target, self.value = at, target, value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == self.at:
            with torch.no_grad():
                self.target(pl_module).fill_(self.value)


class LossRecorder(pl.Callback):
    """The training loss of every step (``global_step`` before the step)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step - 1] = float(loss)


def _fit(model, loader, callbacks, before=(), after=()):
    """Fit with ``callbacks``; the callbacks ``before``/``after`` run their hooks before/after them."""
    logger = RecordingLogger()
    recorder = LossRecorder()
    trainer = make_trainer(max_steps=STEPS, callbacks=[*before, recorder, *callbacks, *after], logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    measurement_warnings = [w for w in caught if issubclass(w.category, MeasurementWarning)]
    assert trainer.global_step == STEPS  # training was not stopped
    return logger, recorder.losses, measurement_warnings


def _warnings_of(caught, callback) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith(type(callback).__name__ + ":")]


def _check_nan_from(logger, keys, first_bad: int, steps=range(STEPS)) -> None:
    for key in keys:
        values = logger.values(key)
        assert sorted(values) == list(steps), (key, sorted(values))
        for step in steps:
            if step < first_bad:
                assert math.isfinite(values[step]), (key, step, values[step])
            else:
                assert math.isnan(values[step]), (key, step, values[step])


def test_non_finite_training_loss_logs_nan_everywhere_with_one_warning_each():
    """Parameters set to inf after the measurement of step 1: the loss of step 2 is nan."""
    pl.seed_everything(0)
    model = TinyClassifier()
    sabotage = Sabotage(at=1, target=lambda m: m.net[0].weight, value=float("inf"))
    callbacks = _callbacks()
    logger, losses, caught = _fit(model, classification_loader(), callbacks, after=[sabotage])
    assert all(math.isfinite(losses[t]) for t in (0, 1)) and all(math.isnan(losses[t]) for t in range(2, STEPS))
    for cb in callbacks:
        _check_nan_from(logger, CLASSIFIER_KEYS[type(cb)], first_bad=2)
        messages = _warnings_of(caught, cb)
        assert len(messages) == 1, (type(cb).__name__, messages)
        assert "non-finite training loss" in messages[0], messages
    _check_nan_from(logger, DRIFT_KEYS, first_bad=2, steps=range(1, STEPS))
    assert len(caught) == len(callbacks)


def test_non_finite_parameters_with_finite_loss_name_the_parameters():
    """Parameters set to inf after step 2's update, before the measurements see them: the
    training loss of step 2 is finite, W_{t+1} is not; from step 3 the loss is nan too."""
    pl.seed_everything(0)
    model = TinyClassifier()
    sabotage = Sabotage(at=2, target=lambda m: m.net[3].bias, value=float("inf"))
    callbacks = _callbacks()
    logger, losses, caught = _fit(model, classification_loader(), callbacks, before=[sabotage])
    assert all(math.isfinite(losses[t]) for t in (0, 1, 2)) and all(math.isnan(losses[t]) for t in (3, 4, 5))
    for cb in callbacks:
        _check_nan_from(logger, CLASSIFIER_KEYS[type(cb)], first_bad=2)
        messages = _warnings_of(caught, cb)
        assert len(messages) == 1, (type(cb).__name__, messages)
        assert "non-finite parameters" in messages[0] and "net.3.bias" in messages[0], messages
    assert len(caught) == len(callbacks)


def test_non_finite_loss_on_the_fixed_sample_only_hits_fixed_sample_measurements():
    """BN running means set to inf: training (batch statistics) stays finite, the fixed-sample
    measurements (eval mode: running statistics) see a nan loss from step 2 on."""
    pl.seed_everything(0)
    model = TinyClassifier()
    sabotage = Sabotage(at=1, target=lambda m: m.net[1].running_mean, value=float("inf"))
    callbacks = _callbacks()
    logger, losses, caught = _fit(model, classification_loader(), callbacks, after=[sabotage])
    assert all(math.isfinite(v) for v in losses.values())
    for cb in callbacks:
        messages = _warnings_of(caught, cb)
        if isinstance(cb, (HessianCallback, KeskarSharpnessCallback)):
            _check_nan_from(logger, CLASSIFIER_KEYS[type(cb)], first_bad=2)
            assert len(messages) == 1, (type(cb).__name__, messages)
            assert "non-finite loss or gradient on the fixed sample" in messages[0], messages
        else:
            _check_nan_from(logger, CLASSIFIER_KEYS[type(cb)], first_bad=STEPS)
            assert messages == [], messages


def test_huge_learning_rate_diverges_without_crash_and_logs_nan_after():
    """SGD with lr 1e6 on a deep linear network: the loss overflows within a few steps (here the
    training loss of step 1 is inf; the loss on the fixed sample at W_1 already is)."""
    pl.seed_everything(0)
    model = TinyDLN(lr=1e6)
    callbacks = _callbacks(activation_layers=["layers.1", "layers.2"])
    logger, losses, caught = _fit(model, regression_loader(), callbacks)
    diverged = [t for t, v in losses.items() if not math.isfinite(v)]
    assert diverged, losses
    first_bad = min(diverged)
    assert first_bad < STEPS - 1, losses  # at least two steps measured after the divergence
    keys = {
        ICSCallback: [f"ics/layers.{i}/{s}" for i in range(4) for s in ("l2_diff", "cosine")],
        LandscapeCallback: CLASSIFIER_KEYS[LandscapeCallback],
        ActivationStatsCallback: [f"activations/layers.{i}/{s}" for i in (1, 2) for s in ("mean", "std")],
        HessianCallback: CLASSIFIER_KEYS[HessianCallback],
        KeskarSharpnessCallback: CLASSIFIER_KEYS[KeskarSharpnessCallback],
        NormCurvatureCallback: [
            f"normcurv/layers.{i}/{s}"
            for i in (1, 2)
            for s in ("quad_in", "quad_out", "quad_chain", "norm_term", "curv_in", "curv_out", "curv_ratio")
        ],
    }
    for cb in callbacks:
        for key in keys[type(cb)]:
            values = logger.values(key)
            assert sorted(values) == list(range(STEPS)), (key, sorted(values))
            assert all(math.isnan(values[t]) for t in range(first_bad, STEPS)), (key, values)
        # one warning, naming the cause: fixed-sample measurements see W_{t+1}, so they may
        # meet the overflow one step earlier, on their sample
        messages = _warnings_of(caught, cb)
        assert len(messages) == 1, (type(cb).__name__, messages)
        causes = (
            "non-finite training loss",
            "non-finite parameters",
            "non-finite loss or gradient on the fixed sample",
        )
        assert any(cause in messages[0] for cause in causes), messages
    assert len(caught) == len(callbacks)
