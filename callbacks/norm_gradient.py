"""Santurkar et al.'s Lemma 4.1 / Theorem 4.1 measured on the training step's own backward.

For a normalization layer with input y and output z, on the batch of step t, from the gradients
the training backward itself computes (tensor hooks: no extra forward or backward):

* ``normgrad/<layer>/in_norm`` = ||dL/dy||_2 (all units and samples; the gradient that flows
  through the layer only, not through other users of y such as a skip connection);
* ``normgrad/<layer>/out_norm`` = ||dL/dz||_2 = ||g||: the gradient at the layer's output, what
  the same network without the normalization would pass down at that point;
* ``normgrad/<layer>/ratio`` = in_norm / out_norm.

For a torch BatchNorm normalizing with batch statistics, per unit (channel) u over its m values
(Lemma 4.1, with BN's eps kept exactly, see :mod:`callbacks.norm_gradient_math`):

    ||dL/dy_u||^2 = (gamma_u^2 / sigma_u^2) (||g_u||^2 - (1/m) <1, g_u>^2 - c_u (1/m) <g_u, y_hat_u>^2)

and the callback logs both sides: ``normgrad/<layer>/in_norm_lemma`` = sqrt of the sum over
units of the right-hand side (equal to ``in_norm`` up to float rounding: the check that the
terms below are the ones BN's backward applies), ``normgrad/<layer>/gain`` = mean over units
of gamma^2 / sigma^2, ``normgrad/<layer>/mean_term`` = sum_u (1/m) <1, g_u>^2 / ||g||^2 and
``normgrad/<layer>/scale_term`` = sum_u c_u (1/m) <g_u, y_hat_u>^2 / ||g||^2: the two
projections BN removes from g, as fractions of ||g||^2. The paper's argument: in_norm is
out_norm shrunk by the two projections and rescaled by gamma/sigma; with large sigma (or
small gamma) the loss is more Lipschitz in the activations.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks.activations import resolve_norm_layers
from callbacks.base import BNMode, MeasurementCallback
from callbacks.context import StepContext
from callbacks.distributed import all_reduce_sum, world_size
from callbacks.guards import is_measuring
from callbacks.norm_gradient_math import batch_norm_terms, normalized, torch_batch_norm_units, units_by_samples
from callbacks.validation import check_names, fail

# Columns of the per-layer table that is summed over micro-batches and ranks in one collective.
COLUMNS = ("in_calls", "out_calls", "bn_calls", "in_sq", "out_sq", "lemma_sq", "mean_sq", "scale_sq", "gain", "units")
SQUARED = ("in_sq", "out_sq", "lemma_sq", "mean_sq", "scale_sq")  # squared gradients: scaled by 1/(R^2 s^2)
BN_KEYS = ("in_norm_lemma", "gain", "mean_term", "scale_term")


class _Record:
    """One layer's first call in one micro-batch: the sums its gradient hooks accumulate."""

    def __init__(self, bn: tuple[Tensor, Tensor, Tensor] | None) -> None:
        self.bn = bn  # (y_hat, gamma, sigma) when the identity's terms apply
        self.row = dict.fromkeys(COLUMNS, 0.0)

    def on_input_grad(self, grad: Tensor) -> None:
        with torch.no_grad():  # a hook runs inside backward; create_graph must not record it
            self.row["in_calls"] = 1.0
            self.row["in_sq"] += float(units_by_samples(grad).square().sum())

    def on_output_grad(self, grad: Tensor) -> None:
        with torch.no_grad():
            g = units_by_samples(grad)
            self.row["out_calls"] = 1.0
            self.row["out_sq"] += float(g.square().sum())
            if self.bn is not None:
                terms = batch_norm_terms(g, *self.bn)
                self.row["bn_calls"] = 1.0
                self.row["lemma_sq"] += float(terms.in_sq.sum())
                self.row["mean_sq"] += float(terms.mean_term.sum())
                self.row["scale_sq"] += float(terms.scale_term.sum())
                # gamma^2/sigma^2 per unit, counted once per forward (not per backward pass)
                self.row["gain"], self.row["units"] = float(terms.gain.sum()), float(terms.gain.numel())


