"""GTO experience: trees of the current and the reference drafter at groups of positions, scored.

Per sequence of the batch (GTO Sec. 3.2, Alg. 1): draw ``groups_per_sequence`` non-overlapping
windows of ``group_size`` adjacent positions whose first drafted token is an assistant token;
at every position build the current drafter's tree and the frozen reference drafter's tree
(EAGLE-2 dynamic trees, the decoding policy), verify both with the target in packed forwards,
and keep what the learner needs: the two tree rewards, the current tree's longest accepted
path, and the reference drafter's log-probability of that path (the PPO ratio's denominator).

``gto_experience`` does all of it for the whole batch in a few large forwards
(``speculative.batched_trees``); ``per_sequence_gto_experience`` is the original sequence-by-
sequence loop, kept as the reference implementation the batched one is tested against.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from speculative.batched_trees import BatchedTreeOptions, score_trees_at_positions
from speculative.drafter import Eagle3Drafter
from speculative.experience import GTOExperience, SFTExperience, hidden_is_smaller, read_row_ids
from speculative.position_trees import build_trees_at, drafter_prefix, prefill_sequence, verify_trees_at
from speculative.tree import TreeConfig, tree_size
from speculative.tree_reward import greedy_accepted_path, score_tree
from speculative.ttt import path_logprob


def tree_config(gto) -> TreeConfig:
    return TreeConfig(depth=gto.training_depth, top_k=gto.tree_top_k, total_tokens=gto.tree_total_tokens)


def choose_windows(
    valid: torch.Tensor, group_size: int, num_groups: int, generator: torch.Generator
) -> list[list[int]]:
    """Up to ``num_groups`` random non-overlapping windows of adjacent valid indices."""
    ok = valid.cpu().tolist()
    starts = [
        s for s in range(len(ok) - group_size + 1) if all(ok[s : s + group_size])
    ]
    order = torch.randperm(len(starts), generator=generator).tolist()
    taken = torch.zeros(len(ok), dtype=torch.bool)
    windows = []
    for i in order:
        start = starts[i]
        if taken[start : start + group_size].any():
            continue
        taken[start : start + group_size] = True
        windows.append(list(range(start, start + group_size)))
        if len(windows) == num_groups:
            break
    return sorted(windows)


def valid_indices(loss_mask: torch.Tensor, length: int) -> torch.Tensor:
    """[T] index t can root a training tree: x_{t+2} (its first drafted token) is supervised."""
    valid = torch.zeros(loss_mask.shape[0], dtype=torch.bool, device=loss_mask.device)
    if length >= 3:
        valid[: length - 2] = loss_mask[2:length].bool()
    return valid


def batched_tree_options(gto) -> BatchedTreeOptions:
    return BatchedTreeOptions(
        tree=tree_config(gto), reward_temperature=gto.reward_scoring()[0], eta=gto.eta,
        aggregation=gto.reward_scoring()[1], sequences_per_forward=gto.sequences_per_forward,
        positions_per_forward=gto.positions_per_forward, share_nodes=gto.share_reference_nodes,
        verify_leaves=gto.verify_leaves, verify_width_multiple=gto.verify_width_multiple,
        verify_prefix_multiple=gto.verify_prefix_multiple,
        tree_autocast=gto.tree_precision == "bf16", tree_attention=gto.tree_attention,
        reference_path_fp32=gto.reference_path_precision == "fp32",
    )


def batch_windows(
    loss_mask: torch.Tensor, lengths: list[int], gto, seed: int
) -> list[list[list[int]]]:
    """Every sequence's windows, drawn in batch order from one generator seeded by ``seed`` (so a
    resumed run repeats them; both implementations draw exactly these)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        choose_windows(valid_indices(loss_mask[s], length), gto.group_size, gto.groups_per_sequence, generator)
        for s, length in enumerate(lengths)
    ]


