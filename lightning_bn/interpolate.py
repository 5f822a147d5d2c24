"""1-D interpolation between two solutions (Keskar et al., ICLR 2017, Fig. 2 and 3).

    f(alpha) = L(alpha * x_b + (1 - alpha) * x_a),   alpha in linspace(-1, 2, 25) by default,

x_a and x_b the parameters of two checkpoints of the same architecture (e.g. a small- and a
large-batch solution: alpha = 0 is A, alpha = 1 is B). At every alpha the training and test
loss and accuracy are computed in eval mode. Normalization running statistics are not
parameters, so they are, by default, recomputed on training data at each alpha (the
statistics the interpolated network would have); ``bn="interpolate"`` interpolates them
like the parameters instead (variances clamped at 0 outside [0, 1]).

Command line (writes ``interpolation.csv`` and ``interpolation.png``)::

    python -m lightning_bn.interpolate small.ckpt large.ckpt --out runs/interp
    python -m lightning_bn.interpolate A.ckpt B.ckpt --config runs/x/version_0/config.yaml \\
        --bn interpolate --tensorboard runs/interp --labels "batch 128" "batch 2048"

The model class comes from the checkpoints (LightningCLI stores it), else from the
``model`` section of ``--config`` or ``--model-class``; the data from the ``data`` section
of ``--config``, else the embedded CIFAR-10 subset. Batches must be ``(input, target)``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bn.errors import ArgumentParser, ConfigError, fail

BNRule = Literal["recompute", "interpolate"]
COLUMNS = ("alpha", "train_loss", "train_acc", "test_loss", "test_acc")


def default_alphas() -> list[float]:
    """Keskar's grid: 25 points from -1 to 2 (A at 0, B at 1)."""
    return torch.linspace(-1.0, 2.0, 25, dtype=torch.float64).tolist()


