"""One LightningModule per architecture, all on :class:`lightning_bn.module.NormStudyModule`."""

from lightning_bn.models.dln import DeepLinearNet
from lightning_bn.models.mlp import MLP
from lightning_bn.models.resnet import ResNet
from lightning_bn.models.vgg import VGG

__all__ = ["VGG", "DeepLinearNet", "MLP", "ResNet"]
