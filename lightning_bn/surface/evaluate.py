"""Loss and accuracy at many points W + a d1 + b d2 of a plane, in chunks of points per call.

Per point: the parameters W + a d1 + b d2 (buffers reset to the checkpoint's), then, with
``bn_batches``, every running statistic recomputed as the plain average of its batch
statistics over those batches (train-mode forwards, :func:`~lightning_bn.interpolate.
recompute_running_stats`), then eval-mode forwards over the sample. Two ways, same numbers:

- ``vmap``: ``chunk_size`` points (default: :func:`auto_chunk_size`) in one ``torch.func.vmap``
  of ``functional_call`` (stacked parameters; stacked buffers when statistics are recomputed,
  since each point has its own);
- ``loop``: one point after the other, parameters written in place into one model copy.

``auto`` takes ``loop`` on the CPU and ``vmap`` elsewhere. On the CPU (one thread) the loop
won everywhere once it laid conv nets out channels-last, computed the input layer's output
from 3 products per batch (:class:`FirstLayerCache`) and stopped seeding CUDA per point: on
the MLP 1.1-1.8x faster than one vmap call; vmap turns a conv over C stacked weights into a
grouped conv, which CPU kernels ran 3-4x slower than C plain ones (VGG-11).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_bn.interpolate import evaluate, loss_function, recompute_running_stats

Method = Literal["auto", "vmap", "loop"]
Batches = Sequence[tuple[Tensor, Tensor]]


def grid_coordinates(a_values: Sequence[float], b_values: Sequence[float]) -> Tensor:
    """(P, 2) float64 points (a, b), a-major: row i * len(b) + j is (a_i, b_j)."""
    a = torch.as_tensor(a_values, dtype=torch.float64)
    b = torch.as_tensor(b_values, dtype=torch.float64)
    return torch.cartesian_prod(a, b).view(-1, 2)


def choose_method(model: nn.Module, device: torch.device, method: Method) -> Literal["vmap", "loop"]:
    if method != "auto":
        return method
    return "loop" if device.type == "cpu" else "vmap"


def moving(d1: Mapping[str, Tensor], d2: Mapping[str, Tensor]) -> list[str]:
    """The parameters a plane moves (a nonzero entry in d1 or d2); the others stay at W."""
    return [n for n in d1 if bool((d1[n] != 0).any() or (d2[n] != 0).any())]


def _seed(seed: int, device: torch.device) -> None:
    """Seed the generator the evaluation draws from. ``torch.manual_seed`` also queues a lazy
    CUDA seeding that formats a stack trace (1.2 ms; 39% of the MLP's loop with recomputed
    statistics): on the CPU only the CPU generator is seeded, which is all it uses."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


# -- loop ---------------------------------------------------------------------------------
def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """``channels_last`` for 2-D conv nets on the CPU, else contiguous. In NCHW the CPU's max
    pooling kernel (with indices) took half of a VGG forward; channels-last pooling and oneDNN
    convolutions ran the whole forward 2x faster (VGG-11 x0.125, batch 256, one thread), with
    the same values up to float rounding (1e-7)."""
    has_conv2d = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if has_conv2d and device.type == "cpu" else torch.contiguous_format


def _on_device(batches: Batches | None, device: torch.device, fmt: torch.memory_format) -> Batches | None:
    """The batches moved (and laid out) once, instead of at every point."""
    if batches is None:
        return None
    out = []
    for x, y in batches:
        x = x.to(device)
        out.append((x.contiguous(memory_format=fmt) if x.dim() == 4 else x, y.to(device) if y is not None else y))
    return out


MIN_FAN_IN = 256


