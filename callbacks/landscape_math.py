"""Loss and gradient along the gradient direction: the math of Santurkar et al. (2018), Sec. 3, Fig. 4.

For parameters W_t, the gradient g_t = grad L(W_t) that training uses and step sizes eta,
W(eta) = W_t - eta g_t. Per measurement we evaluate, on the training step's batch,

- the loss landscape: L(W(eta)) for every eta (Fig. 4a, its min and max over eta);
- gradient predictiveness: ||grad L(W(eta)) - g_t||_2 (Fig. 4b, min and max over eta);
- the effective beta-smoothness: max over eta of ||grad L(W(eta)) - g_t||_2 / ||eta g_t||_2 (Fig. 4c).

Everything here is a pure function of a loss closure ``loss_fn(params, buffers) -> scalar``
(``params``/``buffers``: name -> tensor dicts, e.g. through ``torch.func.functional_call``), so it
serves any model. ``buffers`` are throw-away copies the closure may mutate (BatchNorm in train
mode updates its running statistics in the forward pass; the caller's buffers stay untouched).

Two evaluation methods with the same cost, len(step_sizes) forward+backward passes:
``loop`` evaluates one eta after the other (W(eta) written in place into reused buffers: four
parameter-sized buffers, or len(step_sizes) gradient rows in place of one when they fit in
:data:`ROWS_BYTES`; ``loss_fn`` gets the same tensors at every eta); ``batched`` evaluates
``chunk_size`` etas in one ``torch.func.vmap`` call (chunk_size parameter copies) and needs a
closure that vmap can trace (no ``.item()``, no in-place update of captured tensors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.func import grad_and_value, vmap

Params = Mapping[str, Tensor]
LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]
Method = Literal["loop", "batched"]

DEFAULT_LR_MULTIPLIERS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
"""8 values evenly spaced over [0.5, 4]: the paper's [0.05, 0.4] at learning rate 0.1."""

SUMMARY_KEYS: tuple[str, ...] = (
    "loss_min",
    "loss_max",
    "grad_diff_min",
    "grad_diff_max",
    "beta_smoothness",
    "grad_norm",
)


