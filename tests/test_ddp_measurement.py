"""DDP: with 2 CPU processes (gloo) the logged values equal those of 1 process on the same global batch."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, DistributedSampler

from callbacks import ActivationStatsCallback, ICSCallback, MeasurementCallback, NormCurvatureCallback
from tests._tiny_modules import EndProcessGroup, TinyConvNet, image_loader

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

GLOBAL_BATCH, STEPS = 16, 2


class SampleLoss(MeasurementCallback):
    """Loss and gradient norm at W_t on the step's batch and on a fixed training sample (eval mode)."""

    needs_params_t = True

    def measure(self, trainer, pl_module, ctx):
        loss, grads = ctx.loss_and_grad(ctx.params_t)
        sample = ctx.loss(batches=self.training_sample(trainer, 2), bn_mode="eval")
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        return {"probe/loss_t": loss, "probe/grad_norm_t": norm, "probe/sample_loss": sample}


class InterleavedData(pl.LightningDataModule):
    """Rank r of w gets samples r, r + w, ... in order (Lightning's own DistributedSampler
    always shuffles training data), so every step's global batch is the 1-process batch."""

    def train_dataloader(self) -> DataLoader:
        dataset = image_loader(n=GLOBAL_BATCH * STEPS).dataset
        world = self.trainer.world_size
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def _run(tmp_path, devices: int) -> tuple[dict[str, dict[int, float]], EventAccumulator]:
    pl.seed_everything(0)
    model = TinyConvNet(norm="group")
    loggers = [
        CSVLogger(tmp_path, name="csv", version=devices),
        TensorBoardLogger(tmp_path, name="tb", version=devices),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=STEPS,
        logger=loggers,
        callbacks=[
            ICSCallback(every_n_steps=1),
            ActivationStatsCallback(every_n_steps=1),
            SampleLoss(every_n_steps=1),
            NormCurvatureCallback(every_n_steps=1),
            *([EndProcessGroup()] if devices > 1 else []),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=InterleavedData())
    with open(tmp_path / "csv" / f"version_{devices}" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    values: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if value and key not in ("step", "epoch"):
                values.setdefault(key, {})[int(row["step"])] = float(value)
    events = EventAccumulator(str(tmp_path / "tb" / f"version_{devices}"), size_guidance={"histograms": 0})
    events.Reload()
    return values, events


def test_two_processes_log_the_values_of_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers share 2 cores
    single, single_events = _run(tmp_path, devices=1)
    double, double_events = _run(tmp_path, devices=2)
    measured = [k for k in single if k.startswith(("ics/", "activations/", "probe/", "normcurv/"))]
    assert {
        "ics/net.0/cosine",
        "activations/net.5/std",
        "activations/net.1/mean_drift",
        "probe/sample_loss",
        "normcurv/net.1/quad_in",
        "normcurv/net.5/curv_ratio",
    } <= set(measured)
    for key in measured:
        assert double[key].keys() == single[key].keys(), key
        for step, value in single[key].items():
            assert double[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)
    assert double["probe/loss_t"] == pytest.approx(single["train/loss"], rel=1e-5)  # the global training loss
    # histograms cover the global batch too: every value of 16 samples x 4 channels x 8 x 8
    for events in (single_events, double_events):
        counts = [h.histogram_value.num for h in events.Histograms("activations/net.1/values")]
        assert counts == [GLOBAL_BATCH * 4 * 8 * 8] * STEPS
