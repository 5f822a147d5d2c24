"""``python -m lightning_bn.surface``: a 2-D loss surface of a checkpoint, or of a run's trajectory.

    python -m lightning_bn.surface CKPT --config CONFIG --out DIR
    python -m lightning_bn.surface --trajectory DIR_OF_CKPTS --config CONFIG --out DIR
    python -m lightning_bn.surface CKPT --devices 2 --accelerator cpu   # grid split over 2 ranks

Writes ``surface.csv``, ``directions.pt``, ``contour.png`` and ``surface3d.png`` to ``--out``
(and the figures to TensorBoard with ``--tensorboard LOG_DIR``). Checkpoints and the data are
loaded as by :mod:`lightning_bn.interpolate`; mistakes end with one line ``error: ...`` (exit 2).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_bn.errors import ArgumentParser, ConfigError, fail, format_value
from lightning_bn.interpolate import datamodule_from_config, load_model
from lightning_bn.surface.compute import DEFAULT_SAMPLES, Surface, loss_surface, trajectory_surface


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lightning_bn.surface",
        description="Loss and accuracy over a 2-D plane of parameter space (Li et al., 2018).",
    )
    parser.add_argument("checkpoint", nargs="?", help="the checkpoint at the centre W (random directions)")
    parser.add_argument("--trajectory", metavar="DIR", help="instead: the checkpoints (*.ckpt) of one run; PCA plane")
    parser.add_argument("--config", help="LightningCLI YAML: its data section (and model class) are used")
    parser.add_argument("--model-class", help="model class if the checkpoints do not name it, e.g. lightning_bn.VGG")
    parser.add_argument("--resolution", type=int, nargs="+", default=[25], metavar="N", help="points per axis (1 or 2)")
    parser.add_argument(
        "--span",
        type=float,
        nargs=4,
        default=(-1.0, 1.0, -1.0, 1.0),
        metavar=("A_MIN", "A_MAX", "B_MIN", "B_MAX"),
        help="random mode: the grid's range",
    )
    parser.add_argument("--margin", type=float, default=0.2, help="trajectory mode: grid beyond the path, x its range")
    parser.add_argument("--include-bn-and-bias", action="store_true", help="move biases and norm parameters too")
    parser.add_argument("--bn", choices=("recompute", "running"), default="recompute")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_SAMPLES, help="training samples evaluated")
    parser.add_argument("--bn-samples", type=int, help="training samples for BN statistics (default: --num-samples)")
    parser.add_argument("--test-samples", type=int, default=0, help="also evaluate this many test samples")
    parser.add_argument("--batch-size", type=int, help="override the data module's batch size")
    parser.add_argument("--method", choices=("auto", "vmap", "loop"), default="auto")
    parser.add_argument("--chunk-size", type=int, help="grid points per vmap call (default: up to 64 MB of parameters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device with --devices 1")
    parser.add_argument("--devices", type=int, default=1, help="split the grid over this many ranks (Lightning DDP)")
    parser.add_argument("--accelerator", default="cpu", help="accelerator of the ranks with --devices > 1")
    parser.add_argument("--title", help="first line of the figures' titles")
    parser.add_argument("--out", default="surface", help="directory for the CSV, directions and figures")
    parser.add_argument("--tensorboard", metavar="LOG_DIR", help="also log the figures to TensorBoard")
    return parser


def trajectory_checkpoints(directory: str | Path) -> list[Path]:
    """The ``*.ckpt`` files of ``directory`` in training order (by ``global_step``); a copy of
    the same step (e.g. ``last.ckpt``) is kept once."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--trajectory {directory}: not a directory")
    steps: dict[int, Path] = {}
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: (p.stem == "last", p.name)):
        try:
            step = torch.load(path, map_location="cpu", weights_only=False).get("global_step")
        except Exception as err:  # a truncated file or not a checkpoint at all
            raise ConfigError(f"cannot read checkpoint {path}: {err}") from None
        if not isinstance(step, int):
            raise ConfigError(f"{path} is not a Lightning checkpoint (no global_step)")
        steps.setdefault(step, path)
    if len(steps) < 3:
        raise ConfigError(
            f"--trajectory {directory}: needs at least 3 checkpoints of different steps, found {len(steps)}"
        )
    return [steps[s] for s in sorted(steps)]


def _validate(args: argparse.Namespace) -> tuple[int, int]:
    if (args.checkpoint is None) == (args.trajectory is None):
        raise ConfigError("give either CKPT (random directions) or --trajectory DIR, not both and not neither")
    if len(args.resolution) > 2:
        raise ConfigError(f"--resolution takes 1 or 2 numbers, got {len(args.resolution)}")
    resolution = (args.resolution[0], args.resolution[-1])
    for name, value, low in (
        ("--resolution", min(resolution), 2),
        ("--num-samples", args.num_samples, 1),
        ("--test-samples", args.test_samples, 0),
        ("--devices", args.devices, 1),
    ):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {format_value(value)}")
    if args.bn_samples is not None and args.bn_samples < 1:
        raise ConfigError(f"--bn-samples must be >= 1, got {format_value(args.bn_samples)}")
    return resolution


def _fabric(args: argparse.Namespace) -> Any:
    if args.devices == 1:
        return None
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy="ddp")
    fabric.launch()  # re-runs this command in one process per device
    return fabric


def compute(args: argparse.Namespace, strategy: Any) -> Surface:
    resolution = _validate(args)
    datamodule, config_class = datamodule_from_config(args.config, args.batch_size)
    model_class = args.model_class or config_class
    device = strategy.device if strategy is not None else args.device
    common = dict(
        resolution=resolution,
        include_bn_and_bias=args.include_bn_and_bias,
        bn=args.bn,
        num_samples=args.num_samples,
        bn_samples=args.bn_samples,
        test_samples=args.test_samples,
        seed=args.seed,
        method=args.method,
        chunk_size=args.chunk_size,
        device=device,
        strategy=strategy,
    )
    if args.trajectory is not None:
        models = [load_model(p, model_class, "cpu") for p in trajectory_checkpoints(args.trajectory)]
        return trajectory_surface(models, datamodule, margin=args.margin, **common)
    model = load_model(args.checkpoint, model_class, "cpu")
    return loss_surface(model, datamodule, span=args.span, **common)


def main(argv: Sequence[str] | None = None) -> Surface:
    from lightning_bn.surface.outputs import write_outputs

    args = build_parser().parse_args(argv)
    try:
        _validate(args)  # before any process is started
        fabric = _fabric(args)
        start = time.perf_counter()
        surface = compute(args, fabric)
        seconds = time.perf_counter() - start
    except ConfigError as err:
        fail(str(err))
    if fabric is not None and fabric.global_rank != 0:
        return surface  # only rank 0 writes
    try:
        write_outputs(surface, args.out, title=args.title, tensorboard=args.tensorboard)
    except OSError as err:  # e.g. --out is a file or not writable
        fail(f"--out {args.out}: cannot write the results ({err})")
    best = min(surface.rows(), key=lambda r: r["train_loss"])
    print(f"wrote surface.csv, directions.pt, contour.png, surface3d.png to {args.out}")
    print(f"{surface.mode} plane, {surface.bn_label()}")
    if surface.explained_variance is not None:
        print("explained variance: {:.1%}, {:.1%}".format(*surface.explained_variance))
    print(f"cost: {surface.cost()}; {seconds:.1f} s")
    print(f"lowest train loss {best['train_loss']:.4f} at a={best['a']:.3g}, b={best['b']:.3g}")
    return surface
