"""Full CIFAR-10: torchvision's archive (for users who are online or have it), or the same
images as files in the image-folder layout (``train/<class>/*.jpg``, ``test/<class>/*``), e.g.
the CIFAR-10 JPEG archive extracted by hand, which needs no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from lightning_bn.data.base import InMemoryImageDataModule
from lightning_bn.data.image_folder import is_image_folder, read_image_folder
from lightning_bn.errors import ConfigError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR10DataModule(InMemoryImageDataModule):
    """The 50,000/10,000 CIFAR-10 splits via ``torchvision.datasets.CIFAR10``.

    Args:
        root: directory holding ``cifar-10-batches-py/`` (or where to download it), or a
            directory in the image-folder layout ``train/<class>/*.jpg|png`` and
            ``test/<class>/*`` with the ten standard class names (detected by its ``train/``
            folder; decoded once and cached beside the images as ``.lightning_bn-<split>.pt``,
            reused while the files are unchanged).
        download: fetch ``cifar-10-python.tar.gz`` if absent (needs network; never for an
            image folder).
        **kwargs: batch size, augmentation, ... of
            :class:`~lightning_bn.data.base.InMemoryImageDataModule`.
    """

    num_classes = 10

    def __init__(self, root: str = "data", download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.download = root, download

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place that may download.
        if is_image_folder(self.root):  # decode once per node: every rank's setup reads the cache
            for split in ("train", "test"):
                read_image_folder(self.root, split, CLASSES)
        elif self.download:
            self._dataset(train=True, download=True)
            self._dataset(train=False, download=True)

    def _dataset(self, train: bool, download: bool = False) -> CIFAR10:
        try:
            return CIFAR10(self.root, train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise ConfigError(
                f"CIFAR-10 not found in data.root={str(Path(self.root).resolve())!r}: put "
                "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, or the images "
                "as train/<class>/*.jpg and test/<class>/*, or set data.download=true with network access"
            ) from err
        except OSError as err:  # download attempted without network
            raise ConfigError(
                f"could not download CIFAR-10 into data.root={self.root!r} ({err}); put "
                "cifar-10-python.tar.gz there by hand or run with network access"
            ) from err

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if is_image_folder(self.root):
            return read_image_folder(self.root, "train" if train else "test", CLASSES)
        dataset = self._dataset(train=train)
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2)
        return images.contiguous(), torch.tensor(dataset.targets, dtype=torch.long)