class NormGradientCallback(MeasurementCallback):
    """||dL/dy||, ||dL/dz|| and the terms of Santurkar's Lemma 4.1 per normalization layer.

    Args:
        every_n_steps: measure every n-th training step (see :class:`~callbacks.Schedule`).
        layers: module names (of ``pl_module.named_modules()``); default: every normalization
            layer (torch's BatchNorm/GroupNorm/LayerNorm/..., any class named ``...Norm``, and the
            identity placeholder ``NoNorm`` of an un-normalized network, whose ratio is 1: the
            standard network's gradient at the same place).
        start_step, end_step, log_points_per_decade: the rest of the schedule.
        bn_mode: only ``"train"``: the gradients are those of the training step.

    Logged (module docstring): ``normgrad/<layer>/{in_norm,out_norm,ratio}`` for every layer;
    for torch BatchNorm layers using batch statistics also
    ``normgrad/<layer>/{in_norm_lemma,gain,mean_term,scale_term}``.

    Values are those of the step's loss (under gradient accumulation: the sum over its
    micro-batches, each normalized with its own statistics). Under DDP: the gradient of the global
    loss (the mean of the ranks' losses) with respect to rank r's activations is 1/R times
    rank r's own, so squared norms and terms are summed over ranks and divided by R^2; each
    rank's BatchNorm normalizes its own shard, so the identity holds per rank and its terms add
    up; ``gain`` is the mean over ranks and units. SyncBatchNorm layers get the three norms only
    (their statistics span ranks). With fp16 loss scaling, gradients are divided by the scale.

    Cost: no extra forward or backward. On a measured step each layer's input passes through a
    view (so its own gradient can be hooked; bit-identical), and per BatchNorm layer a float64
    copy of y_hat is kept until the backward has passed; each hook reduces one gradient.
    A layer called several times per batch is measured at its first call.
    """

    reevaluates_loss = False

    def __init__(
        self,
        every_n_steps: int = 10,
        layers: list[str] | None = None,
        *,
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
            fail(owner, "bn_mode", bn_mode, "must be 'train' (the gradients are those of the training backward)")
        check_names(owner, "layers", layers)
        self.layers = None if layers is None else list(layers)
        self._names: list[str] = []
        self._batch_norms: set[str] = set()
        self._handles: list[Any] = []
        self._armed = False
        self._seen: set[str] = set()
        self._records: list[tuple[str, _Record]] = []
        self._current: dict[str, _Record] = {}
        self._grad_scale = 1.0

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "layers": self.layers}

    # -- hooks on the training step --------------------------------------------------------
    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules, names = resolve_norm_layers(type(self).__name__, pl_module, self.layers)
        self.teardown_measurement(trainer, pl_module)
        self._names = names
        bn = nn.modules.batchnorm._BatchNorm
        self._batch_norms = {
            n for n in names if isinstance(modules[n], bn) and not isinstance(modules[n], nn.SyncBatchNorm)
        }
        for name in self._names:
            self._handles.append(modules[name].register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def teardown_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._armed, self._records = [], False, []

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self._armed or is_measuring() or name in self._seen or not torch.is_grad_enabled():
                return None
            self._seen.add(name)
            x = args[0] if args else None
            bn = None
            if isinstance(x, Tensor) and x.dim() >= 2 and torch_batch_norm_units(module):
                with torch.no_grad():
                    y_hat, sigma = normalized(units_by_samples(x), module.eps)
                gamma = module.weight.detach() if module.weight is not None else torch.ones_like(sigma)
                bn = (y_hat, gamma.reshape(-1).clone(), sigma)
            record = _Record(bn)
            self._records.append((name, record))
            self._current[name] = record  # for the forward hook (nested layers each keep their own)
            if not (isinstance(x, Tensor) and x.requires_grad):
                return None
            # A view of y used by this layer alone: its gradient is dL/dy through the layer, not
            # through other users of y (skip connections). A view's backward copies nothing.
            alias = x.view_as(x)
            alias.register_hook(record.on_input_grad)
            return (alias, *args[1:])

        return hook

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            record = self._current.pop(name, None)
            if record is not None and isinstance(output, Tensor) and output.requires_grad:
                # Registered before any in-place op after the layer (ReLU(inplace=True)): it still
                # receives the gradient of the layer's output value.
                output.register_hook(record.on_output_grad)

        return hook

    def on_measured_step_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._records, self._current, self._armed, self._grad_scale = [], {}, True, 1.0

    def on_micro_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        self._seen = set()  # layers already seen in this micro-batch (the first call counts)
        self._armed = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._pending is not None and scaler is not None:
            self._grad_scale = float(scaler.get_scale())  # the hooks saw gradients times this scale

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._armed = False  # never observe validation, nor the forward of another step
        if self._pending is None:  # measured, or nothing to measure
            self._records = []

    # -- the measurement ---------------------------------------------------------------------
    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        keys = []
        for name in self._names:
            stats = ("in_norm", "out_norm", "ratio") + (BN_KEYS if name in self._batch_norms else ())
            keys += [f"normgrad/{name}/{stat}" for stat in stats]
        return keys

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> dict[str, Tensor]:
        self._armed = False
        records, self._records = self._records, []
        index = {name: i for i, name in enumerate(self._names)}
        table = torch.zeros(len(self._names), len(COLUMNS), dtype=torch.float64)
        for name, record in records:
            table[index[name]] += torch.tensor([record.row[c] for c in COLUMNS], dtype=torch.float64)
        # one collective for all layers, the same shape on every rank
        table = all_reduce_sum(table.to(pl_module.device)).cpu()
        col = {c: table[:, i] for i, c in enumerate(COLUMNS)}
        factor = 1.0 / (world_size() ** 2 * self._grad_scale**2)
        for c in SQUARED:
            col[c] = col[c] * factor
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self._names):
            key = f"normgrad/{name}"
            if col["out_calls"][i] == 0:  # reduced values: the same decision on every rank
                self.warn_once(f"no-grad-{name}", f"no gradient reached layer {name!r} in the training backward")
                continue
            out[f"{key}/out_norm"] = col["out_sq"][i].sqrt()
            if col["in_calls"][i] > 0:
                out[f"{key}/in_norm"] = col["in_sq"][i].sqrt()
                out[f"{key}/ratio"] = out[f"{key}/in_norm"] / out[f"{key}/out_norm"]
            if col["bn_calls"][i] > 0:
                out[f"{key}/in_norm_lemma"] = col["lemma_sq"][i].clamp_min(0).sqrt()
                out[f"{key}/gain"] = col["gain"][i] / col["units"][i]
                out[f"{key}/mean_term"] = col["mean_sq"][i] / col["out_sq"][i]
                out[f"{key}/scale_term"] = col["scale_sq"][i] / col["out_sq"][i]
        return out
