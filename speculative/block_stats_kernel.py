"""Block maxima and the fp32 log-normaliser of each row in one read (a Triton kernel).

GTO's tree search reduces [rows, Vd] bf16 logits (40 960 x 32 000 a level on one H200 batch)
twice: block maxima for ``speculative.vocab_topk.top_k_ids`` and a logsumexp for the
log-probabilities. Each was its own pass over 2.6 GB (2.0 and 1.9 ms a level, about a third of
the H200's bandwidth), and Inductor kept them two reductions even when compiled together. One
program per row here streams the row once, in chunks of ``GROUP`` blocks: it stores each block's
maximum and carries an online (rescaled) sum of exponentials for the normaliser.

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


def available() -> bool:
    return triton is not None


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


@functools.cache
def _kernel():
    return triton.jit(_block_stats)  # an interpreted function when TRITON_INTERPRET=1 at import


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
