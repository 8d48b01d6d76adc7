"""One entry point for every training objective: ``objective_loss(drafter, experience, config)``.

The single-process trainer and the Ray learner group both call this, so an objective behaves
the same wherever it runs. Experiences are self-contained (``actors.experience``): whatever a
loss needs from the target or from the frozen reference drafter was computed by the rollout
side, so a learner holds nothing but the drafter it trains.
"""

from __future__ import annotations

import torch

from actors.experience import Experience, GTOExperience, OPDExperience, SFTExperience
from learners.sft import sft_loss
from pipeline.config import ExperimentConfig
from speculative.drafter import Eagle3Drafter


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
    raise TypeError(f"no objective for experience of type {type(experience).__name__}")
