"""The GTO step (arXiv 2509.22134, Sec. 3.2): group-standardised, debiased tree rewards driving a
PPO-style clipped surrogate on the drafter's log-probability of its longest accepted path,
added to the EAGLE-3 token loss: L = w_token * L_token + omega * L_GTO.

Everything target- or reference-dependent arrives in the ``GTOExperience``; only the current
drafter's path log-probability is recomputed here, with gradient: step 1 at every index, the
later steps at the paths' roots only (``speculative.batched_trees.rooted_path_logprob``).
"""

from __future__ import annotations

import torch

from speculative.batched_trees import rooted_path_logprob
from speculative.drafter import Eagle3Drafter
from speculative.experience import GTOExperience
from speculative.sft import sft_loss
from speculative.ttt import path_logprob


def group_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    valid: torch.Tensor,
    std_eps: float = 1e-6,
    clip: float | None = None,
    std_floor: float = 0.0,
    positive_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_i = (R_i - mean_G R) / (std_G R + eps) over the valid members of each group (Eq. 10).

    ``std_floor`` (absolute, 0 = the paper) floors std_G before eps is added, so groups whose
    rewards differ by less than the floor get advantages below unit scale instead of amplified
    noise; ``positive_only`` keeps max(A, 0). Groups with fewer than two valid members have no
    defined spread and are dropped. Returns (advantages [P], used [P] bool, dense group ids [P]);
    unused entries are 0.
    """
    _, dense = torch.unique(group, return_inverse=True)
    n_groups = int(dense.max()) + 1 if dense.numel() else 0
    weight = valid.float()
    count = torch.zeros(n_groups, device=rewards.device).index_add_(0, dense, weight)
    mean = torch.zeros(n_groups, device=rewards.device).index_add_(0, dense, rewards * weight)
    mean = mean / count.clamp_min(1)
    centred = (rewards - mean[dense]) * weight
    var = torch.zeros(n_groups, device=rewards.device).index_add_(0, dense, centred**2)
    std = (var / (count - 1).clamp_min(1)).sqrt()  # unbiased, as torch.std
    used = valid & (count[dense] >= 2)
    advantages = torch.where(used, centred / (std.clamp_min(std_floor)[dense] + std_eps), 0.0)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    if positive_only:
        advantages = advantages.clamp_min(0.0)
    return advantages, used, dense


def reward_scale(rewards: torch.Tensor, members: torch.Tensor) -> float:
    """The batch's reward scale for ``gto.std_floor``: the std of the current trees' rewards over
    the batch's member positions (how much tree quality varies between states), 0 below two."""
    values = rewards[members].float()
    return float(values.std()) if values.numel() >= 2 else 0.0


