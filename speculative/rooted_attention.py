"""The tree search's attention for many rooted trees at once (``speculative.batched_trees``).

Row r = (s, p) of a batch of S sequences x P roots attends to two parts: sequence s's step-1 keys
at indices <= its root (the prefix, shared by the P rows of a sequence: scored once per sequence
as [S, heads, P*w, T]) and its own tree entries (per row, a handful). One softmax over both is
exact attention over their union. Two ways to compute it:

* ``rooted_attention``: eager; the [S, heads, P*w, T] fp32 scores are materialised, masked,
  concatenated with the tree part and normalised (several passes over 1.5 GB a level on an H200
  GTO batch; Inductor compiling these ops was slower, bench/results/throughput_h200/README.md).
* ``rooted_attention_flex``: the prefix part by FlexAttention (``prefix_block_mask``: a query of
  root p sees keys <= roots[s, p]), which returns its log-sum-exp, so the prefix scores are never
  materialised; the small tree part eager; both merged through their log-sum-exps. Forward only
  (FlexAttention has no CPU backward): ``RootedTreeCache`` uses it under no_grad only.
"""

from __future__ import annotations

import math

import torch

from speculative.flex_ttt import default_kernel  # compiled flex_attention on CUDA, eager elsewhere


def rooted_attention(q: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                     tree_keys: torch.Tensor, tree_values: torch.Tensor, visible: torch.Tensor,
                     tree_mask: torch.Tensor) -> torch.Tensor:
    """``RootedTreeCache``'s attention, fp32 out: q [S*P, h, w, d] against each sequence's prefix
    (``prefix_keys [S, h, T, d]``, rows see ``visible [S, P, T]``) and each row's own tree
    entries (``tree_keys [S*P, h, F, d]`` under ``tree_mask [S*P, w, F]``); one softmax over both.
    Compiled by Inductor (dynamic shapes) these ops took 11 ms a tree level on an H200 GTO batch,
    where eager masked_fill, softmax and the probabilities' copy take about 1 ms each."""
    rows, heads, width, dim = q.shape
    seqs, positions, length = visible.shape
    root = math.sqrt(dim)
    qf = q.float()
    # Prefix: the P*w queries of a sequence against its T keys, in one product.
    q_seq = qf.view(seqs, positions, heads, width, dim).transpose(1, 2)
    prefix = torch.matmul(q_seq.reshape(seqs, heads, positions * width, dim), prefix_keys.transpose(-1, -2)) / root
    prefix = prefix.view(seqs, heads, positions, width, length)
    prefix = prefix.masked_fill(~visible[:, None, :, None, :], float("-inf"))
    # Tree: each row against its own entries.
    tree = torch.matmul(qf, tree_keys.float().transpose(-1, -2)) / root  # [R, h, w, F]
    tree = tree.masked_fill(~tree_mask[:, None], float("-inf"))
    fed = tree.shape[-1]
    tree = tree.view(seqs, positions, heads, width, fed).transpose(1, 2)
    probs = torch.softmax(torch.cat([prefix, tree], dim=-1), dim=-1)
    out = torch.matmul(probs[..., :length].reshape(seqs, heads, positions * width, length), prefix_values)
    out = out.view(seqs, heads, positions, width, dim).transpose(1, 2).reshape(rows, heads, width, dim)
    tree_probs = probs[..., length:].transpose(1, 2).reshape(rows, heads, width, fed)
    return out + torch.matmul(tree_probs, tree_values.float())


def prefix_block_mask(roots: torch.Tensor, width: int, length: int):
    """FlexAttention block mask of the prefix part: query q of sequence s (root p = q // width)
    sees keys kv <= roots[s, p], over [S, P*width] queries and ``length`` keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    seqs, positions = roots.shape

    def visible(b, h, q_idx, kv_idx):
        return kv_idx <= roots[b, q_idx // width]

    return create_block_mask(visible, seqs, None, positions * width, length, device=roots.device)


def rooted_attention_flex(q: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                          tree_keys: torch.Tensor, tree_values: torch.Tensor, tree_mask: torch.Tensor,
                          prefix_mask) -> torch.Tensor:
    """``rooted_attention`` with the prefix part by FlexAttention (``prefix_mask`` from
    ``prefix_block_mask``), merged with the tree part through the two log-sum-exps; fp32 out."""
    rows, heads, width, dim = q.shape
    seqs, _, length, _ = prefix_keys.shape
    positions = rows // seqs
    qf = q.float()
    q_seq = qf.view(seqs, positions, heads, width, dim).transpose(1, 2).reshape(seqs, heads, positions * width, dim)
    out, lse = default_kernel(q.device)(q_seq, prefix_keys, prefix_values, block_mask=prefix_mask, return_lse=True)
    out = out.float().view(seqs, heads, positions, width, dim)
    lse = lse.float().view(seqs, heads, positions, width)
    tree = torch.matmul(qf, tree_keys.float().transpose(-1, -2)) / math.sqrt(dim)  # [R, h, w, F]
    tree = tree.masked_fill(~tree_mask[:, None], float("-inf"))
    tree = tree.view(seqs, positions, heads, width, -1).transpose(1, 2)  # [S, h, P, w, F]
    top = torch.maximum(lse, tree.amax(-1))  # finite: every query sees key 0 of its prefix
    prefix_weight = torch.exp(lse - top)  # the prefix's total weight, relative to exp(top)
    tree_weights = torch.exp(tree - top[..., None])
    values = tree_values.float().view(seqs, positions, heads, -1, dim).transpose(1, 2)  # [S, h, P, F, d]
    merged = prefix_weight[..., None] * out + torch.matmul(tree_weights, values)
    merged = merged / (prefix_weight + tree_weights.sum(-1))[..., None]
    return merged.transpose(1, 2).reshape(rows, heads, width, dim)
