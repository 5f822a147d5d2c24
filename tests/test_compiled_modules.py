"""``torch.compile``d models: every measurement equals that of the same fit of an eager copy.

The implementation runs every measurement eagerly (``torch.compiler.set_stance("force_eager")``
in ``callbacks.guards.measuring``), so a measurement of a compiled model computes the same
function as of the uncompiled one. Pinned for:

* a LightningModule whose network is compiled (``self.net = torch.compile(..., backend="eager")``):
  values bit-identical to the eager fit;
* the same with the default (inductor) backend, if it compiles on this machine: rtol 1e-4
  (inductor's kernels round differently, during training too);
* ``trainer.fit(torch.compile(lightning_module))`` (Lightning unwraps it with
  ``pytorch_lightning.utilities.compile.from_compiled``: ``forward`` and ``training_step`` compiled).

The compiled network's parameters are named ``net._orig_mod.<i>...``; keys are compared after
dropping ``._orig_mod``.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch._dynamo.utils import counters

from callbacks import (
    ActivationStatsCallback,
    HessianCallback,
    ICSCallback,
    KeskarSharpnessCallback,
    LandscapeCallback,
    NormCurvatureCallback,
)
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    classification_loader,
    make_trainer,
    one_thread,
)

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]

STEPS = 3
PREFIXES = ("ics/", "landscape/", "activations/", "hessian/", "sharpness/", "normcurv/")


class CompiledClassifier(TinyClassifier):
    """TinyClassifier whose ``net`` is ``torch.compile``d (``backend=None``: left eager)."""

    def __init__(self, backend: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if backend is not None:
            self.net = torch.compile(self.net, backend=backend)


def _callbacks():
    return [
        ICSCallback(every_n_steps=1),
        LandscapeCallback(every_n_steps=1, figure_every_n_steps=None, log_each_step_size=True),
        ActivationStatsCallback(every_n_steps=1, histograms=False),
        HessianCallback(max_iter=30, num_batches=1, every_n_steps=1),
        KeskarSharpnessCallback(max_iter=3, num_batches=1, every_n_steps=1),
        NormCurvatureCallback(every_n_steps=1),
    ]


def _fit(make_model, compile_module: bool = False, measure: bool = True):
    torch._dynamo.reset()
    counters.clear()
    pl.seed_everything(0)
    model = make_model()
    logger = RecordingLogger()
    trainer = make_trainer(max_steps=STEPS, callbacks=_callbacks() if measure else [], logger=logger)
    trainer.fit(torch.compile(model, backend="eager") if compile_module else model, classification_loader())
    # what dynamo compiled during the fit: frames and graphs
    model.compiled = (counters["frames"]["total"], counters["frames"]["ok"], counters["stats"]["unique_graphs"])
    measured: dict[tuple[int, str], float] = {}
    for step, metrics in logger.records:
        for key, value in metrics.items():
            if key.startswith(PREFIXES):
                measured[(step, key.replace("._orig_mod", ""))] = value
    return model, measured


def _assert_same(measured, reference, rel=0.0, abs_=0.0):
    assert sorted(measured) == sorted(reference)
    # every callback measured every step
    for prefix in PREFIXES:
        assert {s for s, k in reference if k.startswith(prefix)} == set(range(STEPS)), prefix
    assert all(math.isfinite(v) for v in reference.values())
    for key, value in reference.items():
        if rel == 0.0 and abs_ == 0.0:
            assert measured[key] == value, key
        else:
            # phi = 100 (max f - f) / (1 + f) differences two float32 losses: one ulp of f (1.2e-7)
            # moves it by ~6e-6, so it gets an absolute tolerance of 100 x that resolution
            tol = max(abs_, 1e-4) if key[1].startswith("sharpness/keskar") else abs_
            assert measured[key] == pytest.approx(value, rel=rel, abs=tol), key


def _final_params(model):
    return {n.replace("._orig_mod", ""): p.detach().clone() for n, p in model.named_parameters()}


def test_compiled_network_eager_backend_measures_exactly_as_eager():
    _, reference = _fit(lambda: CompiledClassifier(backend=None))
    model, measured = _fit(lambda: CompiledClassifier(backend="eager"))
    assert isinstance(model.net, torch._dynamo.eval_frame.OptimizedModule)
    assert any("net._orig_mod" in n for n, _ in model.named_parameters())
    unmeasured, _ = _fit(lambda: CompiledClassifier(backend="eager"), measure=False)
    assert unmeasured.compiled[1] >= 1  # training really ran through dynamo
    # measurements run eagerly: they compile (and recompile) nothing
    assert model.compiled == unmeasured.compiled
    _assert_same(measured, reference)


@pytest.mark.slow
def test_compiled_lightning_module_is_unwrapped_and_measures_exactly_as_eager():
    eager, reference = _fit(lambda: TinyClassifier())
    model, measured = _fit(lambda: TinyClassifier(), compile_module=True)
    assert isinstance(model, pl.LightningModule)
    assert model._compiler_ctx is not None  # from_compiled: forward and training_step compiled
    unmeasured, _ = _fit(lambda: TinyClassifier(), compile_module=True, measure=False)
    assert unmeasured.compiled[1] >= 1
    assert model.compiled == unmeasured.compiled  # the measurements compiled nothing
    _assert_same(measured, reference)
    for name, value in _final_params(eager).items():
        assert torch.equal(_final_params(model)[name], value), name


def _inductor_works() -> str | None:
    """None if inductor compiles (forward and backward) on this machine, else the reason."""
    torch._dynamo.reset()
    try:
        net = torch.compile(torch.nn.Linear(3, 2))
        net(torch.randn(4, 3)).sum().backward()
    except Exception as err:  # noqa: BLE001 (any failure to compile means: skip)
        return f"inductor cannot compile here: {type(err).__name__}: {str(err)[:200]}"
    finally:
        torch._dynamo.reset()
    return None


@pytest.mark.slow
def test_compiled_network_inductor_measures_as_eager():
    reason = _inductor_works()
    if reason is not None:
        pytest.skip(reason)
    _, reference = _fit(lambda: CompiledClassifier(backend=None))
    model, measured = _fit(lambda: CompiledClassifier(backend="inductor"))
    assert isinstance(model.net, torch._dynamo.eval_frame.OptimizedModule)
    assert model.compiled[1] >= 1
    _assert_same(measured, reference, rel=1e-4, abs_=1e-6)
