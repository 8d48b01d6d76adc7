"""The Draft-OPD step: replay drafting from the rollout's anchors and let the target supervise
the drafter's own states (docs/methods/draft_opd.md):

    L_acc = mean over accepted states of KL(p || q)                     (forward, mode-covering)
    L_rej = sum_k gamma^(k-1) KL(q || p) / sum_k gamma^(k-1) over rejected states (reverse)
    L     = (lambda_acc L_acc + lambda_rej L_rej) / (lambda_acc + lambda_rej) [+ w_sft L_EAGLE-3]

p is the target's distribution at the state (from the verification forward, restricted to the
draft vocabulary and renormalised, as in training-time test), q the drafter's recomputed one.
Accepted states are steps k <= r_m; rejected ones the first error (k = r_m + 1) and, with
``rejected: suffix``, the drafted states after it.
"""

from __future__ import annotations

import torch

from speculative.drafter import Eagle3Drafter
from speculative.experience import OPDExperience
from speculative.sft import sft_loss
from speculative.ttt import replay_chains


def stream_masks(accepted: torch.Tensor, steps: int, rejected: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [M, K], rejected [M, K]) state masks; step k is column k - 1."""
    k = torch.arange(steps, device=accepted.device)[None]
    acc = k < accepted[:, None]
    rej = k >= accepted[:, None] if rejected == "suffix" else k == accepted[:, None]
    return acc, rej


def distillation_terms(
    draft_logits: torch.Tensor, target_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-state forward KL(p || q) and reverse KL(q || p), both [M, K]."""
    logq = torch.log_softmax(draft_logits.float(), -1)
    logp = torch.log_softmax(target_logprobs.float(), -1)  # renormalise after any dtype rounding
    forward = (logp.exp() * (logp - logq)).sum(-1)
    reverse = (logq.exp() * (logq - logp)).sum(-1)
    return forward, reverse


def opd_loss(drafter: Eagle3Drafter, experience: OPDExperience, config) -> tuple[torch.Tensor, dict[str, float]]:
    opd = config.opd
    rollout = experience.rollout
    steps = experience.step_inputs.shape[1]
    replayed = replay_chains(
        drafter, rollout.input_ids, rollout.attention_mask, rollout.aux_hidden,
        experience.sequence, experience.index, experience.step_inputs,
    )
    draft_logits = torch.stack(replayed, dim=1)  # [M, K, Vd]
    forward, reverse = distillation_terms(draft_logits, experience.target_logprobs)
    acc, rej = stream_masks(experience.accepted, steps, opd.rejected)
    weights = opd.gamma ** torch.arange(steps, device=acc.device, dtype=torch.float32)[None]
    acc_f, rej_w = acc.float(), rej.float() * weights
    accepted_loss = (forward * acc_f).sum() / acc_f.sum().clamp_min(1.0)
    rejected_loss = (reverse * rej_w).sum() / rej_w.sum().clamp_min(1e-9)
    lam_acc = opd.accepted_weight if bool(acc.any()) else 0.0
    lam_rej = opd.rejected_weight if bool(rej.any()) else 0.0
    loss = (lam_acc * accepted_loss + lam_rej * rejected_loss) / max(lam_acc + lam_rej, 1e-9)

    metrics: dict[str, float] = {}
    if experience.data is not None and opd.sft_weight > 0:
        training = config.training
        supervised, sft_metrics = sft_loss(drafter, experience.data, training.ttt_steps, training.step_weight_decay)
        loss = loss + opd.sft_weight * supervised
        metrics.update({f"sft/{k}": v for k, v in sft_metrics.items() if k in ("loss", "top1/step1")})

    with torch.no_grad():
        proposal_logq = torch.log_softmax(draft_logits.float(), -1).gather(
            -1, experience.proposals[..., None]).squeeze(-1)
        same_proposals = (draft_logits.argmax(-1) == experience.proposals).float().mean()
        drift = (proposal_logq - experience.rollout_logprobs.float()).abs().mean()
    cycles = experience.accepted.numel()
    metrics.update({
        "loss": float(loss.detach()),
        "opd/accepted_kl": float(accepted_loss.detach()),
        "opd/rejected_kl": float(rejected_loss.detach()),
        "opd/accepted_states": float(acc.sum()),
        "opd/rejected_states": float(rej.sum()),
        "opd/cycles": float(cycles),
        # The rollout's own acceptance: committed tokens per verification forward (bonus included).
        "rollout/tau": 1.0 + float(experience.accepted.float().mean()) if cycles else 1.0,
        "rollout/response_tokens": float(experience.response_tokens),
        "opd/replay_same_proposals": float(same_proposals),
        "opd/replay_logprob_drift": float(drift),
    })
    return loss, metrics
