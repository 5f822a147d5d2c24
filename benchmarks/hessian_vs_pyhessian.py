"""Top Hessian eigenvalue and trace: ours vs PyHessian vs hessian-eigenthings, side by side.

Same frozen model (a VGG briefly trained on the embedded CIFAR-10 subset, eval mode, as
PyHessian forces) and the same batch for all three; PyHessian-style settings (tol 1e-3, at
most 100 products). A tight Lanczos run (tol 1e-7) is the reference top eigenvalue every
method is judged against (agreement within 1%). Also times one Hessian-vector product by
double backward with a cached graph (ours), double backward rebuilt per product
(hessian-eigenthings) and torch.func forward-over-reverse (why callbacks/hvp.py keeps the first).

    pip install -e '.[bench]'        # pyhessian, hessian-eigenthings
    python benchmarks/hessian_vs_pyhessian.py             # ~2-4 min on 2 CPU cores
    python benchmarks/hessian_vs_pyhessian.py --width 0.25 --batch 512
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from callbacks.hessian_math import hutchinson_trace, lanczos
from callbacks.hvp import HessianVectorProduct
from lightning_bn import VGG
from lightning_bn.data.base import CIFAR10_MEAN, CIFAR10_STD, normalize_uint8
from lightning_bn.data.embedded import load_embedded_cifar10


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[object, float]:
    """Result of the last call and the median wall time over ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def train(width: float, steps: int, images: torch.Tensor, labels: torch.Tensor) -> VGG:
    torch.manual_seed(0)
    model = VGG(width=width, norm="batch", lr=0.05, weight_decay=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (128,))
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def frozen_model(width: float, steps: int, batch: int) -> tuple[VGG, torch.Tensor, torch.Tensor, int]:
    """(model trained ``steps`` steps on the embedded CIFAR-10, then frozen; the last ``batch``
    training images and labels; the number of parameters): what the Hessian is computed on."""
    raw = load_embedded_cifar10()["train"]
    images, labels = normalize_uint8(raw[0], CIFAR10_MEAN, CIFAR10_STD), raw[1]
    model = train(width, steps, images, labels)
    for p in model.parameters():
        p.grad = None
    return model, images[-batch:], labels[-batch:], sum(p.numel() for p in model.parameters())


def ours_eigen(model, x, y, k, max_iter, tol, start="gradient"):
    """HessianCallback's defaults: Lanczos from the gradient mixed with a random vector."""
    params = [p for p in model.parameters() if p.requires_grad]
    hvp = HessianVectorProduct([lambda: F.cross_entropy(model(x), y)], params)
    generator = torch.Generator().manual_seed(0)
    begin = hvp.grad if start == "gradient" else None
    result = lanczos(hvp, hvp.grad, k=k, max_iter=max_iter, tol=tol, generator=generator, start=begin)
    return result.eigenvalues.tolist(), result.num_products


def ours_trace(model, x, y, max_iter, tol):
    params = [p for p in model.parameters() if p.requires_grad]
    hvp = HessianVectorProduct([lambda: F.cross_entropy(model(x), y)], params)
    result = hutchinson_trace(hvp, hvp.grad, max_iter=max_iter, tol=tol, generator=torch.Generator().manual_seed(0))
    return result.trace, result.stderr, result.num_products


class PyHessianRun:
    """PyHessian's ``hessian`` object on a copy of the model, counting its products."""

    def __init__(self, model, x, y):
        from pyhessian import hessian

        self.model = copy.deepcopy(model)  # PyHessian writes .grad (with a graph) into the model
        with warnings.catch_warnings():  # its loss.backward(create_graph=True) warns about a cycle
            warnings.simplefilter("ignore", UserWarning)
            self.h = hessian(self.model, F.cross_entropy, data=(x, y), cuda=False)

    def __enter__(self):
        self.module = sys.modules["pyhessian.hessian"]  # the package re-exports the class under this name
        self.original, self.count = self.module.hessian_vector_product, 0

        def counted(*args):
            self.count += 1
            return self.original(*args)

        self.module.hessian_vector_product = counted
        torch.manual_seed(0)
        return self

    def __exit__(self, *exc):
        self.module.hessian_vector_product = self.original
        for p in self.model.parameters():
            p.grad = None  # break the parameter <-> graph cycle PyHessian creates


def pyhessian_eigen(model, x, y, k, max_iter, tol):
    with PyHessianRun(model, x, y) as run:
        values, _ = run.h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    return sorted(values, key=abs, reverse=True), run.count


def pyhessian_trace(model, x, y, max_iter, tol):
    with PyHessianRun(model, x, y) as run:
        samples = torch.tensor(run.h.trace(maxIter=max_iter, tol=tol), dtype=torch.float64)
    stderr = float(samples.std() / len(samples) ** 0.5) if len(samples) > 1 else float("nan")
    return float(samples.mean()), stderr, run.count


def eigenthings_operator(model, x, y):
    import hessian_eigenthings as he

    return he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy), full_dataset=True)


