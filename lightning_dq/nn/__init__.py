"""The networks: torch only, no Lightning; they run in a notebook without a Trainer."""

from lightning_dq.nn.autoencoder import AutoEncoderOutput, HierarchicalAutoEncoder
from lightning_dq.nn.codebook import Codebook
from lightning_dq.nn.codes import CodeGeometry
from lightning_dq.nn.prior import CodePrior, PriorStream
from lightning_dq.nn.quantizer import DepthwiseQuantizer

__all__ = [
    "AutoEncoderOutput",
    "CodeGeometry",
    "Codebook",
    "CodePrior",
    "DepthwiseQuantizer",
    "HierarchicalAutoEncoder",
    "PriorStream",
]
