"""LandscapeCallback: loss landscape, gradient predictiveness and effective beta-smoothness along
the gradient (Santurkar, Tsipras, Ilyas & Madry 2018, Sec. 3 and Fig. 4).

At a measured step t, with W_t the parameters, g_t = grad L(W_t; x_t, y_t) the gradient
training used and W(eta) = W_t - eta g_t for every step size eta of a grid, on the step's
batch (x_t, y_t):

* ``landscape/loss_min``, ``landscape/loss_max``: min and max over eta of L(W(eta))
  ("variation in loss", Fig. 4a);
* ``landscape/grad_diff_min``, ``landscape/grad_diff_max``: min and max over eta of
  ||grad L(W(eta)) - g_t||_2 ("gradient predictiveness", Fig. 4b);
* ``landscape/beta_smoothness``: max over eta of ||grad L(W(eta)) - g_t||_2 / ||eta g_t||_2
  ("effective beta-smoothness", Fig. 4c);
* ``landscape/grad_norm``: ||g_t||_2. Both bands scale with it: at one learning rate a network
  with a larger gradient moves further, so compare bands only together with this value.
* with ``log_each_step_size=True`` also ``landscape/loss/<eta>`` and ``landscape/grad_diff/<eta>``
  for every eta, ``<eta>`` = ``lr_x<multiplier>`` (e.g. ``lr_x0.5``) or ``eta_<value>``.

With ``key_suffix`` (e.g. ``"_unit"``) every key ends in it (``landscape/loss_min_unit``), so
two instances, say one per ``direction``, measure in the same run without overwriting each other.

Cost per measurement: exactly len(grid) forward+backward passes of the step's batch (8 by
default), plus bookkeeping that benchmarks/landscape_cost.py measures against them. Memory: the
core's copies of W_t and g_t, plus four parameter-sized buffers (W_t and g_t packed, W(eta),
the gradient at W(eta); ``method="loop"``; a model whose len(grid) gradients fit in 32 MB keeps
one gradient row per eta instead, and keeps these buffers from one measurement to the next)
or ``chunk_size`` copies and activations (``method="batched"``).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
from torch import Tensor, nn
from torch.func import functional_call

from callbacks.base import BNMode, MeasurementCallback
from callbacks.context import StepContext
from callbacks.finite import NonFiniteError
from callbacks.landscape_math import (
    DEFAULT_LR_MULTIPLIERS,
    SUMMARY_KEYS,
    evaluate_along_gradient,
    grad_norm,
    summarize,
)
from callbacks.landscape_plot import plot_landscape
from callbacks.validation import check_choice, check_int, check_key_suffix, check_positive_numbers, fail
from callbacks.writers import tensorboard_writer

PREFIX = "landscape/"
Method = Literal["loop", "batched"]


def run_label(trainer: pl.Trainer) -> str:
    """The run's name for the figure's legend: the logger's version when it is a name (a sweep
    run: ``norm=batch_norm,seed=0``), else ``<Module> version_<n>``."""
    module = type(trainer.lightning_module).__name__
    version = getattr(trainer.logger, "version", None) if trainer.logger is not None else None
    if isinstance(version, str) and version:
        return version
    return f"{module} version_{version}" if isinstance(version, int) else module


class LandscapeCallback(MeasurementCallback):
    """Santurkar et al. (2018) Fig. 4 measurements for any LightningModule.

    Cost per measurement: len(grid) forward+backward passes of the step's batch (8 by
    default), whichever ``method``; memory: four parameter-sized buffers (``loop``; up to
    32 MB of gradient rows on small models, see the module docstring).

    Args:
        every_n_steps: measure every n-th training step.
        step_sizes: absolute step sizes eta; if None, ``lr_multipliers`` x the learning rate
            the optimizer used for the measured step.
        lr_multipliers: multipliers of the current learning rate (default: 8 values evenly
            spaced over [0.5, 4], the paper's [0.05, 0.4] at lr 0.1).
        bn_mode: ``"train"`` (batch statistics, as the training step sees the loss; running
            statistics untouched) or ``"eval"`` (running statistics).
        method: ``"loop"`` (one eta per forward+backward; the default, faster for conv nets
            on CPU, see benchmarks/landscape_batched_vs_loop.py) or ``"batched"`` (vmap over
            ``chunk_size`` etas at once; faster for small MLPs). If vmap cannot trace the
            module's loss (``.item()`` or data-dependent control flow in ``training_step`` or
            the model; define ``measurement_loss`` without them), ``batched`` falls back to
            ``loop`` with one warning.
        chunk_size: etas per vmap call for ``batched`` (None: all).
        figure_every_n_steps: redraw the Fig. 4 figure (tag ``landscape/figure``, TensorBoard)
            at the first measurement at least this many steps after the last one, and at the
            end of training; None: no figure.
        log_each_step_size: also log the loss and gradient difference at every eta.
        direction: ``"gradient"`` (default, the paper's): W(eta) = W_t - eta g_t, so the
            distance moved is eta ||g_t|| and a network with a larger gradient moves farther
            at the same eta; ``"unit"``: W(d) = W_t - d g_t / ||g_t||, fixed distances ``d``
            in parameter space (``step_sizes`` are then these distances and are required),
            so two networks are compared at the same distance. The same keys; beta is
            ||grad L(W) - g_t|| / (distance moved) in both. Per-size keys are ``dist_<d>``.
        key_suffix: appended to every key of this instance (``""`` or ``_``-separated words,
            e.g. ``"_unit"``), so that several instances can run side by side.
        start_step, end_step, log_points_per_decade: the schedule (see ``Schedule``).
    """

    needs_params_t = True
    needs_grads_t = True

    def __init__(
        self,
        every_n_steps: int = 10,
        step_sizes: list[float] | None = None,
        lr_multipliers: list[float] = list(DEFAULT_LR_MULTIPLIERS),  # noqa: B006 (read-only, shown by the CLI)
        bn_mode: BNMode = "train",
        *,
        method: Method = "loop",
        chunk_size: int | None = None,
        figure_every_n_steps: int | None = 500,
        log_each_step_size: bool = False,
        direction: Literal["gradient", "unit"] = "gradient",
        key_suffix: str = "",
        start_step: int = 0,
        end_step: int | None = None,
        log_points_per_decade: int | None = None,
    ) -> None:
        super().__init__(
            every_n_steps,
            start_step=start_step,
            end_step=end_step,
            log_points_per_decade=log_points_per_decade,
            bn_mode=bn_mode,
        )
        owner = type(self).__name__
        self.step_sizes = None if step_sizes is None else check_positive_numbers(owner, "step_sizes", step_sizes)
        self.lr_multipliers = check_positive_numbers(owner, "lr_multipliers", lr_multipliers)
        check_choice(owner, "method", method, ("loop", "batched"))
        check_choice(owner, "direction", direction, ("gradient", "unit"))
        if direction == "unit" and step_sizes is None:
            fail(owner, "step_sizes", None, "is required with direction='unit' (distances in parameter space)")
        self.direction = direction
        self.key_suffix = check_key_suffix(owner, key_suffix)
        check_int(owner, "chunk_size", chunk_size, 1, optional=True)
        check_int(owner, "figure_every_n_steps", figure_every_n_steps, 1, optional=True)
        self.method: Method = method
        self.chunk_size = chunk_size
        self.figure_every_n_steps = figure_every_n_steps
        self.log_each_step_size = log_each_step_size
        self.uses_tensorboard = figure_every_n_steps is not None
        #: summary key (no prefix) -> (steps, values) of every measurement, for the figure
        self.history: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in SUMMARY_KEYS}
        self._last_figure_step: int | None = None
        self._method_in_use: Method = method
        #: a small model's loop buffers, kept from one measurement to the next (landscape_math)
        self._workspace: dict[str, Any] = {}

    def state_key_fields(self) -> dict[str, Any]:
        fields = {**super().state_key_fields(), "step_sizes": self.step_sizes, "lr_multipliers": self.lr_multipliers}
        fields = {**fields, "direction": self.direction} if self.direction != "gradient" else fields
        return {**fields, "key_suffix": self.key_suffix} if self.key_suffix else fields

    def key(self, name: str) -> str:
        """The logged key of ``name`` (``loss_min``, ``loss/lr_x0.5``, ``figure``): prefix and suffix added."""
        return f"{PREFIX}{name}{self.key_suffix}"

    # -- checks before training ------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step_sizes is None and len(trainer.optimizers) > 1:
            raise ValueError(
                f"LandscapeCallback: lr_multipliers need one learning rate, but the module has "
                f"{len(trainer.optimizers)} optimizers (manual optimization); pass absolute step_sizes"
            )
        if self.step_sizes is None:
            for optimizer in trainer.optimizers:
                _single_lr([float(group["lr"]) for group in optimizer.param_groups])

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        keys = [self.key(k) for k in SUMMARY_KEYS]
        if self.log_each_step_size:
            labels = [self._label(i) for i in range(len(self.step_sizes or self.lr_multipliers))]
            keys += [self.key(f"{kind}/{label}") for label in labels for kind in ("loss", "grad_diff")]
        return keys

    # -- the measurement -----------------------------------------------------------------
    def _label(self, i: int) -> str:
        if self.direction == "unit":
            return f"dist_{self.step_sizes[i]:g}"
        return f"eta_{self.step_sizes[i]:g}" if self.step_sizes is not None else f"lr_x{self.lr_multipliers[i]:g}"

    def step_size_grid(self, lrs: Sequence[float]) -> tuple[float, ...]:
        """The etas of a step trained with learning rates ``lrs`` (one per param group)."""
        if self.step_sizes is not None:
            return self.step_sizes
        lr = _single_lr(lrs)
        return tuple(lr * m for m in self.lr_multipliers)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext
    ) -> dict[str, float | Tensor]:
        etas = self.step_size_grid(ctx.lrs_t or [])
        params_t, grads_t = ctx.params_t or {}, ctx.grads_t or {}
        if self.direction == "unit":  # distance d along g_t / ||g_t|| is eta = d / ||g_t|| along g_t
            norm = float(grad_norm(grads_t))
            if not norm > 0:
                raise NonFiniteError(f"direction='unit' needs a non-zero gradient, got ||g_t|| = {norm:g}")
            etas = tuple(d / norm for d in etas)
        moved = {n: params_t[n] for n in grads_t}
        frozen = {n: p for n, p in params_t.items() if n not in grads_t}  # W_t for what g_t does not move
        swapped = _Swapped(moved, ctx._named(), ctx._modules())  # the module lists the core keeps per step
        # The loop differentiates every eta's loss before the next: the core may guard the
        # module's buffers and metrics once per measurement instead of once per eta.
        sequential = self._method_in_use == "loop"
        with ctx.evaluation(frozen or None, wrt=None, sequential=sequential) as core_loss, swapped:
            result = self._evaluate(pl_module, core_loss, swapped, moved, grads_t, etas, ctx)
        values: dict[str, float | Tensor] = {self.key(k): v for k, v in summarize(result).items()}
        if self.log_each_step_size:
            for i in range(len(etas)):
                label = self._label(i)
                values[self.key(f"loss/{label}")] = result.losses[i]
                values[self.key(f"grad_diff/{label}")] = result.grad_diff_norms[i]
        self._record(trainer, ctx.step, values)
        return values

    def _evaluate(self, pl_module, core_loss, swapped, moved, grads_t, etas, ctx):
        # One process: the mean over ranks is the identity, skip its concatenation per eta.
        kwargs = {"reduce": ctx.reduce_mean if ctx.world_size > 1 else None}
        if self._method_in_use == "batched":
            wrapper = _Reparametrized(pl_module, core_loss)

            def vmap_loss(params: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
                # functional_call swaps W(eta) and per-eta buffer copies (batched tensors of
                # vmap) into pl_module while the core evaluates its loss on the step's batch.
                tensors = {f"module.{n}": t for n, t in {**params, **bufs}.items()}
                return functional_call(wrapper, tensors, ())

            try:
                buffers = dict(pl_module.named_buffers())
                return evaluate_along_gradient(
                    vmap_loss, moved, grads_t, etas, buffers, method="batched", chunk_size=self.chunk_size, **kwargs
                )
            except Exception as err:  # vmap cannot trace this module's loss: same numbers, sequentially
                self._method_in_use = "loop"
                self.warn_once(
                    "vmap",
                    f"method='batched' failed ({type(err).__name__}: {str(err)[:200]}); using method='loop'. "
                    "vmap cannot trace .item() or data-dependent control flow in the loss; a "
                    "measurement_loss(batch, batch_idx) without them lets method='batched' run.",
                )

        def loop_loss(params: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
            # The loop hands over the same W(eta) tensors at every eta (updated in place), so
            # they are put into pl_module once, not once per eta as functional_call would.
            swapped.install(params)
            return core_loss()

        return evaluate_along_gradient(
            loop_loss, moved, grads_t, etas, method="loop", workspace=self._workspace, **kwargs
        )

    # -- figure ----------------------------------------------------------------------------
    def _record(self, trainer: pl.Trainer, step: int, values: Mapping[str, float | Tensor]) -> None:
        for key in SUMMARY_KEYS:
            steps, vals = self.history[key]
            steps.append(step)
            vals.append(float(values[self.key(key)]))
        due = self._last_figure_step is None or step - self._last_figure_step >= (self.figure_every_n_steps or 0)
        if self.figure_every_n_steps is not None and due:
            self._draw(trainer, step)

    def _draw(self, trainer: pl.Trainer, step: int) -> None:
        self._last_figure_step = step
        # Only rank 0 writes, and only to TensorBoard: skip drawing where it would be thrown away.
        if trainer is None or not trainer.is_global_zero or tensorboard_writer(trainer) is None:
            return
        self.log_figure(trainer, self.key("figure"), plot_landscape({run_label(trainer): self.history}), step)

    def teardown_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._workspace.clear()  # the kept buffers belong to this fit's model

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = self.history["loss_min"][0][-1] if self.history["loss_min"][0] else None
        if self.figure_every_n_steps is not None and last is not None and last != self._last_figure_step:
            self._draw(trainer, last)

    # -- checkpoint --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {
            "history": {k: (list(s), list(v)) for k, (s, v) in self.history.items()},
            "figure": self._last_figure_step,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        history = state.get("history", {})
        self.history = {
            k: (list(history[k][0]), list(history[k][1])) if k in history else ([], []) for k in SUMMARY_KEYS
        }
        self._last_figure_step = state.get("figure")


class _Swapped:
    """Puts tensors in place of parameters of a module, as ``functional_call`` does (the entry
    of every submodule's ``_parameters`` that holds the parameter, tied occurrences included),
    and the parameters back on exit. :meth:`install` does nothing when the same tensors are
    already in place, so a loop over step sizes swaps once per measurement, not once per eta.

    ``named``/``modules``: ``dict(module.named_parameters())`` and ``list(module.modules())``,
    listed once per step by the measurement context.
    """

    def __init__(self, names: Sequence[str], named: Mapping[str, Tensor], modules: Sequence[nn.Module]) -> None:
        self._names, self._named, self._modules = list(names), named, modules
        self._slots: list[list[tuple[dict[str, Any], str]]] | None = None
        self._current: list[Tensor] = []

    def __enter__(self) -> _Swapped:
        return self

    def install(self, tensors: Mapping[str, Tensor]) -> None:
        values = list(map(tensors.__getitem__, self._names))
        if len(values) == len(self._current) and all(map(operator.is_, values, self._current)):
            return
        if self._slots is None:
            where: dict[int, list[tuple[dict[str, Any], str]]] = {}
            for mod in self._modules:
                for attr, p in mod._parameters.items():
                    if p is not None:
                        where.setdefault(id(p), []).append((mod._parameters, attr))
            self._slots = [where.get(id(self._named[n]), []) for n in self._names]
        self._current = values  # first, so that __exit__ restores whatever was swapped
        for slots, value in zip(self._slots, values):
            for params, attr in slots:
                params[attr] = value

    def __exit__(self, *exc: Any) -> None:
        if self._current and self._slots is not None:
            for slots, name in zip(self._slots, self._names):
                for params, attr in slots:
                    params[attr] = self._named[name]
        self._current = []


class _Reparametrized(nn.Module):
    """``functional_call`` target: holds the LightningModule as ``module`` so its parameters and
    buffers can be swapped, and returns the core's loss (training_step or measurement_loss)."""

    def __init__(self, module: nn.Module, loss: Any) -> None:
        super().__init__()
        self.module = module
        self._loss = loss

    def forward(self) -> Tensor:
        return self._loss()


def _single_lr(lrs: Sequence[float]) -> float:
    if not lrs:
        raise ValueError("LandscapeCallback: no learning rate was recorded for this step; pass step_sizes")
    if any(lr != lrs[0] for lr in lrs):
        raise ValueError(
            f"LandscapeCallback: lr_multipliers need one learning rate, but the param groups use {sorted(set(lrs))}; "
            "pass absolute step_sizes instead"
        )
    if lrs[0] <= 0:
        raise ValueError(
            f"LandscapeCallback: the learning rate is {lrs[0]}; lr_multipliers need lr > 0, pass step_sizes"
        )
    return lrs[0]
