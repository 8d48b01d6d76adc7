"""The Draft-OPD step: replay drafting from the rollout's anchors and let the target supervise
the drafter's own states (docs/methods/draft_opd.md):

    L_acc  = mean over accepted states of KL(p || q)                    (forward, mode-covering)
    L_rej  = sum_k gamma^(k-1) KL(q || p) / sum_k gamma^(k-1) over rejected states (reverse)
    L_cyc  = (lambda_acc L_acc + lambda_rej L_rej) / (lambda_acc + lambda_rej)
    L_corr = mean over first-error states of -log q(c), c the target's (correction) token
    L_TTT  = EAGLE-3 training-time test over every response position of the rollouts
    L      = L_cyc + w_corr L_corr + w_ttt L_TTT [+ w_sft L_EAGLE-3 on the data batch]

p is the target's distribution at the state (from the verification forward, restricted to the
draft vocabulary and renormalised, as in training-time test), q the drafter's recomputed one.
Accepted states are steps k <= r_m; rejected ones the first error (k = r_m + 1) and, with
``rejected: suffix``, the drafted states after it. The defaults are the authors' EAGLE-3 recipe:
lambda_rej = 0, w_corr = w_ttt = 1, states whose target token lies outside the draft vocabulary
dropped, cycle log-probs floored at -10. The paper's loss is lambda_rej = 1, w_corr = w_ttt = 0.
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
    draft_logits: torch.Tensor, target_logprobs: torch.Tensor, log_prob_min: float | None = None,
    loss_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-state forward KL(p || q) and reverse KL(q || p), both [M, K].

    ``log_prob_min`` floors both log-probs inside the log-ratio (the weights p, q stay exact), so
    a state where one side gives a token almost no mass costs at most about -log_prob_min;
    ``loss_max`` caps each state's value. Both are the official code's clamps; None: off.
    """
    logq = torch.log_softmax(draft_logits.float(), -1)
    logp = torch.log_softmax(target_logprobs.float(), -1)  # renormalise after any dtype rounding
    q, p = logq.exp(), logp.exp()
    if log_prob_min is not None:
        logq, logp = logq.clamp_min(log_prob_min), logp.clamp_min(log_prob_min)
    forward = (p * (logp - logq)).sum(-1)
    reverse = (q * (logq - logp)).sum(-1)
    if loss_max is not None:
        forward, reverse = forward.clamp_max(loss_max), reverse.clamp_max(loss_max)
    return forward, reverse


def correction_targets(experience: OPDExperience, drafter: Eagle3Drafter) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft id of the correction token [M], valid [M]) at each cycle's first-error state.

    Cycle m's step k state (column k - 1) predicts text token ``index + 1 + k``: the first-error
    state r_m + 1 predicts ``index + r_m + 2``, the token the target committed instead of the
    drafter's proposal. Cycles that accepted their whole chain (r_m = K) have no drafted error
    state, nor do cycles whose response ended before a correction. A correction token outside
    the draft vocabulary has no draft id, so its state is dropped (the drafter cannot propose it).
    """
    rollout = experience.rollout
    steps = experience.step_inputs.shape[1]
    position = experience.index + experience.accepted + 2
    length = rollout.attention_mask.sum(-1)[experience.sequence]
    has = (experience.accepted < steps) & (position < length)
    token = rollout.input_ids[experience.sequence, position.clamp_max(rollout.input_ids.shape[1] - 1)]
    draft_id = drafter.target_to_draft[token]
    return draft_id.clamp_min(0), has & (draft_id >= 0)


def opd_loss(drafter: Eagle3Drafter, experience: OPDExperience, config) -> tuple[torch.Tensor, dict[str, float]]:
    opd, training = config.opd, config.training
    rollout = experience.rollout
    steps = experience.step_inputs.shape[1]
    replayed = replay_chains(
        drafter, rollout.input_ids, rollout.attention_mask, rollout.aux_hidden,
        experience.sequence, experience.index, experience.step_inputs,
    )
    draft_logits = torch.stack(replayed, dim=1)  # [M, K, Vd]
    forward, reverse = distillation_terms(
        draft_logits, experience.target_logprobs, opd.log_prob_min_clamp, opd.loss_max_clamp)
    acc, rej = stream_masks(experience.accepted, steps, opd.rejected)
    weights = opd.gamma ** torch.arange(steps, device=acc.device, dtype=torch.float32)[None]
    acc_f, rej_w = acc.float(), rej.float() * weights
    accepted_loss = (forward * acc_f).sum() / acc_f.sum().clamp_min(1.0)
    rejected_loss = (reverse * rej_w).sum() / rej_w.sum().clamp_min(1e-9)
    lam_acc = opd.accepted_weight if bool(acc.any()) else 0.0
    lam_rej = opd.rejected_weight if bool(rej.any()) else 0.0
    # With lambda_rej = 0 the rejected states are outside the graph: exactly zero gradient.
    cycle_loss = lam_acc * accepted_loss
    if lam_rej > 0:
        cycle_loss = cycle_loss + lam_rej * rejected_loss
    loss = cycle_loss / max(lam_acc + lam_rej, 1e-9) if lam_acc + lam_rej > 0 else draft_logits.sum() * 0.0

    metrics: dict[str, float] = {}
    correction_id, has_correction = correction_targets(experience, drafter)
    correction_loss = draft_logits.new_zeros((), dtype=torch.float32)
    if opd.correction_weight > 0 and bool(has_correction.any()):
        rows = has_correction.nonzero().squeeze(-1)
        error_logits = draft_logits[rows, experience.accepted[rows]]  # the first-error state [C, Vd]
        logq = torch.log_softmax(error_logits.float(), -1).gather(-1, correction_id[rows, None]).squeeze(-1)
        if opd.log_prob_min_clamp is not None:
            logq = logq.clamp_min(opd.log_prob_min_clamp)
        per_state = -logq
        if opd.loss_max_clamp is not None:
            per_state = per_state.clamp_max(opd.loss_max_clamp)
        correction_loss = per_state.mean()
        loss = loss + opd.correction_weight * correction_loss

    if opd.response_ttt_weight > 0:
        if rollout.target_draft_logits.shape[-1] == 0:
            raise ValueError("opd.response_ttt_weight > 0 needs the rollouts' teacher-forced logits in the "
                             "experience (made with opd.response_ttt_weight > 0)")
        ttt, ttt_metrics = sft_loss(drafter, rollout, training.ttt_steps, training.step_weight_decay,
                                    mask_outside_draft_vocab=opd.draft_vocab_mask)
        loss = loss + opd.response_ttt_weight * ttt
        metrics.update({"opd/response_ttt": float(ttt.detach()),
                        "opd/response_ttt_top1_step1": ttt_metrics["top1/step1"],
                        "opd/response_ttt_states": ttt_metrics["supervised_tokens"]})

    if experience.data is not None and opd.sft_weight > 0:
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
        "opd/correction_ce": float(correction_loss.detach()),
        "opd/correction_states": float(has_correction.sum()),
        "opd/cycles": float(cycles),
        # The rollout's own acceptance: committed tokens per verification forward (bonus included).
        "rollout/tau": 1.0 + float(experience.accepted.float().mean()) if cycles else 1.0,
        "rollout/response_tokens": float(experience.response_tokens),
        "opd/replay_same_proposals": float(same_proposals),
        "opd/replay_logprob_drift": float(drift),
    })
    return loss, metrics
