"""Block maxima and the fp32 log-normaliser of each row in one read (a Triton kernel).

GTO's tree search reduces [rows, Vd] bf16 logits (40 960 x 32 000 a level on one H200 batch)
twice: block maxima for ``speculative.vocab_topk.top_k_ids`` and a logsumexp for the
log-probabilities. Each was its own pass over 2.6 GB (2.0 and 1.9 ms a level, about a third of
the H200's bandwidth), and Inductor kept them two reductions even when compiled together. One
program per row here streams the row once, in chunks of ``GROUP`` blocks: it stores each block's
maximum and carries an online (rescaled) sum of exponentials for the normaliser.

``top_k_in_blocks``, the second kernel, then picks the k best entries of the k best blocks where
they lie (a gather of 2 560 candidates a row and ``torch.topk`` over them took 1.17 ms a level). Each
pick is one max over int64 keys that order (value, then the smaller id): 1.05 ms a level on an H200,
where a max of the values and a min of the ids took 1.87 ms (bench/results/throughput_h200/tenth_kernels).

On CUDA the kernel is compiled by Triton. On CPU tensors it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported: slow, for tests).
"""

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    def _block_stats(logits_ptr, maxima_ptr, lse_ptr, vocab, n_blocks, row_stride,
                     BLOCK: tl.constexpr, GROUP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        source = logits_ptr + row * row_stride
        running_max = tl.full([1], float("-inf"), tl.float32)
        running_sum = tl.full([1], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK * GROUP):
            offsets = start + tl.arange(0, BLOCK * GROUP)
            values = tl.load(source + offsets, mask=offsets < vocab, other=float("-inf")).to(tl.float32)
            block_max = tl.max(tl.reshape(values, (GROUP, BLOCK)), axis=1)  # [GROUP]
            block_index = start // BLOCK + tl.arange(0, GROUP)
            tl.store(maxima_ptr + row * n_blocks + block_index, block_max.to(maxima_ptr.dtype.element_ty),
                     mask=block_index < n_blocks)
            new_max = tl.maximum(running_max, tl.max(block_max, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # an all -inf prefix: no nan
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(values - shift), axis=0)
            running_max = new_max
        tl.store(lse_ptr + row + tl.arange(0, 1), running_max + tl.log(running_sum))

    def _top_k_in_blocks(logits_ptr, blocks_ptr, ids_ptr, vocab, row_stride,
                         K: tl.constexpr, K_POW2: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, K_POW2)
        chosen = tl.load(blocks_ptr + row * K + slot, mask=slot < K, other=0).to(tl.int64)
        index = chosen[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [K_POW2, BLOCK]: the blocks' entries
        live = (slot[:, None] < K) & (index < vocab)
        values = tl.load(logits_ptr + row * row_stride + index, mask=live, other=float("-inf")).to(tl.float32)
        values = tl.where(values == 0.0, 0.0, values)  # -0.0 ties +0.0, as in torch.topk
        # One int64 key per entry orders it as (value, then the smaller id): the float's bits made
        # order-preserving as a signed int in the high half, 2**31 - 1 - id in the low half. One max
        # a pick instead of a max of the values and a min of the ids that reach it.
        bits = values.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        ordered = tl.where(live, ordered, -2147483648)  # below every float's, -inf's included
        key = (ordered.to(tl.int64) << 32) | (2147483647 - index)
        key = tl.reshape(key, (K_POW2 * BLOCK,))
        taken = tl.full([1], -2147483648, tl.int32).to(tl.int64) << 32  # the least int64: below every key
        for j in tl.static_range(K):  # the k largest, largest first; a tie: the smaller id first
            best = tl.max(key, axis=0)
            best_id = 2147483647 - (best - ((best >> 32) << 32))
            tl.store(ids_ptr + row * K + j + tl.arange(0, 1), best_id + tl.zeros([1], tl.int64))
            key = tl.where(key == best, taken, key)  # keys are distinct (ids are): one entry taken


@functools.cache
def _kernel():
    return triton.jit(_block_stats)  # an interpreted function when TRITON_INTERPRET=1 at import


@functools.cache
def _top_k_kernel():
    return triton.jit(_top_k_in_blocks)


def top_k_in_blocks(logits: torch.Tensor, blocks: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The ``k`` largest entries' ids ``[..., k]``, largest first (equal values: the smaller id
    first, as a stable descending sort), among the entries of each row's blocks ``blocks [..., k]``
    (block b: entries [b * block, (b + 1) * block)); the candidates are read where they lie, not
    gathered into a [..., k * block] copy for ``torch.topk``."""
    if triton is None:
        raise RuntimeError("top_k_in_blocks needs Triton (pip install triton)")
    vocab, k = logits.shape[-1], blocks.shape[-1]
    if vocab >= 2**31:
        raise ValueError(f"top_k_in_blocks keys an id in 31 bits; a vocabulary of {vocab} does not fit")
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    chosen = blocks.reshape(-1, k).contiguous()
    ids = torch.empty(rows.shape[0], k, dtype=torch.long, device=logits.device)
    if rows.shape[0] and k:
        _top_k_kernel()[(rows.shape[0],)](rows, chosen, ids, vocab, rows.stride(0), K=k,
                                          K_POW2=triton.next_power_of_2(k), BLOCK=block, num_warps=4)
    return ids.view(*blocks.shape)


def block_stats(logits: torch.Tensor, block: int = 256, group: int = 16,
                num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(maxima [..., ceil(V / block)] in ``logits``' dtype, logsumexp [..., 1] in fp32) of the
    last dim. Block b covers entries [b * block, (b + 1) * block); the last may be short.
    ``block`` and ``group`` must be powers of two; ``group`` blocks are read per loop step."""
    if triton is None:
        raise RuntimeError("block_stats needs Triton (pip install triton)")
    if block & (block - 1) or group & (group - 1):
        raise ValueError(f"block ({block}) and group ({group}) must be powers of two")
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_blocks = -(-vocab // block)
    maxima = torch.empty(rows.shape[0], n_blocks, dtype=logits.dtype, device=logits.device)
    lse = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    if rows.shape[0]:
        _kernel()[(rows.shape[0],)](rows, maxima, lse, vocab, n_blocks, rows.stride(0),
                                    BLOCK=block, GROUP=group, num_warps=num_warps)
    return maxima.view(*logits.shape[:-1], n_blocks), lse.view(*logits.shape[:-1], 1)
