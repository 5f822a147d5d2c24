"""Top eigenvalues and trace of the Hessian of the training loss (peer: PyHessian).

H = d^2 f / dW^2 at the current parameters W (every trainable parameter), f the training
loss over a fixed sample of training data, BN in eval mode by default. Hessian-vector
products by double backward (:mod:`callbacks.hvp`), never the Hessian itself:

- top-k eigenvalues (largest first) by Lanczos (default) or PyHessian's deflated power
  iteration (largest *magnitude*), at most ``max_iter`` products, relative tolerance ``tol``;
- trace by Hutchinson's estimator with Rademacher vectors, PyHessian's stopping rule;
- optionally per layer (module owning parameters): the trace of its diagonal block (free:
  the same products) and the top eigenvalue of its diagonal block (one Lanczos per layer);
- optionally the eigenvalue spectral density phi(t) = (1/n) sum_i delta(t - lambda_i) by
  stochastic Lanczos quadrature with Gaussian broadening (PyHessian's ``density()``,
  :mod:`callbacks.density`): a TensorBoard figure and an ``.npz`` file per measurement.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.base import BNMode
from callbacks.context import StepContext
from callbacks.density import SpectralQuadrature, broadened_density, density_figure, slq
from callbacks.distributed import all_reduce_mean
from callbacks.finite import NonFiniteError
from callbacks.fixed_sample import FixedSampleMeasurement
from callbacks.hessian_math import block_matvec, hutchinson_trace, lanczos, power_iteration
from callbacks.hvp import HessianVectorProduct
from callbacks.validation import check_any_int, check_bool, check_choice, check_int, check_number, fail
from callbacks.writers import tensorboard_writer

Method = Literal["lanczos", "power"]
METHODS = ("lanczos", "power")
Start = Literal["gradient", "random"]
STARTS = ("gradient", "random")


def layer_of(param_name: str) -> str:
    """The module that owns a parameter: ``features.0.weight`` -> ``features.0``."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


