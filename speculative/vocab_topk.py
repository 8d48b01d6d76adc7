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
"""

from __future__ import annotations

import warnings

import torch


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
    blocks = torch.topk(maxima, k, dim=-1).indices  # [..., k]
    index = blocks[..., None] * block + torch.arange(block, device=logits.device)  # [..., k, block]
    outside = index >= vocab  # only in the short block
    index = index.clamp_max(vocab - 1).flatten(-2)
    candidates = logits.gather(-1, index).masked_fill(outside.flatten(-2), float("-inf"))
    best = torch.topk(candidates, k, dim=-1).indices
    return index.gather(-1, best)


def top_k_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely ids of each row and their fp32 log-probabilities, without fp32
    log-probs of the whole row: (ids [..., k], log q [..., k])."""
    ids = top_k_ids(logits, k)
    return ids, logits.gather(-1, ids).float() - log_normaliser(logits)


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
