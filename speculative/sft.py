"""The EAGLE-3 supervised step (training-time test), as a plain function of (drafter, experience).

In the core, not in ``learners/``: the learners' objectives build on it, and so does the held-out
evaluation that rollout actors run on their drafter replicas.
"""

from __future__ import annotations

import torch

from speculative.drafter import Eagle3Drafter
from speculative.experience import SFTExperience
from speculative.ttt import step_weights, training_time_test


def sft_loss(
    drafter: Eagle3Drafter, experience: SFTExperience, ttt_steps: int, step_weight_decay: float,
    mask_outside_draft_vocab: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to backpropagate and the scalars worth logging (per-step KL and top-1 agreement)."""
    if experience.logit_rows is not None:
        raise ValueError("a packed experience (shipping form): unpack it first (experience.unpacked() "
                         "or concat_experiences)")
    result = training_time_test(
        drafter,
        experience.input_ids,
        experience.attention_mask,
        experience.loss_mask,
        experience.target_draft_logits,
        experience.target_top1,
        experience.aux_hidden,
        ttt_steps,
        step_weights(ttt_steps, step_weight_decay),
        drafter.target_to_draft >= 0 if mask_outside_draft_vocab else None,
    )
    metrics = {"loss": result.loss_value, "accept_length_proxy": result.accept_length_proxy}
    for k, (kl, acc) in enumerate(zip(result.step_loss, result.step_accuracy), start=1):
        metrics[f"kl/step{k}"] = kl
        metrics[f"top1/step{k}"] = acc
    metrics["supervised_tokens"] = float(result.step_count[0])
    return result.loss, metrics
