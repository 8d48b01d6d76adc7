"""GTO's trees at every chosen position of every sequence of a batch, in a few large forwards.

``speculative.position_trees`` scores the trees of one sequence at a time: one prefill, then a
Python loop over chunks of positions. That keeps a 135M target at well under 1 % of what the GPU
does for a prefill (issue 17), because every call is small. Here the same trees come out of a
handful of calls whose sizes grow with the batch:

1. **Target prefill** of ``S`` sequences at once ([S, T], right-padded): the learner's features
   (aux hidden states, draft-vocabulary logits, top-1) and the target's KV cache, which keeps
   room for tree nodes behind the T slots. Computed once; the trees and the learner share it.
2. **Drafter step 1** over [S, T] for each drafter: the keys every tree of a sequence attends to,
   and the drafter's output at every root.
3. **Tree search for all S x P roots at once** per drafter (``grow_draft_tree``, unchanged): row
   (s, p) attends to sequence s's step-1 keys up to its root index plus its own tree entries.
   The prefix part is one [S, heads, P*w, T] product (queries of one sequence share its keys),
   the tree part one [S*P, heads, w, F] product; a joint softmax over both is exact.
4. **Verification**: per chunk of C positions, S x (C current + C reference trees) x N nodes in
   one target forward behind the prefix slots (a node sees its sequence up to its root, and
   its ancestors). Each forward's [.., V] logits are reduced at once to what scoring reads
   (``speculative.tree_reward.log_acceptance``), so the full logits never pile up.
5. **Scoring** of all trees of the chunk of sequences in one call.

Shapes come from a few sizes, not from every value: the prefill width is rounded up to
``length_multiple``; a verification forward's packed width and prefix cut (they depend on the
trees and roots) to ``verify_width_multiple`` and ``verify_prefix_multiple``, so forwards meet a
handful of attention shapes again and again (cuDNN builds an execution graph per new shape: 41 ms
against 1.4 ms a repeated call on an H200, ``bench/sdpa_shape_cost.py``). Sequences are processed
longest first so that a chunk's padded width fits its members; results come back in batch order.

Index convention (``speculative.position_trees``): "position t" is the state after the target
read x_0..x_t; the tree's root is x_{t+1} at position t+1, and its nodes draft x_{t+2}, ...
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from speculative.drafter import Eagle3Drafter
from speculative.fused_llama import FusedLlama
from speculative.llama import FastLlama, causal_slot_mask
from speculative.packed_verification import (
    TargetAtTrees,
    TreeNodes,
    pack_tree_pairs,
    packed_width,
    verify_packed,
)
from speculative.rooted_attention import prefix_block_mask, rooted_attention, rooted_attention_flex
from speculative.tree import DraftTree, TreeConfig, grow_draft_tree, tree_size
from speculative.tree_reward import AGGREGATIONS, accepted_path, log_acceptance, score_log_acceptance


@dataclass(frozen=True)
class BatchedTreeOptions:
    """How the batched scorer builds, verifies and scores trees (``config.gto`` maps onto it)."""

    tree: TreeConfig
    reward_temperature: float = 1.0
    eta: float = 1.0
    aggregation: str = "lse"
    sequences_per_forward: int = 16  # S: sequences in one prefill / tree search / verification
    positions_per_forward: int = 8  # C: positions of each sequence per verification forward
    length_multiple: int = 64  # pad each chunk's width to a multiple (a few static shapes)
    # verification forwards: the packed width and the prefix cut rounded up to these multiples, so
    # forwards repeat a few attention shapes (cuDNN builds a graph per new shape: ~40 ms on an H200)
    verify_width_multiple: int = 128
    verify_prefix_multiple: int = 256
    share_nodes: bool = True  # verify a reference node once when the current tree has it too
    verify_leaves: bool = False  # also feed leaves to the target (their logits are never read)
    tree_autocast: bool = False  # grow trees under bf16 autocast (the drafter's served precision)
    tree_attention: str = "eager"  # the trees' rooted attention: eager or flex (speculative.rooted_attention)
    reference_path_fp32: bool = False  # replay the reference's log q(path) in fp32 even when trees are bf16
    # the dense [B, T, Vd] target_draft_logits; False: an empty [B, T, 0] (an experience that ships the
    # final-norm hidden states instead, and the learner redoes the product: ``SFTExperience.packed``)
    draft_logits: bool = True

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if min(self.sequences_per_forward, self.positions_per_forward, self.length_multiple,
               self.verify_width_multiple, self.verify_prefix_multiple) < 1:
            raise ValueError(f"chunk sizes must be >= 1: {self}")


@dataclass
class BatchedTrees:
    """Everything GTO keeps of a batch: the learner's features and, per (sequence, position
    slot) [B, P], the two trees' scores and the current tree's greedy-accepted path. Slots
    without a position (``indices`` padding) hold zeros."""

    aux_hidden: torch.Tensor  # [B, T, n_aux * H] (0 past each sequence's length)
    target_draft_logits: torch.Tensor  # [B, T, Vd] ([B, T, 0] unless options.draft_logits)
    target_top1: torch.Tensor  # [B, T]
    target_hidden: torch.Tensor  # [B, T, H] final-norm hidden: target_draft_logits = its lm_head at the draft ids
    reward: torch.Tensor  # [B, P]
    reference_reward: torch.Tensor  # [B, P]
    expected_length: torch.Tensor  # [B, P]
    reference_expected_length: torch.Tensor  # [B, P]
    path_ids: torch.Tensor  # [B, P, depth] draft ids, 0-padded
    path_length: torch.Tensor  # [B, P]
    rollout_path_logprob: torch.Tensor  # [B, P] log q(path) under the current drafter
    reference_path_logprob: torch.Tensor  # [B, P] log q0(path) under the reference drafter
    verified_nodes: int = 0  # tree slots the target verified (padding slots included)
    shared_nodes: int = 0  # reference-tree nodes read from the current tree's rows


class _SequenceKeys:
    """Drafter attention for step 1: causal over one padded batch of sequences, fp32 like
    ``MaskedKVCache``; keeps the keys/values that every tree of a sequence attends to."""

    keys: torch.Tensor
    values: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.keys, self.values = k, v
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        return out.to(q.dtype)


class RootedTreeCache:
    """Drafter attention for S*P tree rows grown together: row r = (s, p) sees sequence s's
    step-1 keys at indices <= its root index ``roots [S, P]`` and the entries of its own tree that
    ``tree_mask [S*P, w, F]`` allows (set before each call). The two parts are scored separately
    and normalised together (``speculative.rooted_attention``), fp32 as ``MaskedKVCache``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, roots: torch.Tensor, attention: str = "eager"):
        if attention not in ("eager", "flex"):
            raise ValueError(f"rooted attention is 'eager' or 'flex', got {attention!r}")
        self.prefix_keys = keys.float()  # [S, h, T, d]
        self.prefix_values = values.float()
        self.roots = roots  # [S, P]: row (s, p) sees indices <= roots[s, p]
        self.attention = attention
        self.tree_keys: torch.Tensor | None = None  # [S*P, h, F, d]
        self.tree_values: torch.Tensor | None = None
        self.tree_mask: torch.Tensor | None = None
        self._visible: torch.Tensor | None = None
        self._prefix_masks: dict[int, object] = {}  # flex block masks by tree width

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.tree_keys = k if self.tree_keys is None else torch.cat([self.tree_keys, k], dim=-2)
        self.tree_values = v if self.tree_values is None else torch.cat([self.tree_values, v], dim=-2)
        tree = (self.tree_keys, self.tree_values, self.tree_mask)
        if self.attention == "flex" and not torch.is_grad_enabled():
            width = q.shape[2]
            if width not in self._prefix_masks:
                self._prefix_masks[width] = prefix_block_mask(self.roots, width, self.prefix_keys.shape[-2])
            out = rooted_attention_flex(q, self.prefix_keys, self.prefix_values, *tree, self._prefix_masks[width])
        else:  # eager (also whenever gradients flow: the learner's replay; no CPU backward for flex)
            if self._visible is None:
                length = self.prefix_keys.shape[-2]
                self._visible = torch.arange(length, device=self.roots.device)[None, None] <= self.roots[..., None]
            out = rooted_attention(q, self.prefix_keys, self.prefix_values, *tree[:2], self._visible, tree[2])
        return out.to(q.dtype)


