"""Internal covariate shift as Santurkar et al. (2018), Definition 2.1.

For weight layer ``i`` (in forward order) at training step ``t``, on the batch of the step:

    G  = grad_{W_i} L(W_1^t, ..., W_k^t)
    G' = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

where ``W^{t+1}`` is what the optimizer actually wrote at step ``t`` (any optimizer:
momentum, Adam, weight decay; read, not simulated). ``G'`` is the gradient layer ``i``
would get if the layers before it had already taken their update: the difference measures
how much the update of the earlier layers shifts the optimization problem of layer ``i``.
Logged: ``ics/<layer>/l2_diff`` = ||G - G'||_2 and ``ics/<layer>/cosine`` = cos(G, G').
"Before layer i" is every parameter first used before layer i's parameters in the forward
pass (normalization affine parameters included); G and G' cover all parameters the layer's
module owns (weight and bias).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks.base import BNMode, MeasurementCallback
from callbacks.context import StepContext
from callbacks.forward_trace import ForwardTrace, prefix_replayed
from callbacks.validation import check_bool, check_names


def ics_metrics(g: Sequence[Tensor], g_prime: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``||G - G'||_2`` and ``cos(G, G')`` of the concatenated tensors, in float64.

    The cosine is nan when G or G' is zero (undefined), never an exception.
    """
    a = torch.cat([x.detach().reshape(-1).double() for x in g])
    b = torch.cat([x.detach().reshape(-1).double() for x in g_prime])
    l2 = torch.linalg.vector_norm(a - b)
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    cosine = torch.dot(a, b) / denom if denom > 0 else a.new_tensor(float("nan"))
    return l2, cosine


def weight_layers(module: nn.Module) -> list[str]:
    """Names of the Conv/Linear modules of ``module`` with trainable parameters (definition order)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and any(p.requires_grad for p in m.parameters())
    ]


class ICSCallback(MeasurementCallback):
    """Log Santurkar's internal covariate shift of every weight layer (module docstring).

    Args:
        every_n_steps: measure every n-th training step (see :class:`~callbacks.Schedule`).
        layers: module names (of ``pl_module.named_modules()``) to measure, e.g.
            ``["features.0", "classifier"]``; default: every Conv/Linear module. Any module
            owning trainable parameters may be named; its parameters are "layer i".
        share_forward: reuse the forward through already-updated layers across layers
            (exact; see Cost). False recomputes it for every layer (for benchmarks).
        start_step, end_step, log_points_per_decade: the rest of the schedule.
        bn_mode: ``"train"`` (default; batch statistics, G = the gradient training used) or
            ``"eval"`` (running statistics; G is recomputed in eval mode).

    Cost per measurement, for k layers, in passes over the step's batch: one forward without
    autograd at W_{t+1} (records the parameter order and every module's output), then per
    layer i the forward *from layer i on* (everything before it is replayed from the record)
    and the backward from the loss down to layer i only (only layer i requires grad). For
    a chain of k equal layers that is about 1 + (k + 1) / 2 forward+backward passes, against
    k full forward+backward passes done naively. ``bn_mode="eval"`` adds one forward+backward
    (G at W_t). ``benchmarks/ics_cost.py`` measures it: 0.4-0.5x the naive count on VGG-11
    and a compute-bound DLN; a model whose forward+backward takes ~2 ms is dominated by the
    ~1-2 ms fixed cost of each re-evaluation instead (see docs/callbacks.md).
    """

    needs_params_t = True
    needs_grads_t = True

    def __init__(
        self,
        every_n_steps: int = 50,
        layers: list[str] | None = None,
        *,
        share_forward: bool = True,
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
        check_names(type(self).__name__, "layers", layers)
        check_bool(type(self).__name__, "share_forward", share_forward)
        self.layers = None if layers is None else list(layers)
        self.share_forward = share_forward
        self._layer_params: dict[str, list[str]] = {}

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "layers": self.layers}

    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        names = self.layers if self.layers is not None else weight_layers(pl_module)
        missing = [n for n in names if n not in modules]
        if missing:
            known = ", ".join(weight_layers(pl_module)[:8])
            raise ValueError(f"ICSCallback layers {missing} are not modules of the model; Conv/Linear modules: {known}")
        param_name = {id(p): n for n, p in pl_module.named_parameters()}
        self._layer_params = {}
        for name in names:
            params = [param_name[id(p)] for p in modules[name].parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"ICSCallback layer {name!r} has no trainable parameters")
            self._layer_params[name] = params
        if not self._layer_params:
            raise ValueError("ICSCallback found no Conv/Linear layer in the model; pass layers=[...]")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> dict[str, Tensor]:
        # One forward at W_{t+1} (the live parameters) gives the parameter order and,
        # since every call before layer i used only updated parameters, the prefix outputs.
        trace = ForwardTrace(pl_module, keep_outputs=self.share_forward, host_rng=ctx.rng.has_host)
        with ctx.evaluation(wrt=()) as loss_fn, trace.recording():
            loss_fn()
        g_ref = ctx.grads_t
        if self.bn_mode == "eval":
            wanted = [n for names in self._layer_params.values() for n in names]
            g_ref = ctx.loss_and_grad(ctx.params_t, wrt=wanted)[1]

        values: dict[str, Tensor] = {}
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        for layer in self._forward_order(trace):
            names = self._layer_params[layer]
            used = [n for n in names if n in trace.first_use]
            if not used:
                self.warn_once(f"unused-{layer}", f"layer {layer!r} is not used in the forward pass; logged as nan")
                values[f"ics/{layer}/l2_diff"], values[f"ics/{layer}/cosine"] = nan, nan
                continue
            start, before = trace.before(used)
            config = {n: w for n, w in ctx.params_t.items() if n not in before}
            replay = prefix_replayed(trace, start) if self.share_forward else contextlib.nullcontext()
            tensors = ctx.parameters(names)
            with ctx.evaluation(config, wrt=names) as loss_fn:
                with replay:
                    local = loss_fn()
                grads = torch.autograd.grad(local, tensors, allow_unused=True)
            g_prime = ctx.reduce_mean(
                {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, tensors, grads)}
            )
            l2, cosine = ics_metrics([g_ref[n] for n in names], [g_prime[n] for n in names])
            values[f"ics/{layer}/l2_diff"], values[f"ics/{layer}/cosine"] = l2, cosine
        return values

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        return [f"ics/{layer}/{stat}" for layer in self._layer_params for stat in ("l2_diff", "cosine")]

    def _forward_order(self, trace: ForwardTrace) -> list[str]:
        never = float("inf")

        def first(layer: str) -> float:
            return min((trace.first_use.get(n, never) for n in self._layer_params[layer]), default=never)

        return sorted(self._layer_params, key=first)
