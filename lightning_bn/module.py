"""The LightningModule every architecture shares: loss, metrics, optimizer and schedule.

Architectures subclass :class:`NormStudyModule`, build their layers, and implement
``forward``. Training logs ``train/loss`` per step and ``train/acc`` per epoch; validation
and test log ``val/*`` and ``test/*`` per epoch. Regression models (the deep linear
network) set ``task="regression"``: MSE loss and no accuracy.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from callbacks.guards import is_measuring
from lightning_bn.errors import ConfigError, check_choice, check_positive

LRSchedule = Literal["constant", "cosine", "step"]
Task = Literal["classification", "regression"]


class NormStudyModule(pl.LightningModule):
    """Shared training logic.

    Args:
        lr: learning rate of the default SGD optimizer (> 0).
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (>= 0) applied by the optimizer.
        nesterov: Nesterov momentum.
        lr_schedule: ``constant``; ``cosine`` (to 0 over all training steps); ``step``
            (x0.1 at 50% and 75% of the training steps).
        task: ``classification`` (cross-entropy, accuracy) or ``regression`` (MSE).
        num_classes: number of classes for ``classification``.
        channels_last: keep the convolution weights and the 4-D input batches in channels-last
            (NHWC) memory format, which tensor-core GPUs convolve fastest (with bf16 in
            particular). Only the memory layout changes: values, parameter order and checkpoints
            are those of the default layout. Needs a model with 2-D convolutions.

    ``--optimizer``/``--lr_scheduler`` of LightningCLI replace this default optimizer.
    """

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        lr_schedule: LRSchedule = "constant",
        task: Task = "classification",
        num_classes: int = 10,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_positive("lr", lr)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        check_positive("weight_decay", weight_decay, allow_zero=True)
        check_choice("lr_schedule", lr_schedule, ("constant", "cosine", "step"))
        check_choice("task", task, ("classification", "regression"))
        if nesterov and momentum == 0:
            raise ConfigError("nesterov=True needs momentum > 0, got momentum=0")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov, self.lr_schedule, self.task = nesterov, lr_schedule, task
        if not isinstance(channels_last, bool):
            raise ConfigError(f"channels_last must be true or false, got {channels_last!r}")
        self.channels_last = channels_last
        if task == "classification":
            check_positive("num_classes", num_classes)
            self.num_classes = num_classes
            metric = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
            self.train_acc, self.val_acc, self.test_acc = metric, metric.clone(), metric.clone()

    # -- loss -------------------------------------------------------------------------
    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        if self.channels_last and x.dim() == 4:
            # here, not in on_after_batch_transfer: every re-evaluation of the step by a
            # callback passes through it too, and a data module's own hook stays in charge
            x = x.contiguous(memory_format=torch.channels_last)
        output = self(x)
        loss = self.loss_fn(output, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True)
        # A measurement callback re-evaluating the training step (callbacks.is_measuring) needs
        # only the loss: it silences self.log and restores the metric's state afterwards, so
        # updating the metric would be undone work (as costly as a small model's forward).
        if self.task == "classification" and not (on_step and is_measuring()):
            metric = getattr(self, f"{stage}_acc")
            metric(output.detach(), y)
            self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    # -- memory layout -------------------------------------------------------------------
    def _apply_channels_last(self) -> None:
        if not any(isinstance(m, nn.Conv2d) for m in self.modules()):
            raise ConfigError(
                f"channels_last=true needs a model with 2-D convolutions (VGG, ResNet); "
                f"{type(self).__name__} has none: set channels_last to false"
            )
        # in place: the Parameter objects stay (an optimizer built later or earlier holds them)
        self.to(memory_format=torch.channels_last)

    # -- checks that need the trainer ---------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self._apply_channels_last()
        if stage != "fit" or self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        uses_batch_stats = any(isinstance(m, _BatchNorm) for m in self.modules())
        # BatchNorm with one sample per batch has zero variance: PyTorch fails mid-step
        # with a cryptic error, so refuse it before training starts.
        if uses_batch_stats and batch_size == 1:
            raise ConfigError(
                "data.batch_size=1 cannot train a model with BatchNorm (batch statistics of one "
                "sample); use batch_size >= 2 or a norm without batch statistics (none, group, layer)"
            )
        # Norms with their own rules (ghost_batch: a multiple of its virtual batch) check them
        # now rather than fail mid-epoch.
        if isinstance(batch_size, int):
            for module in self.modules():
                check = getattr(module, "check_batch_size", None)
                if module is not self and callable(check):
                    check(batch_size)

    # -- optimization -------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )
        if self.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.lr_schedule == "cosine":
            factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        else:
            factor = lambda step: 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def init_kaiming(module: nn.Module) -> None:
    """Kaiming-normal init (fan_out, ReLU) for convs, N(0, 0.01) for linear layers, as torchvision's VGG.

    Why: with PyTorch's default init the un-normalized VGG does not train at all (DESIGN.md
    section 7), which would make its landscape look trivially smooth.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
