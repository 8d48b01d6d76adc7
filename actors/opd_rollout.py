"""Draft-OPD experience: target-assisted rollouts with the current drafter, cut into cycles.

A rollout is ordinary (lossless) speculative decoding with the current drafter drafting chains
of K tokens, so the text follows the target while the drafter's states are its own. Every
verification cycle m is recorded: the anchor (the committed root token the drafter started
from), the K proposals, how many the target accepted (r_m; the first error is at offset
r_m + 1), and the target's distribution at each drafted state from the verification forward.
The learner replays drafting from those anchors (``learners.opd``).

Two engines generate the rollouts (``opd.engine``):

* ``hf``: draftrl's own speculative engines record every cycle as they verify it: the batched
  engine (``speculative.batch_engine``, ``opd.rollout_batch_size`` sequences at once, the
  records kept on the device), or with ``opd.rollout_batch_size: 0`` the single-sequence
  reference engine (``speculative.engine``, ``record_steps=True``), one prompt at a time.
* ``vllm``: vLLM generates the text with EAGLE-3 speculation by the same drafter
  (``actors.vllm_rollout``) and exposes no verification detail, so :func:`cycles_from_text`
  recomputes it. At T = 0 that is exact: the text is the target's greedy continuation, the
  drafter's chain at every position is a function of the text alone, hence so is each cycle's
  accepted count and therefore where the next cycle starts.

Both end in :func:`assemble_experience`: sequences (prompt + response) and their cycles in,
the ``OPDExperience`` out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from speculative.batch_engine import ChainCycles
from speculative.drafter import Eagle3Drafter
from speculative.experience import OPDExperience, SFTExperience
from speculative.llama import FastLlama
from speculative.profiling import phase
from speculative.runtime import auto_dtype
from speculative.target import stop_token_ids
from speculative.tree import TreeConfig
from speculative.ttt import make_ttt_cache, shift_left


def prompts_from_batch(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each sample's context up to its first supervised token (the first assistant turn's
    header included): what the target is asked to answer."""
    prompts = []
    for ids, attention, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        supervised = torch.nonzero(loss.bool() & attention.bool()).flatten()
        if supervised.numel() and int(supervised[0]) > 0:
            prompts.append(ids[: int(supervised[0])].tolist())
    return prompts


@dataclass
class Cycles:
    """Per-cycle records of a batch of rollouts, in (sequence, cycle) order."""

    sequence: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # root position - 1
    accepted: list[int] = field(default_factory=list)
    step_inputs: list[torch.Tensor] = field(default_factory=list)  # [K] target ids
    proposals: list[torch.Tensor] = field(default_factory=list)  # [K] draft ids
    target_logprobs: list[torch.Tensor] = field(default_factory=list)  # [K, Vd]
    rollout_logprobs: list[torch.Tensor] = field(default_factory=list)  # [K]
    # [M, K, H] the target's final-norm states behind target_logprobs (the batched engine only)
    target_hidden: torch.Tensor | None = None

    def add(self, sequence: int, root_pos: int, accepted: int, root_token: int, proposals: torch.Tensor,
            target_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, drafter: Eagle3Drafter) -> None:
        """Cycle whose root (committed token ``root_token``) sits at ``root_pos``: the drafter fed the
        root, then its own proposals but the last."""
        fed = torch.cat([torch.tensor([root_token], device=proposals.device), drafter.to_target_ids(proposals[:-1])])
        self.sequence.append(sequence)
        self.index.append(root_pos - 1)
        self.accepted.append(int(accepted))
        self.step_inputs.append(fed)
        self.proposals.append(proposals)
        self.target_logprobs.append(target_logprobs)
        self.rollout_logprobs.append(rollout_logprobs)

    def __len__(self) -> int:
        return len(self.accepted)

    @classmethod
    def from_chain_cycles(cls, chains: ChainCycles, drafter: Eagle3Drafter) -> Cycles:
        """The batched engine's records, as tensors (``assemble_experience`` takes either form)."""
        fed = torch.cat([chains.root_token[:, None], drafter.to_target_ids(chains.proposals[:, :-1])], 1)
        return cls(sequence=chains.sequence, index=chains.root_pos - 1, accepted=chains.accepted,
                   step_inputs=fed, proposals=chains.proposals, target_logprobs=chains.target_logprobs,
                   rollout_logprobs=chains.rollout_logprobs, target_hidden=chains.target_hidden)


