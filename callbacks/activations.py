"""Activation statistics over time (Santurkar et al. 2018, Figs. 1, 2 and 5).

For each chosen layer and measured step ``t``, from the training forward itself (forward
hooks, no extra pass): the per-unit batch mean ``mu_u(t)`` and standard deviation
``sigma_u(t)`` of the layer's input (or output), a unit being a channel (dimension 1; the
statistics run over the batch and all other dimensions, as BatchNorm's). Logged:

* ``activations/<layer>/mean``, ``.../std``: ``mu_u(t)`` and ``sigma_u(t)`` averaged over units;
* ``activations/<layer>/mean_drift`` = mean_u |mu_u(t) - mu_u(t')| and ``.../std_drift`` =
  mean_u |sigma_u(t) - sigma_u(t')|, ``t'`` the previous measured step (from the second
  measurement on): how much each unit's input distribution moved, i.e. the covariate shift
  Ioffe & Szegedy meant and that ``noisy_batch`` injects on purpose;
* TensorBoard histograms over time (``.../values``: all activation values, ``.../unit_mean``,
  ``.../unit_std``), the paper's "distribution over time" pictures; put the standard, BN and
  noisy-BN runs side by side in TensorBoard.

With ``position="output"`` the keys start with ``activations_output/`` instead, so an input and
an output callback can run together. Santurkar et al.'s Fig. 2 (and 7) show the *output* of the
(noisy) BN layer: only there the injected noise, visible instability, can be seen; the input of
a noisy BN layer looks like a BN layer's.

Under DDP, sums, sums of squares and counts are reduced, so every value (and histogram) is
that of the global batch.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks.base import BNMode, MeasurementCallback
from callbacks.context import StepContext
from callbacks.distributed import all_reduce_sum
from callbacks.guards import is_measuring
from callbacks.validation import check_bool, check_choice, check_names, fail

_TORCH_NORMS: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_NORM_NAME = re.compile(r"Norm(\dd)?$")


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer: a torch norm class, or a class named ``...Norm`` (``NoNorm``, the
    identity placeholder of an un-normalized network, included)."""
    return isinstance(module, _TORCH_NORMS) or bool(_NORM_NAME.search(type(module).__name__))


def norm_layers(module: nn.Module) -> list[str]:
    """Names of the outermost normalization layers of ``module`` (not the module itself)."""
    names: list[str] = []
    for name, m in module.named_modules():
        if name and is_norm_layer(m) and not any(name.startswith(outer + ".") for outer in names):
            names.append(name)
    return names


def resolve_norm_layers(
    owner: str, pl_module: nn.Module, layers: list[str] | None
) -> tuple[dict[str, nn.Module], list[str]]:
    """``(named modules, the layers to hook)``: ``layers`` if given (each must be a module of
    ``pl_module``), else every normalization layer; ValueError naming ``owner`` if none."""
    modules = dict(pl_module.named_modules())
    names = list(layers) if layers is not None else norm_layers(pl_module)
    missing = [n for n in names if n not in modules]
    if missing:
        known = ", ".join(norm_layers(pl_module)[:8]) or "none found"
        raise ValueError(f"{owner} layers {missing} are not modules of the model; norms: {known}")
    if not names:
        raise ValueError(f"{owner} found no normalization layer; pass layers=[...] (module names)")
    return modules, names


def unit_moments(x: Tensor) -> Tensor:
    """Per-unit (dimension 1) count, sum and sum of squares, stacked as (3, units), float64."""
    x = x.detach().double()
    x = x.reshape(x.shape[0], 1) if x.dim() == 1 else x.transpose(0, 1).reshape(x.shape[1], -1).t()
    count = torch.full((x.shape[1],), float(x.shape[0]), dtype=torch.float64, device=x.device)
    return torch.stack([count, x.sum(0), (x * x).sum(0)])


