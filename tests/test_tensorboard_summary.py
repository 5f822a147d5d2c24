"""TensorBoardSummary: the custom-scalars layout and the HParams a run's TensorBoard log opens with."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from callbacks import ActivationStatsCallback, ICSCallback, LandscapeCallback
from lightning_bn.tensorboard_summary import TensorBoardSummary, layout_for
from tests._tiny_modules import TinyClassifier, classification_loader, make_trainer, one_thread  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread")]


def _fit(tmp_path, callbacks, fail: bool = False):
    pl.seed_everything(3)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    model = TinyClassifier(norm="batch")
    model.save_hyperparameters({"norm": "batch", "lr": 0.1, "_instantiator": "x"})
    if fail:
        model.training_step = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))
    trainer = make_trainer(max_steps=2, callbacks=[TensorBoardSummary(), *callbacks], logger=logger)
    try:
        trainer.fit(model, classification_loader())
    except RuntimeError:
        assert fail
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc, logger.log_dir


def _plugin(log_dir, tag: str) -> bytes:
    """The plugin content of summary ``tag`` in the run's event files (HParams summaries carry
    no value, so EventAccumulator does not keep them)."""
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    return value.metadata.plugin_data.content
    return b""


def test_layout_and_hparams_are_written_and_lightnings_own_summary_is_not(tmp_path):
    callbacks = [
        ICSCallback(every_n_steps=1),
        LandscapeCallback(every_n_steps=1, step_sizes=[0.1], figure_every_n_steps=None),
        LandscapeCallback(every_n_steps=1, step_sizes=[0.1], direction="unit", key_suffix="_unit",
                          figure_every_n_steps=None),
        ActivationStatsCallback(every_n_steps=1, position="output", histograms=False),
    ]  # fmt: skip
    acc, log_dir = _fit(tmp_path, callbacks)
    tags = acc.Tags()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == [
        "1 training", "2 landscape (Santurkar Fig. 4)", "2 landscape_unit (Santurkar Fig. 4)",
        "3 internal covariate shift (Def. 2.1)", "4 activations_output drift",
    ]  # fmt: skip
    band = layout.category[1].chart[0].margin.series[0]
    assert (band.value, band.lower, band.upper) == ("landscape/loss_min", "landscape/loss_min", "landscape/loss_max")
    assert list(layout.category[3].chart[0].multiline.tag) == [r"ics/.*/l2_diff"]
    # HParams: the real arguments and the run's setup, no hp_metric, no LightningCLI internals
    start = plugin_data_pb2.HParamsPluginData()
    start.ParseFromString(_plugin(log_dir, "_hparams_/session_start_info"))
    hp = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.session_start_info.hparams.items()}
    assert hp["model"] == "TinyClassifier" and hp["norm"] == "batch" and hp["optimizer"] == "SGD"
    assert hp["seed"] == 3 and hp["max_steps"] == 2 and "_instantiator" not in hp
    assert "hp_metric" not in tags["scalars"]
    end = plugin_data_pb2.HParamsPluginData()
    end.ParseFromString(_plugin(log_dir, "_hparams_/session_end_info"))
    assert end.session_end_info.status == 1  # STATUS_SUCCESS
    assert (tmp_path / "version_0" / "hparams.yaml").read_text().count("norm: batch") == 1


def test_a_failed_fit_ends_its_session_as_failed(tmp_path):
    _, log_dir = _fit(tmp_path, [], fail=True)
    end = plugin_data_pb2.HParamsPluginData()
    end.ParseFromString(_plugin(log_dir, "_hparams_/session_end_info"))
    assert end.session_end_info.status == 2  # STATUS_FAILURE


def test_without_tensorboard_it_does_nothing_and_other_loggers_keep_their_hparams(tmp_path):
    model = TinyClassifier()
    model.save_hyperparameters({"norm": "none"})
    trainer = make_trainer(max_steps=1, callbacks=[TensorBoardSummary()], logger=CSVLogger(tmp_path))
    trainer.fit(model, classification_loader())
    assert "norm: none" in (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert list(layout_for(trainer)) == ["1 training"]