def eigenthings_eigen(model, x, y, k, max_iter, tol):
    import hessian_eigenthings as he

    result = he.deflated_power_iteration(eigenthings_operator(model, x, y), k=k, max_iter=max_iter, tol=tol, seed=0)
    return result.eigenvalues.tolist(), result.iterations


def eigenthings_trace(model, x, y, num_samples):
    import hessian_eigenthings as he

    result = he.hutchinson(eigenthings_operator(model, x, y), num_samples=num_samples, seed=0)
    return result.estimate, result.stderr, num_samples


def hvp_timings(model, x, y, repeats: int) -> dict[str, float]:
    """Seconds per Hessian-vector product, and per forward+backward, on the same batch."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    leaves = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params))
    cached = HessianVectorProduct([lambda: F.cross_entropy(model(x), y)], leaves, cache_graph=True)
    rebuilt = HessianVectorProduct([lambda: F.cross_entropy(model(x), y)], leaves, cache_graph=False)
    tangent = tuple(t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params))

    def loss_of(ps):
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)

    def forward_backward():
        return torch.autograd.grad(F.cross_entropy(model(x), y), leaves)

    out = {}
    for label, fn in (
        ("forward+backward", forward_backward),
        ("double backward, cached graph (ours)", lambda: cached(v)),
        ("double backward, rebuilt per product", lambda: rebuilt(v)),
        ("torch.func jvp(grad) forward-over-reverse", lambda: jvp(grad(loss_of), (params,), (tangent,))),
    ):
        fn()  # warm-up
        out[label] = timed(fn, repeats)[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=200, help="training steps before freezing")
    parser.add_argument("--batch", type=int, default=256, help="the batch the Hessian is computed on")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (median time)")
    args = parser.parse_args()

    model, x, y, n = frozen_model(args.width, args.steps, args.batch)
    print(f"VGG width {args.width}: {n} parameters, batch {args.batch}, tol {args.tol}, max_iter {args.max_iter}")

    it, tol, reps = args.max_iter, args.tol, args.repeats
    for k in (1, 3):
        reference, _ = ours_eigen(model, x, y, k, max_iter=300, tol=1e-8, start="random")
        print(f"\ntop-{k} eigenvalues; reference (Lanczos, tol 1e-8): {', '.join(f'{v:.4f}' for v in reference)}")
        print(f"{'method':<36}{'eigenvalues':>30}{'max err %':>10}{'HVPs':>6}{'seconds':>9}")
        times = {}
        for label, fn in (
            ("ours (Lanczos)", ours_eigen),
            ("ours, random start", lambda *a: ours_eigen(*a, start="random")),
            ("PyHessian (power, deflation)", pyhessian_eigen),
            ("hessian-eigenthings (power, deflation)", eigenthings_eigen),
        ):
            (values, products), seconds = timed(lambda fn=fn, k=k: fn(model, x, y, k, it, tol), reps)
            err = max(100 * abs(v - r) / abs(r) for v, r in zip(values, reference))
            times[label] = seconds
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"{label:<36}{shown:>30}{err:>10.3f}{products:>6}{seconds:>9.2f}")
        ours_time = times["ours (Lanczos)"]
        ratios = ", ".join(f"{label.split(' ')[0]} {ours_time / t:.2f}" for label, t in list(times.items())[2:])
        print(f"time ours / peer: {ratios} (target <= 0.5)")

    print("\ntrace (Hutchinson, Rademacher); PyHessian's stopping rule for ours and PyHessian")
    print(f"{'method':<36}{'trace':>10}{'stderr':>9}{'HVPs':>6}{'seconds':>9}{'s / HVP':>9}")
    rows = {}
    (tr, err, products), seconds = timed(lambda: ours_trace(model, x, y, it, tol), 1)
    rows["ours"] = (tr, err, products, seconds)
    (tr, err, products), seconds = timed(lambda: pyhessian_trace(model, x, y, it, tol), 1)
    rows["PyHessian"] = (tr, err, products, seconds)
    same = rows["ours"][2]
    (tr, err, products), seconds = timed(lambda: eigenthings_trace(model, x, y, same), 1)
    rows["hessian-eigenthings (same HVP count)"] = (tr, err, products, seconds)
    for label, (tr, err, products, seconds) in rows.items():
        print(f"{label:<36}{tr:>10.2f}{err:>9.2f}{products:>6}{seconds:>9.2f}{seconds / products:>9.3f}")
    per = {label: r[3] / r[2] for label, r in rows.items()}
    print(
        f"time per trace HVP ours / PyHessian {per['ours'] / per['PyHessian']:.2f}, "
        f"ours / hessian-eigenthings {per['ours'] / per['hessian-eigenthings (same HVP count)']:.2f} "
        "(the HVP count itself depends on the random stopping rule)"
    )

    print("\nseconds per Hessian-vector product (median of 5), same model and batch:")
    timings = hvp_timings(model, x, y, repeats=5)
    fb = timings["forward+backward"]
    for label, seconds in timings.items():
        print(f"  {label:<44}{seconds * 1e3:>8.1f} ms  ({seconds / fb:.2f}x forward+backward)")


if __name__ == "__main__":
    main()
