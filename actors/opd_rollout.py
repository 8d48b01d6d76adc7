"""Draft-OPD experience: target-assisted rollouts with the current drafter, cut into cycles.

A rollout is ordinary (lossless) speculative decoding with the current drafter drafting chains
of K tokens, so the text follows the target while the drafter's states are its own. Every
verification cycle m is recorded: the anchor (the committed root token the drafter started
from), the K proposals, how many the target accepted (r_m; the first error is at offset
r_m + 1), and the target's distribution at each drafted state from the verification forward.
The learner replays drafting from those anchors (``learners.opd``).
"""

from __future__ import annotations

import torch

from actors.experience import OPDExperience
from speculative.drafter import Eagle3Drafter
from speculative.target import stop_token_ids
from speculative.tree import TreeConfig


def prompts_from_batch(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each sample's context up to its first supervised token (the first assistant turn's
    header included): what the target is asked to answer."""
    prompts = []
    for ids, attention, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        supervised = torch.nonzero(loss.bool() & attention.bool()).flatten()
        if supervised.numel() and int(supervised[0]) > 0:
            prompts.append(ids[: int(supervised[0])].tolist())
    return prompts


@torch.no_grad()
def opd_experience(
    worker,
    config,
    batch: dict[str, torch.Tensor],
    drafter: Eagle3Drafter,
    drafter_version: int = 0,
    seed: int = 0,
) -> OPDExperience:
    opd = config.opd
    device = worker.target.device
    prompts = prompts_from_batch(batch)
    if not prompts:
        raise ValueError("no sample in the batch has a prompt followed by supervised tokens")
    chain = TreeConfig.chain(opd.chain_length)
    engine = worker.rollout_engine(
        drafter, chain, opd.rollout_temperature, compile=opd.compile,
        max_len=config.data.max_length + opd.max_new_tokens,
    )
    engine.reseed(seed)
    eos = stop_token_ids(worker.target.model)

    sequences, response_starts = [], []
    cycles: dict[str, list] = {k: [] for k in (
        "sequence", "index", "accepted", "step_inputs", "proposals", "target_logprobs", "rollout_logprobs",
    )}
    forwards = tokens = 0
    was_training = drafter.training
    drafter.eval()
    try:
        for s, prompt in enumerate(prompts):
            result = engine.generate(prompt, opd.max_new_tokens, eos)
            sequence = prompt + result.tokens
            sequences.append(sequence)
            response_starts.append(len(prompt))
            forwards += len(result.steps)
            tokens += len(result.tokens)
            for step, tree, logits, root_pos in zip(
                result.steps, result.trees, result.verify_logits, result.root_positions
            ):
                proposals = tree.draft_ids[0]  # a chain: node i sits at depth i + 1
                fed = torch.cat([torch.tensor([sequence[root_pos]], device=device),
                                 drafter.to_target_ids(proposals[:-1])])
                cycles["sequence"].append(s)
                cycles["index"].append(root_pos - 1)
                cycles["accepted"].append(step.accept_length)
                cycles["step_inputs"].append(fed)
                cycles["proposals"].append(proposals)
                # Row k - 1 of the verification is the target at step k's state.
                cycles["target_logprobs"].append(
                    torch.log_softmax(logits[: opd.chain_length].float(), -1).to(logits.dtype)
                )
                cycles["rollout_logprobs"].append(tree.logprobs[0])
    finally:
        drafter.train(was_training)

    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids)
    for s, (sequence, start) in enumerate(zip(sequences, response_starts)):
        input_ids[s, : len(sequence)] = torch.tensor(sequence)
        attention[s, : len(sequence)] = 1
        loss_mask[s, start : len(sequence)] = 1
    rollout = worker.sft_experience(
        {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}, drafter_version
    )
    data = worker.sft_experience(batch, drafter_version) if opd.sft_weight > 0 else None
    return OPDExperience(
        rollout=rollout,
        sequence=torch.tensor(cycles["sequence"], device=device),
        index=torch.tensor(cycles["index"], device=device),
        accepted=torch.tensor(cycles["accepted"], device=device),
        step_inputs=torch.stack(cycles["step_inputs"]),
        proposals=torch.stack(cycles["proposals"]),
        target_logprobs=torch.stack(cycles["target_logprobs"]),
        rollout_logprobs=torch.stack(cycles["rollout_logprobs"]),
        response_tokens=tokens,
        target_forwards=forwards,
        data=data,
        drafter_version=drafter_version,
    )
