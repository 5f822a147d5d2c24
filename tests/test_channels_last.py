"""``channels_last`` with ``device_resident`` and bf16, under every measurement callback.

Channels-last changes only the memory layout of the convolution weights and the batches, so
every logged value must be the default layout's (up to the float32 summation order of a
different convolution kernel), also in bf16 autocast; and the layout must really be used.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from callbacks import (
    ActivationStatsCallback,
    HessianCallback,
    ICSCallback,
    KeskarSharpnessCallback,
    LandscapeCallback,
    NormGradientCallback,
)
from lightning_bn import MLP, VGG
from lightning_bn.data import CIFAR10DataModule
from lightning_bn.errors import ConfigError
from tests._tiny_modules import RecordingLogger, make_trainer, one_thread  # noqa: F401  (fixture)
from tests.test_image_folder import make_tree

pytestmark = [pytest.mark.usefixtures("one_thread")]
FMT = torch.channels_last


class LayoutProbe(pl.Callback):
    """Records, at every training batch, whether the first conv's input and weight are NHWC."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []
        self._input: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        conv = pl_module.features[0]
        conv.register_forward_pre_hook(lambda m, args: self._input.append(args[0].is_contiguous(memory_format=FMT)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the training forward of this batch ran first (callbacks' re-evaluations come after it)
        self.seen.append((self._input[0], pl_module.features[0].weight.is_contiguous(memory_format=FMT)))
        self._input.clear()


def every_callback() -> list[pl.Callback]:
    return [
        ICSCallback(every_n_steps=2),
        ActivationStatsCallback(every_n_steps=2, histograms=False),
        LandscapeCallback(every_n_steps=2, step_sizes=[0.01, 0.1], figure_every_n_steps=None),
        NormGradientCallback(every_n_steps=2),
        KeskarSharpnessCallback(epsilons=[1e-3], max_iter=3, every_n_epochs=None, num_samples=16),
        # tol=0: always max_iter probes (the stopping rule is a threshold a rounding can flip)
        HessianCallback(top_k=1, max_iter=10, tol=0.0, every_n_epochs=None, num_samples=16),
    ]


def fit(root, channels_last: bool, precision: str = "32-true", callbacks: list | None = None):
    pl.seed_everything(0)  # before the data module: it takes its draws' seed from torch's
    # no augmentation: zero-padded crops make exact ties in ReLU/max-pool, where float noise of
    # 1e-6 in the weights switches the active path and second-order values jump by percents in
    # either layout (the crop itself is tested in test_device_resident.py)
    data = CIFAR10DataModule(root=str(root), batch_size=8, device_resident=True, augment=False)
    model = VGG(width=0.0625, lr=0.05, channels_last=channels_last)
    log, probe = RecordingLogger(), LayoutProbe()
    make_trainer(
        max_steps=4,
        callbacks=[probe, *(every_callback() if callbacks is None else callbacks)],
        logger=log,
        precision=precision,
        limit_val_batches=0,
    ).fit(model, data)
    return model, log, probe


def measured(log: RecordingLogger) -> dict[str, float]:
    keep = ("ics/", "activations/", "landscape/", "normgrad/", "sharpness/", "hessian/")
    return {f"{s}:{k}": v for s, m in log.records for k, v in m.items() if k.startswith(keep)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_tree(root, {"train": 4, "test": 1}, size=32)
    return root


def test_every_callback_measures_the_same_values_in_channels_last(tree):
    ref_model, ref_log, ref_probe = fit(tree, channels_last=False)
    model, log, probe = fit(tree, channels_last=True)
    assert ref_probe.seen == [(False, False)] * 4 and probe.seen == [(True, True)] * 4
    ref, got = measured(ref_log), measured(log)
    kinds = {k.split(":")[1].split("/")[0] for k in got}
    assert kinds == {"ics", "activations", "landscape", "normgrad", "sharpness", "hessian"}
    assert got.keys() == ref.keys()
    for key in ref:  # another conv kernel sums in another order: float32 rounding only
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # checkpoints hold the same values in either layout
    state = model.state_dict()
    assert state["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    reloaded = VGG(width=0.0625)
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded.features[0].weight, model.features[0].weight, rtol=0, atol=0)


def test_bf16_channels_last_device_resident_is_measured_and_not_changed(tree):
    """bf16 rounds each kernel's output, so ICS (a difference of two gradients) is rounding-
    sized and layout-dependent: compared here with the same layout's training, which every
    callback must leave bit-identical, and every value must be finite."""
    plain, _, _ = fit(tree, channels_last=True, precision="bf16-mixed", callbacks=[])
    model, log, probe = fit(tree, channels_last=True, precision="bf16-mixed")
    assert probe.seen == [(True, True)] * 4
    values = measured(log)
    assert {k.split(":")[1].split("/")[0] for k in values} == {
        "ics", "activations", "landscape", "normgrad", "sharpness", "hessian"
    }
    assert all(math.isfinite(v) for v in values.values()), values
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name


def test_channels_last_on_a_model_without_convolutions_is_one_line():
    with pytest.raises(ConfigError, match=r"^channels_last=true needs a model with 2-D convolutions .*MLP has none"):
        MLP(channels_last=True).setup("fit")
    with pytest.raises(ConfigError, match=r"^channels_last must be true or false, got 'yes'$"):
        VGG(width=0.0625, channels_last="yes")
