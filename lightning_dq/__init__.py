"""lightning-dq: Depthwise Quantization (Fostiropoulos & Boehm, CVPR 2022) as a PyTorch Lightning framework.

The public API, one import away (`from lightning_dq import DepthwiseQuantizer`):

- `DepthwiseQuantizer`, `Codebook`: the quantizer, a drop-in `nn.Module` (lightning_dq.quantize).
- `HierarchicalAutoEncoder`: the hierarchical DQ auto-encoder (lightning_dq.autoencoder).
- `CodePrior`: the autoregressive prior over its codes (lightning_dq.prior).
- `AutoEncoderModule`, `PriorModule`: their LightningModules (lightning_dq.module).
- `ImageDataModule`: CIFAR-10, ImageNet-32/64 and image folders as uint8 batches (lightning_dq.data).

Names are imported on first use (PEP 562), so the networks load without importing Lightning.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING

__version__ = version("lightning-dq")

_EXPORTS = {
    "DepthwiseQuantizer": "lightning_dq.quantize",
    "Codebook": "lightning_dq.quantize",
    "HierarchicalAutoEncoder": "lightning_dq.autoencoder",
    "CodePrior": "lightning_dq.prior",
    "AutoEncoderModule": "lightning_dq.module",
    "PriorModule": "lightning_dq.module",
    "ImageDataModule": "lightning_dq.data",
}
__all__ = [
    "DepthwiseQuantizer",
    "Codebook",
    "HierarchicalAutoEncoder",
    "CodePrior",
    "AutoEncoderModule",
    "PriorModule",
    "ImageDataModule",
    "__version__",
]

if TYPE_CHECKING:
    from lightning_dq.autoencoder import HierarchicalAutoEncoder
    from lightning_dq.data import ImageDataModule
    from lightning_dq.module import AutoEncoderModule, PriorModule
    from lightning_dq.prior import CodePrior
    from lightning_dq.quantize import Codebook, DepthwiseQuantizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_dq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
