"""Record one forward pass (parameter use order, module calls) and replay its prefix from cache.

Used by ICS, whose configurations ``(W^{t+1}_1..W^{t+1}_{i-1}, W^t_i..W^t_k)`` all share the
forward through the already-updated layers: whatever ran before layer ``i`` in the forward
pass used only updated parameters, so its output equals the output of the same call in one
fully updated forward ``(W^{t+1}_1..W^{t+1}_k)``. :class:`ForwardTrace` records that forward
once; :func:`prefix_replayed` then makes every module call that *ended* before a given point
return its recorded output instead of recomputing it.

Exactness conditions, all checked or enforced:

* the RNG streams are fast-forwarded to their recorded state after a skipped call, so later
  draws (dropout, functional noise) are the ones of the recorded forward;
* a recorded output that was modified in place after the call (``_version`` changed, e.g.
  by ``ReLU(inplace=True)``) is not reused; the call is recomputed;
* calls nested in a skipped call advance their modules' call counters, so a module called
  again later is matched to the right record; outputs other than tensors, None, numbers
  and strings (in tuples, lists, dicts) are never reused.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from callbacks.rng import RNGState


@dataclass
class CallRecord:
    module: nn.Module
    index: int  # how many calls of this module came before in the forward
    start: int
    end: int = -1
    output: Any = None
    versions: list[int] | None = None  # None: output not reusable
    rng_before: RNGState | None = None
    rng_after: RNGState | None = None  # None: the call drew no random numbers
    nested: Counter = field(default_factory=Counter)  # module -> calls nested in this one


class _ParamUse(TorchFunctionMode):
    """Sees every torch function call and notes the first use of each parameter."""

    def __init__(self, trace: ForwardTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                name = self.trace.param_names.get(id(leaf))
                if name is not None and name not in self.trace.first_use:
                    self.trace.first_use[name] = self.trace.tick()
        return func(*args, **kwargs)


class ForwardTrace:
    """One recorded forward of ``module``: ``first_use[name]`` (event counter at the first use
    of each parameter) and, if ``keep_outputs``, every submodule call with its output and the
    RNG state after it (NumPy and Python streams too if ``host_rng``).

    Use as a context manager around exactly one forward (one loss evaluation).
    """

    def __init__(self, module: nn.Module, keep_outputs: bool, host_rng: bool = True) -> None:
        self.module = module
        self.keep_outputs = keep_outputs
        self.host_rng = host_rng  # also track NumPy/Python streams (False: torch streams only)
        self.param_names = {id(p): n for n, p in module.named_parameters()}
        self.first_use: dict[str, int] = {}
        self.calls: list[CallRecord] = []
        self._counter = 0
        self._open: dict[int, list[CallRecord]] = {}
        self._call_counts: Counter = Counter()

    def tick(self) -> int:
        self._counter += 1
        return self._counter

    def _pre(self, module: nn.Module, args: Any) -> None:
        rec = CallRecord(module, self._call_counts[module], self.tick())
        if self.keep_outputs:
            rec.rng_before = RNGState.capture(self.host_rng)
        self._call_counts[module] += 1
        self._open.setdefault(id(module), []).append(rec)
        self.calls.append(rec)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        rec = self._open[id(module)].pop()
        rec.end = self.tick()
        if self.keep_outputs:
            leaves, _ = tree_flatten(output)
            if all(isinstance(x, (Tensor, int, float, bool, str, type(None))) for x in leaves):
                rec.output = output
                rec.versions = [x._version for x in leaves if isinstance(x, Tensor)]
            after = RNGState.capture(self.host_rng)
            rec.rng_after = None if after.same_as(rec.rng_before) else after
            rec.rng_before = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[ForwardTrace]:
        handles = []
        for sub in self.module.modules():
            if sub is self.module:
                continue
            handles.append(sub.register_forward_pre_hook(self._pre))
            handles.append(sub.register_forward_hook(self._post))
        try:
            with _ParamUse(self):
                yield self
        finally:
            for h in handles:
                h.remove()
        if self.keep_outputs:
            for rec in self.calls:  # nested calls, to keep call counters right when skipping
                rec.nested = Counter(
                    c.module for c in self.calls if rec.start < c.start and c.end < rec.end and c.end > 0
                )

    def before(self, names: list[str]) -> tuple[int, set[str]]:
        """The event at which the first of ``names`` is used, and the parameters used before it."""
        start = min(self.first_use[n] for n in names)
        return start, {n for n, t in self.first_use.items() if t < start}


@contextlib.contextmanager
def prefix_replayed(trace: ForwardTrace, until: int) -> Iterator[None]:
    """Inside, module calls that ended before event ``until`` of ``trace`` return their
    recorded output (if still intact) instead of running. Wrap exactly one forward."""
    records = {(id(r.module), r.index): r for r in trace.calls if 0 < r.end < until and r.versions is not None}
    modules = {id(r.module): r.module for r in records.values()}
    counts: Counter = Counter()
    patched: list[tuple[nn.Module, Any]] = []

    def make_forward(module: nn.Module, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            index = counts[id(module)]
            counts[id(module)] += 1
            rec = records.get((id(module), index))
            if rec is not None and _intact(rec):
                for nested_module, n in rec.nested.items():
                    counts[id(nested_module)] += n
                if rec.rng_after is not None:  # fast-forward the streams the call advanced
                    rec.rng_after.restore()
                return rec.output
            return original(*args, **kwargs)

        return forward

    try:
        for module in modules.values():
            patched.append((module, module.__dict__.get("forward")))
            module.forward = make_forward(module, module.forward)
        yield
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _intact(rec: CallRecord) -> bool:
    if isinstance(rec.output, Tensor):  # the common case, without pytree
        return [rec.output._version] == rec.versions
    leaves, _ = tree_flatten(rec.output)
    return [x._version for x in leaves if isinstance(x, Tensor)] == rec.versions