@dataclass
class RootedStepOne:
    """A drafter's step 1 over S sequences, seen from P roots each: what every tree (and every
    replayed path) of those roots starts from."""

    keys: torch.Tensor  # [S, h, T, d] step-1 keys of every index
    values: torch.Tensor
    indices: torch.Tensor  # [S, P] root indices t (the root token x_{t+1} sits at t + 1)
    root_logits: torch.Tensor  # [S*P, Vd] the drafter at index t: its distribution over x_{t+2}
    root_hidden: torch.Tensor  # [S*P, H] its pre-norm output there

    def cache(self, attention: str = "eager") -> RootedTreeCache:
        return RootedTreeCache(self.keys, self.values, self.indices, attention)


def drafter_step_one(
    drafter: Eagle3Drafter, input_ids: torch.Tensor, aux_hidden: torch.Tensor, indices: torch.Tensor
) -> RootedStepOne:
    """Index t feeds x_{t+1} at position t+1 with fc(aux_t), causally (TTT step 1 = inference),
    for every sequence of ``input_ids [S, T]`` at once; kept at the roots ``indices [S, P]``.
    Differentiable (the learner's path replay); the tree search calls it under no_grad."""
    seqs, length = input_ids.shape
    tokens = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last index has no next token
    positions = torch.arange(1, length + 1, device=input_ids.device).expand(seqs, length)
    cache = _SequenceKeys()
    hidden = drafter.hidden_step(tokens, drafter.fuse_target_hidden(aux_hidden), positions, cache)
    rows = torch.arange(seqs, device=input_ids.device)[:, None]
    root_hidden = hidden[rows, indices].flatten(0, 1)
    # logits at the roots only: the lm_head over every index cost 8x the rows (32k x 32 000 a drafter)
    return RootedStepOne(cache.keys, cache.values, indices, drafter.draft_logits(root_hidden), root_hidden)


