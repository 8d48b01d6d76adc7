"""Static KV caches for a batch of sequences of different lengths (the batched engine's).

Row b of every cache belongs to sequence b. No cache stores a length: the engine keeps each
sequence's root position (the first position whose target keys/values are not cached yet) and
builds every attention mask from it, so padded, stale or rejected slots are never read and
nothing ever has to be moved:

* target (``BatchKVCache``): the token at position p sits at slot p. A chain's accepted tokens
  were verified at their own positions, so after verification they are already in place.
* drafter (``BatchDraftCache``): the drafter's entry for position p (it reads token p and the
  target's hidden state at p - 1) sits at slot p - 1. A chain being drafted writes its entries
  at their own positions' slots too, past the sequence's committed ones; the catch-up after the
  verification overwrites them with the entries of the committed tokens. So every query of the
  drafter sees a prefix of its sequence's slots, as every query of the target does.

Every write goes to explicit per-sequence slots, so one step of the whole batch is a fixed
sequence of tensor ops: what a CUDA graph captures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speculative import decode_attention_kernel
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
    """The drafter's keys/values ``[B, heads, S, d]`` (layout: module docstring).

    Implements the drafter's ``attend(q, k, v)`` protocol. Every query sees a prefix of its
    sequence's slots, so on CUDA the attention is ``speculative.decode_attention_kernel`` (one
    program a sequence and head reads its prefix once, for every query token); elsewhere, and where
    that kernel's gate says no, SDPA over the prefix mask. Both keep the scores and the softmax in
    fp32, as ``MaskedKVCache``'s explicit product, so batched and single-sequence drafting agree to
    rounding. Before each drafter call, ``prepare`` says where the new entries go and how far each
    query sees. (The explicit product over fp32 copies of the span was 1.4 of a 64-sequence OPD
    step's 7.0 ms of kernels on an H200, SDPA's masked cuDNN kernels 0.46 of 3.5 ms:
    ``bench/results/opd_engine_h200``.)
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor,
                 base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, kernel: bool | None = None):
        self.keys, self.values = keys, values
        self._slots: torch.Tensor | None = None
        self._visible: torch.Tensor | None = None
        self._span = 0
        # the whole cache's keys, values and head indices: indexed writes go to these, every dim
        # indexed by a tensor (through a row view, the compiled step copied the whole cache)
        self._base = base or (keys, values, torch.arange(keys.shape[1], device=keys.device)[None, None])
        # the decode-attention kernel: None where its gate passed (compiled steps: the outcome the
        # engine resolved eagerly), True forces it (CPU tests, Triton's interpreter), False SDPA
        self.kernel = kernel

    @classmethod
    def empty(cls, batch_size: int, heads: int, slots: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str) -> BatchDraftCache:
        shape = (batch_size, heads, slots, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def size(self) -> int:
        return self.keys.shape[2]

    def rows(self, count: int) -> BatchDraftCache:
        return BatchDraftCache(self.keys[:count], self.values[:count], self._base, self.kernel)

    def prepare(self, slots: torch.Tensor, visible: torch.Tensor, span: int) -> None:
        """The next call writes at ``slots [B, T]`` and query (b, t) sees slots
        ``0 .. visible[b, t] - 1`` (its own included) of the first ``span``."""
        self._slots, self._visible, self._span = slots, visible, span

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # rows [B, 1, 1], heads [1, 1, H], slots [B, T, 1]: entries [B, T, H, d]
        keys, values, heads = self._base
        index = (torch.arange(k.shape[0], device=k.device)[:, None, None], heads, self._slots[..., None])
        keys.index_put_(index, k.transpose(1, 2))
        values.index_put_(index, v.transpose(1, 2))
        keys, values = self.keys[:, :, : self._span], self.values[:, :, : self._span]
        # each token over its prefix: by the kernel, q [B, heads, T, d] -> [B, T, heads, d]; or SDPA
        if decode_attention_kernel.wanted.chosen(q, self.kernel):
            out = decode_attention_kernel.decode_attention(q.transpose(1, 2), keys, values, self._visible,
                                                           q.shape[-1] ** -0.5)
            return out.transpose(1, 2)
        mask = visible_up_to(self._visible - 1, self._span)  # [B, T, S]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])

    def copy_rows_from(self, rows: torch.Tensor, prefill: PrefillDraftCache) -> None:
        """Put a prefill's entries (positions 1 .. L) into rows ``rows`` at their slots."""
        length = prefill.keys.shape[2]
        self.keys[rows, :, :length] = prefill.keys
        self.values[rows, :, :length] = prefill.values


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
