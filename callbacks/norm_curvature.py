"""Santurkar et al.'s Theorem 4.2 measured in training: curvature along the gradient at every
normalization layer's input and output.

At a measured step t, at W_t and on the step's batch, for every normalization layer with input y
and output z (definitions in :mod:`callbacks.norm_curvature_math`), logged under
``normcurv/<layer>/``:

* ``quad_in`` = g_y^T H_yy g_y (Theorem 4.2's left-hand side) and ``quad_out`` = g_z^T H_zz g_z;
* ``curv_in`` = quad_in / ||g_y||^2 and ``curv_out`` = quad_out / ||g_z||^2: the loss's second
  derivative along the normalized gradient at the layer's input and output (a length-free
  curvature, so layers and networks compare), and ``curv_ratio`` = curv_in / curv_out;
* ``quad_chain`` = (J g_y)^T H_zz (J g_y) and ``norm_term`` = sum_k g_z,k g_y^T (d^2 z_k/dy^2) g_y,
  the exact chain-rule split quad_in = quad_chain + norm_term;
* for torch BatchNorm with batch statistics also ``norm_term_paper``, the paper's closed form
  - sum_u gamma_u / (m sigma_u^2) <g_z,u, y_hat_u> ||g_y,u||^2 of ``norm_term``.

The paper's reading: quad_chain is (gamma/sigma)^2 g_y^T H_zz g_y, the output's curvature
rescaled by BN's gain (``normgrad/<layer>/gain`` logs gamma^2/sigma^2), and the second term is
negative when g_z correlates positively with y_hat, so BN's input sees less curvature than its
output. Whether that holds in a run is what these keys show.
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
from callbacks.norm_curvature_math import COLUMNS, CUBIC, SQUARED, activation_variables, quadratic_forms
from callbacks.validation import check_names

PREFIX = "normcurv/"
KEYS = ("quad_in", "quad_out", "quad_chain", "norm_term", "curv_in", "curv_out", "curv_ratio")


class NormCurvatureCallback(MeasurementCallback):
    """Theorem 4.2's quadratic forms of the loss Hessian along the gradient, per normalization layer.

    Args:
        every_n_steps: measure every n-th training step (see :class:`~callbacks.Schedule`).
        layers: module names (of ``pl_module.named_modules()``); default: every normalization
            layer (as :class:`~callbacks.NormGradientCallback`; the identity placeholder of an
            un-normalized network has J = I, norm_term = 0 and curv_in = curv_out: the standard
            network's curvature at the same place).
        bn_mode: ``"train"`` (batch statistics, the loss training minimizes; default) or
            ``"eval"`` (running statistics: the layer is affine, norm_term = 0).
        start_step, end_step, log_points_per_decade: the rest of the schedule.

    Logged: the module docstring's keys for every layer, ``norm_term_paper`` for torch BatchNorm
    layers normalizing with batch statistics.

    Values are those of the step's loss at W_t (under gradient accumulation, the scaled sum over
    its micro-batches: each micro-batch's activations are a block of y, and the forms add up over
    the blocks). Under DDP, the global loss is the mean over R ranks and each rank's activations
    are its own block: the quadratic forms are summed over ranks and divided by R^3, the squared
    norms by R^2 (so curv_* are those of the global loss). SyncBatchNorm layers are refused at
    setup (their double backward spans ranks). A layer called more than once per forward (a shared
    module) has no single input y: it is not measured, with one warning.

    Cost per measurement: one forward and one backward with ``create_graph``, then for every
    layer three double-backward passes from the layer to the loss (on VGG-11 x 0.25, batch 128,
    about 3.5 training steps' time per layer: 7 s for its 8 layers on one CPU thread); memory:
    the double-backward graph of one step.
    """

    needs_params_t = True

    def __init__(
        self,
        every_n_steps: int = 100,
        layers: list[str] | None = None,
        bn_mode: BNMode = "train",
        *,
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
        check_names(type(self).__name__, "layers", layers)
        self.layers = None if layers is None else list(layers)
        self._modules: dict[str, nn.Module] = {}

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "layers": self.layers}

    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        modules, names = resolve_norm_layers(owner, pl_module, self.layers)
        synced = [n for n in names if isinstance(modules[n], nn.SyncBatchNorm)]
        if synced:
            raise ValueError(
                f"{owner}: layers {synced} are SyncBatchNorm, whose double backward spans ranks; "
                "pass layers=[...] without them"
            )
        self._modules = {n: modules[n] for n in names}

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        keys = []
        for name, module in self._modules.items():
            stats = KEYS + (("norm_term_paper",) if self._batch_stats(module) else ())
            keys += [f"{PREFIX}{name}/{stat}" for stat in stats]
        return keys

    def _batch_stats(self, module: nn.Module) -> bool:
        """Whether the closed form applies: a torch BatchNorm normalizing with batch statistics
        in this callback's BN mode (in ``eval``, only one without running statistics)."""
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            return False
        return self.bn_mode == "train" or module.running_mean is None

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> dict[str, Tensor]:
        with ctx.evaluation(ctx.params_t, wrt=()) as loss_fn, activation_variables(self._modules) as recorder:
            with torch.enable_grad():  # the graph starts at the activations; no parameter requires grad
                table = quadratic_forms(loss_fn(), recorder.calls)
        calls_per_forward = len(ctx.micro_batches) or 1
        shared = [n for n, calls in recorder.calls.items() if len(calls) > calls_per_forward]
        table = all_reduce_sum(table.to(pl_module.device)).cpu()  # one collective, the same shape everywhere
        col = {c: table[:, i] for i, c in enumerate(COLUMNS)}
        ranks = world_size()
        for c in CUBIC:
            col[c] = col[c] / ranks**3
        for c in SQUARED:
            col[c] = col[c] / ranks**2
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self._modules):
            key = f"{PREFIX}{name}"
            if name in shared:
                self.warn_once(
                    f"shared-{name}",
                    f"layer {name!r} is called {len(recorder.calls[name])} times per step's loss: it has no single "
                    "input y, so it is not measured (pass layers=[...] without it)",
                )
                continue
            if col["calls"][i] == 0:  # reduced values: the same decision on every rank
                self.warn_once(f"no-grad-{name}", f"the loss does not depend on layer {name!r}'s output; not logged")
                continue
            for k in ("quad_in", "quad_out", "quad_chain", "norm_term"):
                out[f"{key}/{k}"] = col[k][i]
            out[f"{key}/curv_in"] = col["quad_in"][i] / col["in_sq"][i]
            out[f"{key}/curv_out"] = col["quad_out"][i] / col["out_sq"][i]
            out[f"{key}/curv_ratio"] = out[f"{key}/curv_in"] / out[f"{key}/curv_out"]
            if col["bn_calls"][i] > 0:
                out[f"{key}/norm_term_paper"] = col["norm_term_paper"][i]
        return out
