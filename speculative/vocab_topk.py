"""Row-wise top-k and log-normaliser over a large vocabulary, for many rows at once.

GTO grows the trees of thousands of roots per call: each tree level asks the drafter for
[rows, Vd] logits (41k x 32 000 on one H200 batch) and keeps each row's top-k children and their
log-probabilities. ``torch.topk`` over the whole row is a multi-pass radix select, and a
log-softmax of bf16 logits first copies them to fp32: together most of the tree search's time
(bench/gto_throughput.py --profile). Here:

* ``top_k_ids``: the k largest entries of a row all lie in the k blocks (of ``block`` entries)
  with the largest maxima: each of them is >= the k-th largest value, so its block's maximum is
  too, and at most k blocks have such a maximum. One pass of block maxima, a top-k over them,
  and a top-k over the k * block gathered candidates give torch.topk's set (ties aside).
* ``log_normaliser``: logsumexp in fp32 without materialising fp32 logits (on CUDA a compiled
  reduction that reads the bf16 values once; elsewhere, or if compiling fails, eager).
* ``top_k_logprobs`` on CUDA gets both the block maxima and the normaliser from one read of the
  logits (``speculative.block_stats_kernel``, Triton) instead of two passes, and the top k from
  the best blocks' entries where they lie (no gathered copy of k * block candidates);
  ``DRAFTRL_VOCAB_REDUCTION=torch`` keeps the two passes (for an A/B: the results are the same).
"""

from __future__ import annotations

import warnings

import torch

from speculative import block_stats_kernel
from speculative.kernel_gate import KernelGate


def top_k_ids(logits: torch.Tensor, k: int, block: int = 256) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim, largest first ([..., k])."""
    vocab = logits.shape[-1]
    full = vocab // block
    if full < 4 * k:  # a small vocabulary: one top-k is as cheap
        return torch.topk(logits, k, dim=-1).indices
    main = full * block
    maxima = logits[..., :main].unflatten(-1, (full, block)).amax(-1)  # [..., full]
    if main < vocab:  # the remainder is one more (short) block
        maxima = torch.cat([maxima, logits[..., main:].amax(-1, keepdim=True)], dim=-1)
    return _top_k_in_blocks(logits, maxima, k, block)


def _top_k_in_blocks(logits: torch.Tensor, maxima: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """``top_k_ids`` given the block maxima [..., ceil(V / block)]: the k best blocks' entries."""
    vocab = logits.shape[-1]
    blocks = torch.topk(maxima, k, dim=-1).indices  # [..., k]
    index = blocks[..., None] * block + torch.arange(block, device=logits.device)  # [..., k, block]
    outside = index >= vocab  # only in the short block
    index = index.clamp_max(vocab - 1).flatten(-2)
    candidates = logits.gather(-1, index).masked_fill(outside.flatten(-2), float("-inf"))
    best = torch.topk(candidates, k, dim=-1).indices
    return index.gather(-1, best)


def top_k_logprobs(logits: torch.Tensor, k: int, block: int = 256,
                   fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely ids of each row and their fp32 log-probabilities, without fp32
    log-probs of the whole row: (ids [..., k], log q [..., k]). ``fused``: block maxima and
    normaliser from the one-read Triton kernel, the top k by the second (default: on CUDA,
    unless ``DRAFTRL_VOCAB_REDUCTION=torch`` or their one-time check failed there,
    ``speculative.kernel_gate``); True also runs them on CPU tensors, which needs Triton's
    interpreter (tests)."""
    if fused is None:
        fused = _fused_wanted(logits)
    if fused and logits.shape[-1] // block >= 4 * k:
        maxima, lse = block_stats_kernel.block_stats(logits, block)
        ids = block_stats_kernel.top_k_in_blocks(logits, torch.topk(maxima, k, dim=-1).indices, block)
        return ids, logits.gather(-1, ids).float() - lse
    ids = top_k_ids(logits, k, block)
    return ids, logits.gather(-1, ids).float() - log_normaliser(logits)


def _check_fused(device: torch.device) -> str | None:
    """The kernels' top-k against the torch passes on a small case (``KernelGate``'s one-time check)."""
    generator = torch.Generator(device=device).manual_seed(0)
    order = torch.stack([torch.randperm(12800, generator=generator, device=device) for _ in range(5)])
    logits = ((order - 12800).float() / 64).to(torch.bfloat16)  # distinct near the top
    ids, logq = top_k_logprobs(logits, 10, fused=True)
    want_ids, want_logq = top_k_logprobs(logits, 10, fused=False)
    if torch.equal(ids, want_ids) and torch.allclose(logq, want_logq, atol=1e-4, rtol=1e-5):
        return None
    return "differs from the torch passes"


_fused_wanted = KernelGate("block statistics/top-k", "DRAFTRL_VOCAB_REDUCTION", _check_fused)
_compiled_lse = None  # None: not tried yet; False: compiling failed, eager from now on


def _eager_lse(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim in fp32, [..., 1]."""
    global _compiled_lse
    if logits.dtype == torch.float32 or logits.device.type != "cuda" or _compiled_lse is False:
        return _eager_lse(logits)
    try:
        if _compiled_lse is None:
            _compiled_lse = torch.compile(_eager_lse, dynamic=True)
        return _compiled_lse(logits)
    except Exception as error:  # noqa: BLE001 - an Inductor failure costs speed, not results
        warnings.warn(f"compiled logsumexp failed ({type(error).__name__}: {error}); eager from now on",
                      stacklevel=2)
        _compiled_lse = False
        return _eager_lse(logits)
