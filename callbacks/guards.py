"""Context managers that change one kind of module state for a measurement and restore it exactly.

Each guard snapshots what it changes on entry and puts back the same objects and the same
bits on exit, also when the body raises. The optional ``modules``/``named`` arguments take
``list(module.modules())``/``dict(module.named_parameters())`` computed once by the caller
(a measurement enters the guards many times per step). Together they are the "no observer effect" half of
the measurement contract; :mod:`callbacks.context` composes them.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks
from torch.nn.modules.batchnorm import _BatchNorm

_MEASURING = 0


def is_measuring() -> bool:
    """True while a measurement re-evaluates the model.

    Forward hooks that observe the *training* forward (e.g. ActivationStatsCallback) must
    return early when this is True, so re-evaluations are not mistaken for training.
    """
    return _MEASURING > 0


@contextmanager
def measuring() -> Iterator[None]:
    """Mark a measurement (see :func:`is_measuring`). The outermost one also runs every
    ``torch.compile``d function of the model eagerly: a measurement re-evaluates the model with
    hooks, swapped parameters and double backward, which dynamo would retrace or refuse (hooks
    mutate modules it tracks; inductor's donated buffers forbid ``create_graph``), and the eager
    module computes the same function."""
    global _MEASURING
    stance = _eager_stance() if _MEASURING == 0 else contextlib.nullcontext()
    _MEASURING += 1
    try:
        with stance:
            yield
    finally:
        _MEASURING -= 1


def _eager_stance() -> contextlib.AbstractContextManager:
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@contextmanager
def parameters_set_to(
    module: nn.Module, values: Mapping[str, Tensor], named: Mapping[str, Tensor] | None = None
) -> Iterator[None]:
    """Copy ``values`` (name -> tensor, names of ``module.named_parameters()``) into the live
    parameters, in place, and copy the previous bits back on exit.

    In-place copies keep parameter identity, so the optimizer state, DDP's buckets and any
    module code holding references all see the same objects; only the values change.
    """
    if not values:  # nothing to set (the common case of a measurement at the live parameters)
        yield
        return
    params = named if named is not None else dict(module.named_parameters())
    unknown = [n for n in values if n not in params]
    if unknown:
        raise KeyError(f"not parameters of {type(module).__name__}: {unknown[:5]}")
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for name, value in values.items():
                p = params[name]
                if value is p:
                    continue
                saved[name] = p.detach().clone()
                p.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@contextmanager
def buffers_isolated(module: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Inside, every buffer (BN running statistics, num_batches_tracked, counters) is a fresh
    copy; on exit the original tensor objects are put back, untouched.

    The originals are never written, so they are bit-identical afterwards and their autograd
    version counters do not move (BatchNorm saves the running statistics for backward: an
    in-place restore would invalidate a graph that is still to be differentiated).
    """
    saved = []
    for mod in module.modules() if modules is None else modules:
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                saved.append((mod, name, buf))
                mod._buffers[name] = buf.detach().clone()
    try:
        yield
    finally:
        for mod, name, buf in saved:
            mod._buffers[name] = buf


_METRIC_ATTRS = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache")


@contextmanager
def metrics_preserved(module: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Every torchmetrics ``Metric`` inside ``module`` has its accumulated state back on exit.

    Duck-typed on the ``Metric`` layout (``_defaults`` names the states) so that the package
    does not import torchmetrics for models that do not use it.
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    for mod in module.modules() if modules is None else modules:
        defaults = getattr(mod, "_defaults", None)
        if not isinstance(defaults, dict) or not hasattr(mod, "_update_count"):
            continue
        for attr in defaults:
            saved.append((mod, attr, _clone_state(getattr(mod, attr))))
        for attr in _METRIC_ATTRS:
            if hasattr(mod, attr):
                saved.append((mod, attr, getattr(mod, attr)))
    try:
        yield
    finally:
        for mod, attr, value in saved:
            _set_attr(mod, attr, value)


def _clone_state(value: Any) -> Any:
    if type(value) is Tensor or isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for v in value]
    return copy.deepcopy(value)


@contextmanager
def modes_set(module: nn.Module, bn_mode: str, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """``bn_mode="eval"``: the whole module in eval mode (running statistics, no dropout, no
    training noise); ``"train"``: modes left exactly as the training step had them.
    Every module's ``training`` flag is restored individually on exit."""
    if bn_mode == "train":
        yield
        return
    saved = [(m, m.training) for m in (module.modules() if modules is None else modules)]
    try:
        module.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextmanager
def grad_only_for(
    module: nn.Module, names: Iterable[str] | None, named: Mapping[str, Tensor] | None = None
) -> Iterator[None]:
    """Only the parameters in ``names`` require grad (all trainable ones if None), so autograd
    records and back-propagates only what the requested gradient needs."""
    if names is None:  # every trainable parameter: the flags stay as they are
        yield
        return
    params = named if named is not None else dict(module.named_parameters())
    wanted = set(names)
    changed = [(p, p.requires_grad) for n, p in params.items() if p.requires_grad != (n in wanted)]
    try:
        for p, flag in changed:
            p.requires_grad_(not flag)
        yield
    finally:
        for p, flag in changed:
            p.requires_grad_(flag)


@contextmanager
def noise_replayed(module: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Set ``replay_noise = True`` on every noise source (a submodule with a boolean
    ``replay_noise`` attribute): its training forward reuses its last realization and does
    not advance its own state. The previous values come back on exit."""
    candidates = module.modules() if modules is None else modules
    saved = [(m, m.replay_noise) for m in candidates if isinstance(getattr(m, "replay_noise", None), bool)]
    try:
        for m, _ in saved:
            m.replay_noise = True
        yield
    finally:
        for m, flag in saved:
            m.replay_noise = flag


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def logging_suppressed(pl_module: nn.Module) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` of the LightningModule do nothing inside, so a
    re-evaluated ``training_step`` logs nothing twice (and runs no ``sync_dist`` collective)."""
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    try:
        pl_module.__dict__["log"] = _no_log
        pl_module.__dict__["log_dict"] = _no_log
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                pl_module.__dict__[name] = saved[name]
            else:
                pl_module.__dict__.pop(name, None)


class SequentialCalls:
    """:func:`buffers_isolated` and :func:`metrics_preserved` for a series of calls, set up once.

    For a caller that is done with each call's autograd graph before the next call (a loop over
    parameter values): on a small model, snapshotting every buffer and metric state at every
    call costs as much as the forward pass. Use it as a context manager around the calls; each
    ``with calls.call():`` sees what the per-call guards give it, bit for bit: every buffer a
    private copy of the original (made at the first call and reset in place, one fused copy,
    before each later one; in place is safe because no graph of an earlier call is
    differentiated any more), every metric state as it was at the start (a state that a call
    replaced, or modified in place (PyTorch's version counter), is put back as a fresh copy of
    its value at the start). The original buffers are back between calls and on exit; the
    original tensor objects are never written. ``kept``: a dict the caller keeps from one series
    to the next, in which the copies of metric states are reused while unchanged
    (:class:`_MetricStates`).

    One exception, with the same values: the buffers of a torch BatchNorm (``nn.BatchNorm1d``/
    ``2d``/``3d``, ``nn.SyncBatchNorm`` or a subclass that keeps their ``forward``) in train
    mode and without hooks are written but never read by its forward (the output uses the
    batch statistics; the running ones are only updated), so they get their private copy once
    for the whole series and are not reset between calls (one fused copy and two dictionary
    writes per buffer saved at every call); the originals come back on exit. Code that reads
    such a module's running statistics during a call (rather than its forward) sees them as
    updated by the earlier calls.
    """

    def __init__(
        self, buffer_modules: Iterable[nn.Module], metric_modules: Iterable[nn.Module], kept: dict | None = None
    ) -> None:
        #: (the module's _buffers, name, original): reset before every call / copied once
        self._slots: list[tuple[dict[str, Any], str, Tensor]] = []
        self._kept: list[tuple[dict[str, Any], str, Tensor]] = []
        for mod in buffer_modules:
            slots = self._kept if _buffers_write_only(mod) else self._slots
            slots += [(mod._buffers, name, buf) for name, buf in mod._buffers.items() if buf is not None]
        self._originals = [buf for _, _, buf in self._slots]
        self._copies: list[Tensor] | None = None
        self._kept_installed = False
        self._metrics = _MetricStates(metric_modules, kept)
        self._call = _Call(self)

    def __enter__(self) -> SequentialCalls:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._kept_installed:
            for buffers, name, buf in self._kept:
                buffers[name] = buf
            self._kept_installed = False

    def call(self) -> _Call:
        """The guard of one call (a context manager)."""
        return self._call

    def _enter_call(self) -> None:
        if not self._kept_installed and self._kept:
            for buffers, name, buf in self._kept:
                buffers[name] = buf.detach().clone()
            self._kept_installed = True
        if self._copies is None:
            self._copies = [buf.detach().clone() for buf in self._originals]
        elif self._copies:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, self._originals)
        for (buffers, name, _), copy_ in zip(self._slots, self._copies):
            buffers[name] = copy_

    def _exit_call(self) -> None:
        for buffers, name, buf in self._slots:
            buffers[name] = buf
        self._metrics.restore()


class _Call:
    """``with calls.call():`` as a plain object, not a generator: entered 8 times per
    measurement, a generator-based context manager costs several µs more each time."""

    __slots__ = ("_calls",)

    def __init__(self, calls: SequentialCalls) -> None:
        self._calls = calls

    def __enter__(self) -> None:
        self._calls._enter_call()

    def __exit__(self, *exc: Any) -> None:
        self._calls._exit_call()


_WRITE_ONLY_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _buffers_write_only(mod: nn.Module) -> bool:
    """Whether ``mod``'s forward writes its buffers without reading them into its output: torch's
    BatchNorm forward in train mode (batch statistics; the running ones are only updated, and
    ``num_batches_tracked`` only sets the update's factor), with no hook that could read them.
    A subclass or an instance that overrides ``forward`` may read them, and so may a hook (the
    module's own or a global one)."""
    return (
        mod.training
        and type(mod).forward in _WRITE_ONLY_FORWARDS
        and "forward" not in mod.__dict__
        and not (mod._forward_hooks or mod._forward_pre_hooks)
        and not (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)
    )


class _MetricStates:
    """The torchmetrics states of ``modules`` (as :func:`metrics_preserved` saves them), and
    :meth:`restore`, which puts back only what changed (cheap when nothing did).

    ``kept``: a dict the caller keeps from one measurement to the next (None: none). The copy of
    a tensor state is then reused while the state is the same tensor, not written since (its
    version counter): the states of a metric that training does not update (a validation
    metric during training) are copied once, not at every measurement."""

    def __init__(self, modules: Iterable[nn.Module], kept: dict | None = None) -> None:
        #: [module, attribute, saved value, installed tensor, its version] of tensor states
        self._tensors: list[list[Any]] = []
        #: (module, attribute, saved value, whether it needs a fresh copy at every restore)
        self._others: list[tuple[nn.Module, str, Any, bool]] = []
        for mod in modules:
            defaults = getattr(mod, "_defaults", None)
            if not isinstance(defaults, dict) or not hasattr(mod, "_update_count"):
                continue
            for attr in defaults:
                value = getattr(mod, attr)
                if isinstance(value, Tensor):
                    self._tensors.append([mod, attr, _kept_copy(kept, mod, attr, value), value, _version(value)])
                elif isinstance(value, _IMMUTABLE):  # nothing to copy: the object itself comes back
                    self._others.append((mod, attr, value, False))
                else:
                    self._others.append((mod, attr, _clone_state(value), True))
            for attr in _METRIC_ATTRS:
                if hasattr(mod, attr):  # saved by reference, as metrics_preserved does
                    self._others.append((mod, attr, getattr(mod, attr), False))
        # What restore() checks first, in one pass of C-level maps: every tensor state is still
        # the installed tensor at its version, and every by-reference attribute the saved object.
        self._dicts = [e[0].__dict__ for e in self._tensors] + [o[0].__dict__ for o in self._others if not o[3]]
        self._attrs = [e[1] for e in self._tensors] + [o[1] for o in self._others if not o[3]]
        self._missing = [_MISSING] * len(self._attrs)
        self._fresh = [o for o in self._others if o[3]]
        self._expected: list[Any] = []
        self._versions: list[int | None] = []
        self._expect()

    def _expect(self) -> None:
        self._expected = [e[3] for e in self._tensors] + [o[2] for o in self._others if not o[3]]
        self._versions = [e[4] for e in self._tensors]

    def restore(self) -> None:
        current = list(map(dict.get, self._dicts, self._attrs, self._missing))
        unchanged = all(map(operator.is_, current, self._expected)) and None not in self._versions
        if not unchanged or list(map(_VERSION, current[: len(self._tensors)])) != self._versions:
            self._restore_changed()
        for mod, attr, value, _ in self._fresh:  # a mutable state (a list): it may have been changed in place
            _set_attr(mod, attr, _clone_state(value))

    def _restore_changed(self) -> None:
        for entry in self._tensors:
            mod, attr, saved, installed, version = entry
            current = mod.__dict__.get(attr, _MISSING)
            if current is installed and version is not None and current._version == version:
                continue  # the same tensor, not written since: still the saved value
            fresh = saved.clone()
            _set_attr(mod, attr, fresh)
            entry[3], entry[4] = fresh, _version(fresh)
        for mod, attr, value, fresh in self._others:
            if not fresh and mod.__dict__.get(attr, _MISSING) is not value:
                _set_attr(mod, attr, value)
        self._expect()


def _kept_copy(kept: dict | None, mod: nn.Module, attr: str, value: Tensor) -> Tensor:
    """A copy of tensor state ``value``: from ``kept`` if it holds one of this very tensor at its
    current version, else a fresh one (then kept). The copy is never installed, only cloned."""
    version = _version(value)
    if kept is None or version is None:
        return value.detach().clone()
    entry = kept.get((id(mod), attr))
    if entry is not None and entry[0] is value and entry[1] == version:
        return entry[2]
    copy_ = value.detach().clone()
    kept[(id(mod), attr)] = (value, version, copy_)  # holds value: its id cannot be reused
    return copy_


_VERSION = operator.attrgetter("_version")
_IMMUTABLE = (int, float, bool, str, bytes, type(None))
_MISSING = object()


def _version(t: Tensor) -> int | None:
    """The version counter of ``t`` (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def _set_attr(mod: nn.Module, attr: str, value: Any) -> None:
    # An attribute already in __dict__ is neither parameter, buffer nor submodule: setattr
    # would store it there after Module.__setattr__'s checks (a few µs each, several per
    # metric, at every evaluation).
    if attr in mod.__dict__:
        mod.__dict__[attr] = value
    else:
        setattr(mod, attr, value)