def position_slots(windows: list[list[list[int]]], slots: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """(indices [B, slots] 0-padded, positions per sequence, group id of every position in
    batch order): groups are numbered across the batch, window by window."""
    indices = torch.zeros(len(windows), slots, dtype=torch.long)
    counts, group, next_group = [], [], 0
    for s, chosen in enumerate(windows):
        flat = [t for w in chosen for t in w]
        indices[s, : len(flat)] = torch.tensor(flat, dtype=torch.long)
        counts.append(len(flat))
        group += [next_group + g for g, w in enumerate(chosen) for _ in w]
        next_group += len(chosen)
    return indices, counts, torch.tensor(group, dtype=torch.long)


@torch.no_grad()
def gto_experience(
    worker,
    config,
    batch: dict[str, torch.Tensor],
    drafter: Eagle3Drafter,
    reference: Eagle3Drafter,
    drafter_version: int = 0,
    seed: int = 0,
    shipping: bool = False,
) -> GTOExperience:
    """The GTO experience of one data batch, every tree of every sequence in a few large forwards.

    ``shipping``: in the form a rollout actor ships (``SFTExperience.packed('auto')``'s). Where that
    form carries the target's final-norm states instead of its draft-vocabulary logits, the dense
    [B, T, Vd] logits (2 GB at 32 x 1024 tokens and 32k draft ids, in bf16) are never made."""
    gto = config.gto
    device = worker.target.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    lengths = [int(n) for n in attention_mask.sum(-1).tolist()]
    windows = batch_windows(batch["loss_mask"].cpu(), lengths, gto, seed)  # host-side choices
    slots = gto.groups_per_sequence * gto.group_size
    indices, counts, groups = position_slots(windows, slots)

    head = worker.draft_head()
    read = read_row_ids(loss_mask, attention_mask) if shipping else None
    ships_hidden = shipping and head is not None and hidden_is_smaller(read.numel(), head)
    options = replace(batched_tree_options(gto), draft_logits=not ships_hidden)
    was_training = (drafter.training, reference.training)
    drafter.eval(), reference.eval()
    try:
        forward = worker.fused if gto.target_forward == "fused" else worker.fast
        trees = score_trees_at_positions(
            forward, drafter, reference, input_ids, lengths, indices, counts, worker.draft_to_target, options,
        )
    finally:
        drafter.train(was_training[0]), reference.train(was_training[1])

    sft = SFTExperience(
        input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
        aux_hidden=trees.aux_hidden, target_draft_logits=trees.target_draft_logits,
        target_top1=trees.target_top1, drafter_version=drafter_version,
        # shipped instead of the logits (SFTExperience.packed): the learner redoes this product
        target_hidden=None if head is None else trees.target_hidden,
        draft_head=head,
    )
    if ships_hidden:  # packed('auto')'s result, made from the hidden states alone
        sft = sft.packed_as_hidden(read)
    elif shipping:
        sft = sft.packed()
    used = torch.arange(slots)[None] < torch.tensor(counts)[:, None]  # [B, P] on the host
    used = used.to(device)
    rows = {
        "sequence": torch.arange(len(lengths), device=device)[:, None].expand(-1, slots)[used],
        "index": indices.to(device)[used],
        "group": groups.to(device),
        "path_ids": trees.path_ids[used],
    }
    for key in ("path_length", "reward", "reference_reward", "expected_length",
                "reference_expected_length", "rollout_path_logprob", "reference_path_logprob"):
        rows[key] = getattr(trees, key)[used]
    return _finish(sft, rows, reference, gto, drafter_version)


def _finish(sft: SFTExperience, rows: dict[str, torch.Tensor], reference: Eagle3Drafter, gto,
            drafter_version: int) -> GTOExperience:
    """The experience from its per-position rows; unless the rows bring it, the reference
    drafter's log-probability of each accepted path is one batched replay over the whole batch."""
    device = sft.input_ids.device
    if rows["index"].numel() == 0:
        empty = torch.zeros(0, device=device)
        fields = {key: empty.long() if key in ("sequence", "index", "group", "path_length") else empty
                  for key in rows}
        fields["path_ids"] = torch.zeros(0, gto.training_depth, dtype=torch.long, device=device)
        fields["reference_path_logprob"] = empty
        return GTOExperience(sft=sft, drafter_version=drafter_version, **fields)
    if "reference_path_logprob" not in rows:
        rows["reference_path_logprob"] = path_logprob(
            reference, sft.input_ids, sft.attention_mask, sft.aux_hidden,
            rows["sequence"], rows["index"], rows["path_ids"], rows["path_length"],
        )
    return GTOExperience(sft=sft, drafter_version=drafter_version, **rows)


@torch.no_grad()
def per_sequence_gto_experience(
    worker,
    config,
    batch: dict[str, torch.Tensor],
    drafter: Eagle3Drafter,
    reference: Eagle3Drafter,
    drafter_version: int = 0,
    seed: int = 0,
) -> GTOExperience:
    """The reference implementation: one target prefill per sequence, then a loop over chunks of
    ``positions_per_forward`` positions (``speculative.position_trees``). Slow; tests hold
    ``gto_experience`` to it field by field."""
    gto = config.gto
    trees = tree_config(gto)
    nodes, _ = tree_size(trees, drafter.config.draft_vocab_size)
    chunk = gto.positions_per_forward
    device = worker.target.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    n_seq, width = input_ids.shape
    generator = torch.Generator().manual_seed(seed)  # the same draws as ``batch_windows``
    d2t = worker.draft_to_target
    fast = worker.fast

    aux = top1 = draft_logits = None
    rows: dict[str, list[torch.Tensor]] = {key: [] for key in (
        "sequence", "index", "group", "path_ids", "path_length", "reward", "reference_reward",
        "expected_length", "reference_expected_length", "rollout_path_logprob",
    )}
    groups_so_far = 0
    was_training = (drafter.training, reference.training)
    drafter.eval(), reference.eval()
    try:
        for s in range(n_seq):
            length = int(attention_mask[s].sum())
            ids = input_ids[s, :length]
            seq = prefill_sequence(fast, ids, room=2 * chunk * nodes)
            if aux is None:
                aux = seq.aux_hidden.new_zeros(n_seq, width, seq.aux_hidden.shape[-1])
                draft_logits = seq.logits.new_zeros(n_seq, width, d2t.shape[0])
                top1 = torch.zeros(n_seq, width, dtype=torch.long, device=device)
            aux[s, :length] = seq.aux_hidden
            draft_logits[s, :length] = seq.logits[:, d2t]
            top1[s, :length] = seq.logits.argmax(-1)

            windows = choose_windows(
                valid_indices(loss_mask[s], length), gto.group_size, gto.groups_per_sequence, generator
            )
            if not windows:
                continue
            indices = torch.tensor([t for w in windows for t in w], device=device)
            group = torch.tensor(
                [groups_so_far + g for g, w in enumerate(windows) for _ in w], device=device
            )
            groups_so_far += len(windows)
            current_prefix = drafter_prefix(drafter, ids, seq.aux_hidden)
            reference_prefix = drafter_prefix(reference, ids, seq.aux_hidden)
            for start in range(0, indices.shape[0], chunk):
                idx = indices[start : start + chunk]
                tree = build_trees_at(drafter, current_prefix, idx, trees)
                ref_tree = build_trees_at(reference, reference_prefix, idx, trees)
                # Both drafters' trees in one packed target forward.
                logits = verify_trees_at(fast, seq, _stack(tree, ref_tree), torch.cat([idx, idx]))
                logits, ref_logits = logits[: idx.shape[0]], logits[idx.shape[0] :]
                temperature, aggregation = gto.reward_scoring()
                score = score_tree(tree, logits, temperature, gto.eta, aggregation)
                ref_score = score_tree(ref_tree, ref_logits, temperature, gto.eta, aggregation)
                path_ids, path_nodes, path_length = greedy_accepted_path(tree, logits, trees.depth)
                on_path = path_nodes >= 0
                logprob = tree.logprobs.gather(1, path_nodes.clamp_min(0))
                rows["sequence"].append(torch.full_like(idx, s))
                rows["index"].append(idx)
                rows["group"].append(group[start : start + chunk])
                rows["path_ids"].append(path_ids)
                rows["path_length"].append(path_length)
                rows["reward"].append(score.reward)
                rows["reference_reward"].append(ref_score.reward)
                rows["expected_length"].append(score.expected_length)
                rows["reference_expected_length"].append(ref_score.expected_length)
                rows["rollout_path_logprob"].append((logprob * on_path).sum(-1))
    finally:
        drafter.train(was_training[0]), reference.train(was_training[1])

    sft = SFTExperience(
        input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, aux_hidden=aux,
        target_draft_logits=draft_logits, target_top1=top1, drafter_version=drafter_version,
    )
    merged = {key: torch.cat(value) if value else torch.zeros(0, device=device) for key, value in rows.items()}
    return _finish(sft, merged, reference, gto, drafter_version)


def _stack(a, b):
    """Two DraftTrees of the same node count as one batch (for one packed verification)."""
    from dataclasses import fields as dc_fields

    merged = {}
    for f in dc_fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("draft_to_target", "sampled"):
            merged[f.name] = x
        elif f.name == "dists":
            merged[f.name] = None  # different shapes are possible; not needed for verification
        else:
            merged[f.name] = torch.cat([x, y])
    return replace(a, **merged)
