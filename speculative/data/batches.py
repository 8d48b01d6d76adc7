"""A resumable batch order: batch ``i`` is a pure function of (seed, i), so a cursor resumes it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class BatchOrder:
    """Shuffled epochs of fixed-size index batches; the last partial batch of an epoch is dropped.

    With ``lengths`` (sample token counts), each epoch's shuffled samples are cut into windows of
    ``group_window`` batches, sorted by length within a window, batched, and the epoch's batches
    shuffled again: batches of similar lengths, so less of a right-padded batch is padding, in an
    order that is still random at the batch level (Hugging Face's ``group_by_length`` idea).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True,
                 lengths: Sequence[int] | np.ndarray | None = None, group_window: int = 64):
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        if group_window < 1:
            raise ValueError(f"group_window must be at least 1, not {group_window}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        self.group_window = group_window
        self.batches_per_epoch = num_samples // batch_size
        self._epoch = -1
        self._batches: torch.Tensor | None = None

    def _epoch_batches(self, epoch: int) -> torch.Tensor:
        """[batches_per_epoch, batch_size] sample indices of ``epoch``: a pure function of (seed, epoch)."""
        used = self.batches_per_epoch * self.batch_size
        if not self.shuffle:
            return torch.arange(used).view(-1, self.batch_size)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator)[:used]
        if self.lengths is None:
            return order.view(-1, self.batch_size)
        window = self.group_window * self.batch_size
        grouped = [chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
                   for chunk in order.split(window)]
        batches = torch.cat(grouped).view(-1, self.batch_size)
        return batches[torch.randperm(len(batches), generator=generator)]

    def indices(self, batch_index: int) -> list[int]:
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._batches = self._epoch_batches(epoch)
            self._epoch = epoch
        return self._batches[within].tolist()