@torch.no_grad()
def grow_trees_at(drafter: Eagle3Drafter, step_one: RootedStepOne, config: TreeConfig,
                  attention: str = "eager") -> DraftTree:
    """One tree per root (tree row s*P + p), all grown together; the same trees as
    ``speculative.position_trees.build_trees_at`` per sequence. ``attention``: how the rows
    attend (``speculative.rooted_attention``: eager or flex)."""
    cache = step_one.cache(attention)

    def feed(ids, hidden, pos, tree_mask):
        cache.tree_mask = tree_mask
        return drafter(ids, hidden, pos, cache)

    tree, closed = grow_draft_tree(
        drafter, feed, step_one.root_logits, step_one.root_hidden, (step_one.indices + 1).reshape(-1),
        config, keep_dists=False,
    )
    if not bool(closed):
        raise RuntimeError("draft tree selection is not ancestor-closed")
    return tree


def path_logprob_at(
    drafter: Eagle3Drafter, step_one: RootedStepOne, path_ids: torch.Tensor, path_length: torch.Tensor
) -> torch.Tensor:
    """log q(path) [S*P] of each root's path (draft ids ``path_ids [S*P, D]``, the first
    ``path_length`` count) under ``drafter``: ``speculative.ttt.path_logprob``'s chain, replayed
    at the roots only (width-1 steps over the step-1 keys) instead of at every index.
    Differentiable; the rollouts call it under no_grad."""
    total = torch.zeros(path_ids.shape[0], device=path_ids.device)
    steps = int(path_length.max()) if path_length.numel() else 0
    if steps == 0:
        return total
    cache = step_one.cache()
    logits, hidden = step_one.root_logits, step_one.root_hidden
    roots = (step_one.indices + 1).reshape(-1, 1)
    for k in range(steps):
        if k > 0:  # feed the path's (k-1)th node at its position, after its ancestors
            cache.tree_mask = torch.ones(path_ids.shape[0], 1, k, dtype=torch.bool, device=path_ids.device)
            out, prenorm = drafter(drafter.to_target_ids(path_ids[:, k - 1 : k]), hidden[:, None], roots + k, cache)
            logits, hidden = out[:, 0], prenorm[:, 0]
        step = torch.log_softmax(logits.float(), dim=-1).gather(1, path_ids[:, k : k + 1]).squeeze(1)
        total = total + step * (k < path_length)
    return total


