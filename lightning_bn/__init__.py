"""lightning-bn: how does normalization help optimization? Models, norms and data.

Measurement callbacks live in the separate top-level package ``callbacks`` so they can be
used with any LightningModule.
"""

from lightning_bn.data import (
    CIFAR10DataModule,
    EmbeddedCIFAR10DataModule,
    FashionMNISTDataModule,
    GaussianRegressionDataModule,
    MNISTDataModule,
)
from lightning_bn.errors import ConfigError
from lightning_bn.models import MLP, VGG, DeepLinearNet, ResNet
from lightning_bn.module import NormStudyModule

__all__ = [
    "CIFAR10DataModule",
    "ConfigError",
    "DeepLinearNet",
    "EmbeddedCIFAR10DataModule",
    "FashionMNISTDataModule",
    "GaussianRegressionDataModule",
    "MLP",
    "MNISTDataModule",
    "NormStudyModule",
    "ResNet",
    "VGG",
]
__version__ = "0.1.0"
