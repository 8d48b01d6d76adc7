"""Verify two drafters' trees at many positions of many sequences in one target forward.

GTO verifies, at every position, the current drafter's tree A and the reference drafter's tree
B. Both hang from the same root, and the reference starts as a copy of the current drafter and
moves away slowly, so most of B's nodes are nodes of A: the same token path from the same root
means the same target context, hence the same logits. Packing therefore lays out, per sequence,
the C trees A (C * N slots) and behind them only B's nodes that A lacks (padded to the chunk's
longest such list), and B's matched nodes read A's rows. At M = M0 that halves the work, and
the two trees' rewards are bit-for-bit equal by construction.

The target's logits are only ever read at a node's parent (``speculative.tree_reward``): a
node's acceptance is its token's probability under the target at its parent, and the root's
come from the prefill. So a leaf needs no target forward at all (nothing reads its logits, and
no node attends to it): only nodes with children are packed. In a 59-node EAGLE-3 tree most
nodes are leaves, so this is most of the verification work saved. The forward returns hidden
states, and a compact [M, V] logits block is reduced at once to argmax, log-normaliser and the
token logits scoring needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculative.argmax_lse_kernel import argmax_lse
from speculative.batch_cache import BatchKVCache
from speculative.fused_llama import FusedLlama
from speculative.llama import FastLlama, StaticKVCache


@dataclass
class TargetAtTrees:
    """What scoring reads of the verification logits, per tree row (``log_acceptance``'s
    inputs). Rows of nodes without children hold 0: scoring never reads them."""

    token_logit: torch.Tensor  # [R, N] logit of node i's token at its parent's row
    log_norm: torch.Tensor | None  # [R, 1 + N] logsumexp(logits / temperature), row 0 = root
    argmax: torch.Tensor  # [R, 1 + N]


@dataclass
class TreeNodes:
    """The parts of C trees per sequence that packing reads: [S, C, N] (mask [S, C, N, N])."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor


def match_nodes(a: TreeNodes, b: TreeNodes, depth: int) -> torch.Tensor:
    """For every node of B, the node of A on the same token path from the root, else -1 [S, C, N].

    Level by level: a node matches when its token equals an A node's token and their parents
    match (both children of the root, or B's parent matched A's parent). Siblings carry distinct
    tokens, so a match is unique."""
    match = torch.full_like(b.tokens, -1)
    for level in range(1, depth + 1):  # ``depth``: the trees' configured depth (no host sync)
        of_parent = match.gather(-1, b.parents.clamp_min(0))
        # The A node that B's parent matched: -1 for the root, -2 (matches nothing) if none.
        parent_match = torch.where(b.parents < 0, -1, torch.where(of_parent < 0, -2, of_parent))
        same = (b.tokens[..., :, None] == a.tokens[..., None, :]) & (
            parent_match[..., :, None] == a.parents[..., None, :])  # [S, C, N(b), N(a)]
        found = same.any(-1) & (b.depths == level)
        match = torch.where(found, same.int().argmax(-1), match)
    return match


@dataclass
class PackedTrees:
    """One verification forward's layout: per sequence the C trees A, then B's own nodes; only
    nodes with children get a slot. ``slot_a``/``slot_b`` hold ``width`` (one past the last slot)
    for nodes without one: their rows are never read."""

    tokens: torch.Tensor  # [S, Q]
    positions: torch.Tensor  # [S, Q]
    mask: torch.Tensor  # [S, Q, prefix + Q]
    slot_a: torch.Tensor  # [S, C, N] slot of each A node (Q if it has none)
    slot_b: torch.Tensor  # [S, C, N] slot of each B node (an A slot where matched; Q if none)
    has_logits: torch.Tensor  # [S, Q] slots whose logits scoring reads (every slot but padding)
    shared: torch.Tensor  # 0-d: B nodes that read an A node's row


