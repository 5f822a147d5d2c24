"""Tiny LightningModules, data and a recording logger for callback tests.

Importable from any test as ``from tests._tiny_modules import ...`` (tests/ is a package).
Everything is small enough for brute-force references (deep copies, full Jacobians).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (restored after). Tiny models on a shared 2-core
    machine are many times faster without intra-op thread contention. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ReplayNoise(nn.Module):
    """A noise source implementing the replay protocol (a stand-in for ``noisy_batch``).

    In training, every forward draws a per-unit scale and shift from torch's RNG (non-zero
    mean, non-unit variance, changing every step) and counts the draw in a buffer and a
    Python attribute. While ``replay_noise`` is True it reuses the last draw and counts
    nothing, but still consumes the global RNG as a training forward does (draw and
    discard), so modules after it (dropout) see the stream of the training step.
    Identity in eval mode.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.replay_noise = False
        self.draws = 0
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        scale = 1.0 + 0.5 * torch.rand(shape, device=x.device, dtype=x.dtype)
        shift = 0.2 + 0.3 * torch.randn(shape, device=x.device, dtype=x.dtype) * (1 + int(self.steps) % 3)
        if not self.replay_noise or self._last is None:
            self._last = (scale, shift)
            self.draws += 1
            self.steps += 1
        scale, shift = self._last
        return x * scale + shift

    def noise_state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last realization (the protocol's per-micro-batch replay under accumulation)."""
        return self._last

    def load_noise_state(self, state: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self._last = state


def make_norm(norm: str, features: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm1d(features)
    if norm == "group":
        return nn.GroupNorm(2, features)
    if norm == "noisy":
        return nn.Sequential(nn.BatchNorm1d(features), ReplayNoise(features))
    raise ValueError(f"norm must be none, batch, group or noisy, got {norm!r}")


class TinyClassifier(pl.LightningModule):
    """in -> hidden -> norm -> ReLU -> [dropout] -> hidden -> norm -> ReLU -> classes.

    Logs ``train/loss`` per step and a torchmetrics accuracy per epoch, like real modules,
    so tests can check that measurements do not disturb the module's own logging.
    """

    def __init__(
        self,
        in_features: int = 6,
        hidden: int = 8,
        num_classes: int = 3,
        norm: str = "batch",
        dropout: float = 0.0,
        lr: float = 0.1,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), make_norm(norm, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden, hidden), make_norm(norm, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.train_acc(out.detach(), y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)


class TinyDLN(pl.LightningModule):
    """Deep linear network (no bias, no nonlinearity), MSE on Gaussian targets; returns a dict."""

    def __init__(self, width: int = 5, depth: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.5)


class TinyConvNet(pl.LightningModule):
    """Two convs with GroupNorm or no norm (DDP-friendly: no batch statistics)."""

    def __init__(self, norm: str = "group", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(2, cout) if norm == "group" else nn.Identity()]

        self.net = nn.Sequential(*block(3, 4), nn.ReLU(), nn.MaxPool2d(2), *block(4, 4), nn.ReLU())
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.net(x), 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def classification_loader(
    n: int = 64, in_features: int = 6, num_classes: int = 3, batch_size: int = 16, seed: int = 0, shuffle: bool = False
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def regression_loader(n: int = 32, width: int = 5, batch_size: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    y = x @ torch.randn(width, width, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def image_loader(
    n: int = 32, size: int = 8, num_classes: int = 3, batch_size: int = 8, seed: int = 0, shuffle: bool = False
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step) if step is not None else -1, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> dict[int, float]:
        """step -> value of ``key`` (the last write wins)."""
        return {step: m[key] for step, m in self.records if key in m}


class EndProcessGroup(pl.Callback):
    """Ends a DDP run's process group on every rank together (barrier, then destroy) when fit ends.

    Lightning destroys NCCL groups at exit but leaves gloo groups to interpreter shutdown, where a
    spawned worker occasionally aborted ("terminate called without an active exception", SIGABRT,
    once in CI after a test's fit had finished); torch asks for destroy_process_group before exit."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def make_trainer(max_steps: int = 4, callbacks: list | None = None, logger: Any = None, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer for tests (no checkpoints, no progress bar, no summary); with several
    devices it also ends the process group cleanly (:class:`EndProcessGroup`)."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": logger if logger is not None else False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    callbacks = list(callbacks or [])
    if options["devices"] != 1:
        callbacks.append(EndProcessGroup())
    return pl.Trainer(callbacks=callbacks, **options)
