"""Keskar et al. (ICLR 2017) sharpness of the current parameters, Metric 2.1.

    phi(eps, A) = 100 * (max_{y in C} f(x + A y) - f(x)) / (1 + f(x)),
    C = { z : |z_i| <= eps * (|(A^+ x)_i| + 1) },

x the flattened trainable parameters, f the training loss over a fixed sample of training
data (BN in eval mode by default), A = I (full space) or a random n x p matrix with i.i.d.
N(0, 1) entries (``subspace_dim=p``; A^+ x by least squares). The max is approximated
(``max_iter`` iterations), so phi is a lower bound. Keskar et al. report, for eps = 1e-3
in the full space, 1.23 +- 0.83 for small-batch and 205.14 +- 69.52 for large-batch
minima of their network F1. The math is in :mod:`callbacks.keskar_math`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.base import BNMode
from callbacks.context import StepContext
from callbacks.finite import NonFiniteError
from callbacks.fixed_sample import FixedSampleMeasurement
from callbacks.hvp import flatten, unflatten
from callbacks.keskar_math import METHODS, RandomSubspace, keskar_sharpness
from callbacks.validation import check_any_int, check_choice, check_int, check_key_suffix, check_positive_numbers

Method = Literal["torch", "lbfgsb"]


def sharpness_key(eps: float, subspace_dim: int | None, suffix: str = "") -> str:
    """``sharpness/keskar_eps0.001`` (full space) or ``sharpness/keskar_eps0.001_sub100``, then ``suffix``."""
    return f"sharpness/keskar_eps{eps:g}" + ("" if subspace_dim is None else f"_sub{subspace_dim}") + suffix


class KeskarSharpnessCallback(FixedSampleMeasurement):
    """Log Keskar's sharpness phi(eps, A) for every eps (module docstring).

    Args:
        epsilons: box sizes eps (> 0); the paper uses 1e-3 and 5e-4.
        subspace_dim: None: the full space (A = I); p: a random n x p subspace (the paper's
            p = 100), seeded with ``seed`` and the same at every measurement.
        method: ``"torch"`` (default): projected sign ascent on the training device, which
            reached >= 0.99x the L-BFGS-B value in ``benchmarks/sharpness_methods.py``;
            ``"lbfgsb"``: SciPy's L-BFGS-B in float64 on the host (the paper's maximizer).
        max_iter: iterations of the maximizer (the paper: 10).
        num_samples, num_batches, sample_batch_size: the fixed training sample f is computed
            on (default 2048 samples in the loader's batches; see
            :class:`~callbacks.fixed_sample.FixedSampleMeasurement`). Comparing runs of
            different batch sizes in ``bn_mode="train"``, set ``sample_batch_size`` so that
            f uses the same batch statistics' granularity in each.
        bn_mode: ``"eval"`` (default; running statistics) or ``"train"``.
        seed: seed of the random subspace.
        key_suffix: appended to every key of this instance (``""`` or ``_``-separated words,
            e.g. ``_lbfgsb_train``), so that several instances (both maximizers, both BN
            modes) log side by side; two instances that would log the same key are refused
            at setup.
        every_n_epochs, at_train_end, every_n_steps, start_step, end_step,
            log_points_per_decade: when to measure (default: end of every epoch and of training).

    Logged, for each eps (key suffix ``_sub<p>`` in a subspace):
    ``sharpness/keskar_eps<eps>`` = phi, ``sharpness/keskar_eps<eps>_at_bound`` = fraction of
    the box coordinates of the maximizer at their bound; once: ``sharpness/loss`` = f(x).

    Cost per measurement, in forward+backward passes over the sample: at most
    ``max_iter + 1`` per eps for ``torch`` (fewer when it reaches a stationary corner); for
    ``lbfgsb`` one per function evaluation, up to several per iteration (line searches; 48
    for 10 iterations in the benchmark). A subspace adds two n x p products per evaluation.
    """

    def __init__(
        self,
        epsilons: Sequence[float] = (1e-3, 5e-4),
        subspace_dim: int | None = None,
        method: Method = "torch",
        max_iter: int = 10,
        *,
        num_samples: int | None = None,
        num_batches: int | None = None,
        bn_mode: BNMode = "eval",
        seed: int = 0,
        every_n_epochs: int | None = 1,
        at_train_end: bool = True,
        every_n_steps: int | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        log_points_per_decade: int | None = None,
        sample_batch_size: int | None = None,
        key_suffix: str = "",
    ) -> None:
        super().__init__(
            num_samples=num_samples,
            num_batches=num_batches,
            every_n_epochs=every_n_epochs,
            at_train_end=at_train_end,
            every_n_steps=every_n_steps,
            start_step=start_step,
            end_step=end_step,
            log_points_per_decade=log_points_per_decade,
            bn_mode=bn_mode,
            sample_batch_size=sample_batch_size,
        )
        owner = type(self).__name__
        epsilons = [epsilons] if isinstance(epsilons, (int, float)) else epsilons
        epsilons = check_positive_numbers(owner, "epsilons", epsilons)
        check_int(owner, "subspace_dim", subspace_dim, 1, optional=True, why=" (None: the full space)")
        check_choice(owner, "method", method, METHODS)
        check_int(owner, "max_iter", max_iter, 1)
        check_any_int(owner, "seed", seed)
        self.key_suffix = check_key_suffix(owner, key_suffix)
        self.epsilons = [float(e) for e in epsilons]
        self.subspace_dim, self.method, self.max_iter, self.seed = subspace_dim, method, max_iter, seed
        self._subspace: RandomSubspace | None = None

    def state_key_fields(self) -> dict[str, Any]:
        fields = {**super().state_key_fields(), "epsilons": self.epsilons, "subspace_dim": self.subspace_dim}
        return {**fields, "key_suffix": self.key_suffix} if self.key_suffix else fields

    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.subspace_dim is not None and self.subspace_dim > n:
            raise ValueError(f"subspace_dim={self.subspace_dim} exceeds the {n} trainable parameters of the model")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> dict[str, Tensor]:
        sample = self.sample(trainer)
        names = ctx.trainable_names()
        like = ctx.parameters(names)
        x = flatten([p.detach() for p in like]).clone()

        def evaluate(w: Tensor) -> tuple[float, Tensor]:
            params = dict(zip(names, unflatten(w, like)))
            loss, grads = ctx.loss_and_grad(params, wrt=names, batches=sample)
            return float(loss), flatten([grads[n] for n in names])

        start_loss, start_grad = evaluate(x)  # reduced: the same on every rank

        def value_and_grad(w: Tensor) -> tuple[float, Tensor]:
            # every maximizer starts at y = 0, i.e. at x: reuse that evaluation
            return (start_loss, start_grad.clone()) if torch.equal(w, x) else evaluate(w)

        if not math.isfinite(start_loss) or not bool(torch.isfinite(start_grad).all()):
            raise NonFiniteError(f"non-finite loss or gradient on the fixed sample (loss {start_loss:g})")
        subspace = self._get_subspace(x)
        values: dict[str, Tensor] = {}
        for eps in self.epsilons:
            result = keskar_sharpness(value_and_grad, x, eps, subspace, self.method, self.max_iter)
            key = sharpness_key(eps, self.subspace_dim, self.key_suffix)
            values[key] = torch.tensor(result.phi, dtype=torch.float64)
            values[f"{key}_at_bound"] = torch.tensor(result.at_bound, dtype=torch.float64)
            values[f"sharpness/loss{self.key_suffix}"] = torch.tensor(result.loss, dtype=torch.float64)
        return values

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        keys = [sharpness_key(eps, self.subspace_dim, self.key_suffix) for eps in self.epsilons]
        return [k for key in keys for k in (key, f"{key}_at_bound")] + [f"sharpness/loss{self.key_suffix}"]

    def same_values_as(self, other: Any) -> set[str]:
        """f(x) (``sharpness/loss``) is the same in a full-space and a subspace instance that
        measure on the same sample, in the same BN mode, at the same steps."""
        fields = ("sample_batch_size", "bn_mode", "key_suffix")
        if not isinstance(other, KeskarSharpnessCallback) or any(getattr(self, f) != getattr(other, f) for f in fields):
            return set()
        mine, theirs = self.state_key_fields(), other.state_key_fields()
        same_when = [k for k in mine if k not in ("epsilons", "subspace_dim", "class")]
        if any(mine.get(k) != theirs.get(k) for k in same_when):
            return set()
        return {f"sharpness/loss{self.key_suffix}"}

    def _get_subspace(self, x: Tensor) -> RandomSubspace | None:
        if self.subspace_dim is None:
            return None
        sub = self._subspace
        if sub is None or sub.n != x.numel() or sub.device != x.device or sub.dtype != x.dtype:
            sub = RandomSubspace(x.numel(), self.subspace_dim, seed=self.seed, device=x.device, dtype=x.dtype)
            self._subspace = sub
        return sub
