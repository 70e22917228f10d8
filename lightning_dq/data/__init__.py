"""The data layer: on-disk readers, array datasets and samplers, and `ImageDataModule`; it never imports training."""

from lightning_dq.data.datamodule import ImageDataModule

__all__ = ["ImageDataModule"]
