"""Training-time test attention with FlexAttention block masks over packed sequences.

The dense reference (``speculative.ttt.TTTCache``) builds fp32 [B, heads, T, T] scores at each of
the K unrolled steps, so its memory grows with T². This cache computes the same attention with
``torch.nn.attention.flex_attention``:

* the batch's real tokens are *packed* into one row of N tokens (padded to a multiple of the
  block size), each token tagged with its sequence (``doc``); padding costs nothing;
* the keys of steps 1..k are concatenated, [1, heads, k·Npad, d], and the mask of step k is
  ``doc[q] == doc[j]`` and (step 1: ``j <= q`` within the window; later steps: ``j == q``) -
  EAGLE-3's mask (``speculative.ttt`` explains it);
* the block mask is built from that structure directly (``BlockMask.from_kv_blocks``): each query
  block lists the causal blocks of its sequences plus one diagonal block per later step, so
  nothing of size T² is ever materialised, not even as booleans.

FlexAttention is only memory-efficient when compiled, and torch has no CPU backward for it (torch
2.13 raises ``NotImplementedError``): on CUDA the kernel is ``torch.compile(flex_attention)``; on
CPU the eager kernel serves forward passes (tests), and training must use the dense path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

BLOCK = 128  # FlexAttention's default block size; the packed row is padded to a multiple of it

Kernel = Callable[..., torch.Tensor]
_compiled_flex: Kernel | None = None


def default_kernel(device: torch.device) -> Kernel:
    """Compiled flex_attention on CUDA (its fused kernel), the eager one elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # dynamic: the packed length changes from batch to batch; one graph serves them all.
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of a [B, T] mask holds its real tokens first (packing needs it, and so does
    ``speculative.sdpa_ttt``; the dense reference takes any mask)."""
    mask = mask.bool()
    return torch.equal(torch.arange(mask.shape[1], device=mask.device)[None] < mask.sum(1, keepdim=True), mask)


class PackedLayout:
    """Where the real tokens of a right-padded [B, T] batch sit in one packed row."""

    def __init__(self, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        batch, length = mask.shape
        lengths = mask.sum(1)
        if not right_padded(mask):
            raise ValueError("flex TTT attention needs right-padded rows (real tokens first)")
        self.batch, self.length = batch, length
        self.tokens = int(lengths.sum())
        self.padded = max(BLOCK, math.ceil(self.tokens / BLOCK) * BLOCK)
        self.gather = mask.reshape(-1).nonzero().squeeze(1)  # packed index -> b * T + t
        device = mask.device
        doc = torch.full((self.padded,), -1, dtype=torch.long, device=device)
        doc[: self.tokens] = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths  # first packed index of each sequence
        start = torch.arange(self.padded, device=device)
        start[: self.tokens] = starts[doc[: self.tokens]]
        self.doc, self.start = doc, start

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] -> [1, H, Npad, d] (zeros past the real tokens)."""
        heads, dim = x.shape[1], x.shape[-1]
        flat = x.transpose(0, 1).reshape(heads, self.batch * self.length, dim)[:, self.gather]
        pad = flat.new_zeros(heads, self.padded - self.tokens, dim)
        return torch.cat([flat, pad], dim=1)[None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, H, Npad, d] -> [B, H, T, d] (zeros at padding)."""
        heads, dim = packed.shape[1], packed.shape[-1]
        out = packed.new_zeros(heads, self.batch * self.length, dim)
        out = out.index_copy(1, self.gather, packed[0, :, : self.tokens])
        return out.view(heads, self.batch, self.length, dim).transpose(0, 1)


def ttt_mask_mod(layout: PackedLayout, window: int | None):
    """EAGLE-3's TTT mask over [queries Npad] x [keys of steps 1..k, k·Npad]."""
    doc, padded = layout.doc, layout.padded

    def mask_mod(b, h, q_idx, kv_idx):
        step = kv_idx // padded
        j = kv_idx - step * padded
        same = (doc[q_idx] == doc[j]) & (doc[q_idx] >= 0)
        causal = j <= q_idx
        if window is not None:
            causal = causal & (q_idx - j < window)
        return same & torch.where(step == 0, causal, j == q_idx)

    return mask_mod


