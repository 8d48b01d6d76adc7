"""Experiences: what a rollout worker hands a learner, self-contained and sized for shipping.

Every experience carries the drafter version that produced it (``drafter_version``), so an
asynchronous pipeline can measure and bound staleness, and whatever its loss needs from the
target or the frozen reference drafter, so a learner holds only the drafter it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


class _Movable:
    """``.to(device)`` and ``.pin()``-free moving of every tensor field (nested experiences too)."""

    def to(self, device: torch.device | str):
        moved = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, _Movable)):
                value = value.to(device)
            moved[f.name] = value
        return replace(self, **moved)  # type: ignore[type-var]

    def nbytes(self) -> int:
        """Bytes of tensor payload (what shipping this experience costs)."""
        total = 0
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, _Movable):
                total += value.nbytes()
        return total


@dataclass
class SFTExperience(_Movable):
    """One batch of teacher-forced data with the target's view of it (for training-time test)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] 1 on tokens the drafter should learn to propose
    aux_hidden: torch.Tensor  # [B, T, 3H] the target's fused-layer inputs
    target_draft_logits: torch.Tensor  # [B, T, N] target logits at the draft vocabulary
    target_top1: torch.Tensor  # [B, T] target argmax over its full vocabulary
    drafter_version: int = 0  # version of the drafter whose vocabulary shaped this experience

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class GTOExperience(_Movable):
    """Draft trees at groups of positions of teacher-forced sequences, scored by the target.

    Position p is index ``index[p]`` of sequence ``sequence[p]`` of ``sft`` (the tree's root is
    token ``index + 1``); ``group[p]`` numbers the window of adjacent positions it belongs to.
    ``path_ids[p, :path_length[p]]`` is the longest accepted branch of the current drafter's
    tree (greedy verification), in draft-vocabulary ids.
    """

    sft: SFTExperience  # the same sequences, for the EAGLE-3 token loss and the path replay
    sequence: torch.Tensor  # [P]
    index: torch.Tensor  # [P]
    group: torch.Tensor  # [P]
    path_ids: torch.Tensor  # [P, D] draft ids, 0-padded
    path_length: torch.Tensor  # [P]
    reward: torch.Tensor  # [P] tree reward of the current drafter's tree
    reference_reward: torch.Tensor  # [P] tree reward of the frozen reference drafter's tree
    expected_length: torch.Tensor  # [P] exact expected accepted length of the current tree
    reference_expected_length: torch.Tensor  # [P]
    rollout_path_logprob: torch.Tensor  # [P] log q(path) under the drafter that built the tree
    reference_path_logprob: torch.Tensor  # [P] log q0(path) under the reference drafter
    drafter_version: int = 0

    @property
    def num_tokens(self) -> int:
        return self.sft.num_tokens


@dataclass
class OPDExperience(_Movable):
    """Target-assisted rollouts (speculative decoding with the current drafter) and their cycles.

    ``rollout`` holds prompt + generated response per sequence (its ``loss_mask`` marks the
    response) and the target's aux states over them; its ``target_draft_logits`` is empty
    ``[B, T, 0]`` (the loss reads ``target_logprobs``, not teacher-forced logits). Cycle m anchors at index ``index[m]`` of sequence ``sequence[m]``: the drafter fed
    ``step_inputs[m, 0]`` (the committed root token) then its own proposals, drafting
    ``proposals[m, k]``; the target accepted the first ``accepted[m]``. ``target_logprobs[m, k]``
    is the target's log-distribution (draft vocabulary, T = 1) at step k's state, from the
    verification forward: conditioned on the drafted prefix, as the drafter saw it.
    """

    rollout: SFTExperience
    sequence: torch.Tensor  # [M]
    index: torch.Tensor  # [M]
    accepted: torch.Tensor  # [M] r_m
    step_inputs: torch.Tensor  # [M, K] target ids fed at steps 1..K
    proposals: torch.Tensor  # [M, K] draft ids drafted at steps 1..K
    target_logprobs: torch.Tensor  # [M, K, Vd]
    rollout_logprobs: torch.Tensor  # [M, K] log q(proposal) at rollout time
    response_tokens: int = 0
    target_forwards: int = 0  # verification forwards of the rollout (tau = tokens / forwards)
    data: SFTExperience | None = None  # the offline batch, when the EAGLE-3 loss is mixed in
    drafter_version: int = 0
    # opd.engine 'vllm': how the recomputed cycles agree with the text and with vLLM's own
    # acceptance counters (``actors.vllm_rollout``); None for draftrl's engine
    engine_report: dict | None = None

    @property
    def num_tokens(self) -> int:
        return self.rollout.num_tokens


@dataclass
class CombinedExperience(_Movable):
    """``objective: gto_opd``: GTO trees and Draft-OPD rollouts made from the same data batch by
    the same drafter version, trained on together in one update."""

    gto: GTOExperience
    opd: OPDExperience
    drafter_version: int = 0

    @property
    def num_tokens(self) -> int:
        return self.gto.num_tokens + self.opd.num_tokens


Experience = SFTExperience | GTOExperience | OPDExperience | CombinedExperience


def uses_reference(objective: str) -> bool:
    """Whether an objective needs GTO's frozen reference drafter on the rollout side."""
    return objective in ("gto", "gto_opd")
