"""Experiences: what a target worker hands a learner, sized for shipping between processes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SFTExperience:
    """One batch of teacher-forced data with the target's view of it (for training-time test)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] 1 on tokens the drafter should learn to propose
    aux_hidden: torch.Tensor  # [B, T, 3H] the target's fused-layer inputs
    target_draft_logits: torch.Tensor  # [B, T, N] target logits at the draft vocabulary
    target_top1: torch.Tensor  # [B, T] target argmax over its full vocabulary
    drafter_version: int = 0  # version of the drafter whose vocabulary shaped this experience

    def to(self, device: torch.device | str) -> SFTExperience:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return SFTExperience(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())