class FirstLayerCache:
    """The output of the layers that read an input batch itself, from 3 products per batch.

    A conv or linear layer is linear in its weight and bias, so on a fixed batch x
    ``layer(x; W + a D1 + b D2) = layer(x; W) + a layer(x; D1) + b layer(x; D2)``: the three
    terms are computed once and every point costs two additions instead of the layer. Only
    for layers that sum over at least ``MIN_FAN_IN`` inputs per output: the MLP's 784 x 32
    input layer (97% of its forward) became 1.6x faster, while on VGG's first conv (27 inputs
    per output) the two additions cost more than the conv (the loop 1.2x slower). Equal to the
    direct product up to float rounding. A layer's input counts as the batch when it
    has the batch's storage, shape and strides (``nn.Flatten`` gives a view of it); anything
    else (noise added to the input, another layer) runs the layer as usual.
    """

    def __init__(self, model: nn.Module, center, d1, d2, batches: Sequence[Batches | None], budget: int = 2**26):
        self.point = (0.0, 0.0)
        self.budget = budget  # cached elements (3 per output element): 256 MB in float32
        self.batches = [x for group in batches if group is not None for x, _ in group]  # keeps their storage
        self.storage = {x.data_ptr() for x in self.batches}
        self.parts: dict[tuple, tuple[Tensor, Tensor, Tensor] | None] = {}
        for prefix, module in model.named_modules():
            if type(module) not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) or f"{prefix}.weight" not in center:
                continue
            if center[f"{prefix}.weight"][0].numel() >= MIN_FAN_IN:
                module.forward = self._forward(prefix, module, center, d1, d2)

    def _forward(self, prefix: str, module: nn.Module, center, d1, d2):
        original = module.forward
        weights = [(center[f"{prefix}.{k}"], d1[f"{prefix}.{k}"], d2[f"{prefix}.{k}"]) for k in ("weight", "bias")
                   if f"{prefix}.{k}" in center]  # fmt: skip

        def apply(x: Tensor, which: int) -> Tensor:
            w, bias = weights[0][which], weights[1][which] if len(weights) > 1 else None
            return F.linear(x, w, bias) if isinstance(module, nn.Linear) else module._conv_forward(x, w, bias)

        def forward(x: Tensor) -> Tensor:
            if x.data_ptr() not in self.storage:
                return original(x)
            key = (prefix, x.data_ptr(), x.dtype, tuple(x.shape), tuple(x.stride()))
            if key not in self.parts:
                self.parts[key] = self._store([apply(x, k) for k in range(3)])
            parts = self.parts[key]
            if parts is None:  # over the memory budget
                return original(x)
            a, b = self.point
            return torch.add(parts[0], parts[1], alpha=a).add_(parts[2], alpha=b)

        return forward

    def _store(self, parts: list[Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
        size = sum(p.numel() for p in parts)
        if size > self.budget:
            return None
        self.budget -= size
        return parts[0], parts[1], parts[2]


@torch.inference_mode()
def _loop(model, center, d1, d2, coords, train, bn_batches, test, device, seed) -> Tensor:
    fmt = memory_format(model, device)
    work = copy.deepcopy(model).to(device, memory_format=fmt)
    train, bn_batches, test = (_on_device(b, device, fmt) for b in (train, bn_batches, test))
    first = FirstLayerCache(work, center, d1, d2, (train, bn_batches, test))
    params = dict(work.named_parameters())
    names = moving(d1, d2)
    buffers = dict(work.named_buffers())
    saved = {k: v.clone() for k, v in buffers.items()}
    rows = []
    for a, b in coords.tolist():
        for name in names:  # W + a d1 + b d2 written in place: no temporaries per point
            params[name].copy_(center[name]).add_(d1[name], alpha=a).add_(d2[name], alpha=b)
        first.point = (a, b)
        if bn_batches is not None:
            for name, value in saved.items():  # each point starts from the checkpoint's buffers
                buffers[name].copy_(value)
            with torch.random.fork_rng(devices=[]):  # noise layers and dropout draw from it
                _seed(seed, device)
                recompute_running_stats(work, bn_batches, device)
        row = list(evaluate(work, train, device))
        if test is not None:
            row += list(evaluate(work, test, device))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


# -- vmap ---------------------------------------------------------------------------------
class StackedModel(nn.Module):
    """``model`` evaluated at C points at once: ``forward(x)`` returns (C, *output).

    ``params``/``buffers`` hold (C, ...) tensors for the entries that differ between points;
    ``shared`` the rest (the same for every point). In-place updates of stacked buffers (BN in
    train mode) write into each point's own copy.
    """

    def __init__(self, model: nn.Module, stacked: dict[str, Tensor], shared: dict[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.stacked, self.shared = stacked, shared

    def forward(self, x: Tensor) -> Tensor:
        def one(entries: dict[str, Tensor]) -> Tensor:
            return functional_call(self.model, {**self.shared, **entries}, (x,))

        return vmap(one, randomness="same")(self.stacked)


def _stacked_model(model, center, d1, d2, coords, recompute: bool) -> StackedModel:
    a = coords[:, 0].to(next(iter(center.values())).dtype)
    b = coords[:, 1].to(a.dtype)
    stacked, shared = {}, {}
    names = set(moving(d1, d2))
    for name, w in center.items():
        if name in names:
            shape = (-1,) + (1,) * w.dim()
            stacked[name] = w + a.to(w.device).view(shape) * d1[name] + b.to(w.device).view(shape) * d2[name]
        else:
            shared[name] = w
    for name, buf in model.named_buffers():
        if recompute:  # every point re-estimates its own statistics
            stacked[name] = buf.detach().unsqueeze(0).repeat(len(coords), *[1] * buf.dim())
        else:
            shared[name] = buf.detach()
    return StackedModel(model, stacked, shared)


@torch.no_grad()
def _evaluate_stacked(stacked: StackedModel, batches: Batches, device: torch.device) -> Tensor:
    """(C, 2): mean loss and accuracy per point over ``batches`` (eval mode), as ``evaluate``."""
    stacked.eval()
    loss_fn = loss_function(stacked.model)
    total = correct = None
    count = 0
    classification = True
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = stacked(x)
        losses = vmap(lambda o, target=y: loss_fn(o, target))(out).double() * len(y)
        classification = classification and not y.is_floating_point() and out.dim() == 3
        hits = (out.argmax(-1) == y).sum(-1).double() if classification else torch.zeros_like(losses)
        total = losses if total is None else total + losses
        correct = hits if correct is None else correct + hits
        count += len(y)
    acc = correct / count if classification else torch.full_like(total, math.nan)
    return torch.stack([total / count, acc], 1).cpu()


def auto_chunk_size(center: Mapping[str, Tensor], names: Sequence[str], points: int) -> int:
    """Points per vmap call: all of them, up to 2^24 stacked parameter values (64 MB in float32);
    each call costs a fixed ~10 ms of tracing, so small models want large chunks."""
    size = sum(center[n].numel() for n in names) or 1
    return max(1, min(points, 2**24 // size))


def _vmap(model, center, d1, d2, coords, train, bn_batches, test, device, seed, chunk_size) -> Tensor:
    work = copy.deepcopy(model).to(device)
    chunk_size = chunk_size or auto_chunk_size(center, moving(d1, d2), len(coords))
    out = []
    for start in range(0, len(coords), chunk_size):
        chunk = coords[start : start + chunk_size]
        stacked = _stacked_model(work, center, d1, d2, chunk, bn_batches is not None)
        if bn_batches is not None:
            with torch.random.fork_rng(devices=[]):
                _seed(seed, device)
                recompute_running_stats(stacked, bn_batches, device)
        parts = [_evaluate_stacked(stacked, train, device)]
        if test is not None:
            parts.append(_evaluate_stacked(stacked, test, device))
        out.append(torch.cat(parts, 1))
    return torch.cat(out)


def evaluate_points(
    model: nn.Module,
    d1: Mapping[str, Tensor],
    d2: Mapping[str, Tensor],
    coords: Tensor,
    train: Batches,
    bn_batches: Batches | None = None,
    test: Batches | None = None,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Tensor:
    """(P, 2) or (P, 4) float64: train loss, train accuracy[, test loss, test accuracy] at each
    point (a, b) of ``coords`` (P, 2), W = ``model``'s parameters (the model is not modified).

    ``bn_batches``: recompute running statistics on them at every point; None: the model's own.
    """
    device = torch.device(device)
    center = {n: p.detach().to(device) for n, p in model.named_parameters()}
    d1 = {n: v.to(device, center[n].dtype) for n, v in d1.items()}
    d2 = {n: v.to(device, center[n].dtype) for n, v in d2.items()}
    args: tuple[Any, ...] = (model, center, d1, d2, coords, train, bn_batches, test, device, seed)
    if len(coords) == 0:
        return torch.zeros(0, 2 if test is None else 4, dtype=torch.float64)
    if choose_method(model, device, method) == "loop":
        return _loop(*args)
    try:
        return _vmap(*args, chunk_size)
    except RuntimeError as err:  # a layer vmap cannot trace (.item(), data-dependent control flow)
        warnings.warn(f"surface: vmap failed ({str(err).splitlines()[0]}); evaluating point by point", stacklevel=2)
        return _loop(*args)
