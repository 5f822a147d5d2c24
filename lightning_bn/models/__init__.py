"""One LightningModule per architecture, all on :class:`lightning_bn.module.NormStudyModule`."""

from lightning_bn.models.vgg import VGG

__all__ = ["VGG"]