def _has_child(parents: torch.Tensor) -> torch.Tensor:
    n = parents.shape[-1]
    has = torch.zeros(*parents.shape[:-1], n + 1, dtype=torch.bool, device=parents.device)
    has.scatter_(-1, torch.where(parents < 0, n, parents), True)
    return has[..., :n]


def pack_tree_pairs(
    a: TreeNodes, b: TreeNodes, roots: torch.Tensor, prefix_slots: int, dedupe: bool = True,
    multiple: int = 16, max_depth: int | None = None, feed_leaves: bool = False,
) -> PackedTrees:
    """Lay out A's and B's trees rooted at slots ``roots [S, C]`` behind ``prefix_slots`` slots.

    Only nodes whose logits scoring reads are fed: A's nodes with children, plus A nodes that a
    B node with children matched; then B's unmatched nodes with children. A node sees the prefix
    up to its root's slot and its own ancestors (wherever they sit: a new B node's ancestors may
    be A slots; ancestors always have children, so they always have a slot). The width is padded
    to a multiple of ``multiple`` (a few static shapes); padding slots see only themselves and
    are never read. The result is at most ``packed_width(C, N, multiple)`` slots wide.
    ``max_depth``: the trees' depth (from their config), bounds the matching loop.
    ``feed_leaves``: feed every node (the layout before leaves were skipped; to measure the saving).
    """
    seqs, chunk, n = a.tokens.shape
    device = a.tokens.device
    levels = max_depth if max_depth is not None else n  # N bounds the depth too, without a sync
    match = match_nodes(a, b, levels) if dedupe else torch.full_like(b.tokens, -1)
    inner_a, inner_b = _has_child(a.parents), _has_child(b.parents)
    if feed_leaves:
        inner_a, inner_b = torch.ones_like(inner_a), torch.ones_like(inner_b)
    # A nodes whose row a B node with children reads (same path: same hidden state).
    read_by_b = torch.zeros(seqs, chunk, n + 1, dtype=torch.bool, device=device)
    read_by_b.scatter_(-1, torch.where(inner_b & (match >= 0), match, n), True)
    fed_a = (inner_a | read_by_b[..., :n]).reshape(seqs, chunk * n)
    fed_b = ((match < 0) & inner_b).reshape(seqs, chunk * n)
    count_a = fed_a.sum(-1, keepdim=True)
    # The one host sync: the widest sequence's slot count sizes the forward. A multiple of
    # ``multiple`` (static shapes; aligned attention masks), at most ``packed_width(C, N)``:
    # the room a cache keeps for one forward.
    used = int((count_a + fed_b.sum(-1, keepdim=True)).max())
    width = min(_round_up(max(used, 1), multiple), packed_width(chunk, n, multiple))
    slot_a = torch.where(fed_a, fed_a.long().cumsum(-1) - 1, width).view(seqs, chunk, n)
    own_b = torch.where(fed_b, count_a + fed_b.long().cumsum(-1) - 1, width).view(seqs, chunk, n)
    slot_b = torch.where(match >= 0, slot_a.gather(-1, match.clamp_min(0)), own_b)
    fed_a, fed_b = fed_a.view(seqs, chunk, n), fed_b.view(seqs, chunk, n)

    def place(values_a, values_b, fill):
        """[S, Q] with fed A nodes' values at their slots, new B nodes' at theirs, ``fill`` elsewhere."""
        out = torch.full((seqs, width + 1), fill, dtype=values_a.dtype, device=device)  # last: dump
        out.scatter_(1, slot_a.reshape(seqs, -1), values_a.reshape(seqs, -1))
        out.scatter_(1, own_b.reshape(seqs, -1), values_b.reshape(seqs, -1))
        return out[:, :width]

    tokens = place(a.tokens, b.tokens, 0)
    root_slot = place(roots[..., None].expand(seqs, chunk, n), roots[..., None].expand(seqs, chunk, n), -1)
    positions = place(roots[..., None] + a.depths, roots[..., None] + b.depths, 0)

    # Tree part: each fed node's row over its ancestors' slots (A's, or B's own where new).
    cells = width * width
    tree_part = torch.zeros(seqs, cells + 1, dtype=torch.bool, device=device)  # last: a dump cell
    for slots, mask, fed in ((slot_a, a.mask, fed_a), (slot_b, b.mask, fed_b)):
        index = slots[..., :, None] * width + slots[..., None, :]  # [S, C, N, N]
        value = mask & fed[..., None]
        tree_part.scatter_(1, torch.where(value, index, cells).reshape(seqs, -1), True)
    tree_part = tree_part[:, :cells].view(seqs, width, width)
    padding = root_slot < 0
    eye = torch.eye(width, dtype=torch.bool, device=device)
    tree_part = tree_part | (eye[None] & padding[..., None])  # padding slots see themselves only
    prefix = torch.arange(prefix_slots, device=device)[None, None] <= root_slot[..., None]
    mask = torch.cat([prefix, tree_part], dim=-1)
    return PackedTrees(tokens, positions, mask, slot_a, slot_b, ~padding, (match >= 0).sum())


