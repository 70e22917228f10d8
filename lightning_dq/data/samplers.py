"""Samplers and the training DataLoader: every evaluation image exactly once under DDP, and a training order that
is a function of (seed, epoch), so a run killed mid-epoch resumes by skipping exactly the batches it trained on."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EvenShardSampler(DistributedSampler):
    """Evaluation batches of one DDP rank: every image of the split exactly once over all ranks, and the same
    number of batches on every rank.

    Rank r gets the r-th of `num_replicas` contiguous shards (sizes differ by at most one), cut into
    ceil(ceil(N / num_replicas) / batch_size) batches of near-equal size. Equal batch counts keep per-step
    collectives matched, and no rank is left with no batch at all (Lightning would skip its whole evaluation loop,
    epoch-end metric syncs included, while the others wait in them): when a split has fewer images than ranks, a
    rank without an image gets one empty batch. Lightning's own `DistributedSampler` pads shards with repeated
    images instead, counting up to `num_replicas - 1` images twice.

    Yields lists of positions: use it with `DataLoader(dataset, batch_size=None, sampler=...)`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        shards = np.array_split(np.arange(len(dataset)), num_replicas)
        batches = -(-len(shards[0]) // batch_size)  # the largest shard: array_split puts the extra images first
        self.batches = [b.tolist() for b in np.array_split(shards[rank], batches)] if batches else []
        self.num_samples = len(shards[rank])
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TrainSampler(DistributedSampler):
    """The training order: torch's `DistributedSampler` shuffle, a function of (seed, epoch) (Lightning calls
    `set_epoch`), also in a single process, so Lightning keeps it under DDP. After `skip` is set, the next
    iteration starts that many indices later: whole batches, indices only, no image is read.
    """

    skip = 0

    def __iter__(self) -> Iterator[int]:  # a generator: the order is drawn at the first `next`, after set_epoch
        skip, self.skip = self.skip, 0  # once: a persistent-workers loader reuses this object
        yield from itertools.islice(super().__iter__(), skip, None)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch (its stateful-loader protocol, `state_dict` and
    `load_state_dict`): its state is the number of batches handed out in the current iteration (Lightning does not
    prefetch from loaders with a length, so that is the number trained on); after a restore, its `TrainSampler`
    skips that many batches of the epoch's order."""

    _yielded = 0

    def __iter__(self) -> Iterator:
        self._yielded = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.skip = int(state_dict["batches_yielded"]) * self.batch_size
