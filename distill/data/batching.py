"""A deterministic stream of per-rank batches whose position is a sample count, so resume is exact.

We do not use a ``DataLoader`` + ``DistributedSampler`` with ``skip_first_batches``: replaying batches costs time on
resume and ties the position to the number of processes. Here the order of epoch ``e`` is a permutation drawn from
``seed + e``; each optimizer micro-step takes the next ``batch_size * world_size`` indices of it and rank ``r`` keeps
its slice. The position saved in a checkpoint is ``samples_consumed`` (global), from which any world size can
continue; with the same world size the continuation is the same sequence of batches.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BatchStream:
    dataset_size: int
    batch_size: int  # per rank
    world_size: int
    rank: int
    seed: int
    samples_consumed: int = 0  # global: sum over ranks, all epochs
    # Up to two epochs' permutations: a look ahead (peek_indices) may reach into the next epoch.
    _orders: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size * self.world_size > self.dataset_size:
            raise ValueError(
                f"per_device_train_batch_size x processes = {self.batch_size * self.world_size} is larger than the "
                f"training set ({self.dataset_size} examples)"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The epoch's remainder (fewer than a global batch) is dropped so every rank sees equal batch sizes.
        return self.dataset_size // self.global_batch

    @property
    def epoch(self) -> int:
        return self.samples_consumed // (self.steps_per_epoch * self.global_batch)

    def resume_at(self, samples_consumed: int, saved_world_size: int) -> None:
        """Continues from a checkpoint's position; a different process count realigns to a batch boundary."""
        if saved_world_size == self.world_size:
            self.samples_consumed = samples_consumed
            return
        old_global = self.batch_size * saved_world_size
        epoch, within = divmod(samples_consumed, (self.dataset_size // old_global) * old_global)
        within = (within // self.global_batch) * self.global_batch
        if within >= self.steps_per_epoch * self.global_batch:
            epoch, within = epoch + 1, 0
        self.samples_consumed = epoch * self.steps_per_epoch * self.global_batch + within
        logger.warning(
            "resuming with %d processes from a checkpoint written by %d: continuing at epoch %d, sample %d of the "
            "epoch order (batches differ from an uninterrupted run)",
            self.world_size,
            saved_world_size,
            epoch,
            within,
        )

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation, drawn once per epoch and kept as a tensor (8 bytes per example, two epochs at
        most): a micro-batch then costs a slice of its own size, where rebuilding the permutation as a list took
        0.34 s at 1M examples."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(self.dataset_size, generator=generator)
            for old in sorted(self._orders)[:-2]:
                del self._orders[old]
        return self._orders[epoch]

    def peek_indices(self, ahead: int = 0) -> list[int]:
        """This rank's indices for the micro-batch ``ahead`` micro-batches after the next one; the position does not
        move (a served teacher scores the next step's micro-batches early)."""
        per_epoch = self.steps_per_epoch * self.global_batch
        epoch, within = divmod(self.samples_consumed + ahead * self.global_batch, per_epoch)
        start = within + self.rank * self.batch_size
        return self._epoch_order(epoch)[start : start + self.batch_size].tolist()

    def next_indices(self) -> list[int]:
        """This rank's indices for the next micro-batch; advances the global position."""
        indices = self.peek_indices()
        self.samples_consumed += self.global_batch
        return indices
