"""A resumable batch order: batch ``i`` is a pure function of (seed, i), so a cursor resumes it."""

from __future__ import annotations

import torch


class BatchOrder:
    """Shuffled epochs of fixed-size index batches; the last partial batch of an epoch is dropped."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = num_samples // batch_size
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def indices(self, batch_index: int) -> list[int]:
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=generator)
            else:
                self._perm = torch.arange(self.num_samples)
            self._epoch = epoch
        start = within * self.batch_size
        return self._perm[start : start + self.batch_size].tolist()
