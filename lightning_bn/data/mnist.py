"""MNIST and Fashion-MNIST from their idx files, kept in memory as normalized tensors.

The four files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (optionally ``.gz``) are
read from ``root`` itself (Debian's ``dataset-fashion-mnist`` package installs them in
``/usr/share/datasets/fashion-mnist``) or from torchvision's layout ``<root>/FashionMNIST/raw``
(``<root>/MNIST/raw``), which ``download=true`` fills through torchvision. Nothing is
downloaded unless asked.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch
from torchvision import datasets

from lightning_bn.data.base import InMemoryImageDataModule
from lightning_bn.errors import ConfigError

SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an idx file of unsigned bytes (gzip-compressed if the name ends in ``.gz``) as uint8.

    Format (LeCun's): two zero bytes, the type code 0x08 (ubyte), the number of dimensions,
    one big-endian int32 per dimension, then the data.
    """
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise ConfigError(f"{path} is not an idx file of unsigned bytes (bad header {data[:4].hex()!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(torch.Size(shape).numel())
    if len(data) != expected:
        raise ConfigError(f"{path} is truncated or corrupt: {len(data)} bytes, its header announces {expected}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


class MNISTDataModule(InMemoryImageDataModule):
    """MNIST (60,000 train / 10,000 test 28x28 grey digits) from idx files.

    Args:
        root: directory with the idx files, or with torchvision's ``MNIST/raw/`` below it.
        download: let torchvision download the files into ``<root>/MNIST/raw`` (network).
        **kwargs: batch size etc. of :class:`~lightning_bn.data.base.InMemoryImageDataModule`
            (``augment`` is not supported: crops and flips are CIFAR's recipe).
    """

    mean = (0.1307,)
    std = (0.3081,)
    num_classes = 10
    name = "MNIST"
    torchvision_dataset = datasets.MNIST
    install_hint = "or set data.download=true (network)"

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.augment:
            raise ConfigError(f"data.augment=true is not supported for {self.name} (crop+flip is CIFAR's recipe)")
        self.root, self.download = root, download

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place that may download.
        if not self.download:
            return
        try:
            for train in (True, False):
                self.torchvision_dataset(self.root, train=train, download=True)
        except (RuntimeError, OSError) as err:  # torchvision: every mirror failed / no network
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"could not download {self.name} into data.root={self.root!r}: {message}") from err

    def find_files(self, train: bool) -> tuple[Path, Path]:
        """The (images, labels) files of a split, looked up in ``root`` and ``root/<Name>/raw``."""
        root = Path(self.root)
        folders = (root, root / self.torchvision_dataset.__name__ / "raw")
        found = []
        for stem in SPLIT_FILES[train]:
            candidates = [folder / (stem + suffix) for folder in folders for suffix in ("", ".gz")]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                names = ", ".join(f"{s}[.gz]" for stem_pair in SPLIT_FILES.values() for s in stem_pair)
                raise ConfigError(
                    f"{self.name} not found in data.root={str(root.resolve())!r}: expected {names} there or in "
                    f"{self.torchvision_dataset.__name__}/raw/ below it; {self.install_hint}"
                )
            found.append(path)
        return found[0], found[1]

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        image_file, label_file = self.find_files(train)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ConfigError(
                f"{image_file} / {label_file}: expected (N, H, W) images and N labels, "
                f"got shapes {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        return images.unsqueeze(1).contiguous(), labels.long()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al., 2017): 60,000 / 10,000 28x28 grey clothing images, 10 classes.

    The default ``root`` is where Debian's ``dataset-fashion-mnist`` package puts the files.
    Takes every argument of :class:`MNISTDataModule`.
    """

    mean = (0.2860,)
    std = (0.3530,)
    name = "Fashion-MNIST"
    torchvision_dataset = datasets.FashionMNIST
    install_hint = "install them with `apt-get install dataset-fashion-mnist` or set data.download=true (network)"

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist", download: bool = False, **kwargs) -> None:
        super().__init__(root=root, download=download, **kwargs)
