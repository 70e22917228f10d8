"""The one answer to "am I distributed?", at call time (Lightning builds models before the process group exists),
and the collectives of the networks: no-ops in a single process."""

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_finite(finite: Tensor) -> Tensor:
    """Whether a boolean scalar `finite` is True on every rank (`()` bool tensor, no host sync)."""
    bad = (~finite).float().view(1)  # (1,)
    return all_reduce_sum_(bad)[0] == 0


def broadcast_from_rank0_(tensor: Tensor) -> Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor
