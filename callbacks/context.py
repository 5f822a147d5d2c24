"""Evaluate the training loss and its gradient at other parameter values, with no observer effect.

A :class:`StepContext` is what a measurement callback receives for one measured training
step ``t``: the step's batch, ``W_t`` and ``g_t`` (if the callback asked for them), and
methods that evaluate ``L(W; x_t, y_t)`` and ``grad L(W; x_t, y_t)`` for any ``W``, on the
step's batch (default) or on any other batch, reduced over DDP ranks.

How a loss is evaluated (the protocols every callback relies on):

* The loss is ``pl_module.measurement_loss(batch, batch_idx)`` if the module defines it,
  else ``pl_module.training_step(batch, batch_idx)`` (a tensor or a dict with ``"loss"``),
  with ``self.log``/``self.log_dict`` silenced and every torchmetrics state restored, so the
  module's own logging and metrics are unchanged. It runs inside the precision plugin's
  training context (autocast as in training).
* Parameters are set by in-place copy under ``no_grad`` and copied back bit for bit.
* ``bn_mode="train"`` keeps the module modes of the training step (batch statistics);
  ``"eval"`` puts the whole module in eval mode (running statistics, no dropout or noise).
  Buffers (running statistics, ``num_batches_tracked``) are restored after every call
  (with ``sequential=True`` guarded once per block, same values; see :meth:`StepContext.evaluation`).
* Randomness: before every loss call all RNG streams are set to their state at
  ``on_train_batch_start`` and afterwards set back; every submodule with a boolean
  ``replay_noise`` attribute gets ``replay_noise = True`` (reuse the last training noise
  realization, do not advance its own state) and its previous value back afterwards.
* Gradients come from ``torch.autograd.grad``: ``.grad`` is never touched and DDP's
  gradient hooks never fire; loss and gradient are averaged over ranks here instead.
* Gradient accumulation: a step of k micro-batches (``accumulate_grad_batches``) is
  measured on all of them. "The step's loss" is then (1/k) sum_j L(W; micro-batch j), as
  Lightning scales it, each micro-batch with its own RNG state, batch statistics and noise
  realization, so its gradient at W_t is the g_t the optimizer used.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from callbacks.distributed import all_reduce_mean, all_reduce_mean_dict, world_size
from callbacks.guards import (
    SequentialCalls,
    buffers_isolated,
    grad_only_for,
    logging_suppressed,
    measuring,
    metrics_preserved,
    modes_set,
    noise_replayed,
    parameters_set_to,
)
from callbacks.module_index import ModuleIndex
from callbacks.rng import RNGState, preserved_rng, replayed_rng

BNMode = Literal["train", "eval"]
LossFn = Callable[..., Tensor]

_NO_BATCH = object()


@dataclass
class MicroBatch:
    """One training batch of a measured step: what ``training_step`` received, the RNG streams
    when it started and (with several micro-batches) each noise source's realization after its
    training forward (``noise``: module -> ``noise_state()``; None for the last micro-batch,
    whose realization is the live one)."""

    batch: Any
    batch_idx: int
    rng: RNGState
    noise: dict[Any, Any] | None = None


@dataclass
class StepContext:
    """One measured training step.

    Attributes:
        trainer, pl_module: the running Trainer and LightningModule (``trainer`` may be None
            when a context is built by hand, e.g. in tests).
        step: ``t`` = ``trainer.global_step`` when the batch started (with manual optimization:
            the batches completed before it; :mod:`callbacks.training_loop`).
        batch, batch_idx: the training batch of step ``t`` as ``training_step`` received it.
        bn_mode: the callback's BN mode, the default of every evaluation below.
        rng: all RNG streams as they were at ``on_train_batch_start`` of step ``t``.
        params_t: ``W_t`` (name -> detached copy, every parameter), if the callback asked.
        grads_t: ``g_t`` (name -> detached copy, every parameter that requires grad; zeros
            where ``.grad`` was None), read in ``on_before_optimizer_step`` (after DDP's
            all-reduce, before clipping and before the optimizer step), if the callback asked.
        lrs_t: learning rate of every optimizer param group used for the step ``t`` update.
        micro_batches: every training batch of step ``t`` (one unless gradients are
            accumulated; ``batch``/``batch_idx``/``rng`` are the first's).
        loss_scale: the factor of each micro-batch's loss in the step's loss (1/k under
            accumulation, as Lightning scales it).
        train_loss: the loss ``training_step`` returned for the step's last batch, if any.
    Live parameters (``pl_module.parameters()``) are ``W_{t+1}`` when ``measure`` runs.
    """

    trainer: Any
    pl_module: Any
    step: int
    batch: Any
    batch_idx: int
    bn_mode: BNMode = "train"
    rng: RNGState = field(default_factory=RNGState.capture)
    params_t: dict[str, Tensor] | None = None
    grads_t: dict[str, Tensor] | None = None
    lrs_t: list[float] | None = None
    micro_batches: list[MicroBatch] = field(default_factory=list)
    loss_scale: float = 1.0
    train_loss: Tensor | None = None
    _trainable: list[str] | None = field(default=None, repr=False)
    _param_cache: dict[str, Tensor] | None = field(default=None, repr=False)
    _module_cache: dict[str, list[Any]] | None = field(default=None, repr=False)
    _takes_batch_idx: bool | None = field(default=None, repr=False)
    _sequential: SequentialCalls | None = field(default=None, repr=False)
    _sequential_step_loss: Callable[[], Tensor] | None = field(default=None, repr=False)
    #: lists of the module tree kept across steps (:class:`~callbacks.module_index.ModuleIndex`)
    index: ModuleIndex | None = field(default=None, repr=False)

    # -- the primitives ----------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(
        self,
        params: Mapping[str, Tensor] | None = None,
        *,
        wrt: Iterable[str] | None = (),
        bn_mode: BNMode | None = None,
        sequential: bool = False,
    ) -> Iterator[LossFn]:
        """Set the live parameters to ``params`` (names as ``pl_module.named_parameters()``;
        missing names keep their live value) and yield ``loss_fn(batch=..., batch_idx=...)``.

        ``loss_fn()`` returns the *local* (this rank's) loss on the step's batch, or on the
        given one, as a scalar tensor whose autograd graph reaches the live parameters named
        in ``wrt`` (``()``: none, the default; ``None``: every trainable parameter). Use
        ``self.parameters(names)`` to get those tensors for ``torch.autograd.grad`` (also
        with ``create_graph=True`` for Hessian-vector products). The graph is only valid
        inside the ``with`` block; every change is undone on exit. Reduce across ranks
        yourself (:meth:`reduce_mean`) -- every rank must make the same calls.

        ``sequential=True`` promises that the caller is done with the graph of each
        ``loss_fn()`` (differentiated or dropped) before calling it again: buffers and metric
        states are then guarded once for the block (:class:`~callbacks.guards.SequentialCalls`)
        instead of once per call, with the same values at every call; the live RNG streams are
        captured once and put back when the block ends (every call still starts from the
        step's state, but between calls the streams hold what the last call left: draw
        nothing there that must come from the live streams).
        """
        mode = self.bn_mode if bn_mode is None else bn_mode
        module, modules, named = self.pl_module, self._modules(), self._named()
        names = None if wrt is None else list(wrt)
        with contextlib.ExitStack() as stack:
            stack.enter_context(measuring())
            stack.enter_context(parameters_set_to(module, params or {}, named))
            stack.enter_context(modes_set(module, mode, modules))
            stack.enter_context(grad_only_for(module, names, named))
            stack.enter_context(noise_replayed(module, self._modules("noise")))
            stack.enter_context(logging_suppressed(module))
            stack.enter_context(torch.enable_grad() if names is None or names else torch.no_grad())
            outer = self._sequential  # a nested evaluation guards its own calls
            guarded = None
            if sequential:
                kept = self.index.kept.setdefault("metric states", {}) if self.index is not None else None
                guarded = stack.enter_context(SequentialCalls(self._modules("buffers"), self._modules("metrics"), kept))
                # The live streams are put back once, at the end of the block; each call only
                # replays the step's state (streams the step's state leaves alone stay alone).
                stack.enter_context(preserved_rng(host=self.rng.has_host))
            self._sequential = guarded
            outer_step_loss = self._sequential_step_loss
            self._sequential_step_loss = self._step_loss(guarded) if guarded is not None else None
            try:
                yield self._loss_fn
            finally:
                self._sequential, self._sequential_step_loss = outer, outer_step_loss

    def _step_loss(self, calls: SequentialCalls) -> Callable[[], Tensor] | None:
        """``loss_fn()`` on the step's own batch in a sequential block, with every lookup
        :meth:`_one_loss` makes per call done once for the block (on a small model they cost
        as much as a layer); None under accumulation, which goes through :meth:`_one_loss`."""
        if self.accumulated:
            return None
        rng, (step, args) = self.rng, self._loss_source(self.batch, self.batch_idx)

        def loss() -> Tensor:
            rng.restore()  # the sequential block restores the live streams at its end
            with calls.call(), self._precision():
                out = step(*args)
            return extract_loss(out)

        return loss

    def _loss_source(self, batch: Any, batch_idx: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The function the loss comes from and its arguments: ``measurement_loss(batch,
        batch_idx)`` if the module defines it, else ``training_step`` (with ``batch_idx`` if it
        takes one, as Lightning decides)."""
        module = self.pl_module
        hook = getattr(module, "measurement_loss", None)
        if callable(hook):
            return hook, (batch, batch_idx)
        if self._takes_batch_idx is None:
            self._takes_batch_idx = takes_batch_idx(module.training_step)
        return module.training_step, (batch, batch_idx) if self._takes_batch_idx else (batch,)

    def _precision(self) -> contextlib.AbstractContextManager:
        """The precision plugin's training context (autocast as in training), entered per call."""
        if self.trainer is None:  # a context built by hand
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.train_step_context()

    def _loss_fn(self, batch: Any = _NO_BATCH, batch_idx: int | None = None) -> Tensor:
        if batch is _NO_BATCH and batch_idx is None and self._sequential_step_loss is not None:
            return self._sequential_step_loss()
        if batch is _NO_BATCH and batch_idx is None and self.accumulated:
            return self._accumulated_loss()
        ((batch, batch_idx),) = self._batches(batch, batch_idx, None)
        return self._one_loss(batch, batch_idx, self.rng)

    def _one_loss(self, batch: Any, batch_idx: int, rng: RNGState) -> Tensor:
        module = self.pl_module
        precision = self._precision()
        # Accumulation sums the graphs of several calls before differentiating: not sequential.
        if self._sequential is not None and not self.accumulated:
            rng.restore()  # the sequential block restores the live streams at its end
            randomness, buffers, metrics = contextlib.nullcontext(), self._sequential.call(), contextlib.nullcontext()
        else:
            randomness = replayed_rng(rng)
            buffers = buffers_isolated(module, self._modules("buffers"))
            metrics = metrics_preserved(module, self._modules("metrics"))
        with randomness, buffers, metrics, precision:
            step, args = self._loss_source(batch, batch_idx)
            out = step(*args)
        return extract_loss(out)

    @property
    def accumulated(self) -> bool:
        """Whether the step's loss is a scaled sum over several micro-batches (accumulation)."""
        return len(self.micro_batches) > 1 or self.loss_scale != 1.0

    def _accumulated_loss(self) -> Tensor:
        """(1/k) sum_j L(micro-batch j): each with its RNG state and noise realization of training."""
        sources = self._modules("noise")
        live = {m: m.noise_state() for m in sources} if len(self.micro_batches) > 1 else {}
        total: Tensor | None = None
        try:
            for mb in self.micro_batches:
                for m, state in (mb.noise or live).items():
                    m.load_noise_state(state)
                term = self._one_loss(mb.batch, mb.batch_idx, mb.rng) * self.loss_scale
                total = term if total is None else total + term
        finally:
            for m, state in live.items():
                m.load_noise_state(state)
        return total

    def parameters(self, names: Iterable[str]) -> list[Tensor]:
        """The live parameter tensors named ``names`` (for ``torch.autograd.grad``)."""
        params = self._named()
        return [params[n] for n in names]

    def named_live(self) -> dict[str, Tensor]:
        """The live parameters by name (``W_{t+1}`` while ``measure`` runs)."""
        return dict(self._named())

    def _named(self) -> dict[str, Tensor]:
        if self._param_cache is None:
            self._index_lists()
        return self._param_cache

    def _modules(self, kind: str = "all") -> list[Any]:
        """The module's submodules, and those a guard acts on, listed once per step: looking
        attributes up on every module for every loss call costs more than a tiny model."""
        if self._module_cache is None:
            self._index_lists()
        return self._module_cache[kind]

    def _index_lists(self) -> None:
        # With an index (one per callback) the lists of the previous step are reused while the
        # module tree is unchanged; the dict is copied, so a caller changing it changes no other step.
        named, lists = (self.index or ModuleIndex()).lists(self.pl_module)
        self._param_cache, self._module_cache = dict(named), lists

    # -- the common cases --------------------------------------------------------------
    def loss(
        self,
        params: Mapping[str, Tensor] | None = None,
        *,
        batch: Any = _NO_BATCH,
        batch_idx: int | None = None,
        batches: Sequence[Any] | None = None,
        bn_mode: BNMode | None = None,
    ) -> Tensor:
        """``L(params)`` on the step's batch, or on ``batch``, or the mean over ``batches``
        (e.g. a fixed sample of training data), averaged over ranks, detached."""
        with self.evaluation(params, wrt=(), bn_mode=bn_mode) as loss_fn:
            losses = [loss_fn(b, i).detach() for b, i in self._batches(batch, batch_idx, batches)]
        return all_reduce_mean(torch.stack(losses).mean())

    def loss_and_grad(
        self,
        params: Mapping[str, Tensor] | None = None,
        *,
        wrt: Iterable[str] | None = None,
        batch: Any = _NO_BATCH,
        batch_idx: int | None = None,
        batches: Sequence[Any] | None = None,
        bn_mode: BNMode | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L(params)`` and ``grad L(params)`` w.r.t. the parameters ``wrt`` (default: every
        trainable one) on the step's batch, ``batch`` or the mean over ``batches``; both
        averaged over ranks in one collective, detached. Gradients of parameters the loss
        does not reach are zeros."""
        names = self.trainable_names() if wrt is None else list(wrt)
        items = self._batches(batch, batch_idx, batches)
        with self.evaluation(params, wrt=names, bn_mode=bn_mode) as loss_fn:
            tensors = self.parameters(names)
            total = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
            loss_sum = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else None)
            for b, i in items:
                local = loss_fn(b, i)
                if local.requires_grad and names:
                    for n, g in zip(names, torch.autograd.grad(local, tensors, allow_unused=True)):
                        if g is not None:
                            total[n] += g
                loss_sum = loss_sum + local.detach().double()
            out = {n: g / len(items) for n, g in total.items()}
            out["\0loss"] = (loss_sum / len(items)).to(local.dtype)
        reduced = all_reduce_mean_dict(out)
        return reduced.pop("\0loss"), reduced

    def _batches(self, batch: Any, batch_idx: int | None, batches: Sequence[Any] | None) -> list[tuple[Any, int]]:
        if batches is None:
            if batch is _NO_BATCH:
                if batch_idx is None and self.accumulated:  # the step's loss over its micro-batches
                    return [(_NO_BATCH, None)]
                return [(self.batch, self.batch_idx if batch_idx is None else batch_idx)]
            return [(batch, 0 if batch_idx is None else batch_idx)]
        if batch is not _NO_BATCH:
            raise ValueError("pass either batch or batches, not both")
        if not batches:
            raise ValueError("batches must not be empty")
        return [(b, i) for i, b in enumerate(batches)]

    def trainable_names(self) -> list[str]:
        """Names of the parameters that require grad in training (the keys of ``grads_t``)."""
        if self._trainable is None:
            self._trainable = [n for n, p in self._named().items() if p.requires_grad]
        return list(self._trainable)

    @property
    def world_size(self) -> int:
        return world_size()

    @staticmethod
    def reduce_mean(value: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Mean over DDP ranks (identity in one process): the global-batch value of a per-rank
        mean. A dict is reduced in one collective."""
        if isinstance(value, Mapping):
            return all_reduce_mean_dict(value)
        return all_reduce_mean(value)


_TAKES_BATCH_IDX: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def takes_batch_idx(training_step: Callable[..., Any]) -> bool:
    """Whether ``training_step`` takes ``batch_idx``, as Lightning decides (``training_step(batch)``
    is allowed); remembered per function, since reading a signature costs more than a small
    model's loss call."""
    key = getattr(training_step, "__func__", training_step)
    try:
        return _TAKES_BATCH_IDX[key]
    except (KeyError, TypeError):  # not seen yet, or not weakly referenceable
        from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

        answer = is_param_in_hook_signature(training_step, "batch_idx", min_args=2)
    with contextlib.suppress(TypeError):
        _TAKES_BATCH_IDX[key] = answer
    return answer


def extract_loss(out: Any) -> Tensor:
    """The loss from what ``training_step``/``measurement_loss`` returned (tensor or dict)."""
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise TypeError(
            "a measurement needs the loss: training_step must return a scalar tensor or a dict with a "
            f"scalar 'loss' (got {type(out).__name__}); or define measurement_loss(batch, batch_idx)"
        )
    return out if out.dim() == 0 else out.reshape(())  # a reshape per call costs a few µs
