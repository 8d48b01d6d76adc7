"""The target worker: runs the frozen target over batches and packages experiences."""

from __future__ import annotations

import torch

from actors.experience import SFTExperience
from speculative.target import TargetModel
from speculative.ttt import restrict_to_draft_vocab


class TargetWorker:
    """Hosts the target; knows the current draft vocabulary so experiences stay small."""

    def __init__(self, target: TargetModel, draft_to_target: torch.Tensor):
        self.target = target
        self.draft_to_target = draft_to_target.to(target.device)

    @torch.no_grad()
    def sft_experience(self, batch: dict[str, torch.Tensor], drafter_version: int = 0) -> SFTExperience:
        device = self.target.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        features = self.target.features(input_ids, attention_mask)
        draft_logits, top1 = restrict_to_draft_vocab(features.logits, self.draft_to_target)
        return SFTExperience(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=batch["loss_mask"].to(device),
            aux_hidden=features.aux_hidden,
            target_draft_logits=draft_logits,
            target_top1=top1,
            drafter_version=drafter_version,
        )
