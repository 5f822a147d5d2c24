"""Schedules: which steps are measured, serialization, and exact resumption from a checkpoint."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import ActivationStatsCallback, ICSCallback, Schedule
from tests._tiny_modules import RecordingLogger, TinyClassifier, classification_loader, make_trainer, one_thread  # noqa: F401  (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_n_steps_with_start_and_end():
    assert Schedule(every_n_steps=3).steps(10) == [0, 3, 6, 9]
    assert Schedule(every_n_steps=3, start_step=2, end_step=8).steps(20) == [2, 5, 8]
    assert Schedule(every_n_steps=1, start_step=4, end_step=4).steps(10) == [4]


def test_log_spaced_steps_are_added_to_every_n_steps():
    assert Schedule(every_n_steps=1000, log_points_per_decade=5).steps(100) == [
        0, 1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100,
    ]  # fmt: skip
    # offsets count from start_step; the multiples of every_n_steps stay
    assert Schedule(every_n_steps=50, start_step=10, log_points_per_decade=1).steps(120) == [10, 11, 20, 60, 110]
    dense = Schedule(every_n_steps=10**9, log_points_per_decade=20).steps(10**4)
    assert dense[:4] == [0, 1, 2, 3] and dense[-1] == 10**4 and len(dense) < 90


def test_schedule_is_serializable_plain_data():
    schedule = Schedule(every_n_steps=7, start_step=3, end_step=99, log_points_per_decade=4)
    state = schedule.to_dict()
    assert state == {"every_n_steps": 7, "start_step": 3, "end_step": 99, "log_points_per_decade": 4}
    assert Schedule.from_dict(state) == schedule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1, got 0"),
        ({"every_n_steps": 1.5}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 5, "end_step": 4}, "end_step must be an integer >= 5"),
        ({"log_points_per_decade": 0}, "log_points_per_decade"),
    ],
)
def test_invalid_schedules_name_argument_value_and_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**{"every_n_steps": 1, **kwargs})


def test_callbacks_are_configurable_like_lightningcli_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_object(
        {
            "callbacks": [
                {"class_path": "callbacks.ICSCallback", "init_args": {"every_n_steps": 5, "layers": ["net.0"]}},
                {
                    "class_path": "callbacks.ActivationStatsCallback",
                    "init_args": {"every_n_steps": 2, "log_points_per_decade": 3, "position": "output"},
                },
            ]
        }
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    ics, act = instantiate(config).callbacks
    assert isinstance(ics, ICSCallback) and ics.schedule.every_n_steps == 5 and ics.layers == ["net.0"]
    assert act.schedule.log_points_per_decade == 3 and act.position == "output"


def _callbacks():
    return [
        ICSCallback(every_n_steps=2, log_points_per_decade=2),
        ActivationStatsCallback(every_n_steps=1, histograms=False),
    ]


def test_resumed_run_measures_the_same_steps_with_the_same_values(tmp_path):
    """3 steps, checkpoint, resume to 6: the same measured steps and values (activation drift
    across the resume included, it needs the callback state) as 6 uninterrupted steps."""
    loader = lambda: classification_loader(n=48, batch_size=16)  # noqa: E731  (3 steps per epoch)
    pl.seed_everything(0)
    full = RecordingLogger()
    make_trainer(max_steps=6, callbacks=_callbacks(), logger=full).fit(TinyClassifier(), loader())

    pl.seed_everything(0)
    first = RecordingLogger()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    make_trainer(max_steps=3, callbacks=[*_callbacks(), ckpt], logger=first, enable_checkpointing=True).fit(
        TinyClassifier(), loader()
    )
    (path,) = tmp_path.glob("*step=3.ckpt")
    assert len(torch.load(path, weights_only=False)["callbacks"]) == 3
    second = RecordingLogger()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)  # as in the first run
    make_trainer(max_steps=6, callbacks=[*_callbacks(), ckpt], logger=second, enable_checkpointing=True).fit(
        TinyClassifier(), loader(), ckpt_path=path
    )

    keys = {k for _, m in full.records for k in m if k.startswith(("ics/", "activations/"))}
    assert "activations/net.1/mean_drift" in keys and "ics/net.6/cosine" in keys
    for key in keys:
        resumed = {**first.values(key), **second.values(key)}
        assert resumed.keys() == full.values(key).keys(), key
        for step, value in full.values(key).items():
            assert resumed[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, step)
    assert sorted(full.values("ics/net.0/cosine")) == [0, 1, 2, 3, 4]  # every 2nd + 1, 3 (log-spaced)
