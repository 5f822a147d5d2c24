"""lightning-bn: how does normalization help optimization? Models, norms and data.

Measurement callbacks live in the separate top-level package ``callbacks`` so they can be
used with any LightningModule.
"""

from lightning_bn.data import CIFAR10DataModule, EmbeddedCIFAR10DataModule
from lightning_bn.errors import ConfigError
from lightning_bn.models import VGG
from lightning_bn.module import NormStudyModule

__all__ = ["CIFAR10DataModule", "ConfigError", "EmbeddedCIFAR10DataModule", "NormStudyModule", "VGG"]
__version__ = "0.1.0"
