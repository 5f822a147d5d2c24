"""Full CIFAR-10 through torchvision, for users who are online (or have the archive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from lightning_bn.data.base import InMemoryImageDataModule
from lightning_bn.errors import ConfigError


class CIFAR10DataModule(InMemoryImageDataModule):
    """The 50,000/10,000 CIFAR-10 splits via ``torchvision.datasets.CIFAR10``.

    Args:
        root: directory holding ``cifar-10-batches-py/`` (or where to download it).
        download: fetch ``cifar-10-python.tar.gz`` if absent (needs network).
        **kwargs: batch size, augmentation, ... of
            :class:`~lightning_bn.data.base.InMemoryImageDataModule`.
    """

    num_classes = 10

    def __init__(self, root: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.download = root, download

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place that may download.
        if self.download:
            self._dataset(train=True, download=True)
            self._dataset(train=False, download=True)

    def _dataset(self, train: bool, download: bool = False) -> CIFAR10:
        try:
            return CIFAR10(self.root, train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise ConfigError(
                f"CIFAR-10 not found in data.root={str(Path(self.root).resolve())!r}: put "
                "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, "
                "or set data.download=true with network access"
            ) from err
        except OSError as err:  # download attempted without network
            raise ConfigError(
                f"could not download CIFAR-10 into data.root={self.root!r} ({err}); put "
                "cifar-10-python.tar.gz there by hand or run with network access"
            ) from err

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = self._dataset(train=train)
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)
        return images.contiguous(), torch.tensor(dataset.targets, dtype=torch.long)