def rooted_path_logprob(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    aux_hidden: torch.Tensor,
    sequence: torch.Tensor,
    index: torch.Tensor,
    path_ids: torch.Tensor,
    path_length: torch.Tensor,
) -> torch.Tensor:
    """``speculative.ttt.path_logprob`` for flat chains (chain i at index ``index[i]`` of sequence
    ``sequence[i]``, right-padded ``input_ids [B, T]``), differentiable: what the GTO learner
    differentiates. The TTT replay runs every draft step at all B x T indices (and its lm_head over
    all of them) to read P of them; here only step 1 covers every index, as the tree search's does,
    and the later steps run at the P roots alone (``path_logprob_at``)."""
    if path_ids.shape[0] == 0 or int(path_length.max()) == 0:
        return torch.zeros(path_ids.shape[0], device=path_ids.device)
    seqs = input_ids.shape[0]
    counts = torch.bincount(sequence, minlength=seqs)
    width = int(counts.max())
    # each chain's slot among its sequence's chains, in input order: a rectangular [B, width] grid
    order = torch.argsort(sequence, stable=True)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(sequence)
    slot[order] = torch.arange(sequence.numel(), device=sequence.device) - first[sequence[order]]
    indices = torch.zeros(seqs, width, dtype=index.dtype, device=index.device)
    indices[sequence, slot] = index
    grid_ids = torch.zeros(seqs, width, path_ids.shape[1], dtype=path_ids.dtype, device=path_ids.device)
    grid_ids[sequence, slot] = path_ids
    grid_length = torch.zeros(seqs, width, dtype=path_length.dtype, device=path_length.device)
    grid_length[sequence, slot] = path_length  # empty slots: length 0, nothing summed
    step_one = drafter_step_one(drafter, input_ids, aux_hidden, indices)
    total = path_logprob_at(drafter, step_one, grid_ids.flatten(0, 1), grid_length.flatten())
    return total.view(seqs, width)[sequence, slot]


