"""Shared by the test_surface* files (no tests here): a 32x32 VGG on random images, and an
MLP with BatchNorm1d on Gaussian inputs (no conv)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import VGG
from lightning_bn.data.base import InMemoryImageDataModule


class SurfaceImages(InMemoryImageDataModule):
    """64 train / 32 test random 32x32 RGB images in 3 classes (shuffled training loader)."""

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0 if train else 1)
        n = 64 if train else 32
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return images, torch.randint(0, 3, (n,), generator=g)


class GaussianClasses(pl.LightningDataModule):
    """96 train / 48 test N(0, I) inputs of dimension 6, 3 classes from a fixed linear teacher."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(3)
        x = torch.randn(144, 6, generator=g)
        y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
        self.train_set, self.test_set = TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


def tiny_vgg(seed: int = 0, norm: str = "batch") -> VGG:
    torch.manual_seed(seed)
    return VGG(width=0.0625, num_classes=3, norm=norm, lr=0.05).eval()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # running statistics other than the defaults
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def fit_quietly(model: pl.LightningModule, datamodule: pl.LightningDataModule, steps: int, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule)
    return trainer