@torch.no_grad()
def verify_packed(
    fast: FastLlama | FusedLlama, cache: StaticKVCache | BatchKVCache, prefix_slots: int, packed: PackedTrees,
    trees: tuple[TreeNodes, TreeNodes],
    root_logits: torch.Tensor, temperature: float,
) -> tuple[TargetAtTrees, TargetAtTrees]:
    """One target forward over ``packed`` behind ``prefix_slots`` cache slots; the root's logits
    ``root_logits [S, C, V]`` come from the prefill. Returns what scoring reads, for A and B,
    as [S*C] tree rows."""
    hidden = fast(packed.tokens, packed.positions, cache, prefix_slots, packed.mask, apply_lm_head=False,
                  aux_hidden=False).hidden
    need = packed.has_logits
    # Logits only where a child reads them, plus one zero row M for every slot without.
    picked = hidden[need]
    logits = fast.lm_head(torch.cat([picked, picked.new_zeros(1, picked.shape[-1])]))  # [M + 1, V]
    del hidden, picked
    rows_with_logits = logits.shape[0] - 1
    compact = torch.where(need, need.reshape(-1).long().cumsum(0).view_as(need) - 1, rows_with_logits)
    compact = torch.cat([compact, compact.new_full((compact.shape[0], 1), rows_with_logits)], dim=1)  # slot Q: none
    vocab = logits.shape[-1]
    # as ``node_log_acceptance``: argmax, and logsumexp of the fp32 logits / temperature (T > 0)
    row_argmax, row_norm = argmax_lse(logits, temperature)  # one read of the logits on CUDA
    root_argmax, root_norm = argmax_lse(root_logits, temperature)  # [S, C]
    flat_logits = logits.reshape(-1)
    seqs, chunk, n = packed.slot_a.shape
    results = []
    for tree, slots in zip(trees, (packed.slot_a, packed.slot_b)):
        rows = compact.gather(1, slots.reshape(seqs, -1)).view(seqs, chunk, n)
        parent_row = torch.where(tree.parents >= 0, rows.gather(-1, tree.parents.clamp_min(0)), rows_with_logits)
        at_node = flat_logits[parent_row * vocab + tree.tokens]
        token_logit = torch.where(tree.parents < 0, root_logits.gather(-1, tree.tokens), at_node)
        argmax = torch.cat([root_argmax[..., None], row_argmax[rows]], dim=-1)
        log_norm = None
        if row_norm is not None:
            log_norm = torch.cat([root_norm[..., None], row_norm[rows]], dim=-1).reshape(seqs * chunk, 1 + n)
        results.append(TargetAtTrees(token_logit.reshape(seqs * chunk, n), log_norm, argmax.reshape(seqs * chunk, 1 + n)))
    return results[0], results[1]


def packed_width(chunk: int, n: int, multiple: int = 16) -> int:
    """The widest packing of C tree pairs of N nodes: nothing shared, rounded up."""
    return _round_up(2 * chunk * n, multiple)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