@torch.no_grad()
def score_trees_at_positions(
    fast: FastLlama | FusedLlama,
    drafter: Eagle3Drafter,
    reference: Eagle3Drafter,
    input_ids: torch.Tensor,
    lengths: list[int],
    indices: torch.Tensor,
    counts: list[int],
    draft_to_target: torch.Tensor,
    options: BatchedTreeOptions,
) -> BatchedTrees:
    """Build, verify and score both drafters' trees at ``indices [B, P]`` of ``input_ids [B, T]``.

    Sequence b holds ``lengths[b]`` real tokens (right-padded) and ``counts[b]`` positions, in
    ``indices[b, :counts[b]]`` (each t <= length - 3, so that x_{t+2} exists); the rest of a row
    is padding and comes back as zeros. Drafters run in their own dtype, the target in its own.
    ``fast`` is the target's forward: ``FusedLlama`` (a third of ``FastLlama``'s kernels a layer,
    a flash-attention prefill) or ``FastLlama`` (the reference the per-sequence path runs).
    """
    device = fast.device
    batch, width = input_ids.shape
    positions_per_seq = indices.shape[1]
    tree_cfg = options.tree
    n_nodes, _ = tree_size(tree_cfg, drafter.config.draft_vocab_size)
    depth = tree_cfg.depth
    chunk_pos = options.positions_per_forward
    vocab_map = draft_to_target.to(device)
    host_indices = indices.cpu()  # root positions known on the host: no sync to size a forward
    indices = indices.to(device)

    out = _empty_result(batch, width, positions_per_seq, depth, drafter, fast,
                        vocab_map.shape[0] if options.draft_logits else 0, device)
    shared = torch.zeros((), dtype=torch.long, device=device)  # summed on the device, read once
    order = sorted(range(batch), key=lambda b: -lengths[b])  # longest first: tight chunk widths
    for start in range(0, batch, options.sequences_per_forward):
        members = order[start : start + options.sequences_per_forward]
        rows = torch.tensor(members, device=device)
        chunk_len = max(lengths[b] for b in members)
        padded = _round_up(max(chunk_len, 1), options.length_multiple)
        used = max(counts[b] for b in members)
        span = _round_up(used, chunk_pos)  # position slots worth verifying in this chunk
        room = packed_width(chunk_pos, n_nodes, options.verify_width_multiple) if used else 0
        ids = torch.zeros(len(members), padded, dtype=input_ids.dtype, device=device)
        copy = min(padded, width)
        ids[:, :copy] = input_ids[rows, :copy].to(device)

        # 1. Target prefill: the learner's features and the cache the trees are verified against.
        cache = fast.new_cache(len(members), padded + room)
        seq_pos = torch.arange(padded, device=device)
        with record_function("gto/prefill"):  # FusedLlama: causal within the chunk (flash), no mask
            mask = None if isinstance(fast, FusedLlama) else causal_slot_mask(0, padded, padded, len(members),
                                                                              device=device)
            prefill = fast(ids, seq_pos.expand(len(members), padded), cache, 0, mask)  # logits and final states
        real = (seq_pos[None] < torch.tensor([lengths[b] for b in members], device=device)[:, None])
        real = real[:, :copy]
        logits = prefill.logits[:, :copy]
        out.aux_hidden[rows, :copy] = torch.where(real[..., None], prefill.aux_hidden[:, :copy], 0)
        out.target_hidden[rows, :copy] = torch.where(real[..., None], prefill.hidden[:, :copy], 0)
        if options.draft_logits:
            out.target_draft_logits[rows, :copy] = torch.where(real[..., None], logits[..., vocab_map], 0)
        out.target_top1[rows, :copy] = torch.where(real, logits.argmax(-1), 0)
        if not used:
            continue
        # [S, span]; padding slots index 0 (computed, then dropped). span may exceed P.
        keep = min(span, positions_per_seq)
        idx = torch.zeros(len(members), span, dtype=torch.long, device=device)
        idx[:, :keep] = indices[rows, :keep]
        seq_rows = torch.arange(len(members), device=device)[:, None]
        root_logits = prefill.logits[seq_rows, idx + 1]  # [S, span, V]: the target at each root
        aux = prefill.aux_hidden
        del prefill, logits

        # 2-3. Both drafters' step 1 and all their trees.
        trees, step_ones = [], []
        with record_function("gto/trees"), torch.autocast(device.type, dtype=torch.bfloat16,
                                                          enabled=options.tree_autocast):
            for model in (drafter, reference):
                step_ones.append(drafter_step_one(model, ids, aux, idx))
                trees.append(grow_trees_at(model, step_ones[-1], tree_cfg, options.tree_attention))
        current, ref = trees
        in_fp32 = options.tree_autocast and options.reference_path_fp32  # else at the trees' precision
        ref_step_one = None if in_fp32 else step_ones[1]  # reused by the path replay
        del step_ones

        # 4. Verification, C positions of every sequence per forward.
        *at, verified, chunk_shared = verify_position_chunks(
            fast, cache, current, ref, idx, host_indices[members], root_logits, padded, positions_per_seq, options,
            observer=_VERIFY_OBSERVER)
        out.verified_nodes += verified
        shared = shared + chunk_shared

        # 5. Scoring.
        scores = [_score(tree, target_at, options) for tree, target_at in zip((current, ref), at)]
        greedy = log_acceptance(current, at[0].token_logit, None, at[0].argmax, 0.0)
        path_ids, path_nodes, path_length = accepted_path(current, greedy, depth)
        logprob = (current.logprobs.gather(1, path_nodes.clamp_min(0)) * (path_nodes >= 0)).sum(-1)
        view = (len(members), span)
        out.reward[rows, :keep] = scores[0].reward.view(view)[:, :keep]
        out.reference_reward[rows, :keep] = scores[1].reward.view(view)[:, :keep]
        out.expected_length[rows, :keep] = scores[0].expected_length.view(view)[:, :keep]
        out.reference_expected_length[rows, :keep] = scores[1].expected_length.view(view)[:, :keep]
        out.path_ids[rows, :keep] = path_ids.view(*view, depth)[:, :keep]
        out.path_length[rows, :keep] = path_length.view(view)[:, :keep]
        out.rollout_path_logprob[rows, :keep] = logprob.view(view)[:, :keep]
        # The PPO ratio's denominator: the reference drafter along the current tree's path, at the
        # trees' precision from their step 1 (bf16 trees: as the learner's bf16 numerator rounds;
        # on CPU both replays under bf16 were 0.02 nats apart and 0.10 from fp32), or in fp32.
        with record_function("gto/reference_path_logprob"), torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=options.tree_autocast and not in_fp32):
            if ref_step_one is None:
                ref_step_one = drafter_step_one(reference, ids, aux, idx)
            ref_logprob = path_logprob_at(reference, ref_step_one, path_ids, path_length)
            del ref_step_one
        out.reference_path_logprob[rows, :keep] = ref_logprob.view(view)[:, :keep]
        del aux

    out.shared_nodes = int(shared)
    # Padding slots were computed with index 0: zero them.
    slot = torch.arange(positions_per_seq, device=device)[None]
    pad = slot >= torch.tensor(counts, device=device)[:, None]
    for name in ("reward", "reference_reward", "expected_length", "reference_expected_length",
                 "path_length", "rollout_path_logprob", "reference_path_logprob"):
        getattr(out, name).masked_fill_(pad, 0)
    out.path_ids.masked_fill_(pad[..., None], 0)
    return out