def mean_std(moments: Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit mean and (biased, as BatchNorm's) standard deviation from :func:`unit_moments`."""
    count, total, squares = moments
    mean = total / count
    return mean, (squares / count - mean * mean).clamp_min(0).sqrt()


class ActivationStatsCallback(MeasurementCallback):
    """Per-unit activation mean/std, their drift and histograms over time (module docstring).

    Args:
        every_n_steps: measure every n-th training step (see :class:`~callbacks.Schedule`).
        layers: module names (of ``pl_module.named_modules()``); default: every
            normalization layer (:func:`is_norm_layer`; with ``norm=none`` the placeholder
            identity where the norm would be).
        position: ``"input"`` (default, what the norm receives: the distribution whose
            shift is "internal covariate shift") or ``"output"`` of each layer (after the
            norm, and after the noise of ``noisy_batch``: what the paper's Fig. 2 shows); the
            keys of ``"output"`` start with ``activations_output/``.
        histograms: write TensorBoard histograms (needs a TensorBoardLogger).
        start_step, end_step, log_points_per_decade: the rest of the schedule.
        bn_mode: only ``"train"``: the statistics are those of the training forward.

    Cost: no extra forward or backward; per measured step and layer, one pass over the
    activation for the moments (and a copy of it kept until the step ends, for histograms).
    A layer called several times per batch is measured at its first call; under gradient
    accumulation the statistics are those of all micro-batches of the step together.
    """

    reevaluates_loss = False
    uses_tensorboard = True

    def __init__(
        self,
        every_n_steps: int = 10,
        layers: list[str] | None = None,
        *,
        position: Literal["input", "output"] = "input",
        histograms: bool = True,
        start_step: int = 0,
        end_step: int | None = None,
        log_points_per_decade: int | None = None,
        bn_mode: BNMode = "train",
    ) -> None:
        super().__init__(
            every_n_steps,
            start_step=start_step,
            end_step=end_step,
            log_points_per_decade=log_points_per_decade,
            bn_mode=bn_mode,
        )
        owner = type(self).__name__
        if bn_mode != "train":
            fail(owner, "bn_mode", bn_mode, "must be 'train' (the statistics are those of the training forward)")
        check_names(owner, "layers", layers)
        check_choice(owner, "position", position, ("input", "output"))
        check_bool(owner, "histograms", histograms)
        self.layers = None if layers is None else list(layers)
        self.position = position
        self.prefix = "activations" if position == "input" else "activations_output"
        self.histograms = histograms
        self.uses_tensorboard = histograms
        self._names: list[str] = []
        self._handles: list[Any] = []
        self._armed = False
        self._moments: dict[str, Tensor] = {}
        self._values: dict[str, Tensor] = {}
        self._previous: dict[str, tuple[Tensor, Tensor]] = {}
        self._seen: set[str] = set()

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "layers": self.layers, "position": self.position}

    # -- hooks on the training forward ----------------------------------------------------
    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules, names = resolve_norm_layers(type(self).__name__, pl_module, self.layers)
        self.teardown_measurement(trainer, pl_module)
        self._names = names
        self._keep_values = self.histograms and self._has_tensorboard(trainer)
        for name in self._names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _has_tensorboard(self, trainer: pl.Trainer) -> bool:
        from callbacks.writers import tensorboard_writer

        return tensorboard_writer(trainer) is not None

    def teardown_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._armed = [], False
        self._moments, self._values = {}, {}

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._armed or is_measuring() or name in self._seen:
                return
            x = args[0] if self.position == "input" else output
            if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
                return
            self._seen.add(name)
            with torch.no_grad():
                # Under gradient accumulation the step's batch is the union of its micro-batches:
                # moments add up, values are concatenated.
                moments = unit_moments(x)
                previous = self._moments.get(name)
                same = previous is not None and previous.shape == moments.shape
                self._moments[name] = previous + moments if same else moments
                if self._keep_values:
                    values = x.detach().reshape(-1).clone()
                    self._values[name] = torch.cat([self._values[name], values]) if same else values

        return hook

    def on_measured_step_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._moments, self._values, self._armed = {}, {}, True

    def on_micro_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        self._seen: set[str] = set()  # layers already measured in this micro-batch (first call counts)
        self._armed = True

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        keys = [f"{self.prefix}/{name}/{stat}" for name in self._names for stat in ("mean", "std")]
        drift = [f"{self.prefix}/{name}/{stat}" for name in self._previous for stat in ("mean_drift", "std_drift")]
        return keys + drift

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._armed = False  # never observe validation, also between micro-batches of a step
        if self._pending is None:  # measured, or nothing to measure
            self._moments, self._values = {}, {}

    # -- the measurement ----------------------------------------------------------------
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> dict[str, Tensor]:
        self._armed = False
        moments, values, self._moments, self._values = self._moments, self._values, {}, {}
        out: dict[str, Tensor] = {}
        for name in self._names:
            if name not in moments:  # same on every rank: the model's structure decides
                self.warn_once(f"not-called-{name}", f"layer {name!r} was not called in the training forward")
                continue
            mean, std = mean_std(all_reduce_sum(moments[name]))
            key = f"{self.prefix}/{name}"
            out[f"{key}/mean"], out[f"{key}/std"] = mean.mean(), std.mean()
            if name in self._previous:
                prev_mean, prev_std = self._previous[name]
                if prev_mean.shape == mean.shape:
                    out[f"{key}/mean_drift"] = (mean - prev_mean.to(mean)).abs().mean()
                    out[f"{key}/std_drift"] = (std - prev_std.to(std)).abs().mean()
            self._previous[name] = (mean.cpu(), std.cpu())
            if self._keep_values:
                self.log_histogram(trainer, f"{key}/values", values[name], ctx.step)
                self.log_histogram(trainer, f"{key}/unit_mean", mean, ctx.step)
                self.log_histogram(trainer, f"{key}/unit_std", std, ctx.step)
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"previous": {name: [m.clone(), s.clone()] for name, (m, s) in self._previous.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._previous = {name: (m, s) for name, (m, s) in state.get("previous", {}).items()}