# -- compatibility ------------------------------------------------------------------------
def check_compatible(model_a: nn.Module, model_b: nn.Module, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise ``ConfigError`` (one line) unless both models have the same class, keys and shapes."""
    if type(model_a) is not type(model_b):
        raise ConfigError(
            f"different architectures: {names[0]} is {type(model_a).__name__}, {names[1]} is {type(model_b).__name__}"
        )
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    only_a, only_b = sorted(set(state_a) - set(state_b)), sorted(set(state_b) - set(state_a))
    if only_a or only_b:
        raise ConfigError(
            f"different architectures: entries only in {names[0]}: {only_a[:3]}, only in {names[1]}: {only_b[:3]}"
        )
    for key, tensor in state_a.items():
        if tensor.shape != state_b[key].shape:
            raise ConfigError(
                f"parameter shapes differ: {key} is {tuple(tensor.shape)} in {names[0]} "
                f"but {tuple(state_b[key].shape)} in {names[1]}"
            )


def interpolated_state(
    state_a: dict[str, Tensor], state_b: dict[str, Tensor], alpha: float, buffers: Iterable[str], bn: BNRule
) -> dict[str, Tensor]:
    """alpha * b + (1 - alpha) * a for every floating-point entry (buffers only if ``bn="interpolate"``;
    otherwise, and for integer entries such as ``num_batches_tracked``, A's values)."""
    buffers = set(buffers)
    out = {}
    for key, a in state_a.items():
        if not a.is_floating_point() or (key in buffers and bn == "recompute"):
            out[key] = a.clone()
            continue
        value = torch.lerp(a, state_b[key].to(a.dtype), alpha)
        if key in buffers and key.rsplit(".", 1)[-1] in ("running_var", "running_stat"):
            value = value.clamp_min(0.0)  # outside [0, 1] a variance may extrapolate below 0
        out[key] = value
    return out


# -- running statistics -------------------------------------------------------------------
def running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with running-statistics buffers (``running_*``): BatchNorm and its relatives."""
    return [m for m in model.modules() if any(n.startswith("running_") for n, _ in m.named_buffers(recurse=False))]


@torch.no_grad()
def recompute_running_stats(model: nn.Module, batches: Iterable[Any], device: torch.device) -> int:
    """Replace every running statistic by its average over ``batches`` (train-mode forwards).

    Each module's ``momentum`` is set to 1/k for the k-th batch, so after K batches its
    running estimate is the plain mean of the K batch statistics (BatchNorm's cumulative
    average, for any module following BatchNorm's update rule), then restored.
    """
    modules = running_stat_modules(model)
    missing = [type(m).__name__ for m in modules if not hasattr(m, "momentum")]
    if missing:
        raise ConfigError(f"cannot recompute running statistics of {missing[0]} (no momentum); use bn='interpolate'")
    if not modules:
        return 0
    saved = [(m, m.momentum) for m in modules]
    modes = [(m, m.training) for m in model.modules()]
    count = 0
    try:
        model.train()
        for x, _ in batches:
            count += 1
            for m in modules:
                m.momentum = 1.0 / count
            model(x.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        for m, flag in modes:
            m.training = flag
    if count == 0:
        raise ConfigError("no training batch to recompute the running statistics on")
    return count


# -- evaluation ---------------------------------------------------------------------------
def loss_function(model: nn.Module):
    """The module's own ``loss_fn(output, target)`` (NormStudyModule), else cross-entropy."""
    fn = getattr(model, "loss_fn", None)
    return fn if callable(fn) else F.cross_entropy


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over the samples of ``batches`` (eval mode); accuracy is nan
    unless targets are class indices."""
    model.eval()
    loss_fn = loss_function(model)
    total, correct, count = 0.0, 0, 0
    classification = True
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = model(x)
        total += float(loss_fn(out, y)) * len(y)
        classification = classification and not y.is_floating_point() and out.dim() == 2
        if classification:
            correct += int((out.argmax(1) == y).sum())
        count += len(y)
    if count == 0:
        raise ConfigError("the data loader yielded no batch")
    return total / count, (correct / count if classification else math.nan)


def _limited(loader: Iterable[Any], max_batches: int | None, seed: int) -> list[Any]:
    """The first ``max_batches`` batches of ``loader``, the same ones at every call (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = []
        for batch in loader:
            out.append(batch)
            if max_batches is not None and len(out) >= max_batches:
                break
    return out


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    datamodule: pl.LightningDataModule,
    alphas: Sequence[float] | None = None,
    bn: BNRule = "recompute",
    bn_batches: int | None = None,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train/test loss and accuracy of alpha * B + (1 - alpha) * A for every alpha.

    Args:
        model_a, model_b: the two solutions (same architecture; neither is modified).
        datamodule: gives ``train_dataloader()`` (loss, accuracy and running statistics)
            and ``test_dataloader()``; batches are ``(input, target)``.
        alphas: default :func:`default_alphas` (linspace(-1, 2, 25)).
        bn: ``"recompute"`` running statistics on training data at each alpha (default) or
            ``"interpolate"`` them like the parameters.
        bn_batches: training batches used to recompute them (default: all).
        max_batches: evaluate on at most this many batches of each split (default: all).
        device: where to evaluate.
        seed: fixes which batches a shuffling loader yields (the same at every alpha).

    Returns one dict per alpha with the keys of :data:`COLUMNS`.
    """
    if bn not in ("recompute", "interpolate"):
        raise ConfigError(f"bn must be 'recompute' or 'interpolate', got {bn!r}")
    for name, value in (("bn_batches", bn_batches), ("max_batches", max_batches)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 or None, got {value!r}")
    alphas = default_alphas() if alphas is None else [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("alphas must not be empty")
    check_compatible(model_a, model_b)
    device = torch.device(device)
    model = copy.deepcopy(model_a).to(device)
    state_a = {k: v.detach().to(device) for k, v in model_a.state_dict().items()}
    state_b = {k: v.detach().to(device) for k, v in model_b.state_dict().items()}
    buffer_names = [n for n, _ in model.named_buffers()]

    datamodule.setup("fit")
    train_batches = _limited(datamodule.train_dataloader(), max_batches, seed)
    recompute = bn == "recompute" and bool(running_stat_modules(model))  # nothing to recompute without BN
    stat_batches = _limited(datamodule.train_dataloader(), bn_batches, seed + 1) if recompute else []
    datamodule.setup("test")
    test_batches = _limited(datamodule.test_dataloader(), max_batches, seed)

    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolated_state(state_a, state_b, alpha, buffer_names, bn))
        if recompute:
            with torch.random.fork_rng(devices=[]):  # noise layers and dropout draw from it
                torch.manual_seed(seed)
                recompute_running_stats(model, stat_batches, device)
        train_loss, train_acc = evaluate(model, train_batches, device)
        test_loss, test_acc = evaluate(model, test_batches, device)
        rows.append(dict(zip(COLUMNS, (alpha, train_loss, train_acc, test_loss, test_acc))))
    return rows


# -- outputs ------------------------------------------------------------------------------
def write_csv(rows: Sequence[dict[str, float]], path: str | Path, columns: Sequence[str] = COLUMNS) -> Path:
    """The table as CSV; written to a temporary file and renamed, so never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def plot(rows: Sequence[dict[str, float]], labels: tuple[str, str] = ("A", "B"), title: str | None = None):
    """Keskar's Fig. 2: loss (left axis, solid train / dashed test) and accuracy (right axis)
    against alpha, with the two solutions marked at alpha = 0 and 1."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    alphas = [r["alpha"] for r in rows]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.plot(alphas, [r["train_loss"] for r in rows], "b-", label="train loss")
    ax.plot(alphas, [r["test_loss"] for r in rows], "b--", label="test loss")
    ax.set_xlabel(r"$\alpha$  (parameters $\alpha\, x_B + (1-\alpha)\, x_A$)")
    ax.set_ylabel("cross-entropy loss", color="b")
    handles = ax.get_lines()
    if not all(math.isnan(r["train_acc"]) for r in rows):
        acc = ax.twinx()
        acc.plot(alphas, [100 * r["train_acc"] for r in rows], "r-", label="train accuracy")
        acc.plot(alphas, [100 * r["test_acc"] for r in rows], "r--", label="test accuracy")
        acc.set_ylabel("accuracy (%)", color="r")
        handles = handles + acc.get_lines()
    for alpha, label in zip((0.0, 1.0), labels):
        ax.axvline(alpha, color="0.5", lw=0.8, ls=":")
        ax.annotate(label, (alpha, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=9)
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", fontsize=8, ncol=len(handles))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the axes
    return fig


def log_to_tensorboard(rows: Sequence[dict[str, float]], figure: Any, log_dir: str | Path) -> None:
    """The figure (tag ``interpolation``) and the table as text to a TensorBoard run in ``log_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_figure("interpolation", figure, close=False)
        header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        body = "".join("| " + " | ".join(f"{r[c]:.4g}" for c in COLUMNS) + " |\n" for r in rows)
        writer.add_text("interpolation/table", header + body)
    finally:
        writer.close()


# -- loading ------------------------------------------------------------------------------
def import_class(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import class {path!r}: {err}") from None


def load_model(path: str | Path, model_class: str | None = None, device: str = "cpu") -> pl.LightningModule:
    """A LightningModule from a checkpoint: its class from the checkpoint (LightningCLI saves
    ``_class_path``) or from ``model_class``; its hyperparameters from the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated file or not a checkpoint at all
        raise ConfigError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no state_dict)")
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    class_path = saved or model_class
    if class_path is None:
        raise ConfigError(f"{path} does not name its model class; pass --model-class (e.g. lightning_bn.VGG)")
    cls = import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ConfigError(f"{class_path} is not a LightningModule")
    try:
        model = cls.load_from_checkpoint(path, map_location=device)
    except RuntimeError as err:  # state_dict does not fit the class built from the hparams
        raise ConfigError(f"cannot load {path} into {cls.__name__}: {str(err).splitlines()[0]}") from None
    return model.eval()


def datamodule_from_config(config: str | Path | None, batch_size: int | None) -> tuple[Any, str | None]:
    """The data module of a LightningCLI config (and its model class path), or the embedded CIFAR-10."""
    from pytorch_lightning.cli import instantiate_class

    model_class = None
    data_section: dict[str, Any] = {"class_path": "lightning_bn.data.EmbeddedCIFAR10DataModule", "init_args": {}}
    if config is not None:
        from omegaconf import OmegaConf

        if not Path(config).is_file():
            raise ConfigError(f"config not found: {config}")
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        except Exception as err:  # not YAML, or an interpolation that does not resolve
            raise ConfigError(f"--config {config}: cannot read it ({' '.join(str(err).split())})") from None
        cfg = cfg.get("fit", cfg) if isinstance(cfg, dict) else {}
        model_class = (cfg.get("model") or {}).get("class_path")
        if cfg.get("data"):
            data_section = dict(cfg["data"])
            data_section.setdefault("init_args", {})
    if batch_size is not None:
        data_section["init_args"] = {**data_section["init_args"], "batch_size": batch_size}
    import_class(data_section["class_path"])
    try:
        return instantiate_class((), data_section), model_class
    except TypeError as err:  # an init_args key the class does not take
        raise ConfigError(f"data: {data_section['class_path']}: {err}") from None


# -- command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lightning_bn.interpolate",
        description="Loss and accuracy along the line between two checkpoints (Keskar et al., Fig. 2).",
    )
    parser.add_argument("checkpoint_a", help="solution A (alpha = 0)")
    parser.add_argument("checkpoint_b", help="solution B (alpha = 1)")
    parser.add_argument("--config", help="LightningCLI YAML: its data section (and model class) are used")
    parser.add_argument("--model-class", help="model class if the checkpoints do not name it, e.g. lightning_bn.VGG")
    parser.add_argument(
        "--alphas",
        type=float,
        nargs=3,
        metavar=("START", "STOP", "NUM"),
        default=(-1.0, 2.0, 25),
        help="NUM evenly spaced alphas from START to STOP (A at 0, B at 1; default: Keskar's -1 2 25)",
    )
    parser.add_argument(
        "--bn",
        choices=("recompute", "interpolate"),
        default="recompute",
        help="running statistics (BatchNorm and relatives) at each alpha: recompute them on training data "
        "(default) or interpolate them like the parameters; no effect on a model without them",
    )
    parser.add_argument("--bn-batches", type=int, help="training batches to recompute the statistics on (default: all)")
    parser.add_argument("--max-batches", type=int, help="evaluate on at most this many batches per split")
    parser.add_argument("--batch-size", type=int, help="override the data module's batch size")
    parser.add_argument(
        "--device", default="cpu", help="torch device to evaluate on, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="fixes which batches are used and the noise of noisy layers (default: 0)"
    )
    parser.add_argument(
        "--labels",
        nargs=2,
        metavar=("A", "B"),
        help="names of the solutions in the figure (default: from the file names)",
    )
    parser.add_argument(
        "--out", default="interpolation", help="directory for interpolation.csv and .png (default: interpolation)"
    )
    parser.add_argument("--tensorboard", metavar="LOG_DIR", help="also log the figure and table to TensorBoard")
    return parser


def default_labels(path_a: str | Path, path_b: str | Path) -> tuple[str, str]:
    """The file names without suffix, or, when they are the same (``last.ckpt`` twice), the
    shortest trailing parts of the paths that tell the two apart (``sb/last`` vs ``lb/last``)."""
    a, b = Path(path_a).with_suffix(""), Path(path_b).with_suffix("")
    for n in range(1, max(len(a.parts), len(b.parts)) + 1):
        tail_a, tail_b = "/".join(a.parts[-n:]), "/".join(b.parts[-n:])
        if tail_a != tail_b:
            return tail_a, tail_b
    return str(path_a), str(path_b)  # the same file twice


def _same_stem(args: argparse.Namespace) -> bool:
    return Path(args.checkpoint_a).stem == Path(args.checkpoint_b).stem


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    args = build_parser().parse_args(argv)
    try:
        start, stop, num = args.alphas
        if num < 1 or num != int(num):
            raise ConfigError(f"--alphas NUM must be a positive integer, got {num:g}")
        alphas = torch.linspace(start, stop, int(num), dtype=torch.float64).tolist()
        datamodule, config_class = datamodule_from_config(args.config, args.batch_size)
        model_class = args.model_class or config_class
        model_a = load_model(args.checkpoint_a, model_class, args.device)
        model_b = load_model(args.checkpoint_b, model_class, args.device)
        labels = tuple(args.labels) if args.labels else default_labels(args.checkpoint_a, args.checkpoint_b)
        # Errors name the files themselves when their names alone would not tell them apart.
        names = labels if labels[0] != labels[1] and not _same_stem(args) else (args.checkpoint_a, args.checkpoint_b)
        check_compatible(model_a, model_b, names)
        rows = interpolate(
            model_a, model_b, datamodule, alphas, args.bn, args.bn_batches, args.max_batches, args.device, args.seed
        )
    except ConfigError as err:
        fail(str(err))
    out = Path(args.out)
    try:
        csv_path = write_csv(rows, out / "interpolation.csv")
        # The --bn rule means nothing for a model without running statistics: no title about it.
        title = f"BN statistics: {args.bn}" if running_stat_modules(model_a) else None
        figure = plot(rows, labels, title=title)
        tmp = out / f".interpolation.{os.getpid()}.png"
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, out / "interpolation.png")
        if args.tensorboard:
            log_to_tensorboard(rows, figure, args.tensorboard)
    except OSError as err:  # e.g. --out is a file or not writable
        fail(f"--out {args.out}: cannot write the results ({err})")
    print(f"wrote {csv_path} and {out / 'interpolation.png'}")
    for row in rows:
        print("  ".join(f"{c}={row[c]:.4f}" for c in COLUMNS))
    return rows


if __name__ == "__main__":
    main()
