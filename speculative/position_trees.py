"""Draft trees at many positions of one teacher-forced sequence, verified by the target in bulk.

GTO scores trees at every position of a group (and for two drafters). Doing that with the
generation engine would cost one target forward per tree; here a sequence is prefilled once and
the trees of many positions are verified together in *one* target forward, packed behind the
sequence in the same KV cache: a node of the tree rooted at token t+1 sees the sequence up to
t+1 and its own ancestors, nothing else. The drafter side is shared the same way: its keys over
the sequence are computed once (step 1 of training-time test) and each tree hides the keys after
its root with a prefix mask.

Index convention (as in ``speculative.ttt``): "position t" is the state after the target read
x_0..x_t; the tree's root is the known next token x_{t+1} at position t+1, and its nodes draft
x_{t+2}, x_{t+3}, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculative.drafter import Eagle3Drafter
from speculative.kv_cache import MaskedKVCache
from speculative.llama import FastLlama, StaticKVCache, causal_slot_mask
from speculative.tree import DraftTree, TreeConfig, build_draft_tree


@dataclass
class PrefilledSequence:
    """One sequence after the target's forward, with its cache kept for packed verification."""

    input_ids: torch.Tensor  # [T]
    logits: torch.Tensor  # [T, V]
    aux_hidden: torch.Tensor  # [T, n_aux * H]
    cache: StaticKVCache  # slots 0..T-1 hold the sequence; the rest is room for tree nodes

    @property
    def length(self) -> int:
        return self.input_ids.shape[0]


@torch.no_grad()
def prefill_sequence(fast: FastLlama, input_ids: torch.Tensor, room: int) -> PrefilledSequence:
    """Target forward over ``input_ids [T]`` into a cache with ``room`` extra slots for trees."""
    length = input_ids.shape[0]
    cache = fast.new_cache(1, length + room)
    out = fast(
        input_ids[None], torch.arange(length, device=input_ids.device)[None], cache, 0,
        causal_slot_mask(0, length, length, device=input_ids.device),
    )
    return PrefilledSequence(input_ids, out.logits[0], out.aux_hidden[0], cache)


@dataclass
class DrafterPrefix:
    """The drafter's step-1 pass over a sequence: keys, and its output at every index."""

    keys: torch.Tensor  # [1, heads, T, d]
    values: torch.Tensor
    logits: torch.Tensor  # [T, Vd] at index t: the distribution over x_{t+2}
    hidden: torch.Tensor  # [T, H] pre-norm output at index t


@torch.no_grad()
def drafter_prefix(drafter: Eagle3Drafter, input_ids: torch.Tensor, aux_hidden: torch.Tensor) -> DrafterPrefix:
    """Index t feeds x_{t+1} at position t+1 with fc(aux_t), causally (TTT step 1 = inference)."""
    length = input_ids.shape[0]
    device = input_ids.device
    cache = MaskedKVCache()
    tokens = torch.cat([input_ids[1:], input_ids[-1:]])  # the last index has no next token
    weight_dtype = drafter.fc.weight.dtype
    logits, hidden = drafter(
        tokens[None], drafter.fuse_target_hidden(aux_hidden[None].to(weight_dtype)),
        torch.arange(1, length + 1, device=device)[None], cache,
    )
    return DrafterPrefix(cache.keys, cache.values, logits[0], hidden[0])


@torch.no_grad()
def build_trees_at(
    drafter: Eagle3Drafter, prefix: DrafterPrefix, indices: torch.Tensor, config: TreeConfig
) -> DraftTree:
    """One tree per index t in ``indices [B]``, rooted at x_{t+1}; the same tree the engine
    would draft after accepting x_0..x_{t+1} (the drafter's cache at inference holds exactly
    the step-1 keys of indices <= t)."""
    batch = indices.shape[0]
    length = prefix.keys.shape[-2]
    cache = MaskedKVCache()
    cache.keys = prefix.keys.expand(batch, -1, -1, -1)
    cache.values = prefix.values.expand(batch, -1, -1, -1)
    visible = torch.arange(length, device=indices.device)[None] <= indices[:, None]
    return build_draft_tree(
        drafter, cache, prefix.logits[indices], prefix.hidden[indices], indices + 1, config,
        prefix_mask=visible,
    )


@torch.no_grad()
def verify_trees_at(
    fast: FastLlama, sequence: PrefilledSequence, tree: DraftTree, indices: torch.Tensor
) -> torch.Tensor:
    """Target logits [B, 1 + N, V] for trees rooted at x_{t+1}, t in ``indices``: row 0 is the
    target at the root (from the prefill), row 1 + i at node i. One forward for all B trees."""
    batch, n = tree.tokens.shape
    length = sequence.length
    device = indices.device
    if sequence.cache.max_len < length + batch * n:
        raise ValueError(f"cache has room for {sequence.cache.max_len - length} tree nodes, need {batch * n}")
    tokens = tree.tokens.reshape(1, batch * n)
    positions = tree.positions().reshape(1, batch * n)
    # Prefix part: the tree rooted at index t's next token sees slots 0..t+1.
    prefix = torch.arange(length, device=device)[None] <= (indices + 1)[:, None]  # [B, T]
    prefix = prefix[:, None, :].expand(batch, n, length).reshape(batch * n, length)
    # Tree part: block-diagonal ancestor masks.
    tree_part = torch.block_diag(*tree.mask.unbind(0)).to(torch.bool)  # [B*N, B*N]
    mask = torch.cat([prefix, tree_part], dim=-1)[None]
    out = fast(tokens, positions, sequence.cache, length, mask)
    root = sequence.logits[indices + 1][:, None]  # the target at the root token
    return torch.cat([root, out.logits[0].reshape(batch, n, -1)], dim=1)