def _stats(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """mean, std (population), abs-mean of ``values`` under ``prefix``; zeros when empty."""
    values = values.float()
    if values.numel() == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_std": 0.0, f"{prefix}_abs": 0.0}
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_std": float(values.std(unbiased=False)),
            f"{prefix}_abs": float(values.abs().mean())}


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, used: torch.Tensor, dense_group: torch.Tensor,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-(1/|G|) sum_{i in G} min(s_i A_i, clip(s_i, 1-eps, 1+eps) A_i), averaged over groups (Eq. 12).

    Returns (loss, clipped [P] bool: where the clipped branch was the active one).
    """
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * advantages
    objective = torch.minimum(unclipped, clipped)
    n_groups = int(dense_group.max()) + 1 if dense_group.numel() else 0
    weight = used.float()
    count = torch.zeros(n_groups, device=log_ratio.device).index_add_(0, dense_group, weight)
    per_group = torch.zeros(n_groups, device=log_ratio.device).index_add_(
        0, dense_group, objective * weight
    )
    has = count > 0
    if not bool(has.any()):
        return log_ratio.sum() * 0.0, torch.zeros_like(used)
    loss = -(per_group[has] / count[has]).mean()
    return loss, used & (clipped < unclipped)


def gto_loss(drafter: Eagle3Drafter, experience: GTOExperience, config) -> tuple[torch.Tensor, dict[str, float]]:
    gto, training = config.gto, config.training
    token_loss, metrics = sft_loss(drafter, experience.sft, training.ttt_steps, training.step_weight_decay)
    metrics = {f"token/{k}" if k == "loss" else k: v for k, v in metrics.items()}

    lengths = experience.path_length
    debiased = experience.reward - experience.reference_reward  # Eq. 9
    has_path = lengths > 0  # an empty path has ratio 1 and no gradient
    members = has_path if gto.advantage_members == "with_path" else torch.ones_like(has_path)
    floor = gto.std_floor * reward_scale(experience.reward, members) if gto.std_floor > 0 else 0.0
    advantages, used, dense = group_advantages(
        debiased, experience.group, members, gto.std_eps, gto.advantage_clip, floor, gto.advantage_clip_negative
    )
    used = used & has_path
    advantages = advantages * has_path
    sft = experience.sft
    chains = (experience.sequence, experience.index, experience.path_ids, lengths)
    if gto.path_replay == "rooted" and drafter.config.sliding_window is None:  # same value and gradient
        logprob = rooted_path_logprob(drafter, sft.input_ids, sft.aux_hidden, *chains)
    else:  # only the TTT cache applies a sliding window
        logprob = path_logprob(drafter, sft.input_ids, sft.attention_mask, sft.aux_hidden, *chains)
    per_token = (logprob - experience.reference_path_logprob) / lengths.clamp_min(1)  # Eq. 11
    surrogate, clipped = clipped_surrogate(per_token, advantages, used, dense, gto.clip_epsilon)
    loss = gto.token_loss_weight * token_loss + gto.loss_weight * surrogate

    n_used = max(int(used.sum()), 1)
    detached = per_token.detach()
    drift = ((logprob.detach() - experience.rollout_path_logprob) / lengths.clamp_min(1)).abs()
    metrics.update({
        "loss": float(loss.detach()),
        "gto/surrogate": float(surrogate.detach()),
        "gto/reward": float(experience.reward.mean()) if lengths.numel() else 0.0,
        "gto/reference_reward": float(experience.reference_reward.mean()) if lengths.numel() else 0.0,
        "gto/debiased_reward": float(debiased.mean()) if lengths.numel() else 0.0,
        "gto/expected_length": float(experience.expected_length.mean()) if lengths.numel() else 0.0,
        "gto/reference_expected_length": float(experience.reference_expected_length.mean())
        if lengths.numel() else 0.0,
        "gto/path_length": float(lengths.float().mean()) if lengths.numel() else 0.0,
        "gto/positions": float(lengths.numel()),
        "gto/used_fraction": float(used.float().mean()) if lengths.numel() else 0.0,
        "gto/advantage_abs": float((advantages.abs() * used).sum() / n_used),
        "gto/clip_fraction": float(clipped.float().sum() / n_used),
        "gto/ratio": float((detached.exp() * used).sum() / n_used),
        # min/max over the update (mean_metrics reduces *_min / *_max keys with min / max)
        "gto/ratio_min": float(detached.exp()[used].min()) if bool(used.any()) else 1.0,
        "gto/ratio_max": float(detached.exp()[used].max()) if bool(used.any()) else 1.0,
        "gto/std_floor_abs": float(floor),
        # KL(current || reference) per path token, k3 estimator on the current drafter's path.
        "gto/kl_reference": float(((torch.expm1(-detached) + detached) * used).sum() / n_used),
        "gto/rollout_logprob_drift": float((drift * used).sum() / n_used),
    })
    # Debiased reward over every position, advantages over the positions that drive the update.
    debiased_stats = _stats(debiased, "gto/debiased_reward")
    debiased_stats.pop("gto/debiased_reward_mean")  # logged above as gto/debiased_reward
    metrics.update(debiased_stats)
    metrics.update(_stats(advantages[used], "gto/advantage"))
    return loss, metrics
