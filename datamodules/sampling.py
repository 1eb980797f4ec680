"""Resumable, rank-aware sampling: a resumed run sees exactly the batches an uninterrupted one would.

The sampler yields ``(index, epoch)`` pairs, so the dataset draws the image views of the right epoch in
any worker process without shared state. The loader is *stateful* in Lightning's sense (it has
``state_dict``/``load_state_dict``): a checkpoint records how many batches of the epoch the module
consumed (counted by the DataModule when a batch reaches the module, not when a worker prefetched it),
and a resumed run skips exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


@dataclass
class EpochProgress:
    """Shared between the DataModule (which counts consumed batches) and the sampler."""

    epoch: int = 0
    consumed_batches: int = 0
    skip_batches: int = 0


class ResumableSampler(DistributedSampler):
    """Seeded shuffling sharded over ranks, yielding ``(index, epoch)`` and able to skip consumed batches.

    Subclasses ``DistributedSampler`` so that Lightning does not replace it under DDP.

    Args:
        dataset: the dataset (only its length is used).
        batch_size: batch size (to turn skipped batches into skipped samples).
        num_replicas: number of ranks.
        rank: this rank.
        shuffle: shuffle every epoch with ``(seed, epoch)``.
        seed: shuffling seed.
        drop_last: drop the tail that does not divide evenly over ranks.
        progress: the shared :class:`EpochProgress`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        progress: EpochProgress | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.batch_size = batch_size
        self.progress = progress or EpochProgress()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; a new epoch resets the consumed count."""
        if epoch != self.progress.epoch:
            self.progress.consumed_batches = 0
            self.progress.skip_batches = 0
        self.progress.epoch = epoch
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.progress.epoch
        self.epoch = epoch
        indices = list(super().__iter__())
        skip = self.progress.skip_batches * self.batch_size
        self.progress.skip_batches = 0
        return iter([(index, epoch) for index in indices[skip:]])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints."""

    def __init__(self, *args: Any, progress: EpochProgress, batches_per_epoch: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.batches_per_epoch = batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches of it the module consumed."""
        return {"epoch": self.progress.epoch, "consumed_batches": self.progress.consumed_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after ``consumed_batches`` of ``epoch`` (or at the next epoch if that one was complete)."""
        epoch, consumed = int(state["epoch"]), int(state["consumed_batches"])
        if consumed >= self.batches_per_epoch:
            epoch, consumed = epoch + 1, 0
        self.progress.epoch = epoch
        self.progress.consumed_batches = consumed
        self.progress.skip_batches = consumed
