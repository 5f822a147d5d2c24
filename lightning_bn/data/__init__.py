"""LightningDataModules: embedded CIFAR-10 (default, offline), torchvision CIFAR-10."""

from lightning_bn.data.base import InMemoryImageDataModule, TensorImageDataset
from lightning_bn.data.cifar10 import CIFAR10DataModule
from lightning_bn.data.embedded import EmbeddedCIFAR10DataModule

__all__ = ["CIFAR10DataModule", "EmbeddedCIFAR10DataModule", "InMemoryImageDataModule", "TensorImageDataset"]