class HessianCallback(FixedSampleMeasurement):
    """Log the top Hessian eigenvalue(s) and the Hessian trace (module docstring).

    Args:
        top_k: number of top eigenvalues (0: none).
        trace: estimate the trace.
        max_iter: at most this many Hessian-vector products per eigenvalue computation
            (Lanczos: in total; power: per eigenvalue) and for the trace (PyHessian: 100).
        tol: relative tolerance of both stopping rules (PyHessian: 1e-3).
        method: ``"lanczos"`` (the k largest eigenvalues) or ``"power"`` (PyHessian's power
            iteration with deflation: the k of largest magnitude).
        per_layer: also log each layer's diagonal-block trace and top eigenvalue.
        density: also estimate the eigenvalue spectral density (module docstring).
        density_runs, density_steps: SLQ runs (random start vectors) and Lanczos steps per
            run (PyHessian's ``n_v=1``, ``iter=100``).
        density_bins, density_sigma_squared: the grid and the Gaussian broadening of the
            drawn density (PyHessian's 10000 and 1e-5: kernel variance
            ``sigma_squared * max(1, lambda_max - lambda_min)``).
        density_dir: where the ``.npz`` files go (default: ``<trainer.log_dir>/hessian_density``).
        cache_graph: keep the gradient graph of the sample for all products (one backward
            per product instead of a forward and two backwards; memory: the double-backward
            graph of the whole sample). Turn off for samples that do not fit.
        num_samples, num_batches, sample_batch_size: the fixed training sample (default 256
            samples, as PyHessian's examples use one batch of ~200), optionally re-split into
            batches of ``sample_batch_size`` (see
            :class:`~callbacks.fixed_sample.FixedSampleMeasurement`).
        bn_mode: ``"eval"`` (default; running statistics, what PyHessian forces) or ``"train"``.
        seed: seed of the random start and probe vectors (a private generator: the training
            RNG streams are never touched).
        start: Lanczos start vector: ``"gradient"`` (default; the sample's loss gradient mixed
            in equal parts with a random unit vector: the gradient leans toward the top
            eigenvectors, so fewer products reach ``tol``) or ``"random"`` (PyHessian's).
        every_n_epochs, at_train_end, every_n_steps, start_step, end_step,
            log_points_per_decade: when to measure (default: end of every epoch and of training).

    Logged: ``hessian/top_eigenvalue``; with ``top_k > 1`` also ``hessian/eigenvalue_<i>``,
    i = 1..k; ``hessian/trace`` and ``hessian/trace_stderr`` (standard error of the
    Hutchinson mean); ``hessian/num_hvps`` (products used); per layer
    ``hessian/<layer>/trace`` and ``hessian/<layer>/top_eigenvalue``; with ``density``,
    ``hessian/spectrum_min`` and ``hessian/spectrum_max`` (extreme quadrature nodes, mean over
    runs) and ``hessian/negative_mass`` (spectral mass below -1% of the spectral radius), the figure ``hessian/density``
    and ``step_<t>.npz`` (``nodes``, ``weights``: runs x steps; ``grid``, ``density``; ``step``,
    ``num_params``), written by rank 0.

    Cost per measurement: one forward+backward over the sample (with ``create_graph``),
    then one backward through that graph per product (~1.5 forward+backward passes each,
    measured), at most ``max_iter`` products for the eigenvalues (``top_k * max_iter`` for
    ``power``), as many for the trace, ``max_iter`` per layer with ``per_layer``, and
    ``density_runs * density_steps`` with ``density``.
    """

    default_num_samples = 256

    def __init__(
        self,
        top_k: int = 1,
        trace: bool = True,
        max_iter: int = 100,
        tol: float = 1e-3,
        *,
        method: Method = "lanczos",
        per_layer: bool = False,
        cache_graph: bool = True,
        num_samples: int | None = None,
        num_batches: int | None = None,
        bn_mode: BNMode = "eval",
        seed: int = 0,
        start: Start = "gradient",
        every_n_epochs: int | None = 1,
        at_train_end: bool = True,
        every_n_steps: int | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        log_points_per_decade: int | None = None,
        sample_batch_size: int | None = None,
        density: bool = False,
        density_runs: int = 1,
        density_steps: int = 100,
        density_bins: int = 10000,
        density_sigma_squared: float = 1e-5,
        density_dir: str | None = None,
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
        check_int(owner, "top_k", top_k, 0)
        flags = {"trace": trace, "per_layer": per_layer, "cache_graph": cache_graph, "density": density}
        for name, flag in flags.items():
            check_bool(owner, name, flag)
        if top_k == 0 and not (trace or density):
            fail(owner, "trace", trace, "must be True with top_k=0 and density=False (nothing to measure)")
        check_int(owner, "density_runs", density_runs, 1)
        check_int(owner, "density_steps", density_steps, 2, why=" (the second moment needs two steps)")
        check_int(owner, "density_bins", density_bins, 2)
        check_number(owner, "density_sigma_squared", density_sigma_squared, 0)
        if density_sigma_squared == 0:
            fail(owner, "density_sigma_squared", density_sigma_squared, "must be > 0 (the kernel's variance)")
        if density_dir is not None and not isinstance(density_dir, str):
            fail(owner, "density_dir", density_dir, "must be a directory path (str) or None")
        check_int(owner, "max_iter", max_iter, 1)
        check_number(owner, "tol", tol, 0)
        check_choice(owner, "method", method, METHODS)
        check_any_int(owner, "seed", seed)
        check_choice(owner, "start", start, STARTS)
        self.start: Start = start
        self.top_k, self.trace, self.max_iter, self.tol = top_k, trace, max_iter, float(tol)
        self.method, self.per_layer, self.cache_graph, self.seed = method, per_layer, cache_graph, seed
        self.density, self.density_runs, self.density_steps = density, density_runs, density_steps
        self.density_bins, self.density_sigma_squared = density_bins, float(density_sigma_squared)
        self.density_dir = density_dir
        self.uses_tensorboard = density  # the figure

    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "top_k": self.top_k,
            "trace": self.trace,
            "per_layer": self.per_layer,
            "density": self.density,
        }

    def setup_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.top_k > n:
            raise ValueError(f"top_k={self.top_k} exceeds the {n} trainable parameters of the model")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: StepContext) -> dict[str, Tensor]:
        sample = self.sample(trainer)
        names = ctx.trainable_names()
        values: dict[str, Tensor] = {}
        with ctx.evaluation(wrt=names) as loss_fn:
            closures = [lambda b=b, i=i: loss_fn(b, i) for i, b in enumerate(sample)]
            local = HessianVectorProduct(closures, ctx.parameters(names), cache_graph=self.cache_graph)
            products = [0]

            def hvp(v: Tensor) -> Tensor:
                products[0] += 1
                return all_reduce_mean(local(v))  # the Hessian of the global sample (equal shards)

            like = local.grad
            # the same decision on every rank: reduce before looking
            start_loss = all_reduce_mean(torch.tensor(local.loss, dtype=torch.float64, device=like.device))
            if not bool(torch.isfinite(start_loss)) or not bool(torch.isfinite(all_reduce_mean(like)).all()):
                local.release()
                raise NonFiniteError(f"non-finite loss or gradient on the fixed sample (loss {float(start_loss):g})")
            # the global sample's gradient: the same start vector on every rank
            wants_start = self.start == "gradient" and self.method == "lanczos" and (self.top_k or self.per_layer)
            start_vector = all_reduce_mean(like) if wants_start else None
            generator = torch.Generator().manual_seed(self.seed)
            if self.top_k:
                eigen = self._eigenvalues(hvp, like, self.top_k, generator, start_vector)
                values["hessian/top_eigenvalue"] = eigen[0]
                if self.top_k > 1:
                    values.update({f"hessian/eigenvalue_{i + 1}": e for i, e in enumerate(eigen)})
            blocks = self._blocks(names, ctx.parameters(names))
            if self.trace:
                sizes = [stop - start for start, stop in blocks.values()]
                result = hutchinson_trace(hvp, like, self.max_iter, self.tol, generator, block_sizes=sizes)
                values["hessian/trace"] = torch.tensor(result.trace, dtype=torch.float64)
                values["hessian/trace_stderr"] = torch.tensor(result.stderr, dtype=torch.float64)
                if self.per_layer:
                    for layer, block_trace in zip(blocks, result.block_traces):
                        values[f"hessian/{layer}/trace"] = torch.tensor(block_trace, dtype=torch.float64)
            if self.per_layer:
                for layer, (first, stop) in blocks.items():
                    block = block_matvec(hvp, like, first, stop)
                    block_start = None if start_vector is None else start_vector[first:stop]
                    top = self._eigenvalues(block, like[first:stop], 1, generator, block_start)[0]
                    values[f"hessian/{layer}/top_eigenvalue"] = top
            if self.density:  # drawn last: the other estimates see the same random vectors as without it
                quadrature = slq(hvp, like, self.density_runs, self.density_steps, generator)
                values.update(self._write_density(trainer, quadrature, like.numel(), ctx.step))
            local.release()
        values["hessian/num_hvps"] = torch.tensor(float(products[0]), dtype=torch.float64)
        return values

    def expected_keys(self, pl_module: pl.LightningModule) -> list[str]:
        keys = ["hessian/top_eigenvalue"] if self.top_k else []
        if self.top_k > 1:
            keys += [f"hessian/eigenvalue_{i + 1}" for i in range(self.top_k)]
        if self.trace:
            keys += ["hessian/trace", "hessian/trace_stderr"]
        if self.density:
            keys += ["hessian/spectrum_min", "hessian/spectrum_max", "hessian/negative_mass"]
        if self.per_layer:
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            params = [p for p in pl_module.parameters() if p.requires_grad]
            for layer in self._blocks(names, params):
                keys += ([f"hessian/{layer}/trace"] if self.trace else []) + [f"hessian/{layer}/top_eigenvalue"]
        return keys + ["hessian/num_hvps"]

    def _write_density(
        self, trainer: pl.Trainer, quadrature: SpectralQuadrature, n: int, step: int
    ) -> dict[str, Tensor]:
        """The density's scalars; its figure and ``.npz`` (rank 0). Every rank calls it (the
        quadrature is identical on every rank: products are all-reduced, vectors seeded)."""
        directory = self.density_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "hessian_density")
        grid, density = broadened_density(quadrature, self.density_bins, self.density_sigma_squared)
        if trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            arrays = {"nodes": quadrature.nodes, "weights": quadrature.weights, "grid": grid, "density": density}
            path = os.path.join(directory, f"step_{step:08d}.npz")
            np.savez(path, step=step, num_params=n, **{k: v.numpy() for k, v in arrays.items()})
            if tensorboard_writer(trainer) is not None:
                title = f"Hessian eigenvalue density, step {step} ({self.density_runs} SLQ runs x {self.density_steps})"
                self.log_figure(trainer, "hessian/density", density_figure(grid, density, title), step)
        low, high = quadrature.support()
        return {
            "hessian/spectrum_min": torch.tensor(low, dtype=torch.float64),
            "hessian/spectrum_max": torch.tensor(high, dtype=torch.float64),
            "hessian/negative_mass": torch.tensor(quadrature.negative_mass(), dtype=torch.float64),
        }

    def _eigenvalues(
        self, matvec, like: Tensor, k: int, generator: torch.Generator, start: Tensor | None
    ) -> list[Tensor]:
        max_iter = max(self.max_iter, k)
        if self.method == "lanczos":
            result = lanczos(matvec, like, k=k, max_iter=max_iter, tol=self.tol, generator=generator, start=start)
        else:
            result = power_iteration(matvec, like, k=k, max_iter=max_iter, tol=self.tol, generator=generator)
        if not result.converged:
            message = f"eigenvalues did not converge to tol={self.tol} in {self.max_iter} products"
            self.warn_once("not-converged", message)
        return [v.double() for v in result.eigenvalues]

    @staticmethod
    def _blocks(names: list[str], params: list[Tensor]) -> dict[str, tuple[int, int]]:
        """Coordinate range [start, stop) of each layer in the flat parameter vector."""
        blocks: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, p in zip(names, params):
            layer = layer_of(name)
            start = blocks[layer][0] if layer in blocks and blocks[layer][1] == offset else offset
            if layer in blocks and blocks[layer][1] != offset:
                layer = name  # not contiguous with its module's other parameters: its own block
            blocks[layer] = (start, offset + p.numel())
            offset += p.numel()
        return blocks
