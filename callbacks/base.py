"""The base class of every measurement callback: schedule, step capture, logging, safety.

A subclass declares what it needs from the training step and implements :meth:`measure`::

    class GradNormCallback(MeasurementCallback):
        needs_grads_t = True          # copy g_t in on_before_optimizer_step

        def measure(self, trainer, pl_module, ctx):
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ctx.grads_t.values()))
            return {"grad/norm": norm}

What the base does for every subclass (see docs/measurement-core.md):

* ``on_train_batch_start``: decides from step ``t`` (``trainer.global_step``; with manual
  optimization the batch count, see :mod:`callbacks.training_loop`) and the
  :class:`~callbacks.schedule.Schedule` whether step ``t`` is measured ("should measure
  now" is separate from "measure"); if so keeps the batch and captures every RNG stream.
  Under gradient accumulation every micro-batch of step ``t`` is kept.
* ``on_before_optimizer_step``: copies ``W_t`` (``needs_params_t``), ``g_t`` = ``p.grad``
  as training used it, already all-reduced by DDP (``needs_grads_t``), and the learning rates.
  (Manual optimization: ``W_t`` is copied at batch start and ``g_t`` is the gradient of
  ``measurement_loss`` at ``W_t``, computed at batch end.)
* ``on_train_batch_end`` of the step's last micro-batch (live parameters are ``W_{t+1}``):
  calls :meth:`measure` with a :class:`~callbacks.context.StepContext`, under a guard that
  restores every RNG stream; writes the returned scalars to every logger at step ``t``.
  Non-finite values are written as nan/inf with a single warning; if training diverged
  (non-finite loss, parameters or g_t), :meth:`measure` is skipped and every key of
  :meth:`expected_keys` is written as nan, with one warning naming the cause. In one process
  an exception inside ``measure`` becomes a :class:`MeasurementWarning` (nan written) and
  training continues; under DDP it is re-raised, because a rank that skipped a collective
  would hang the others.
* ``state_dict``: the schedule, the last measured step and :meth:`extra_state`, so a resumed
  run measures at the same steps with the same history.

Noise replay protocol: any submodule with a boolean attribute ``replay_noise`` is a noise
source. While ``replay_noise`` is True its training-mode forward must reuse the realization
of its last training forward and must not advance its own state (step counters). Every
re-evaluation sets it True and restores the previous value; it also replays the torch
(CPU, CUDA), NumPy and Python RNG state captured at ``on_train_batch_start`` and restores
the live state afterwards, so modules that draw from torch's RNG (dropout) see the
randomness of the training step.

Loss protocol: ``pl_module.measurement_loss(batch, batch_idx) -> Tensor`` if defined, else
``training_step`` (tensor or dict with ``"loss"``) with ``self.log``/``self.log_dict``
silenced and torchmetrics states restored. Manual optimization needs ``measurement_loss``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning_fabric
import lightning_utilities
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import Tensor

from callbacks.context import MicroBatch, StepContext, extract_loss
from callbacks.distributed import all_reduce_mean, is_global_zero, world_size
from callbacks.finite import NonFiniteError, all_finite, non_finite_names
from callbacks.guards import measuring
from callbacks.module_index import ModuleIndex
from callbacks.rng import RNGState, preserved_rng
from callbacks.schedule import Schedule
from callbacks.training_loop import (
    accumulating,
    all_lrs,
    max_accumulation,
    noise_sources,
    steps_done,
    supports_noise_state,
)
from callbacks.validation import CallbackArgumentError, check_choice
from callbacks.writers import histogram_stats, tensorboard_writer, write_scalars

BNMode = Literal["train", "eval"]
BN_MODES = ("train", "eval")


class MeasurementWarning(UserWarning):
    """A measurement could not run as asked; training continues. Filter with this class."""


# Frames of these packages are not "the user's code": a warning about the user's setup points
# at the first frame outside them (their trainer.fit(...) or Trainer(...) line).
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep
    for f in (__file__, pl.__file__, torch.__file__, lightning_fabric.__file__, lightning_utilities.__file__)
)
_LIBRARY_FILES = frozenset({contextlib.__file__, contextlib.__file__.removesuffix("c")})


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called from the caller of this function that
    attributes the warning to the first frame outside the callbacks, Lightning and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_LIBRARY_DIRS) or frame.f_code.co_filename in _LIBRARY_FILES
    ):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def _restored_after(state: RNGState) -> Any:
    """:func:`~callbacks.rng.preserved_rng` with the live state already captured (``state``)."""
    try:
        yield
    finally:
        state.restore()


def _loss_of(outputs: Any) -> Tensor | None:
    """The training loss in what ``on_train_batch_end`` received (None if there is none)."""
    try:
        return extract_loss(outputs).detach()
    except TypeError:
        return None


class MeasurementCallback(pl.Callback):
    """Base class: subclasses implement :meth:`measure` and declare what they need.

    Args:
        every_n_steps: measure every n-th training step (>= 1).
        start_step: first step that may be measured (>= 0).
        end_step: last step that may be measured (inclusive), or None.
        log_points_per_decade: also measure at log-spaced steps, this many per decade.
        bn_mode: ``"train"`` (batch statistics, as the training step) or ``"eval"``
            (running statistics; the whole module in eval mode) for re-evaluations.
    """

    #: copy W_t (every parameter) into ``ctx.params_t`` before the optimizer step
    needs_params_t: ClassVar[bool] = False
    #: copy g_t (``p.grad`` as training used it) into ``ctx.grads_t``
    needs_grads_t: ClassVar[bool] = False
    #: re-evaluates the loss (needs training_step returning the loss, or measurement_loss)
    reevaluates_loss: ClassVar[bool] = True
    #: writes histograms or figures (warn at setup when there is no TensorBoard logger)
    uses_tensorboard: ClassVar[bool] = False

    def __init__(
        self,
        every_n_steps: int,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        log_points_per_decade: int | None = None,
        bn_mode: BNMode = "train",
    ) -> None:
        super().__init__()
        try:
            self.schedule = Schedule(every_n_steps, start_step, end_step, log_points_per_decade)
        except CallbackArgumentError as err:  # name this callback, not the Schedule
            raise err.for_owner(type(self).__name__) from None
        check_choice(type(self).__name__, "bn_mode", bn_mode, BN_MODES)
        self.bn_mode: BNMode = bn_mode
        self.last_measured_step: int | None = None
        #: the scalars of the last measurement (also handy without any logger)
        self.last_values: dict[str, float] = {}
        self._pending: StepContext | None = None
        self._warned: set[str] = set()
        self._index = ModuleIndex()  # the module tree's lists, kept from step to step

    # ------------------------------------------------------------------ subclass API --
    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Trainer-dependent checks and preparation (resolve layer names, register hooks).
        Raise ``ValueError`` for anything that cannot work, before training starts."""

    def on_measured_step_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Called in ``on_train_batch_start`` of a measured step, before ``training_step``
        (e.g. arm forward hooks that observe the training forward)."""

    def on_micro_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        """Called before ``training_step`` of every micro-batch of a measured step (index 0 right
        after :meth:`on_measured_step_start`; 1, 2, ... under gradient accumulation)."""

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext
    ) -> Mapping[str, float | Tensor] | None:
        """Measure step ``ctx.step``; return the scalars to log (key -> value)."""
        raise NotImplementedError

    def teardown_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Undo what ``setup_measurement`` did (remove hooks)."""

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint (tensors/plain types)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def state_key_fields(self) -> dict[str, Any]:
        """Constructor arguments that tell two instances of the callback apart (state_key)."""
        return {**self.schedule.to_dict(), "bn_mode": self.bn_mode}

    # ------------------------------------------------------------ helpers for subclasses --
    def measures_step(self, step: int) -> bool:
        """Whether training step ``step`` (``trainer.global_step`` at batch start; the batch index
        with manual optimization) is measured;
        the schedule by default. Override to add conditions (e.g. epoch-only measurements)."""
        return self.schedule.should_measure(step)

    def measure_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int | None = None
    ) -> dict[str, float]:
        """Measure the live parameters now, from any hook outside the training step (epoch or
        training end, a validation hook, your own callback), with every guarantee of a
        scheduled measurement: states and RNG streams restored, errors warned (single process),
        values reduced over DDP ranks and written. There is no training batch: ``ctx.batch`` is
        None, so only measurements that bring their own data (a fixed sample) can run here.
        Every rank must call it (collectives).

        Values are written at ``step`` (default ``t - 1`` for ``t`` the steps taken so far,
        ``trainer.global_step`` or, with manual optimization, batches: the step whose update
        produced these parameters, as a scheduled measurement of step t sees W_{t+1}).
        Returns the written scalars (also in :attr:`last_values`).
        """
        if step is None:
            step = max(steps_done(trainer) - 1, 0)
        ctx = StepContext(
            trainer, pl_module, step, None, 0, bn_mode=self.bn_mode, rng=RNGState.capture(), index=self._index
        )
        ctx.lrs_t = all_lrs(trainer)
        self._measure_and_write(trainer, pl_module, ctx)
        return dict(self.last_values)

    def warn_once(self, key: str, message: str) -> None:
        """One ``MeasurementWarning`` per ``key`` per callback instance (on rank 0 only)."""
        if key not in self._warned:
            self._warned.add(key)
            if is_global_zero():
                warnings.warn(f"{type(self).__name__}: {message}", MeasurementWarning, stacklevel=user_stacklevel())

    def training_sample(self, trainer: pl.Trainer, num_batches: int) -> list[Any]:
        """The first ``num_batches`` batches of a fresh pass over ``trainer.train_dataloader``,
        on the device as ``training_step`` receives them; drawn once, then cached.

        A fixed sample of training data for measurements defined on it (sharpness, Hessian).
        Under DDP every rank gets its own shard (the DistributedSampler), so the reduced value
        is the value on the global sample. Drawing does not disturb the training RNG or the
        training iterator. Call it from :meth:`measure` (or later hooks).
        """
        cached = getattr(self, "_training_sample", None)
        if cached is not None and len(cached) >= num_batches:
            return cached[:num_batches]
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("trainer.train_dataloader is not available yet; call training_sample from measure()")
        batches: list[Any] = []
        with preserved_rng():
            for batch in loader:
                batch = trainer.precision_plugin.convert_input(batch)
                batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
                batches.append(trainer.strategy.batch_to_device(batch, dataloader_idx=0))
                if len(batches) == num_batches:
                    break
        if len(batches) < num_batches:
            self.warn_once("short-sample", f"the training data has only {len(batches)} batches (< {num_batches})")
        self._training_sample = batches
        return batches

    def log_histogram(self, trainer: pl.Trainer, tag: str, values: Tensor, step: int, bins: int = 64) -> None:
        """Histogram of ``values`` over the global batch to TensorBoard at ``step``.

        A collective under DDP: call it on every rank (only rank 0 writes). Does nothing
        (on every rank) when the trainer has no TensorBoard logger."""
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        stats = histogram_stats(values, bins)
        if stats is not None and trainer.is_global_zero:
            writer.add_histogram_raw(tag, global_step=step, **stats)

    def log_figure(self, trainer: pl.Trainer, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure to TensorBoard at ``step`` (rank 0 only; closes the figure)."""
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero:
            writer.add_figure(tag, figure, global_step=step, close=True)
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)

    # ----------------------------------------------------------------- Lightning hooks --
    @property
    def state_key(self) -> str:
        # Lightning reads state_key at every hook call of every callback (its profiler's label),
        # about 10 µs each and several per training step, measured or not: a fit uses the key
        # fixed at its setup (the constructor arguments do not change while it runs).
        key = self.__dict__.get("_fit_state_key")
        return key if key is not None else self._generate_state_key(**self.state_key_fields())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._fit_state_key = None
        self._fit_state_key = self.state_key
        name = type(self).__name__
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
            raise ValueError(
                f"{name} supports single-device and DDP strategies, got {type(strategy).__name__}: "
                "sharded parameters cannot be set in place"
            )
        if self.reevaluates_loss and not pl_module.automatic_optimization:
            if not callable(getattr(pl_module, "measurement_loss", None)):
                raise ValueError(
                    f"{name} re-evaluates the loss; with manual optimization training_step steps the optimizer, "
                    "so define measurement_loss(self, batch, batch_idx) -> Tensor on the LightningModule"
                )
        if self.reevaluates_loss and max_accumulation(trainer) > 1:
            lacking = [type(m).__name__ for m in noise_sources(pl_module) if not supports_noise_state(m)]
            if lacking:
                raise ValueError(
                    f"{name}: gradient accumulation needs each noise source's realization per micro-batch, "
                    f"but {sorted(set(lacking))} define no noise_state()/load_noise_state(state) "
                    "(see the noise replay protocol)"
                )
        if self.uses_tensorboard and tensorboard_writer(trainer) is None:
            self.warn_once(
                "no-tensorboard", "no TensorBoardLogger: histograms and figures are not written (scalars are)"
            )
        if not trainer.loggers:
            self.warn_once("no-logger", "the trainer has no logger: values are only kept in `last_values`")
        self.setup_measurement(trainer, pl_module)
        self._check_distinct_keys(trainer, pl_module)

    def same_values_as(self, other: MeasurementCallback) -> set[str]:
        """Keys that this callback and ``other`` both log with equal values at the same steps
        (so that sharing them is harmless); default: none."""
        return set()

    def _check_distinct_keys(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a callback that would log a key an earlier measurement callback logs: the
        values would silently overwrite each other (two sharpness callbacks that differ only in
        maximizer or BN mode, say). Lightning sets callbacks up in order, so the earlier ones
        know their keys by now."""
        mine = set(self.expected_keys(pl_module))
        callbacks = list(trainer.callbacks)
        for i, other in enumerate(callbacks):
            if other is self:
                break
            if not isinstance(other, MeasurementCallback):
                continue
            shared = sorted((mine & set(other.expected_keys(pl_module))) - self.same_values_as(other))
            if shared:
                more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
                fix = "give one a distinct key_suffix" if hasattr(self, "key_suffix") else "remove one of them"
                raise ValueError(
                    f"{type(self).__name__} (trainer.callbacks[{callbacks.index(self)}]) would log {shared[0]}{more}, "
                    f"as {type(other).__name__} (trainer.callbacks[{i}]) does: the values would overwrite each "
                    f"other; {fix}"
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_state_key = None
            self._pending = None
            self._index = ModuleIndex()  # holds the module's tree: let it go with the fit
            self.teardown_measurement(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = steps_done(trainer)
        ctx = self._pending
        # The RNG streams are captured only for a step that is measured (NumPy's get_state
        # alone costs ~50 µs); nothing before the captures below draws from them.
        if ctx is not None and ctx.step == step and ctx.lrs_t is None and pl_module.automatic_optimization:
            # the next micro-batch of an accumulated step
            ctx.micro_batches.append(MicroBatch(batch, batch_idx, RNGState.capture()))
            self.on_micro_batch_start(trainer, pl_module, len(ctx.micro_batches) - 1)
            return
        self._pending = None
        if not self.measures_step(step):
            return
        if pl_module.automatic_optimization and batch_idx % trainer.accumulate_grad_batches != 0:
            # step t began before this callback could see its first micro-batch (e.g. a resume
            # inside an accumulation window): measuring the rest would pair part of the data with g_t
            self.warn_once("mid-window", f"step {step} began before its first micro-batch was seen; not measured")
            return
        micro = MicroBatch(batch, batch_idx, RNGState.capture())
        ctx = StepContext(
            trainer, pl_module, step, batch, batch_idx, bn_mode=self.bn_mode, rng=micro.rng, index=self._index
        )
        ctx.micro_batches.append(micro)
        if not pl_module.automatic_optimization:
            # Manual optimization: the measured step is the batch. W_t = the parameters at batch
            # start, before any of the module's optimizers moved them; g_t is computed at batch end.
            if self.needs_params_t or self.needs_grads_t:
                with torch.no_grad():
                    ctx.params_t = {n: p.detach().clone() for n, p in ctx._named().items()}
            ctx.lrs_t = all_lrs(trainer)
        self._pending = ctx
        self.on_measured_step_start(trainer, pl_module, step)
        self.on_micro_batch_start(trainer, pl_module, 0)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        ctx = self._pending
        if ctx is None or not pl_module.automatic_optimization:
            return
        named = ctx._named()  # listed once per step (named_parameters() walks the module tree)
        with torch.no_grad():  # a clone made here records no graph: no detach() needed (µs per tensor)
            if self.needs_params_t:
                ctx.params_t = {n: p.clone() for n, p in named.items()}
            if self.needs_grads_t:
                ctx.grads_t = {
                    n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                    for n, p in named.items()
                    if p.requires_grad
                }
        ctx.lrs_t = [float(group["lr"]) for group in optimizer.param_groups]
        # Lightning divides every micro-batch's loss by accumulate_grad_batches (also in a
        # shorter last window of an epoch), so the step's loss is that scaled sum.
        ctx.loss_scale = 1.0 / trainer.accumulate_grad_batches

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ctx = self._pending
        if ctx is None:
            return
        ctx.train_loss = _loss_of(outputs)
        if pl_module.automatic_optimization and ctx.lrs_t is None:
            if accumulating(trainer):  # keep this micro-batch's noise realization for the replay
                ctx.micro_batches[-1].noise = {m: m.noise_state() for m in ctx._modules("noise")}
                return
            self._pending = None  # same on every rank: the optimizer did not step
            self.warn_once("no-step", f"the optimizer did not step at step {ctx.step}; nothing measured")
            return
        self._pending = None
        if not pl_module.automatic_optimization and self.needs_grads_t and ctx.params_t is not None:
            if self._finite_cause(pl_module, ctx) is None:
                _, ctx.grads_t = ctx.loss_and_grad(ctx.params_t)
        self._measure_and_write(trainer, pl_module, ctx)

    def _measure_and_write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> None:
        # One capture of the live streams serves both the comparison and the restore after the
        # measurement (NumPy's get_state is the costly call; nothing in between draws). When the
        # cheap exact check says NumPy's and Python's streams are still at the step's start, the
        # step's state is the live one there: only the torch streams are captured again.
        if ctx.rng.host_unchanged():
            live, host_same = ctx.rng.with_live_torch(), True
        else:
            live = RNGState.capture()
            host_same = live.host_same_as(ctx.rng)
        if host_same:
            # The training step drew nothing from NumPy/Python: replaying them is a no-op,
            # skip it (the measurement boundary below still restores every stream).
            ctx.rng = ctx.rng.torch_only()
            for mb in ctx.micro_batches:
                mb.rng = mb.rng.torch_only()
        values: Mapping[str, float | Tensor] | None = None
        cause = self._finite_cause(pl_module, ctx)
        if cause is None:
            with _restored_after(live), measuring():
                try:
                    values = self.measure(trainer, pl_module, ctx)
                except NonFiniteError as err:
                    cause = str(err)
                except Exception as err:
                    if world_size() > 1:
                        raise
                    self.warn_once(
                        f"error-{type(err).__name__}",
                        f"measurement at step {ctx.step} failed ({err!r}); logged as nan, training continues",
                    )
                    values = self._nan_values(pl_module)
        if cause is not None:
            values = self._nan_values(pl_module)
            self.warn_once(
                "diverged",
                f"{cause} at step {ctx.step}: the measurement is logged as nan from here on while it lasts "
                "(training continues; warned once)",
            )
        elif values:
            self._known_keys = list(values)
        self.last_measured_step = ctx.step
        self._write(trainer, values or {}, ctx.step, quiet=cause is not None)

    def _finite_cause(self, pl_module: pl.LightningModule, ctx: StepContext) -> str | None:
        """Why step ``ctx.step`` cannot be measured meaningfully (training diverged), or None.

        The same answer on every rank: parameters and g_t are identical across DDP ranks, the
        training loss is reduced first."""
        loss = getattr(ctx, "train_loss", None)
        if loss is not None and world_size() > 1:
            loss = all_reduce_mean(loss.detach().double())
        # One fused check over the loss and all three groups (one host sync); only if it fails,
        # the loss or the names of the first group that holds a non-finite tensor, as a check
        # per group in this order would report.
        groups = (ctx._named(), ctx.params_t or {}, ctx.grads_t or {})
        tensors = [t for group in groups for t in group.values()]
        if all_finite(tensors if loss is None else [loss, *tensors]):
            return None
        if loss is not None and not bool(torch.isfinite(loss)):
            return f"non-finite training loss ({float(loss):g})"
        merged = {
            (label, name): t
            for label, tensors in (("parameters", ctx.named_live()), ("W_t", ctx.params_t), ("g_t", ctx.grads_t))
            for name, t in (tensors or {}).items()
        }
        bad = non_finite_names(merged)
        if bad:
            label = bad[0][0]
            names = [name for group, name in bad if group == label]
            return f"non-finite {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        return None

    def _nan_values(self, pl_module: pl.LightningModule) -> dict[str, float]:
        return dict.fromkeys(self.expected_keys(pl_module), float("nan"))

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        """The keys a measurement writes, so that one that cannot run (diverged training) writes
        nan at every one of them. Default: the keys of the last successful measurement;
        subclasses that know their keys beforehand override it."""
        return list(getattr(self, "_known_keys", []))

    def _write(self, trainer: pl.Trainer, values: Mapping[str, float | Tensor], step: int, quiet: bool = False) -> None:
        scalars = {k: float(v.detach().double()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}
        bad = [k for k, v in scalars.items() if not math.isfinite(v)]
        if bad and not quiet:
            self.warn_once(
                "non-finite",
                f"non-finite value(s) at step {step} ({', '.join(bad[:3])}...) from finite parameters and loss; "
                "logged as nan/inf, training continues (warned once)",
            )
        self.last_values = scalars
        write_scalars(trainer, scalars, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "last_measured_step": self.last_measured_step,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_measured_step = state_dict.get("last_measured_step")
        self.load_extra_state(state_dict.get("extra", {}))