def rollout_batch(sequences: list[list[int]], response_starts: list[int]) -> dict[str, torch.Tensor]:
    """Prompt + response per row, right-padded; ``loss_mask`` marks the response."""
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids)
    for s, (sequence, start) in enumerate(zip(sequences, response_starts)):
        input_ids[s, : len(sequence)] = torch.tensor(sequence)
        attention[s, : len(sequence)] = 1
        loss_mask[s, start : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def assemble_experience(
    worker,
    config,
    batch: dict[str, torch.Tensor],
    rollout: SFTExperience,
    cycles: Cycles,
    drafter_version: int = 0,
    engine_report: dict | None = None,
) -> OPDExperience:
    """The experience from the rollouts (``rollout``: the target's view of prompt + response) and
    their cycles, whichever engine produced them."""
    device = worker.target.device
    responses = rollout.loss_mask.bool() & rollout.attention_mask.bool()
    data = worker.sft_experience(batch, drafter_version) if config.opd.sft_weight > 0 else None
    k, vocab = config.opd.chain_length, len(worker.draft_to_target)

    def stacked(rows: list[torch.Tensor] | torch.Tensor, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):  # already stacked (the batched engine)
            return rows.to(device=device, dtype=dtype).reshape(-1, *shape)
        # no cycle at all (every response ended at its first token): empty, correctly shaped
        return torch.stack(rows).to(device) if rows else torch.zeros(0, *shape, dtype=dtype, device=device)

    def longs(values: list[int] | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long).to(device)

    # The cycle losses replay the drafter over the rollout's aux states and read the target's
    # distributions from the verification records. The teacher-forced draft-vocabulary logits
    # ([B, T, Vd], gigabytes at a batch of 64 rollouts) are shipped only for the response TTT
    # term (opd.response_ttt_weight > 0, the authors' EAGLE-3 recipe).
    if config.opd.response_ttt_weight <= 0:
        rollout = replace(rollout, target_draft_logits=rollout.target_draft_logits.new_zeros(
            *rollout.target_draft_logits.shape[:2], 0))
    # The target's distributions can travel as its final-norm states and lm_head rows (OPDExperience.packed)
    head = worker.draft_head()
    hidden = None if head is None else cycles.target_hidden
    return OPDExperience(
        target_hidden=None if hidden is None else hidden.to(device),
        draft_head=None if hidden is None else head,
        rollout=rollout,
        sequence=longs(cycles.sequence),
        index=longs(cycles.index),
        accepted=longs(cycles.accepted),
        step_inputs=stacked(cycles.step_inputs, k, dtype=torch.long),
        proposals=stacked(cycles.proposals, k, dtype=torch.long),
        target_logprobs=stacked(cycles.target_logprobs, k, vocab, dtype=rollout.target_draft_logits.dtype),
        rollout_logprobs=stacked(cycles.rollout_logprobs, k, dtype=torch.float32),
        response_tokens=int(responses.sum()),
        target_forwards=len(cycles),
        data=data,
        drafter_version=drafter_version,
        engine_report=engine_report,
        reads_rejected_suffix=config.opd.rejected == "suffix",
    )


def split_experience(experience: OPDExperience, parts: int) -> list[OPDExperience]:
    """``experience`` cut into ``parts`` experiences of contiguous sequences, each trimmed to its
    own longest sequence: for one batched rollout of a whole update, learned on in micro-batches.
    Cycles go with their sequence (renumbered); ``data`` rows are split the same way."""
    rollout = experience.rollout
    rows = rollout.input_ids.shape[0]
    bounds = torch.linspace(0, rows, parts + 1).round().long().tolist()

    def rows_of(sft: SFTExperience, lo: int, hi: int) -> SFTExperience:
        width = int(sft.attention_mask[lo:hi].sum(-1).max()) if hi > lo else 0
        return replace(sft, **{f.name: getattr(sft, f.name)[lo:hi, :width] for f in fields(sft)
                               if isinstance(getattr(sft, f.name), torch.Tensor) and f.name != "draft_head"})

    out = []
    data_rows = experience.data.input_ids.shape[0] if experience.data is not None else 0
    data_bounds = torch.linspace(0, data_rows, parts + 1).round().long().tolist()
    for k in range(parts):
        lo, hi = bounds[k], bounds[k + 1]
        keep = (experience.sequence >= lo) & (experience.sequence < hi)
        part = rows_of(rollout, lo, hi)
        out.append(replace(
            experience, rollout=part, sequence=experience.sequence[keep] - lo, index=experience.index[keep],
            accepted=experience.accepted[keep], step_inputs=experience.step_inputs[keep],
            proposals=experience.proposals[keep], target_logprobs=experience.target_logprobs[keep],
            rollout_logprobs=experience.rollout_logprobs[keep],
            target_hidden=None if experience.target_hidden is None else experience.target_hidden[keep],
            response_tokens=int((part.loss_mask.bool() & part.attention_mask.bool()).sum()),
            target_forwards=int(keep.sum()),
            data=None if experience.data is None else rows_of(experience.data, data_bounds[k], data_bounds[k + 1]),
        ))
    return out


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
    prompts = prompts_from_batch(batch)
    if not prompts:
        raise ValueError("no sample in the batch has a prompt followed by supervised tokens")
    if opd.engine == "vllm":
        return vllm_opd_experience(worker, config, batch, prompts, drafter, drafter_version)
    if opd.rollout_batch_size > 0:  # (each phase a no-op unless a bench records them: OPD_PHASES)
        with phase("opd/rollouts"):
            sequences, cycles = batched_rollouts(worker, config, prompts, drafter, seed)
        with phase("opd/target_forward"):
            rollout = worker.sft_experience(rollout_batch(sequences, [len(p) for p in prompts]), drafter_version)
        with phase("opd/assemble"):
            return assemble_experience(worker, config, batch, rollout, cycles, drafter_version)
    chain = TreeConfig.chain(opd.chain_length)
    engine = worker.rollout_engine(
        drafter, chain, opd.rollout_temperature, compile=opd.compile,
        max_len=config.data.max_length + opd.max_new_tokens,
    )
    engine.reseed(seed)
    eos = stop_token_ids(worker.target.model)

    sequences = []
    cycles = Cycles()
    was_training = drafter.training
    drafter.eval()
    try:
        for s, prompt in enumerate(prompts):
            result = engine.generate(prompt, opd.max_new_tokens, eos)
            sequence = prompt + result.tokens
            sequences.append(sequence)
            for step, tree, logits, root_pos in zip(
                result.steps, result.trees, result.verify_logits, result.root_positions
            ):
                # A chain: node i sits at depth i + 1; row k - 1 of the verification is the
                # target at step k's state.
                cycles.add(
                    s, root_pos, step.accept_length, sequence[root_pos], tree.draft_ids[0],
                    torch.log_softmax(logits[: opd.chain_length].float(), -1).to(logits.dtype),
                    tree.logprobs[0], drafter,
                )
    finally:
        drafter.train(was_training)
    rollout = worker.sft_experience(rollout_batch(sequences, [len(p) for p in prompts]), drafter_version)
    return assemble_experience(worker, config, batch, rollout, cycles, drafter_version)


def rollout_drafter_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``opd.rollout_precision`` as the batched engine's drafter dtype (auto: ``auto_dtype``)."""
    if precision == "auto":
        return auto_dtype(device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


@torch.no_grad()
def batched_rollouts(worker, config, prompts: list[list[int]], drafter: Eagle3Drafter,
                     seed: int = 0) -> tuple[list[list[int]], Cycles]:
    """The rollouts of ``prompts`` by the batched engine (``speculative.batch_engine``):
    ``opd.rollout_batch_size`` sequences advance at once. Returns prompt + response per prompt
    and every verification cycle, recorded on the device as the steps run."""
    opd = config.opd
    engine = worker.batch_rollout_engine(
        drafter, opd.chain_length, opd.rollout_temperature, compile=opd.compile,
        max_batch=opd.rollout_batch_size, max_len=config.data.max_length + opd.max_new_tokens,
        drafter_dtype=rollout_drafter_dtype(opd.rollout_precision, worker.target.device),
    )
    engine.reseed(seed)
    was_training = drafter.training
    drafter.eval()
    try:
        result = engine.generate(prompts, opd.max_new_tokens, stop_token_ids(worker.target.model))
    finally:
        drafter.train(was_training)
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, result.tokens)]
    return sequences, Cycles.from_chain_cycles(result.cycles, drafter)


