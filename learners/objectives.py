"""One entry point for every training objective: ``objective_loss(drafter, experience, config)``.

The single-process trainer and the Ray learner group both call this, so an objective behaves
the same wherever it runs. Experiences are self-contained (``speculative.experience``): whatever a
loss needs from the target or from the frozen reference drafter was computed by the rollout
side, so a learner holds nothing but the drafter it trains.
"""

from __future__ import annotations

import torch

from speculative.config import ExperimentConfig
from speculative.drafter import Eagle3Drafter
from speculative.experience import CombinedExperience, Experience, GTOExperience, OPDExperience, SFTExperience
from speculative.sft import sft_loss


def objective_loss(
    drafter: Eagle3Drafter, experience: Experience, config: ExperimentConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to backpropagate for ``experience`` and the scalars worth logging."""
    training = config.training
    if isinstance(experience, SFTExperience):
        return sft_loss(drafter, experience, training.ttt_steps, training.step_weight_decay)
    if isinstance(experience, GTOExperience):
        from learners.gto import gto_loss

        return gto_loss(drafter, experience, config)
    if isinstance(experience, OPDExperience):
        from learners.opd import opd_loss

        return opd_loss(drafter, experience, config)
    if isinstance(experience, CombinedExperience):
        return combined_loss(drafter, experience, config)
    raise TypeError(f"no objective for experience of type {type(experience).__name__}")


def combined_loss(
    drafter: Eagle3Drafter, experience: CombinedExperience, config: ExperimentConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``objective: gto_opd``: gto_weight * L_GTO + opd_weight * L_OPD, one backward for both.

    GTO's metrics keep their names (``gto/...``, ``token/loss``), Draft-OPD's keep ``opd/...`` and
    ``rollout/...``; the two total losses are logged as ``gto/loss`` and ``opd/loss``.
    """
    from learners.gto import gto_loss
    from learners.opd import opd_loss

    weights = config.combined
    gto, gto_metrics = gto_loss(drafter, experience.gto, config)
    opd, opd_metrics = opd_loss(drafter, experience.opd, config)
    loss = weights.gto_weight * gto + weights.opd_weight * opd
    metrics = {**{k: v for k, v in opd_metrics.items() if k != "loss"},
               **{k: v for k, v in gto_metrics.items() if k != "loss"}}
    metrics.update({"loss": float(loss.detach()), "gto/loss": gto_metrics["loss"], "opd/loss": opd_metrics["loss"]})
    return loss, metrics
