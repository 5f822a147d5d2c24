"""LightningDataModules: embedded CIFAR-10 (default, offline), torchvision CIFAR-10, MNIST /
Fashion-MNIST from idx files, and synthetic Gaussian data for the deep linear network."""

from lightning_bn.data.base import InMemoryImageDataModule, TensorImageDataset
from lightning_bn.data.cifar10 import CIFAR10DataModule
from lightning_bn.data.embedded import EmbeddedCIFAR10DataModule
from lightning_bn.data.mnist import FashionMNISTDataModule, MNISTDataModule
from lightning_bn.data.synthetic import GaussianRegressionDataModule

__all__ = [
    "CIFAR10DataModule",
    "EmbeddedCIFAR10DataModule",
    "FashionMNISTDataModule",
    "GaussianRegressionDataModule",
    "InMemoryImageDataModule",
    "MNISTDataModule",
    "TensorImageDataset",
]