@torch.no_grad()
def verify_position_chunks(
    fast: FastLlama | FusedLlama,
    cache,
    current: DraftTree,
    ref: DraftTree,
    idx: torch.Tensor,
    host_idx: torch.Tensor,
    root_logits: torch.Tensor,
    padded: int,
    positions_per_seq: int,
    options: BatchedTreeOptions,
    observer=None,
) -> tuple[TargetAtTrees, TargetAtTrees, int, torch.Tensor]:
    """Step 4 of ``score_trees_at_positions`` for one chunk of S sequences: verify the trees of
    ``current`` and ``ref`` (rows s * span + p) at the roots ``idx [S, span]`` (on the host:
    ``host_idx [S, >= P]``) in forwards of C = ``options.positions_per_forward`` positions of
    every sequence each, behind the prefill in ``cache`` (``padded`` slots; room for
    ``packed_width(C, N, options.verify_width_multiple)`` more). ``root_logits [S, span, V]``: the target at each root.

    Per forward and sequence: the C current trees, then the reference trees' nodes that the
    current ones lack. Position chunks go last to first. A sequence's roots only grow along its
    slots (its padding slots, index 0, come last), so a forward may overwrite the cache slots past
    the largest root any sequence has in this or an earlier chunk (no later forward reads them)
    and attend to a prefix cut there instead of the full width.

    Returns what scoring reads for the current and the reference trees ([S * span] rows), the
    target slots fed (padding included) and the reference nodes read from current rows (0-d).
    ``observer`` (``observing_verification``; None in training) sees the chunk before the first
    forward (``begin``) and every forward's inputs and results (``forward``)."""
    device = idx.device
    seqs, span = idx.shape
    chunk_pos = options.positions_per_forward
    if span % chunk_pos:
        raise ValueError(f"{span} position slots do not split into forwards of {chunk_pos}")
    seq_rows = torch.arange(seqs, device=device)[:, None]
    at = [_allocate_target_at(seqs * span, current.num_nodes, root_logits, options) for _ in range(2)]
    verified, shared = 0, torch.zeros((), dtype=torch.long, device=device)
    if observer is not None:
        observer.begin(fast=fast, cache=cache, current=current, ref=ref, idx=idx, host_idx=host_idx,
                       root_logits=root_logits, padded=padded, positions_per_seq=positions_per_seq,
                       options=options)
    for first in reversed(range(0, span, chunk_pos)):
        slots = torch.arange(first, first + chunk_pos, device=device)
        tree_rows = (seq_rows * span + slots[None]).reshape(-1)  # [S*C], sequence-major
        pair = (_nodes(current, tree_rows, seqs), _nodes(ref, tree_rows, seqs))
        needed = host_idx[:, : min(first + chunk_pos, positions_per_seq)]
        prefix = min(padded, _round_up(int(needed.max()) + 2, options.verify_prefix_multiple))
        roots = idx[:, first : first + chunk_pos] + 1
        with record_function("gto/pack"):
            packed = pack_tree_pairs(*pair, roots, prefix, dedupe=options.share_nodes,
                                     multiple=options.verify_width_multiple, max_depth=options.tree.depth,
                                     feed_leaves=options.verify_leaves)
        root_chunk = root_logits[:, first : first + chunk_pos]
        with record_function("gto/verify"):
            found = verify_packed(fast, cache, prefix, packed, pair, root_chunk, options.reward_temperature)
        for target_at, part in zip(at, found):
            _store(target_at, tree_rows, part)
        verified += int(packed.tokens.numel())
        shared = shared + packed.shared
        if observer is not None:
            observer.forward(first=first, prefix=prefix, roots=roots, pair=pair, packed=packed,
                             root_logits=root_chunk, found=found)
    return at[0], at[1], verified, shared


