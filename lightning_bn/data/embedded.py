"""The real CIFAR-10 subset shipped inside the package: no network, no files to fetch.

10 classes x (1,000 train + 200 test) images, the first files by name per class of the
CIFAR-10 JPEG re-encoding (quality 75; see ``tools/build_embedded_cifar10.py``). The JPEG
bytes are stored xz-compressed (3.5 MB) and decoded once into memory (Pillow, about 1 s).

The file stores each split class by class. The test split is returned with the classes
interleaved (one image of each class in turn), so any prefix of 10 k images, e.g. what
``trainer.limit_val_batches`` evaluates, holds k images of every class. The training split
keeps the stored order (training shuffles it; ``train_size`` subsets draw a permutation).
"""

from __future__ import annotations

import io
import lzma
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_bn.data.base import InMemoryImageDataModule

EMBEDDED_FILE = Path(__file__).with_name("cifar10_subset.pt.xz")


@lru_cache(maxsize=1)
def load_embedded_cifar10() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Decode the embedded subset: {"train": (uint8 N x 3 x 32 x 32, int64 N), "test": ...}."""
    blob = torch.load(io.BytesIO(lzma.decompress(EMBEDDED_FILE.read_bytes())), weights_only=True)
    out = {}
    for split in ("train", "test"):
        part = blob[split]
        payload = part["jpeg"].numpy().tobytes()
        offsets = np.concatenate([[0], np.cumsum(part["lengths"].numpy())])
        decoded = [
            np.asarray(Image.open(io.BytesIO(payload[start:end])).convert("RGB"))
            for start, end in zip(offsets[:-1], offsets[1:])
        ]
        images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
        labels = part["labels"].long()
        if split == "test":
            order = _interleave_classes(labels)
            images, labels = images[order], labels[order]
        out[split] = (images, labels)
    return out


def _interleave_classes(labels: torch.Tensor) -> torch.Tensor:
    """Indices visiting the classes round-robin: the i-th image of every class before the (i+1)-th."""
    rank = torch.empty_like(labels)
    for cls in labels.unique():
        members = (labels == cls).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    return torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)


class EmbeddedCIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10 subset embedded in the package (10,000 train / 2,000 test, class-balanced).

    Takes every option of :class:`~lightning_bn.data.base.InMemoryImageDataModule`.
    """

    num_classes = 10

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_embedded_cifar10()["train" if train else "test"]
        return images, labels