# ------------------------------------------------------------------------------------------
# The verification detail of a greedy rollout, recomputed from its text
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_chains(drafter: Eagle3Drafter, rollout: SFTExperience, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's greedy chain of ``steps`` proposals rooted at every index at once.

    Index t's chain feeds the root x_{t+1} with fc(target aux hidden at t), then its own
    proposals with its own pre-norm hidden: the inference protocol the engine follows (and
    ``speculative.ttt.replay_chains`` reproduces), except that each step's input is the previous
    step's argmax instead of a given token. The chain at t depends on x_{<=t+1} only, never on
    where cycles start. Returns (proposals [B, T, K] draft ids, log q(proposal) [B, T, K]).
    """
    ids = rollout.input_ids
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    cache = make_ttt_cache(drafter, rollout.attention_mask)
    hidden = drafter.fuse_target_hidden(rollout.aux_hidden)
    tokens = shift_left(ids, 1)
    proposals, logprobs = [], []
    for k in range(1, steps + 1):
        logits, hidden = drafter(tokens, hidden, positions + k, cache)
        top = torch.topk(torch.log_softmax(logits.float(), -1), 1, dim=-1)  # as the tree builder picks
        proposals.append(top.indices[..., 0])
        logprobs.append(top.values[..., 0])
        tokens = drafter.to_target_ids(top.indices[..., 0])
    return torch.stack(proposals, -1), torch.stack(logprobs, -1)


def walk_cycles(sequence: list[int], start: int, chains: list[list[int]]) -> list[tuple[int, int, bool]]:
    """Where the verification cycles of a greedy rollout start, from its text alone.

    ``sequence`` is prompt + response (the response starts at ``start``); ``chains[t]`` is the
    drafter's chain (target ids) rooted at index t, i.e. at root position t + 1. The first root
    is the first response token; a cycle at root p accepts the proposals matching the text
    after p (the text is the target's greedy choice), adds the target's token after them, and
    the next cycle starts at that token. The rollout stopped (EOS or length) at its last token,
    so the cycle whose tokens reach it is the last one. Returns (root position, accepted,
    resolved) per cycle; ``resolved`` is False when the text ended before a proposal failed, so
    that ``accepted`` is only a lower bound (the last cycle's proposals may run past the end).
    """
    last = len(sequence) - 1
    out = []
    root = start
    while root < last:
        chain = chains[root - 1]
        accepted, resolved = 0, True
        for k, token in enumerate(chain, start=1):
            if root + k > last:
                resolved = False
                break
            if token != sequence[root + k]:
                break
            accepted += 1
        out.append((root, accepted, resolved))
        root += accepted + 1
    return out


@torch.no_grad()
def verify_chains(
    fast: FastLlama,
    sequence: list[int],
    roots: list[int],
    chains: torch.Tensor,
    draft_to_target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target at every drafted state of the cycles of one sequence, in ONE forward.

    The forward runs over the sequence (causal) followed by each cycle's drafted tokens but the
    last, ``chains [M, K - 1]`` (target ids), at positions root + 1 .. root + K - 1; drafted token
    j of cycle m sees the text up to its root and the cycle's drafted tokens up to itself - the
    tree attention of the cycle's own verification forward. Row k - 1 of cycle m (the root's
    text row, then its drafted rows) is the target at step k's state.

    Returns (the target's argmax over its full vocabulary [M, K], logits at the draft
    vocabulary [M, K, Vd]).
    """
    device = fast.device
    length, (cycles, drafted) = len(sequence), chains.shape
    roots_t = torch.tensor(roots, device=device, dtype=torch.long)
    ids = torch.cat([torch.tensor(sequence, device=device), chains.reshape(-1).to(device)])
    steps = torch.arange(1, drafted + 1, device=device)
    positions = torch.cat([torch.arange(length, device=device), (roots_t[:, None] + steps).reshape(-1)])
    total = length + cycles * drafted
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:length, :length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if drafted:
        owner = torch.arange(cycles, device=device).repeat_interleave(drafted)  # cycle of each drafted row
        mask[length:, :length] = torch.arange(length, device=device)[None] <= roots_t[owner][:, None]
        within = torch.ones(drafted, drafted, dtype=torch.bool, device=device).tril()
        mask[length:, length:] = torch.block_diag(*[within] * cycles)
    rows = torch.cat(
        [roots_t[:, None], length + drafted * torch.arange(cycles, device=device)[:, None] + steps[None] - 1], 1
    )  # [M, K]
    out = fast(ids[None], positions[None], fast.new_cache(1, total), 0, mask[None],
               logits_rows=rows.reshape(-1))
    logits = out.logits[0].reshape(cycles, drafted + 1, -1)
    return logits.argmax(-1), logits[..., draft_to_target.to(device)]


@dataclass
class TextCycles:
    """What :func:`cycles_from_text` found, beside the cycles themselves."""

    cycles: Cycles
    rollout: SFTExperience
    sequences: list[list[int]]
    # response tokens that were not the worker's target's greedy choice; each such sequence was
    # cut right before its first one (a rollout must be the target's own greedy text)
    off_target_tokens: int = 0
    cut_sequences: int = 0
    # resolved cycles whose accepted count from the text differs from the chain verification's
    verify_mismatches: int = 0
    # tokens accepted past the end of the text (the last cycle's chain, settled by verify_chains)
    accepted_past_end: int = 0


@torch.no_grad()
def cycles_from_text(
    worker,
    drafter: Eagle3Drafter,
    sequences: list[list[int]],
    response_starts: list[int],
    chain_length: int,
    drafter_version: int = 0,
) -> TextCycles:
    """Recompute the verification cycles of greedy rollouts from their text.

    1. One target forward over the padded prompt + response rows (the rollout experience the
       learner trains on): the target's aux hidden states and its greedy choice at every token.
       A response token that is not the target's greedy choice (another engine's numerics broke
       a near-tie) cuts its sequence before it.
    2. The drafter's greedy chain at every index (:func:`greedy_chains`, over those aux states).
    3. The cycle boundaries and accepted counts (:func:`walk_cycles`).
    4. The target at every drafted state (:func:`verify_chains`, one forward per sequence),
       which also settles the last cycle's accepted count where its chain runs past the text.
    """
    sequences = [list(s) for s in sequences]
    rollout = worker.sft_experience(rollout_batch(sequences, response_starts), drafter_version)
    top1 = rollout.target_top1.tolist()
    off_target, cut = 0, 0
    for s, (sequence, start) in enumerate(zip(sequences, response_starts)):
        wrong = [j for j in range(start, len(sequence)) if sequence[j] != top1[s][j - 1]]
        if wrong:
            off_target += len(wrong)
            cut += 1
            sequences[s] = sequence[: wrong[0]]
    if cut:
        rollout = worker.sft_experience(rollout_batch(sequences, response_starts), drafter_version)

    proposals, logprobs = greedy_chains(drafter, rollout, chain_length)
    proposal_ids = drafter.to_target_ids(proposals)
    fast = worker.fast
    cycles = Cycles()
    mismatches = past_end = 0
    for s, (sequence, start) in enumerate(zip(sequences, response_starts)):
        walked = walk_cycles(sequence, start, proposal_ids[s].tolist())
        if not walked:
            continue
        index = torch.tensor([root - 1 for root, _, _ in walked], device=proposals.device)
        chains = proposal_ids[s, index, : chain_length - 1]
        best, draft_logits = verify_chains(fast, sequence, [r for r, _, _ in walked], chains,
                                           drafter.draft_to_target)
        agree = (best.to(proposal_ids.device) == proposal_ids[s, index]).long()
        verified = agree.cumprod(-1).sum(-1).tolist()  # greedy verification: the matching prefix
        for m, (root, accepted, resolved) in enumerate(walked):
            if resolved:
                mismatches += int(verified[m] != accepted)
            elif verified[m] < accepted:  # the verification fails inside the text
                mismatches += 1
            else:  # the text ended first: the verification says how far the chain goes
                past_end += verified[m] - accepted
                accepted = verified[m]
            cycles.add(
                s, root, accepted, sequence[root], proposals[s, root - 1],
                torch.log_softmax(draft_logits[m].float(), -1).to(draft_logits.dtype),
                logprobs[s, root - 1], drafter,
            )
    return TextCycles(cycles, rollout, sequences, off_target, cut, mismatches, past_end)


@torch.no_grad()
def vllm_opd_experience(
    worker,
    config,
    batch: dict[str, torch.Tensor],
    prompts: list[list[int]],
    drafter: Eagle3Drafter,
    drafter_version: int = 0,
):
    """``opd_experience`` with vLLM generating the rollouts (see ``actors.vllm_rollout``'s docstring)."""
    opd = config.opd
    engine = worker.vllm_rollouts(config)
    eos = stop_token_ids(worker.target.model)
    was_training = drafter.training
    drafter.eval()
    try:
        generated = engine.generate(drafter, drafter_version, prompts, opd.max_new_tokens, eos)
        if len(generated.token_ids) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(generated.token_ids)} rollouts for {len(prompts)} prompts")
        sequences = [prompt + list(tokens) for prompt, tokens in zip(prompts, generated.token_ids)]
        found = cycles_from_text(
            worker, drafter, sequences, [len(p) for p in prompts], opd.chain_length, drafter_version
        )
    finally:
        drafter.train(was_training)
    accepted = sum(found.cycles.accepted)
    spec = generated.spec
    report = {
        "process": generated.process,
        "generate_seconds": generated.seconds,
        "probe_max_abs_diff": generated.probe["max_abs_diff"],
        "cycles": len(found.cycles),
        "accepted_tokens": accepted,
        "vllm_num_drafts": spec.num_drafts,
        "vllm_num_accepted_tokens": spec.num_accepted_tokens,
        "vllm_accepted_per_position": list(spec.accepted_per_position),
        "off_target_tokens": found.off_target_tokens,
        "cut_sequences": found.cut_sequences,
        "verify_mismatches": found.verify_mismatches,
        "accepted_past_end": found.accepted_past_end,
    }
    # Cut sequences lose cycles vLLM did count, so the counters compare only on whole rollouts.
    # The gap is measured in committed tokens (accepted + one target token per cycle).
    if not found.cut_sequences:
        gap = abs(spec.num_accepted_tokens - accepted) / max(accepted + len(found.cycles), 1)
        report["acceptance_gap"] = gap
        if gap > opd.vllm.acceptance_tolerance:
            raise RuntimeError(
                f"vLLM accepted {spec.num_accepted_tokens} drafted tokens in {spec.num_drafts} "
                f"drafts, the recomputed cycles {accepted} in {len(found.cycles)} (gap {gap:.3f} "
                f"of the committed tokens > opd.vllm.acceptance_tolerance "
                f"{opd.vllm.acceptance_tolerance}): vLLM is not drafting with the worker's drafter"
            )
    return assemble_experience(worker, config, batch, found.rollout, found.cycles, drafter_version, report)