def ttt_block_mask(layout: PackedLayout, steps: int, window: int | None):
    """The block mask of step ``steps``, listed block by block from the mask's structure.

    Query block i needs the step-1 key blocks from the lowest key any of its rows sees up to
    block i, and block ``s * QB + i`` of every later step s (the diagonal). All are marked partial,
    so the mask_mod decides inside each block; none is left out, so none is skipped wrongly.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_blocks = layout.padded // BLOCK
    device = layout.doc.device
    rows = torch.arange(layout.padded, device=device)
    lowest = layout.start if window is None else torch.maximum(layout.start, rows - window + 1)
    lowest = lowest.view(q_blocks, BLOCK).min(1).values // BLOCK  # first step-1 key block
    block = torch.arange(q_blocks, device=device)
    causal_count = block - lowest + 1
    width = steps * q_blocks  # torch expects one column per key block (unused ones ignored)
    j = torch.arange(width, device=device)[None]
    count = causal_count[:, None]
    indices = torch.where(j < count, lowest[:, None] + j, (j - count + 1) * q_blocks + block[:, None])
    used = j < count + steps - 1
    indices = torch.where(used, indices, torch.zeros_like(indices)).to(torch.int32)
    num = (causal_count + steps - 1).to(torch.int32)
    return BlockMask.from_kv_blocks(
        num[None, None], indices[None, None], BLOCK_SIZE=BLOCK,
        mask_mod=ttt_mask_mod(layout, window), seq_lengths=(layout.padded, steps * layout.padded),
    )


class FlexTTTCache:
    """Drop-in for ``TTTCache``: same attention, computed on packed sequences by FlexAttention."""

    applies_sliding_window = True

    def __init__(self, key_padding_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                 kernel: Kernel | None = None):
        self.key_padding_mask = key_padding_mask
        self.sliding_window = sliding_window
        self.kernel = kernel
        self.layout: PackedLayout | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layout is None:
            mask = self.key_padding_mask
            if mask is None:
                mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
            self.layout = PackedLayout(mask.to(q.device))
        from torch.nn.attention.flex_attention import flex_attention

        kernel = self.kernel or default_kernel(q.device)
        if kernel is flex_attention and q.device.type == "cpu" and torch.is_grad_enabled() \
                and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise NotImplementedError(
                "training.attention 'flex' needs CUDA: FlexAttention has no CPU backward in torch "
                f"{torch.__version__}; train with training.attention 'dense' on CPU"
            )
        layout = self.layout
        self.keys.append(layout.pack(k.float()))
        self.values.append(layout.pack(v.float()))
        block_mask = ttt_block_mask(layout, len(self.keys), self.sliding_window)
        out = kernel(layout.pack(q.float()), torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2),
                     block_mask=block_mask, scale=1.0 / math.sqrt(q.shape[-1]))
        return layout.unpack(out).to(q.dtype)


def listed_blocks(block_mask, q_blocks: int, kv_blocks: int) -> torch.Tensor:
    """[q_blocks, kv_blocks] bool: the key blocks each query block lists (partial or full)."""
    dense = torch.zeros(q_blocks, kv_blocks, dtype=torch.bool, device=block_mask.kv_num_blocks.device)
    for num, indices in ((block_mask.kv_num_blocks, block_mask.kv_indices),
                         (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        if num is None:
            continue
        for row in range(q_blocks):
            dense[row, indices[0, 0, row, : int(num[0, 0, row])].long()] = True
    return dense


def masked_reference_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                            block_mask, scale: float) -> torch.Tensor:
    """flex_attention's result computed densely, for checking this module where flex cannot run
    (its CPU backward): the mask is the mask_mod evaluated everywhere *and* restricted to the
    listed blocks, so a block missing from ``ttt_block_mask`` shows up as a wrong result."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    q_idx = torch.arange(q_len, device=query.device)[:, None]
    kv_idx = torch.arange(kv_len, device=query.device)[None]
    zero = torch.zeros((), dtype=torch.long, device=query.device)
    allowed = block_mask.mask_mod(zero, zero, q_idx, kv_idx)
    listed = listed_blocks(block_mask, q_len // BLOCK, kv_len // BLOCK)
    listed = listed.repeat_interleave(BLOCK, 0)[:q_len].repeat_interleave(BLOCK, 1)[:, :kv_len]
    allowed = allowed & listed
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1) * any_key
    return torch.matmul(probs, value)
