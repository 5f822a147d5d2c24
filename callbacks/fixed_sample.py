"""Expensive measurements on a fixed sample of training data, at epoch ends by default.

Sharpness and the Hessian are properties of the loss over a fixed sample at the current
parameters, not of one training step, and cost tens to hundreds of forward+backward passes.
:class:`FixedSampleMeasurement` runs them at the end of every ``every_n_epochs``-th epoch and
at the end of training (skipped if the parameters did not change since the last
measurement), optionally also on a step schedule. Everything else (restoring every state,
DDP reduction, writing, never crashing training) is :class:`~callbacks.MeasurementCallback`'s.

Values measured at the end of an epoch are written at step ``trainer.global_step - 1``,
the step whose update produced the measured parameters (the base's convention: a
measurement of step ``t`` sees ``W_{t+1}``), so they line up with that step's ``train/loss``.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from callbacks.base import BNMode, MeasurementCallback
from callbacks.distributed import world_size
from callbacks.validation import check_bool, check_int, fail

DEFAULT_NUM_SAMPLES = 2048


class FixedSampleMeasurement(MeasurementCallback):
    """Base of measurements on a fixed training sample (subclasses implement ``measure``).

    Args:
        num_samples: size of the fixed sample over all ranks, rounded up to whole batches
            of the training loader (default: ``default_num_samples``). Drawn once, at the
            first measurement, as the first batches of a fresh pass over the training data.
        num_batches: or: the number of training batches per rank (not with ``num_samples``).
        every_n_epochs: measure at the end of every n-th epoch (None: never).
        at_train_end: also measure at the end of training (unless the last measurement
            already saw the final parameters).
        every_n_steps: also measure after every n-th training step (None: never), with
            ``start_step``, ``end_step``, ``log_points_per_decade`` as in
            :class:`~callbacks.Schedule`.
        bn_mode: ``"eval"`` (running statistics; default) or ``"train"`` (batch statistics
            of each batch of the sample).
        sample_batch_size: None (default): the sample is the training loader's batches, so in
            ``bn_mode="train"`` the statistics are those of batches of the training batch size.
            An integer: the sample (``num_samples``, rounded up to whole batches of this size)
            is re-split into batches of this size, so that runs with different training batch
            sizes (Keskar's small vs large batch) are measured on equally sized batches. Each
            batch must be a tensor or a tuple/list/dict of tensors of one leading size.
    """

    default_num_samples = DEFAULT_NUM_SAMPLES

    def __init__(
        self,
        *,
        num_samples: int | None = None,
        num_batches: int | None = None,
        every_n_epochs: int | None = 1,
        at_train_end: bool = True,
        every_n_steps: int | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        log_points_per_decade: int | None = None,
        bn_mode: BNMode = "eval",
        sample_batch_size: int | None = None,
    ) -> None:
        owner = type(self).__name__
        check_int(owner, "every_n_steps", every_n_steps, 1, optional=True)
        super().__init__(
            every_n_steps or 1,
            start_step=start_step,
            end_step=end_step,
            log_points_per_decade=log_points_per_decade,
            bn_mode=bn_mode,
        )
        check_int(owner, "num_samples", num_samples, 1, optional=True)
        check_int(owner, "num_batches", num_batches, 1, optional=True)
        if num_samples is not None and num_batches is not None:
            fail(owner, "num_batches", num_batches, f"must be None with num_samples={num_samples} (give one, not both)")
        check_int(owner, "sample_batch_size", sample_batch_size, 1, optional=True, why=" (None: the loader's batches)")
        if sample_batch_size is not None and num_batches is not None:
            rule = f"must be None with num_batches={num_batches} (re-batching needs num_samples)"
            fail(owner, "sample_batch_size", sample_batch_size, rule)
        check_int(owner, "every_n_epochs", every_n_epochs, 1, optional=True)
        check_bool(owner, "at_train_end", at_train_end)
        if every_n_epochs is None and every_n_steps is None and not at_train_end:
            rule = "must be True when every_n_epochs and every_n_steps are None (nothing would be measured)"
            fail(owner, "at_train_end", at_train_end, rule)
        self.num_samples, self.num_batches, self.sample_batch_size = num_samples, num_batches, sample_batch_size
        self._rebatched: list[Any] | None = None
        self.every_n_epochs, self.at_train_end, self.every_n_steps = every_n_epochs, at_train_end, every_n_steps
        self._measured_global_step: int | None = None

    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "every_n_steps": self.every_n_steps,
            "every_n_epochs": self.every_n_epochs,
            "at_train_end": self.at_train_end,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "sample_batch_size": self.sample_batch_size,
        }

    # -- the sample ---------------------------------------------------------------------
    def sample(self, trainer: pl.Trainer) -> list[Any]:
        """This rank's batches of the fixed training sample (cached after the first call)."""
        if self.num_batches is not None:
            return self.training_sample(trainer, self.num_batches)
        batch_size = extract_batch_size(self.training_sample(trainer, 1)[0])
        wanted = self.num_samples or self.default_num_samples
        if self.sample_batch_size is None:
            return self.training_sample(trainer, max(1, math.ceil(wanted / (batch_size * world_size()))))
        if self._rebatched is None:
            size = self.sample_batch_size
            per_rank = math.ceil(wanted / (size * world_size())) * size  # whole batches of `size` per rank
            drawn = self.training_sample(trainer, math.ceil(per_rank / batch_size))
            self._rebatched = rebatch(drawn, size, per_rank, type(self).__name__)
        return self._rebatched

    # -- when -----------------------------------------------------------------------------
    def measures_step(self, step: int) -> bool:
        return self.every_n_steps is not None and super().measures_step(step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        before = self.last_measured_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.last_measured_step != before:  # this step was measured: W_{global_step} seen
            self._measured_global_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure_now(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            self.measure_now(trainer, pl_module)

    def measure_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int | None = None
    ) -> dict[str, float]:
        """As :meth:`MeasurementCallback.measure_now`, but once per set of parameters: a call
        with the parameters of the last measurement (same ``global_step``) returns its values."""
        if self._measured_global_step == trainer.global_step:
            return dict(self.last_values)  # same parameters as the last measurement (identical on every rank)
        self._measured_global_step = trainer.global_step
        return super().measure_now(trainer, pl_module, step)

    def extra_state(self) -> dict[str, Any]:
        return {"measured_global_step": self._measured_global_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._measured_global_step = state.get("measured_global_step")


def rebatch(batches: list[Any], size: int, total: int, owner: str) -> list[Any]:
    """The first ``total`` samples of ``batches`` (tensors, or tuples/lists/dicts of tensors
    sharing the leading dimension) re-split into batches of ``size`` (the last may be smaller
    when the data run out)."""
    leaves, specs = [], []
    for batch in batches:
        flat, spec = tree_flatten(batch)
        if not flat or not all(isinstance(t, Tensor) and t.dim() > 0 for t in flat):
            kinds = sorted({type(t).__name__ for t in flat}) or ["nothing"]
            fail(owner, "sample_batch_size", size, f"needs batches of tensors, got a batch of {', '.join(kinds)}")
        if len({t.shape[0] for t in flat}) != 1:
            fail(owner, "sample_batch_size", size, "needs tensors of one leading size in every batch")
        leaves.append(flat)
        specs.append(spec)
    if any(spec != specs[0] for spec in specs):
        fail(owner, "sample_batch_size", size, "needs every batch of the same structure")
    columns = [torch.cat(column)[:total] for column in zip(*leaves)]
    chunks = zip(*(column.split(size) for column in columns))
    return [tree_unflatten(list(chunk), specs[0]) for chunk in chunks]
