"""Samplers and the training DataLoader: every evaluation image exactly once under DDP, and a training order that
is a function of (seed, epoch), so a run killed mid-epoch resumes by skipping exactly the batches it trained on."""

import itertools
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EvenShardSampler(DistributedSampler):
    """Evaluation batches of one DDP rank: every image exactly once over all ranks, the same batch count on each. Rank r
    gets the r-th of `num_replicas` contiguous shards (sizes differ by at most one), cut into near-equal batches,
    ceil(ceil(N / num_replicas) / batch_size) of them: equal counts keep per-step collectives matched, and a rank
    without images gets one empty batch (with none, Lightning would skip its evaluation loop and epoch-end syncs while
    the others wait). `DistributedSampler` instead pads with up to `num_replicas - 1` repeated images. Yields lists of
    positions, for `DataLoader(dataset, batch_size=None, sampler=...)`."""

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
    """The training order: `DistributedSampler`'s shuffle of (seed, epoch) (Lightning calls `set_epoch`), also in one
    process, so Lightning keeps it under DDP. Once `skip` is set, the next iteration starts that many indices later."""

    skip = 0

    def __iter__(self) -> Iterator[int]:  # a generator: the order is drawn at the first `next`, after set_epoch
        skip, self.skip = self.skip, 0  # once: a persistent-workers loader reuses this object
        yield from itertools.islice(super().__iter__(), skip, None)


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning checkpoints mid-epoch: its state is the batches handed out this iteration (Lightning does
    not prefetch from sized loaders: the number trained on), which its `TrainSampler` skips after a restore."""

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
