"""Held-out TTT metrics of a drafter: what the single-process trainer and the rollout actors report.

One function for both, so the Ray pipeline's eval curve is the single-process trainer's, computed
on a rollout actor's replica instead of in the training process.
"""

from __future__ import annotations

import numpy as np
import torch

from speculative.config import TrainingConfig
from speculative.data import collate
from speculative.data.batches import BatchOrder
from speculative.drafter import Eagle3Drafter
from speculative.sft import sft_loss


@torch.no_grad()
def evaluate_ttt(
    drafter: Eagle3Drafter, worker, dataset, pad_id: int, training: TrainingConfig
) -> dict[str, float]:
    """Held-out TTT metrics over the first ``eval_batches`` batches (a fixed set).

    ``worker`` makes the SFT experiences (``actors.target_worker.TargetWorker``)."""
    drafter.eval()
    size = min(training.batch_size, len(dataset))
    order = BatchOrder(len(dataset), size, seed=0, shuffle=False)
    results = []
    for index in range(min(training.eval_batches, order.batches_per_epoch)):
        batch = collate([dataset[i] for i in order.indices(index)], pad_id)
        experience = worker.sft_experience(batch)
        _, metrics = sft_loss(drafter, experience, training.ttt_steps, training.step_weight_decay)
        results.append(metrics)
    return mean_metrics(results)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean of metric dicts (all with the keys of the first); {} for no rows. Keys ending
    in ``_min`` / ``_max`` (extremes, e.g. ``gto/ratio_min``) are reduced by min / max instead."""
    if not rows:
        return {}
    reduce = {"_min": np.min, "_max": np.max}
    return {key: float(reduce.get(key[-4:], np.mean)([row[key] for row in rows])) for key in rows[0]}
