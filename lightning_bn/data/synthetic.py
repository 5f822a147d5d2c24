"""Synthetic Gaussian data from a fixed random linear teacher, for the deep linear network.

Inputs x ~ N(0, I_in); targets y = W* x + noise * N(0, I_out), with W* ~ N(0, 1/in) entry-wise
(so every target coordinate has variance about 1 + noise^2). The teacher and both splits are
drawn from a private generator seeded by ``seed``: the data do not depend on the global RNG
or on the order of anything else. ``batch_size=None`` gives full-batch gradient descent: one
batch holding the whole training set, every step.
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.errors import ConfigError, check_choice, check_positive


class GaussianRegressionDataModule(pl.LightningDataModule):
    """Gaussian inputs, linear-teacher targets (see module doc).

    Args:
        num_samples: training samples.
        in_features: input dimension (the model's ``in_features``).
        out_features: target dimension (the model's ``out_features``).
        noise: standard deviation of the label noise added to the teacher's output (>= 0).
        seed: seed of the teacher and of both splits.
        batch_size: SGD batch size, or ``None`` for full-batch gradient descent
            (``batch_size`` then becomes ``num_samples``).
        num_val_samples: validation samples from the same teacher (0: no validation).
        task: ``regression`` (real targets) or ``classification`` (label = argmax of the
            noisy teacher output, ``out_features`` classes).
        drop_last: drop the last incomplete mini-batch (every SGD batch the same size).
    """

    def __init__(
        self,
        num_samples: int = 1000,
        in_features: int = 10,
        out_features: int = 10,
        noise: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        num_val_samples: int = 1000,
        task: Literal["regression", "classification"] = "regression",
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("num_samples", num_samples), ("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be an integer >= 1, got {value!r}")
        check_positive("data.noise", noise, allow_zero=True)
        check_positive("data.num_val_samples", num_val_samples, allow_zero=True)
        check_choice("data.task", task, ("regression", "classification"))
        if batch_size is not None and (not isinstance(batch_size, int) or not 1 <= batch_size <= num_samples):
            raise ConfigError(
                f"data.batch_size must be an integer in [1, num_samples={num_samples}] or null (full batch), "
                f"got {batch_size!r}"
            )
        self.num_samples, self.in_features, self.out_features = num_samples, in_features, out_features
        self.noise, self.seed, self.num_val_samples, self.task = noise, seed, num_val_samples, task
        self.full_batch = batch_size is None
        self.batch_size = num_samples if batch_size is None else batch_size
        self.drop_last = drop_last
        self.num_classes = out_features
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def generate(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(teacher W* (out x in), (x_train, y_train), (x_val, y_val)), the same for the same seed."""
        generator = torch.Generator().manual_seed(self.seed)
        teacher = torch.randn(self.out_features, self.in_features, generator=generator) / self.in_features**0.5

        def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, self.in_features, generator=generator)
            y = x @ teacher.T + self.noise * torch.randn(n, self.out_features, generator=generator)
            return x, (y.argmax(1) if self.task == "classification" else y)

        return teacher, split(self.num_samples), split(self.num_val_samples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.teacher, train, val = self.generate()
        self.train_set, self.val_set = TensorDataset(*train), TensorDataset(*val)

    def train_dataloader(self) -> DataLoader:
        # Full batch: the same single batch every step, in a fixed order.
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=not self.full_batch, drop_last=self.drop_last
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.num_val_samples == 0:
            return []
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 1))

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
