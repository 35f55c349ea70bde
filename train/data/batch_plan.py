"""The batch plan: which samples every process reads at every global step, a pure function of (seed, step).

On resume the run continues with exactly the batches it would have seen, and a run on P processes reads the same
global batches as one process.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BatchPlan:
    """Global batches per epoch: each bucket shuffled with ``(seed, epoch)``, cut into full batches, batches shuffled.

    A bucket smaller than a global batch gives one batch per epoch: its shuffled samples, repeated to fill it (every
    sample in every batch). :func:`~dit.train.data.buckets.merge_buckets` leaves that only to a data set smaller than a
    batch.

    Args:
        buckets: sample indices grouped so that a batch never mixes groups.
        global_batch: samples per optimizer micro-step summed over processes.
        seed: run seed.
    """

    def __init__(self, buckets: list[list[int]], global_batch: int, seed: int):
        self.buckets, self.global_batch, self.seed = [b for b in buckets if b], global_batch, seed
        self.batches_per_epoch = sum(max(1, len(b) // global_batch) for b in self.buckets)
        if self.batches_per_epoch == 0:
            raise ValueError("No samples to train on: every bucket is empty.")
        self._epoch, self._batches = None, None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for bucket in self.buckets:
                order = [bucket[i] for i in torch.randperm(len(bucket), generator=gen).tolist()]
                if len(order) < self.global_batch:
                    order = (order * -(-self.global_batch // len(order)))[: self.global_batch]
                batches += [
                    order[i : i + self.global_batch]
                    for i in range(0, len(order) - self.global_batch + 1, self.global_batch)
                ]
            self._batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            self._epoch = epoch
        return self._batches

    def global_batch_at(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        return self.epoch_batches(epoch)[position]

    def local_batches(self, start: int, rank: int, world: int) -> Iterator[list[int]]:
        """This process's share of every micro-step's global batch, from micro-step ``start`` on, forever."""
        if self.global_batch % world:
            raise ValueError(f"The global batch {self.global_batch} does not split over {world} processes.")
        share = self.global_batch // world
        step = start
        while True:
            yield self.global_batch_at(step)[rank * share : (rank + 1) * share]
            step += 1


class PlannedBatches(torch.utils.data.Sampler):
    """A batch sampler over :meth:`BatchPlan.local_batches` (so a DataLoader can prefetch with workers)."""

    def __init__(self, plan: BatchPlan, start: int, rank: int, world: int, count: int):
        self.plan, self.start, self.rank, self.world, self.count = plan, start, rank, world, count

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.plan.local_batches(self.start, self.rank, self.world)
        for _ in range(self.count):
            yield next(batches)

    def __len__(self) -> int:
        return self.count