# The observer ``verify_position_chunks`` reports to inside ``score_trees_at_positions`` (None:
# nobody watches; set only by ``observing_verification``, e.g. by bench/gto_verify_profile.py).
_VERIFY_OBSERVER = None


@contextlib.contextmanager
def observing_verification(observer):
    """Inside the block, ``score_trees_at_positions`` hands every chunk's verification inputs and
    every forward's inputs and results to ``observer`` (``begin(**chunk)``, ``forward(**one)``),
    so a bench can replay the very forwards a GTO batch ran. Nothing changes what is computed."""
    global _VERIFY_OBSERVER
    previous, _VERIFY_OBSERVER = _VERIFY_OBSERVER, observer
    try:
        yield observer
    finally:
        _VERIFY_OBSERVER = previous


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _empty_result(batch, width, positions, depth, drafter, fast, draft_vocab: int, device) -> BatchedTrees:
    hidden = len(fast.aux_layer_ids) * fast.config.hidden_size
    per_slot = lambda dtype=torch.float32: torch.zeros(batch, positions, dtype=dtype, device=device)  # noqa: E731
    return BatchedTrees(
        aux_hidden=torch.zeros(batch, width, hidden, dtype=fast.dtype, device=device),
        target_draft_logits=torch.zeros(batch, width, draft_vocab, dtype=fast.dtype, device=device),
        target_top1=torch.zeros(batch, width, dtype=torch.long, device=device),
        target_hidden=torch.zeros(batch, width, fast.config.hidden_size, dtype=fast.dtype, device=device),
        reward=per_slot(), reference_reward=per_slot(), expected_length=per_slot(),
        reference_expected_length=per_slot(),
        path_ids=torch.zeros(batch, positions, depth, dtype=torch.long, device=device),
        path_length=per_slot(torch.long), rollout_path_logprob=per_slot(), reference_path_logprob=per_slot(),
    )


def _nodes(tree: DraftTree, rows: torch.Tensor, seqs: int) -> TreeNodes:
    """Trees at ``rows`` (sequence-major) as [S, C, ...] for packing."""
    shape = (seqs, -1, tree.num_nodes)
    return TreeNodes(tokens=tree.tokens[rows].view(shape), parents=tree.parents[rows].view(shape),
                     depths=tree.depths[rows].view(shape), mask=tree.mask[rows].view(*shape, tree.num_nodes))


def _allocate_target_at(rows: int, n_nodes: int, like: torch.Tensor, options: BatchedTreeOptions) -> TargetAtTrees:
    device = like.device
    return TargetAtTrees(
        token_logit=torch.zeros(rows, n_nodes, dtype=like.dtype, device=device),
        log_norm=torch.zeros(rows, 1 + n_nodes, device=device) if options.reward_temperature > 0 else None,
        argmax=torch.zeros(rows, 1 + n_nodes, dtype=torch.long, device=device),
    )


def _store(target_at: TargetAtTrees, rows: torch.Tensor, part: TargetAtTrees) -> None:
    target_at.token_logit[rows] = part.token_logit
    target_at.argmax[rows] = part.argmax
    if part.log_norm is not None:
        target_at.log_norm[rows] = part.log_norm


def _score(tree: DraftTree, target_at: TargetAtTrees, options: BatchedTreeOptions):
    log_accept = log_acceptance(
        tree, target_at.token_logit, target_at.log_norm, target_at.argmax, options.reward_temperature
    )
    return score_log_acceptance(tree, log_accept, options.eta, options.aggregation)
