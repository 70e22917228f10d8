"""lightning-dq: Depthwise Quantization (Fostiropoulos & Boehm, CVPR 2022) as a PyTorch Lightning framework. The
public API, one import away (`from lightning_dq import DepthwiseQuantizer`), imported on first use so the networks load
without Lightning; the layers and which file owns which concept: docs/architecture.md."""

import importlib
from importlib.metadata import version

__version__ = version("lightning-dq")

_EXPORTS = {
    "DepthwiseQuantizer": "lightning_dq.nn.quantizer",
    "Codebook": "lightning_dq.nn.codebook",
    "CodeGeometry": "lightning_dq.nn.codes",
    "HierarchicalAutoEncoder": "lightning_dq.nn.autoencoder",
    "CodePrior": "lightning_dq.nn.prior",
    "AutoEncoderModule": "lightning_dq.training.modules",
    "PriorModule": "lightning_dq.training.modules",
    "ImageDataModule": "lightning_dq.data.datamodule",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_dq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
