"""Static KV caches for a batch of sequences of different lengths (the batched engine's).

Row b of every cache belongs to sequence b. No cache stores a length: the engine keeps each
sequence's root position (the first position whose target keys/values are not cached yet) and
builds every attention mask from it, so padded, stale or rejected slots are never read and
nothing ever has to be moved:

* target (``BatchKVCache``): the token at position p sits at slot p. A chain's accepted tokens
  were verified at their own positions, so after verification they are already in place.
* drafter (``BatchDraftCache``): the drafter's entry for position p (it reads token p and the
  target's hidden state at p - 1) sits at slot ``scratch + p - 1``; the first ``scratch`` slots
  hold the chain being drafted, at the same slots in every step. Putting the scratch first
  lets an attention span (only the first S slots) be a plain slice.

Every write goes to explicit per-sequence slots, so one step of the whole batch is a fixed
sequence of tensor ops: what a CUDA graph captures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from speculative.llama import compact_slots


class BatchKVCache:
    """The target's keys and values, all layers in one tensor ``[2, layers, B, kv_heads, S, d]``.

    One tensor so that a layer's keys and values are written in one indexed copy; ``rows(n)``
    is a view of the first n sequences (a smaller batch runs on the same memory).
    """

    def __init__(self, storage: torch.Tensor, index: tuple[torch.Tensor, ...] | None = None):
        self.storage = storage
        self.batch_size = storage.shape[2]
        self.max_len = storage.shape[4]
        if index is None:  # index tensors of the keys/values, layer and head dims, made once
            device = storage.device
            index = (torch.arange(2, device=device).view(2, 1, 1, 1), torch.arange(storage.shape[1], device=device),
                     torch.arange(storage.shape[3], device=device).view(1, 1, 1, -1))
        self._index = index

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str) -> BatchKVCache:
        shape = (2, num_layers, batch_size, num_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, count: int) -> BatchKVCache:
        return BatchKVCache(self.storage[:, :, :count], self._index)

    def write_kv(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor] | int, kv: torch.Tensor) -> None:
        """``kv [B, T, 2, kv_heads, d]`` (keys, values) to (rows ``[B, 1]``, slots ``[B, T]``), or to
        the T slots from an int: one copy for both.

        Compiled, the indexed write is ONE ``index_put_`` on the whole storage, every dim indexed
        by a tensor (the layer too, a 0-d one), which Inductor turns into an in-place scatter:
        written through a view (``storage[:, layer][...] = ``), the compiled step copied the
        layer's whole cache around every write. Eagerly (and in CUDA graphs) the view's write is
        one kernel too, and a faster one (H200 profiles: about 3.1 us against 4.6 us a layer).
        With the compile-only forms also used eagerly (this write, a broadcast decode mask,
        strided RoPE factors), batch-1 graph decoding ran 9–11 % slower in an interleaved H200
        A/B (472 and 458 against 529 and 502 tok/s), so eager paths keep the earlier forms."""
        if isinstance(slots, int):
            self.storage[:, layer, :, :, slots : slots + kv.shape[1]] = kv.permute(2, 0, 3, 1, 4)
            return
        rows, slots = slots
        if not torch.compiler.is_compiling():  # eagerly the view's write is the faster kernel
            self.storage[:, layer][:, rows, :, slots] = kv
            return
        pair, layers, heads = self._index
        self.storage.index_put_((pair, layers[layer], rows[None, :, :, None], heads, slots[None, :, :, None]),
                                kv.permute(2, 0, 1, 3, 4))  # [2, B, T, kv_heads, d]

    def copy_rows_from(self, rows: torch.Tensor, other: BatchKVCache) -> None:
        """Put ``other``'s sequences (its slots ``0 .. other.max_len-1``) into rows ``rows``."""
        self.storage[:, :, rows, :, : other.max_len] = other.storage

    def compact(self, src_slots: torch.Tensor, dst_start: torch.Tensor | int) -> None:
        """Move slots ``src_slots [B, M]`` to ``dst_start ..`` (a verified tree's accepted nodes
        behind the prefix: the tree engine's static path runs ``FusedLlama`` on this cache)."""
        compact_slots(self.storage, src_slots, dst_start)


class BatchDraftCache:
    """The drafter's keys/values ``[B, heads, scratch + context, d]`` (layout: module docstring).

    Implements the drafter's ``attend(q, k, v)`` protocol with ``MaskedKVCache``'s arithmetic
    (fp32 scores, masked softmax), so batched and single-sequence drafting agree to rounding.
    Before each drafter call, ``prepare`` says where the new entries go and what they see.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, scratch: int,
                 base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        self.keys, self.values, self.scratch = keys, values, scratch
        self._slots: torch.Tensor | int = 0
        self._mask: torch.Tensor | None = None
        # the whole cache's keys, values and head indices: indexed writes go to these, every dim
        # indexed by a tensor (through a row view, the compiled step copied the whole cache)
        self._base = base or (keys, values, torch.arange(keys.shape[1], device=keys.device)[None, None])

    @classmethod
    def empty(cls, batch_size: int, heads: int, scratch: int, context: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str) -> BatchDraftCache:
        shape = (batch_size, heads, scratch + context, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device), scratch)

    @property
    def size(self) -> int:
        return self.keys.shape[2]

    def rows(self, count: int) -> BatchDraftCache:
        return BatchDraftCache(self.keys[:count], self.values[:count], self.scratch, self._base)

    def prepare(self, slots: torch.Tensor | int, mask: torch.Tensor) -> None:
        """The next call writes at ``slots [B, T]`` (or the T slots from an int) and its queries
        see the slots ``mask [B, T, S]`` allows among the first S (own slot included)."""
        self._slots, self._mask = slots, mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        slots = self._slots
        if isinstance(slots, int) and not torch.compiler.is_compiling():  # eagerly: two slice copies
            self.keys[:, :, slots : slots + k.shape[2]] = k
            self.values[:, :, slots : slots + k.shape[2]] = v
        else:  # rows [B, 1, 1], heads [1, 1, H], slots [B, T, 1]: entries [B, T, H, d]
            keys, values, heads = self._base
            batch, length = k.shape[0], k.shape[2]
            if isinstance(slots, int):
                slots = torch.arange(slots, slots + length, device=k.device).expand(batch, length)
            index = (torch.arange(batch, device=k.device)[:, None, None], heads, slots[..., None])
            keys.index_put_(index, k.transpose(1, 2))
            values.index_put_(index, v.transpose(1, 2))
        span = self._mask.shape[-1]
        keys, values = self.keys[:, :, :span], self.values[:, :, :span]
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self._mask[:, None], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), values.float()).to(q.dtype)

    def copy_rows_from(self, rows: torch.Tensor, prefill: PrefillDraftCache) -> None:
        """Put a prefill's entries (positions 1 .. L) into rows ``rows`` at their context slots."""
        length = prefill.keys.shape[2]
        self.keys[rows, :, self.scratch : self.scratch + length] = prefill.keys
        self.values[rows, :, self.scratch : self.scratch + length] = prefill.values


class PrefillDraftCache:
    """The drafter over right-padded prompts: causal attention within the chunk, entries kept
    for ``BatchDraftCache.copy_rows_from``. Padding follows every real token, so a causal mask
    never shows it to a real query."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.keys, self.values = k, v
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        return out.to(q.dtype)


def visible_up_to(last: torch.Tensor, span: int) -> torch.Tensor:
    """Mask ``[B, T, span]``: slot s is visible to query (b, t) when ``s <= last[b, t]``."""
    cols = torch.arange(span, device=last.device)
    return cols[None, None, :] <= last[..., None]
