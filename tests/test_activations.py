"""ActivationStatsCallback: per-unit statistics, drift and histograms of the training forward."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import ActivationStatsCallback, ICSCallback, is_measuring
from callbacks.activations import mean_std, norm_layers, unit_moments
from tests._tiny_modules import (
    RecordingLogger,
    TinyClassifier,
    TinyConvNet,
    classification_loader,
    image_loader,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
)

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]


def _capture_norm_inputs(model, names):
    """Reference: every training-mode input of the named modules, keyed by global step."""
    seen: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
    modules = dict(model.named_modules())
    for name in names:

        def hook(module, args, name=name):
            if module.training and not is_measuring():  # ICS re-runs the forward at step t+1
                seen[name].setdefault(model.global_step, args[0].detach().clone())

        modules[name].register_forward_pre_hook(hook)
    return seen


def test_unit_moments_match_torch_reductions():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    mean, std = mean_std(unit_moments(x))
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(std, x.std(dim=(0, 2, 3), unbiased=False))
    mean1, std1 = mean_std(unit_moments(x[:, 0, 0, 0]))  # (N,): one unit
    torch.testing.assert_close(mean1, x[:, 0, 0, 0].mean().reshape(1))


@pytest.mark.parametrize("with_ics", [False, True], ids=["alone", "with-ics"])
def test_statistics_and_drift_match_reference(with_ics):
    """Values equal a brute-force computation from the captured training inputs; an ICS
    measurement in the same run (which re-runs the forward) does not change them."""
    torch.manual_seed(0)
    model = TinyClassifier(norm="batch")
    names = norm_layers(model)
    assert names == ["net.1", "net.4"]
    seen = _capture_norm_inputs(model, names)
    cb = ActivationStatsCallback(every_n_steps=2, histograms=False)
    logger = RecordingLogger()
    callbacks = [cb, ICSCallback(every_n_steps=1)] if with_ics else [cb]
    make_trainer(max_steps=5, callbacks=callbacks, logger=logger).fit(model, classification_loader())
    for name in names:
        key = f"activations/{name}"
        assert sorted(logger.values(f"{key}/mean")) == [0, 2, 4]
        assert sorted(logger.values(f"{key}/mean_drift")) == [2, 4]  # from the second measurement on
        for step in (0, 2, 4):
            x = seen[name][step].double()
            assert logger.values(f"{key}/mean")[step] == pytest.approx(float(x.mean(0).mean()), rel=1e-9, abs=1e-12)
            assert logger.values(f"{key}/std")[step] == pytest.approx(float(x.std(0, unbiased=False).mean()), rel=1e-9)
        for step, prev in ((2, 0), (4, 2)):
            x, x0 = seen[name][step].double(), seen[name][prev].double()
            drift = (x.mean(0) - x0.mean(0)).abs().mean()
            std_drift = (x.std(0, unbiased=False) - x0.std(0, unbiased=False)).abs().mean()
            assert logger.values(f"{key}/mean_drift")[step] == pytest.approx(float(drift), rel=1e-9)
            assert logger.values(f"{key}/std_drift")[step] == pytest.approx(float(std_drift), rel=1e-9)


def test_histograms_in_tensorboard_and_hooks_removed(tmp_path):
    torch.manual_seed(0)
    model = TinyConvNet(norm="group")
    cb = ActivationStatsCallback(every_n_steps=1, position="output")
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    make_trainer(max_steps=3, callbacks=[cb], logger=logger).fit(model, image_loader(batch_size=8))
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {
        "activations_output/net.1/values",
        "activations_output/net.1/unit_mean",
        "activations_output/net.5/unit_std",
    } <= set(tags["histograms"])
    events = acc.Histograms("activations_output/net.1/values")
    assert [e.step for e in events] == [0, 1, 2]
    assert events[0].histogram_value.num == 8 * 4 * 8 * 8  # batch x channels x H x W, every value
    assert sum(events[0].histogram_value.bucket) == 8 * 4 * 8 * 8
    assert "activations_output/net.5/mean_drift" in tags["scalars"]
    assert all(not m._forward_hooks for m in model.modules())


def test_input_and_output_together_have_their_own_keys_and_values():
    """Two callbacks, one per position, in one run: the output keys are the norm's output
    statistics (brute force from the captured outputs), the input keys its input's."""
    torch.manual_seed(0)
    model = TinyClassifier(norm="batch")
    names = norm_layers(model)
    inputs = _capture_norm_inputs(model, names)
    outputs: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
    modules = dict(model.named_modules())
    for name in names:

        def hook(module, args, out, name=name):
            if module.training and not is_measuring():
                outputs[name].setdefault(model.global_step, out.detach().clone())

        modules[name].register_forward_hook(hook)
    logger = RecordingLogger()
    callbacks = [
        ActivationStatsCallback(every_n_steps=1, histograms=False),
        ActivationStatsCallback(every_n_steps=1, histograms=False, position="output"),
    ]
    make_trainer(max_steps=2, callbacks=callbacks, logger=logger).fit(model, classification_loader())
    for name in names:
        for step in (0, 1):
            for prefix, seen in (("activations", inputs), ("activations_output", outputs)):
                x = seen[name][step].double()
                logged = logger.values(f"{prefix}/{name}/std")[step]
                assert logged == pytest.approx(float(x.std(0, unbiased=False).mean()), rel=1e-9), (prefix, name)
    # BN's output has unit std per channel (gamma = 1 at init), its input does not
    assert logger.values("activations_output/net.1/std")[0] == pytest.approx(1.0, abs=1e-3)
    assert abs(logger.values("activations/net.1/std")[0] - 1.0) > 1e-2


def test_default_layers_are_norm_positions_also_without_norm():
    """With norm=none the callback observes the identity placeholders where the norms would be."""
    lightning_bn = pytest.importorskip("lightning_bn")
    with_bn = norm_layers(lightning_bn.VGG(width=0.125, norm="batch"))
    without = norm_layers(lightning_bn.VGG(width=0.125, norm="none"))
    assert with_bn == without and len(with_bn) == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bn_mode": "eval"}, "bn_mode"),
        ({"position": "middle"}, "position"),
        ({"layers": []}, "layers"),
        ({"histograms": "yes"}, "histograms"),
        ({"every_n_steps": -1}, "every_n_steps"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationStatsCallback(**{"every_n_steps": 1, **kwargs})


def test_setup_errors_name_the_problem():
    logger = RecordingLogger()
    with pytest.raises(ValueError, match="net.42"):
        cb = ActivationStatsCallback(every_n_steps=1, layers=["net.42"], histograms=False)
        make_trainer(callbacks=[cb], logger=logger).fit(TinyClassifier(), classification_loader())
    with pytest.raises(ValueError, match="no normalization layer"):
        cb = ActivationStatsCallback(every_n_steps=1, histograms=False)
        make_trainer(callbacks=[cb], logger=logger).fit(TinyClassifier(norm="none"), classification_loader())
