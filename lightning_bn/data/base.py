"""A LightningDataModule over image tensors held in memory.

Small datasets (the embedded CIFAR-10 subset, CIFAR-10 itself: 150 MB as uint8) are kept
as one normalized float tensor, so a batch is an index into memory and loading never
limits a CPU run. Augmentation (random crop with 4-pixel padding + horizontal flip, the
standard CIFAR recipe) is applied per sample with torchvision's tensor transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_bn.data.device_resident import DeviceResidentLoader
from lightning_bn.errors import ConfigError, check_positive

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class TensorImageDataset(Dataset):
    """(image, label) pairs from two tensors, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def normalize_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, scaled to [0, 1], then standardized per channel."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t


class InMemoryImageDataModule(pl.LightningDataModule):
    """Base for the image data modules: subclasses implement :meth:`load_split`.

    Args:
        batch_size: training batch size (the SGD batch), >= 1.
        eval_batch_size: batch size for validation/test (default: ``batch_size``).
        num_workers: DataLoader workers; 0 is fastest for in-memory tensors.
        augment: random crop (padding 4) + horizontal flip on training images.
        train_size: use only the first ``train_size`` training samples (class order is
            shuffled with ``subset_seed`` first, so a subset stays class-balanced in expectation).
        subset_seed: seed of the permutation used by ``train_size``.
        drop_last: drop the last incomplete training batch (keeps every SGD batch the same size).
        batch_size_schedule: epoch -> the training batch size from that epoch on (epochs
            before the first key use ``batch_size``). Keskar et al.'s warm start: ``{5: 6000}``
            trains 5 epochs at ``batch_size``, then continues from those iterates (and the
            optimizer's state) at 6000. Needs ``trainer.reload_dataloaders_every_n_epochs=1``
            so that the loader is rebuilt at each epoch.
        device_resident: make training batches on the training device without a DataLoader
            (:class:`~lightning_bn.data.device_resident.DeviceResidentLoader`: the uint8 set
            moved there once, permutation, normalization, crop and flip in batched ops, DDP
            shards, resumable mid-epoch); for GPU runs at paper scale. ``num_workers`` must be 0.
    """

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: bool = False,
        train_size: int | None = None,
        subset_seed: int = 0,
        drop_last: bool = True,
        batch_size_schedule: dict[int, int] | None = None,
        device_resident: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1 or null, got {eval_batch_size!r}")
        check_positive("data.num_workers", num_workers, allow_zero=True)
        if train_size is not None and train_size < 1:
            raise ConfigError(f"data.train_size must be >= 1 or null, got {train_size!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.augment, self.train_size = num_workers, augment, train_size
        self.subset_seed, self.drop_last = subset_seed, drop_last
        self.batch_size_schedule = _checked_schedule(batch_size_schedule)
        if not isinstance(device_resident, bool):
            raise ConfigError(f"data.device_resident must be true or false, got {device_resident!r}")
        if device_resident and num_workers:
            raise ConfigError(
                f"data.num_workers={num_workers} with data.device_resident=true: batches are made on the "
                "device, there are no workers; set num_workers to 0"
            )
        self.device_resident = device_resident
        # the base seed of the device-resident draws (seed_everything has run by now)
        self._draw_seed = torch.initial_seed()
        self._train_uint8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.train_set: TensorImageDataset | None = None
        self.test_set: TensorImageDataset | None = None

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (uint8 images (N, C, H, W), int64 labels) of the train or test split."""
        raise NotImplementedError

    def _train_transform(self) -> Callable | None:
        if not self.augment:
            return None
        size = self.train_set_shape[-1]
        return v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        images, labels = self.load_split(train=True)
        if self.train_size is not None:
            if self.train_size > len(labels):
                raise ConfigError(f"data.train_size={self.train_size} exceeds the {len(labels)} training samples")
            generator = torch.Generator().manual_seed(self.subset_seed)
            keep = torch.randperm(len(labels), generator=generator)[: self.train_size]
            images, labels = images[keep], labels[keep]
        for name, size in [("batch_size", self.batch_size)] + [
            (f"batch_size_schedule[{epoch}]", size) for epoch, size in self.batch_size_schedule.items()
        ]:
            if self.drop_last and size > len(labels):
                raise ConfigError(
                    f"data.{name}={size} exceeds the {len(labels)} training samples "
                    "(with drop_last=True no batch would be left)"
                )
        self.train_set_shape = tuple(images.shape)
        if self.device_resident:
            # uint8 only: batches are normalized on the device; a float copy of the whole set
            # would take 4x the memory on the host for nothing (600 MB for CIFAR-10)
            self._train_uint8 = (images, labels)
        else:
            self.train_set = TensorImageDataset(
                normalize_uint8(images, self.mean, self.std), labels, self._train_transform()
            )
        test_images, test_labels = self.load_split(train=False)
        self.test_set = TensorImageDataset(normalize_uint8(test_images, self.mean, self.std), test_labels)

    def train_batch_size(self, epoch: int) -> int:
        """The training batch size of ``epoch`` (``batch_size_schedule``, else ``batch_size``)."""
        size = self.batch_size
        for start, scheduled in sorted(self.batch_size_schedule.items()):
            if epoch >= start:
                size = scheduled
        return size

    def _check_reload(self) -> None:
        trainer = self.trainer
        if self.batch_size_schedule and trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(
                f"data.batch_size_schedule={self.batch_size_schedule} needs "
                f"trainer.reload_dataloaders_every_n_epochs=1 (the loader is rebuilt per epoch), got "
                f"{trainer.reload_dataloaders_every_n_epochs}"
            )

    def train_dataloader(self) -> DataLoader | DeviceResidentLoader:
        self._check_reload()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self.device_resident:
            images, labels = self._train_uint8
            return DeviceResidentLoader(
                images,
                labels,
                self.train_batch_size(epoch),
                self.mean,
                self.std,
                self.augment,
                self.drop_last,
                self._draw_seed,
                self.trainer,
            )
        return DataLoader(
            self.train_set,
            batch_size=self.train_batch_size(epoch),
            shuffle=True,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    # CIFAR papers validate on the test split; there is no separate validation split.
    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()


def _checked_schedule(schedule: dict[int, int] | None) -> dict[int, int]:
    if schedule is None:
        return {}
    # JSON (a sweep's command line) has string keys only: "5" is epoch 5
    if isinstance(schedule, dict):
        schedule = {int(e) if isinstance(e, str) and e.isdigit() else e: b for e, b in schedule.items()}

    def valid(n: object, low: int) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= low

    if not isinstance(schedule, dict) or not all(valid(e, 0) and valid(b, 1) for e, b in schedule.items()):
        raise ConfigError(
            f"data.batch_size_schedule must map epochs (integers >= 0) to batch sizes (integers >= 1), got {schedule!r}"
        )
    return dict(sorted(schedule.items()))