def check_positive_values(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """Return ``values`` as a tuple of floats; ValueError unless a non-empty list of finite numbers > 0."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of positive numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must contain finite numbers > 0, got {v!r} in {list(values)!r}")
        out.append(float(v))
    return tuple(out)


def step_size_grid(
    lr: float | None,
    lr_multipliers: Sequence[float] = DEFAULT_LR_MULTIPLIERS,
    step_sizes: Sequence[float] | None = None,
) -> tuple[float, ...]:
    """The etas of one measurement: ``step_sizes`` if given, else ``lr_multipliers`` x ``lr``."""
    if step_sizes is not None:
        return check_positive_values("step_sizes", step_sizes)
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0 to scale lr_multipliers, got {lr!r}")
    return tuple(lr * m for m in check_positive_values("lr_multipliers", lr_multipliers))


@dataclass(frozen=True)
class AlongGradient:
    """One measurement: per-eta values (1-D tensors of length len(step_sizes)) and ||g_t||."""

    step_sizes: Tensor
    losses: Tensor
    grad_diff_norms: Tensor
    grad_norm: Tensor


def grad_norm(grad: Params) -> Tensor:
    """||g||_2 over all tensors of ``grad`` (in float64 so large models do not lose digits)."""
    norms = torch._foreach_norm([g.detach() for g in grad.values()], 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms))


def evaluate_along_gradient(
    loss_fn: LossFn,
    params: Params,
    grad: Params,
    step_sizes: Sequence[float],
    buffers: Params | None = None,
    *,
    method: Method = "loop",
    chunk_size: int | None = None,
    before_each: Callable[[], None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    workspace: dict | None = None,
) -> AlongGradient:
    """Evaluate L(W(eta)) and ||grad L(W(eta)) - g|| for W(eta) = params - eta * grad.

    Args:
        loss_fn: ``loss_fn(params, buffers) -> scalar`` on the measured batch. With ``loop``
            it receives the same ``params`` dict and tensors at every eta, their values
            updated in place between calls (so it can swap them into a module once); it must
            not keep them or its graph beyond the call.
        params: W_t, name -> tensor (only the tensors to move; not modified).
        grad: g_t, the same names and shapes as ``params``.
        step_sizes: the etas.
        buffers: name -> tensor passed to ``loss_fn`` as fresh copies at every evaluation.
        method: ``loop`` (one eta per forward+backward) or ``batched`` (vmap over etas).
        chunk_size: etas per vmap call for ``batched`` (None: all at once).
        before_each: called before every ``loss_fn`` evaluation (loop) or vmap call
            (batched), e.g. to restore the training step's RNG state so that dropout and
            noise see the same realization.
        reduce: maps a tensor to its mean over data-parallel ranks (DDP); applied to the
            losses and gradients at W(eta), flattened into one tensor (one collective), before
            the difference to g is taken: once per measurement (``loop``, when the gradients of
            all etas fit in :data:`ROWS_BYTES`; else once per eta) or per vmap call (``batched``).
        workspace: a dict the caller keeps between measurements, in which ``loop`` keeps a
            small model's buffers (see :meth:`_MovedParams.reused`); None: fresh buffers.

    Cost: exactly len(step_sizes) forward+backward passes.
    """
    if method not in ("loop", "batched"):
        raise ValueError(f"method must be 'loop' or 'batched', got {method!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if set(params) != set(grad):
        raise ValueError(f"params and grad must have the same names, got {sorted(params)} and {sorted(grad)}")
    etas = check_positive_values("step_sizes", list(step_sizes))
    names = list(params)
    p = {n: _detached(params[n]) for n in names}
    g = {n: _detached(grad[n]) for n in names}
    bufs = {n: _detached(b) for n, b in (buffers or {}).items()}
    if method == "loop":
        losses, diffs, g_norm = _loop(loss_fn, p, g, bufs, etas, before_each, reduce, workspace)
    else:
        g_norm = grad_norm(g)
        size = len(etas) if chunk_size is None else chunk_size
        starts = range(0, len(etas), size)
        chunks = [_batched(loss_fn, p, g, bufs, etas[i : i + size], before_each, reduce) for i in starts]
        losses, diffs = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    device = next(iter(p.values())).device if p else torch.device("cpu")
    return AlongGradient(
        step_sizes=torch.tensor(etas, dtype=torch.float64, device=device),
        losses=losses,
        grad_diff_norms=diffs,
        grad_norm=g_norm.to(device),
    )


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad or t.grad_fn is not None else t


ROWS_BYTES = 32 * 2**20
"""The loop keeps the gradients of all etas (one row each) when they take at most this many
bytes, and differences, reduces (DDP) and norms them in one operation each at the end; a larger
model's gradients are handled one eta at a time (one row). Rows cost memory, operations cost a
fixed time each: on a small model the per-eta operations cost as much as its forward pass."""


def _loop(loss_fn, p, g, bufs, etas, before_each, reduce, workspace=None) -> tuple[Tensor, Tensor, Tensor]:
    flat = workspace is None or not workspace.get("per_tensor", False)
    try:
        return _loop_once(loss_fn, p, g, bufs, etas, before_each, reduce, workspace, flat)
    except RuntimeError:
        if not flat:
            raise
    # The loss changed a parameter in place (under no_grad, say), which views of a split do not
    # allow: the same loop with a leaf per tensor (a copy of each gradient per eta), and from
    # now on if that runs (an error it raises too was not the views').
    if workspace is not None:
        workspace.clear()
    out = _loop_once(loss_fn, p, g, bufs, etas, before_each, reduce, workspace, flat=False)
    if workspace is not None:
        workspace["per_tensor"] = True
    return out


def _loop_once(loss_fn, p, g, bufs, etas, before_each, reduce, workspace, flat) -> tuple[Tensor, Tensor, Tensor]:
    moved = _MovedParams.reused(workspace, p, g, len(etas), flat)
    leaves = moved.inputs
    losses, diffs = [], []
    with torch.enable_grad():  # once, not per eta: the loop's own tensor operations need no graph
        for start in range(0, len(etas), moved.rows):
            chunk = etas[start : start + moved.rows]
            chunk_losses = []
            for row, eta in enumerate(chunk):
                moved.move_to(eta)
                if before_each is not None:
                    before_each()
                loss = loss_fn(moved.params, {n: b.clone() for n, b in bufs.items()})
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                moved.store_grads(row, grads)
                del grads
                chunk_losses.append(loss.detach())
            chunk_loss = torch.stack(chunk_losses).reshape(len(chunk))
            if reduce is not None:  # one collective for the chunk's losses and gradients
                chunk_loss = moved.reduce_rows(reduce, chunk_loss, len(chunk))
            losses.append(chunk_loss.double())
            diffs.append(moved.diff_norms(len(chunk)))
    return torch.cat(losses), torch.cat(diffs), moved.g_norm()


class _MovedParams:
    """W(eta) = W_t - eta g_t for one eta after the other, written in place into one set of
    tensors (``params``: the same objects at every eta) that the loss closure receives, and the
    gradients at W(eta) in ``rows`` rows (the loop's etas in chunks of ``rows``).

    Contiguous floating-point tensors of one dtype and device share one buffer, each at a
    64-byte aligned offset (a fresh allocation's alignment: kernels compute the bits they
    compute in training); W_t, g_t, W(eta) and the gradients are packed the same way, into
    buffers allocated once per measurement (or kept between measurements, :meth:`reused`).
    Moving to the next eta is then one add per buffer instead of a fresh copy of every tensor;
    the gradient with respect to a buffer's one leaf is the padded concatenation of its tensors'
    gradients, made by autograd and kept as the row without a copy (``flat``; see
    :class:`_Packed`; with ``flat=False`` a leaf per tensor and one concatenation per eta); and
    ||grad L(W(eta)) - g_t|| for all rows is one subtraction and one norm per buffer instead of
    five operations per tensor and eta. Element by element it is the same
    ``torch.add(p, g, alpha=-eta)`` and the same ``grad - g`` as per tensor, so W(eta), the
    losses and the differences are bit for bit those of a per-tensor computation; only the
    float64 sum of squares runs in another order. Other tensors (e.g. channels_last weights)
    keep a leaf of their own layout, so kernels see training's layout.
    """

    _ALIGN_BYTES = 64

    def __init__(self, p: Mapping[str, Tensor], g: Mapping[str, Tensor], rows: int = 1, flat: bool = True) -> None:
        names = list(p)
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        self._single: list[int] = []
        for i, n in enumerate(names):
            same = (g[n].shape, g[n].dtype, g[n].device) == (p[n].shape, p[n].dtype, p[n].device)
            if same and p[n].is_contiguous() and p[n].dtype.is_floating_point:
                groups.setdefault((p[n].dtype, p[n].device), []).append(i)
            else:
                self._single.append(i)
        self.rows = rows
        self._p, self._g = [p[n] for n in names], [g[n] for n in names]
        self._buffers = [_Packed(idx, self._p, self._g, self._ALIGN_BYTES, rows, flat) for idx in groups.values()]
        #: per row, the other tensors' gradients (flattened), as the loop stores them
        self._single_grads: list[list[Tensor]] = [[] for _ in range(rows)]
        #: the same stacked over the rows of a chunk, as :meth:`reduce_rows` leaves them (DDP)
        self._single_stacked: list[Tensor] | None = None
        params: list[Tensor | None] = [None] * len(names)
        for b in self._buffers:
            for i, view in zip(b.idx, b.w_views):
                params[i] = view
        with torch.no_grad():
            singles = []
            for i in self._single:
                dtype = torch.result_type(self._p[i], self._g[i])
                params[i] = torch.empty_like(self._p[i], dtype=dtype).requires_grad_(True)
                singles.append(params[i])
        self.params: dict[str, Tensor] = dict(zip(names, params))
        #: what the loop differentiates with respect to: each buffer's leaves, then the others
        self.inputs: list[Tensor] = [leaf for b in self._buffers for leaf in b.leaves] + singles

    @classmethod
    def reused(
        cls, workspace: dict | None, p: Mapping[str, Tensor], g: Mapping[str, Tensor], num_etas: int, flat: bool = True
    ) -> _MovedParams:
        """The buffers for ``p``, ``g`` and ``num_etas`` step sizes: one row per eta if their
        gradients fit in :data:`ROWS_BYTES`, else one row. A small model's buffers are kept in
        ``workspace`` (a dict the caller keeps between measurements) and refilled with ``p``
        and ``g`` at the next measurement of the same layout: allocating and packing them
        costs as much as a forward pass there. Larger models allocate them per measurement,
        so that training does not carry them between measurements."""
        nbytes = sum(t.numel() * t.element_size() for t in g.values())
        rows = num_etas if num_etas * nbytes <= ROWS_BYTES else 1
        if workspace is None or rows == 1:
            return cls(p, g, rows, flat)
        key = (rows, flat, _layout_key(p, g))
        if workspace.get("key") == key:
            moved = workspace["moved"]
            moved._refill(p, g)
            return moved
        workspace["key"], workspace["moved"] = key, cls(p, g, rows, flat)
        return workspace["moved"]

    def _refill(self, p: Mapping[str, Tensor], g: Mapping[str, Tensor]) -> None:
        self._p, self._g = list(p.values()), list(g.values())
        with torch.no_grad():
            for b in self._buffers:
                b.refill(self._p, self._g)

    def move_to(self, eta: float) -> None:
        """Set ``params`` to W_t - eta g_t (in place, outside autograd)."""
        for b in self._buffers:  # through the alias: it requires no grad and shares no version counter
            torch.add(b.p, b.g, alpha=-eta, out=b.w_alias)
        if self._single:
            leaves = list(self.params.values())
            with torch.no_grad():  # these leaves require grad themselves
                for i in self._single:
                    torch.add(self._p[i], self._g[i], alpha=-eta, out=leaves[i])

    def store_grads(self, row: int, grads: Sequence[Tensor | None]) -> None:
        """Keep the gradients (one per tensor of ``inputs``; None: zeros) in row ``row``."""
        start = 0
        for b in self._buffers:
            b.store(row, grads[start : start + len(b.leaves)])
            start += len(b.leaves)
        self._single_grads[row] = [
            torch.zeros_like(self._p[i]).reshape(-1) if grad is None else grad.reshape(-1)
            for i, grad in zip(self._single, grads[start:])
        ]

    def reduce_rows(self, reduce: Callable[[Tensor], Tensor], losses: Tensor, k: int) -> Tensor:
        """Replace rows ``0..k-1`` and ``losses`` (k,) by their ``reduce`` (mean over ranks), in
        one collective; returns the reduced losses."""
        singles = [torch.stack([self._single_grads[r][j] for r in range(k)]) for j in range(len(self._single))]
        stored = [torch.stack(b.rows[:k]) for b in self._buffers] + singles
        losses, reduced = _reduced(reduce, losses, stored)
        for b, value in zip(self._buffers, reduced):
            b.rows[:k] = list(value.unbind(0))
        self._single_stacked = reduced[len(self._buffers) :]  # diff_norms takes them as they are
        for j, value in enumerate(self._single_stacked):
            for r in range(k):
                self._single_grads[r][j] = value[r]
        return losses

    def g_norm(self) -> Tensor:
        """||g_t||_2 from the packed g_t (one norm per buffer; the padding is zeros), in float64."""
        norms = [torch.linalg.vector_norm(b.g, dtype=torch.float64) for b in self._buffers]
        norms += [torch.linalg.vector_norm(self._g[i], dtype=torch.float64) for i in self._single]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    def diff_norms(self, k: int) -> Tensor:
        """||grad - g_t||_2 of rows ``0..k-1``, shape (k,): the difference (of the rows stacked,
        in place on the stack) in the tensors' dtype, its squares summed in float64."""
        norms = [
            torch.linalg.vector_norm(torch.stack(b.rows[:k]).sub_(b.g), dim=1, dtype=torch.float64)
            for b in self._buffers
        ]
        reduced, self._single_stacked = self._single_stacked, None
        for j, i in enumerate(self._single):
            stacked = reduced[j] if reduced is not None else torch.stack([self._single_grads[r][j] for r in range(k)])
            norms.append(torch.linalg.vector_norm(stacked - self._g[i].reshape(1, -1), dim=1, dtype=torch.float64))
        if len(norms) == 1:
            return norms[0]
        return torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


def _layout_key(p: Mapping[str, Tensor], g: Mapping[str, Tensor]) -> tuple:
    """What the buffers of :class:`_MovedParams` depend on: names, shapes, strides, dtypes, devices."""
    return tuple(
        (n, p[n].shape, p[n].stride(), p[n].dtype, p[n].device, g[n].shape, g[n].stride(), g[n].dtype, g[n].device)
        for n in p
    )


class _Packed:
    """Tensors ``idx`` (of one dtype and device) of W_t and g_t packed into 1-D buffers
    ``p`` and ``g``, each tensor at an ``align_bytes`` aligned offset (zeros between), with a
    buffer ``w`` for W(eta) and ``rows`` slots for gradients with respect to it.

    ``w`` is a leaf that requires grad, and ``w_views`` (the tensors' views into it, what the
    loss closure gets) come from one ``split``: differentiating with respect to ``w`` gives the
    gradients of all of them as one padded concatenation (autograd's split backward, zeros for
    the padding and for a view the loss does not reach), kept as a row without a copy. The
    views are made once; the loop writes each W(eta) through ``w_alias``, a tensor on the same
    memory that autograd does not know as a view of ``w`` (an in-place write through ``w``
    itself would invalidate views of a split). That is safe because each eta's graph is made
    after the write and differentiated before the next one. The views are not leaves: a loss
    that reads ``param.grad`` gets PyTorch's warning about a non-leaf's ``.grad`` (None), as
    it would get None from the per-tensor leaves.
    """

    def __init__(
        self, idx: list[int], p: Sequence[Tensor], g: Sequence[Tensor], align_bytes: int, rows: int, flat: bool = True
    ) -> None:
        self.idx = idx
        align = max(1, align_bytes // p[idx[0]].dtype.itemsize)
        zeros = torch.zeros(align, dtype=p[idx[0]].dtype, device=p[idx[0]].device)
        #: per part: a tensor index, or the zeros that pad the tensor before
        layout: list[int | Tensor] = []
        for i in idx:
            pad = -p[i].numel() % align
            layout += [i, zeros[:pad]] if pad else [i]

        def packed(tensors: Sequence[Tensor]) -> Tensor:
            return _flatten_dense_tensors([tensors[e].reshape(-1) if isinstance(e, int) else e for e in layout])

        with torch.no_grad():
            self.p, self.g = packed(p), packed(g)
            self.w = torch.empty_like(self.p)
            self.w_alias = torch.empty(0, dtype=self.w.dtype, device=self.w.device).set_(
                self.w.untyped_storage(), self.w.storage_offset(), self.w.shape, self.w.stride()
            )
        shapes = [p[e] if isinstance(e, int) else e for e in layout]
        keep = [isinstance(e, int) for e in layout]

        def views(buffer: Tensor) -> list[Tensor]:
            return [v for v, k in zip(_unflatten_dense_tensors(buffer, shapes), keep) if k]

        if flat:
            self.w.requires_grad_(True)
            with torch.enable_grad():
                pieces = torch.split(self.w, [t.numel() for t in shapes])
                self.w_views = [
                    piece if piece.shape == t.shape else piece.view(t.shape)
                    for piece, t, k in zip(pieces, shapes, keep)
                    if k
                ]
            self.leaves = [self.w]
        else:  # a leaf per tensor, on w's memory; each gradient is copied into its row
            self.w_views = [v.detach().requires_grad_(True) for v in views(self.w)]
            self.leaves = self.w_views
        self._p_views, self._g_views = views(self.p), views(self.g)
        self._layout = layout
        #: the gradients with respect to ``w`` at the etas of a chunk
        self.rows: list[Tensor] = [zeros] * rows

    def store(self, row: int, grads: Sequence[Tensor | None]) -> None:
        """Keep the gradients with respect to ``leaves`` (None: zeros) as row ``row``: their
        padded concatenation (with one leaf, autograd's; else made here in one operation)."""
        if self.leaves[0] is self.w:
            self.rows[row] = torch.zeros_like(self.p) if grads[0] is None else grads[0]
            return
        by_index = {i: torch.zeros_like(v) if gr is None else gr for i, v, gr in zip(self.idx, self.w_views, grads)}
        self.rows[row] = _flatten_dense_tensors([by_index[e] if isinstance(e, int) else e for e in self._layout])

    def refill(self, p: Sequence[Tensor], g: Sequence[Tensor]) -> None:
        """Copy new W_t and g_t (same layout) into ``p`` and ``g``."""
        torch._foreach_copy_(self._p_views + self._g_views, [p[i] for i in self.idx] + [g[i] for i in self.idx])


def _batched(loss_fn, p, g, bufs, etas, before_each, reduce) -> tuple[Tensor, Tensor]:
    k = len(etas)
    with torch.no_grad():
        moved = {}
        for n in p:
            eta = torch.tensor(etas, dtype=p[n].dtype, device=p[n].device).view(k, *([1] * p[n].dim()))
            moved[n] = p[n].unsqueeze(0) - eta * g[n].unsqueeze(0)
        # One private copy of every buffer per eta: BN in train mode updates them in place,
        # which vmap allows only on batched tensors.
        stacked_bufs = {n: b.unsqueeze(0).expand(k, *b.shape).clone() for n, b in bufs.items()}
    if before_each is not None:
        before_each()
    # randomness="same": one dropout/noise draw for all etas, the draw the loop makes
    # after before_each() restored the RNG.
    grads, losses = vmap(grad_and_value(loss_fn), randomness="same")(moved, stacked_bufs)
    losses, grads = _reduced(reduce, losses.detach().reshape(k), [grads[n] for n in p])
    return losses.double(), _diff_norm(grads, g)


def _diff_norm(stacked: Sequence[Tensor], g: Params) -> Tensor:
    """||stacked[i] - g||_2 for every leading index i (sums of squares in float64)."""
    total = 0.0
    for a, b in zip(stacked, g.values()):
        total = total + (a - b.unsqueeze(0)).double().pow(2).reshape(a.shape[0], -1).sum(1)
    return torch.sqrt(total)


def _reduced(
    reduce: Callable[[Tensor], Tensor] | None, losses: Tensor, grads: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """Apply ``reduce`` to losses (k,) and stacked gradients (k, ...) in one call (one collective)."""
    if reduce is None:
        return losses, grads
    k = losses.shape[0]
    dtype = functools.reduce(torch.promote_types, [gr.dtype for gr in grads], losses.dtype)
    flat = reduce(torch.cat([losses.reshape(k, 1).to(dtype)] + [gr.reshape(k, -1).to(dtype) for gr in grads], dim=1))
    parts = flat.split([1] + [gr[0].numel() for gr in grads], dim=1)
    return parts[0].reshape(k).to(losses.dtype), [p.reshape(gr.shape).to(gr.dtype) for p, gr in zip(parts[1:], grads)]


def summarize(result: AlongGradient) -> dict[str, float]:
    """The logged statistics of one measurement (keys :data:`SUMMARY_KEYS`, no prefix).

    beta_smoothness = max over eta of ||grad L(W(eta)) - g|| / (eta ||g||); nan if g = 0
    (every W(eta) is W_t, the ratio is undefined). min/max propagate nan, so a diverged eta
    shows up in the log instead of being skipped.

    Computed on the host, in Python floats, from one copy of the per-eta values: float64
    multiplication and division are correctly rounded there as on the device, so the ratios
    are bit for bit those of ``diffs / (step_sizes * grad_norm)`` in torch (a dozen tensor
    operations cost as much as a small model's layer).
    """
    k = result.losses.numel()
    values = [result.losses, result.grad_diff_norms, result.step_sizes, result.grad_norm.reshape(1)]
    device = result.losses.device
    host = torch.cat([v.detach().double().to(device) for v in values]).tolist()
    losses, diffs, etas, g = host[:k], host[k : 2 * k], host[2 * k : 3 * k], host[3 * k]
    ratios = [_ieee_div(d, e * g) for d, e in zip(diffs, etas)]
    stats = [_nan_min(losses), _nan_max(losses), _nan_min(diffs), _nan_max(diffs), _nan_max(ratios), g]
    return dict(zip(SUMMARY_KEYS, stats))


def _ieee_div(a: float, b: float) -> float:
    """a / b as IEEE 754 (and torch) define it, also for b = 0 (Python raises there)."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _nan_min(values: Sequence[float]) -> float:
    """min that propagates nan, as torch's does."""
    return math.nan if any(map(math.isnan, values)) else min(values)


def _nan_max(values: Sequence[float]) -> float:
    """max that propagates nan, as torch's does."""
    return math.nan if any(map(math.isnan, values)) else max(values)
