"""KL(target || drafter) over the draft vocabulary with the drafter's lm_head fused in, in row blocks.

Training-time test compares, at every supervised row of every unrolled step, the target's
distribution over the draft vocabulary with the drafter's. Done with whole-tensor ops that meant
[B, T, V] fp32 log-probabilities, products and their gradients per step (4.2 GB each at 32 x 1024
x 32 000), most of them kept for the backward: copies and products were a quarter of the GTO
learner step on an H200 (``bench/results/throughput_h200/learner_step_fp32``) and the step peaked
at 62 GiB. Here only the rows a step supervises are taken, in blocks: a block's logits are one
product, a row's KL, log-normalisers and argmax one read of its drafter and target logits, and
the logits are dropped. The backward recomputes a block's logits and overwrites them with the
gradient ``w * (softmax(l) - p)`` before the two products into the hidden rows and the head.

On CUDA the per-row passes are Triton kernels (``DRAFTRL_VOCAB_KL=torch`` keeps the torch
passes, an A/B with the same results); elsewhere torch does the same blocked passes.
"""

from __future__ import annotations

import functools

import torch

from speculative.kernel_gate import KernelGate

try:
    import triton
    import triton.language as tl

    from speculative.argmax_lse_kernel import argmax_logsumexp_step
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None

BLOCK_ELEMENTS = 1 << 28  # rows x vocab of one block's logits: 512 MiB in bf16


if triton is not None:
    # (no ``from __future__`` annotations are read by Triton here: the tl.constexpr ones are)
    def _kl_forward(logits_ptr, target_ptr, target_rows_ptr, kl_ptr, lse_q_ptr, lse_p_ptr, argmax_ptr,
                    vocab, logits_stride, target_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target_row = tl.load(target_rows_ptr + row).to(tl.int64)
        drafter = logits_ptr + row * logits_stride
        target = target_ptr + target_row * target_stride
        max_q = tl.full([1], float("-inf"), tl.float32)
        sum_q = tl.full([1], 0.0, tl.float32)
        max_p = tl.full([1], float("-inf"), tl.float32)
        sum_p = tl.full([1], 0.0, tl.float32)
        weighted_gap = tl.full([1], 0.0, tl.float32)  # sum exp(t - max_p) (t - l)
        best = tl.full([1], float("-inf"), tl.float32)
        best_index = tl.full([1], 0, tl.int64)
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < vocab
            q = tl.load(drafter + offsets, mask=inside, other=float("-inf")).to(tl.float32)
            t = tl.load(target + offsets, mask=inside, other=float("-inf")).to(tl.float32)
            best, best_index, max_q, sum_q = argmax_logsumexp_step(q, q, start, best, best_index, max_q, sum_q)
            new_p = tl.maximum(max_p, tl.max(t, axis=0))
            rescale = tl.exp(max_p - new_p)
            weight = tl.exp(t - new_p)  # 0 outside the vocabulary
            gap = tl.where(inside, t, 0.0) - tl.where(inside, q, 0.0)  # no -inf - -inf outside
            sum_p = sum_p * rescale + tl.sum(weight, axis=0)
            weighted_gap = weighted_gap * rescale + tl.sum(weight * gap, axis=0)
            max_p = new_p
        lse_q = max_q + tl.log(sum_q)
        lse_p = max_p + tl.log(sum_p)
        one = tl.arange(0, 1)
        tl.store(kl_ptr + row + one, weighted_gap / sum_p - lse_p + lse_q)
        tl.store(lse_q_ptr + row + one, lse_q)
        tl.store(lse_p_ptr + row + one, lse_p)
        tl.store(argmax_ptr + row + one, best_index)

    def _kl_backward(logits_ptr, target_ptr, target_rows_ptr, lse_q_ptr, lse_p_ptr, scale_ptr,
                     vocab, logits_stride, target_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target_row = tl.load(target_rows_ptr + row).to(tl.int64)
        drafter = logits_ptr + row * logits_stride
        target = target_ptr + target_row * target_stride
        lse_q = tl.load(lse_q_ptr + row)
        lse_p = tl.load(lse_p_ptr + row)
        scale = tl.load(scale_ptr + row)
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < vocab
            q = tl.load(drafter + offsets, mask=inside, other=0.0).to(tl.float32)
            t = tl.load(target + offsets, mask=inside, other=0.0).to(tl.float32)
            grad = scale * (tl.exp(q - lse_q) - tl.exp(t - lse_p))
            tl.store(drafter + offsets, grad.to(logits_ptr.dtype.element_ty), mask=inside)


@functools.cache
def _kernels():
    return triton.jit(_kl_forward), triton.jit(_kl_backward)  # interpreted when TRITON_INTERPRET=1 at import


def _block(vocab: int) -> int:
    return min(4096, triton.next_power_of_2(vocab))


def torch_row_kl(logits: torch.Tensor, target: torch.Tensor, target_rows: torch.Tensor):
    """Per row of ``logits`` [n, V]: (KL(p || q), log-normaliser of q, of p, argmax of q), fp32, with
    p = softmax of ``target[target_rows]``: the torch passes."""
    q = logits.float()
    t = target.index_select(0, target_rows).float()
    lse_q, lse_p = torch.logsumexp(q, -1), torch.logsumexp(t, -1)
    kl = (torch.exp(t - lse_p[:, None]) * (t - q)).sum(-1) - lse_p + lse_q
    return kl, lse_q, lse_p, logits.argmax(-1)


def kernel_row_kl(logits: torch.Tensor, target: torch.Tensor, target_rows: torch.Tensor):
    """``torch_row_kl`` in one read of each row (Triton)."""
    rows, vocab = logits.shape
    kl, lse_q, lse_p = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    argmax = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows:
        _kernels()[0][(rows,)](logits, target, target_rows, kl, lse_q, lse_p, argmax, vocab, logits.stride(0),
                               target.stride(0), BLOCK=_block(vocab), num_warps=8)
    return kl, lse_q, lse_p, argmax


def torch_row_kl_grad_(logits: torch.Tensor, target: torch.Tensor, target_rows: torch.Tensor,
                       lse_q: torch.Tensor, lse_p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits`` with d(sum_i scale_i KL_i)/d logits = scale (softmax(l) - p): the torch passes."""
    q = torch.exp(logits.float() - lse_q[:, None])
    p = torch.exp(target.index_select(0, target_rows).float() - lse_p[:, None])
    return logits.copy_((q - p) * scale[:, None])


def kernel_row_kl_grad_(logits, target, target_rows, lse_q, lse_p, scale) -> torch.Tensor:
    """``torch_row_kl_grad_`` in one read and one write of each row (Triton)."""
    rows, vocab = logits.shape
    if rows:
        _kernels()[1][(rows,)](logits, target, target_rows, lse_q, lse_p, scale, vocab, logits.stride(0),
                               target.stride(0), BLOCK=_block(vocab), num_warps=8)
    return logits


class _FusedVocabKL(torch.autograd.Function):
    """sum_i w_i KL(p_i || softmax(h_i W^T)) and each row's argmax; the gradient reaches h and W."""

    @staticmethod
    def forward(ctx, hidden, weight, target, target_rows, row_weight, block_rows: int, fused: bool):
        row_kl = kernel_row_kl if fused else torch_row_kl
        parts = []
        for start in range(0, hidden.shape[0], block_rows):
            logits = hidden[start:start + block_rows] @ weight.t()
            parts.append(row_kl(logits, target, target_rows[start:start + block_rows]))
            del logits
        kl, lse_q, lse_p, argmax = (torch.cat(column) for column in zip(*parts)) if parts else (
            hidden.new_zeros(0, dtype=torch.float32),) * 3 + (target_rows.new_zeros(0),)
        ctx.save_for_backward(hidden, weight, target, target_rows, row_weight, lse_q, lse_p)
        ctx.block_rows, ctx.fused = block_rows, fused
        ctx.mark_non_differentiable(argmax)
        return (kl * row_weight).sum(), argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_argmax):
        hidden, weight, target, target_rows, row_weight, lse_q, lse_p = ctx.saved_tensors
        row_grad_ = kernel_row_kl_grad_ if ctx.fused else torch_row_kl_grad_
        scale = (row_weight * grad_loss).float().contiguous()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.block_rows):
            rows = slice(start, start + ctx.block_rows)
            block = hidden[rows]
            grad_logits = row_grad_(block @ weight.t(), target, target_rows[rows], lse_q[rows], lse_p[rows],
                                    scale[rows])
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ block).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def fused_vocab_kl(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, target_rows: torch.Tensor,
    row_weight: torch.Tensor, fused: bool | None = None, block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i row_weight_i KL(p_i || q_i), argmax_v q_i) over rows i of ``hidden`` [n, H].

    q_i = softmax(hidden_i @ weight^T) (the lm_head; products in the autocast dtype when autocast
    is on), p_i = softmax(target[target_rows_i]) (``target`` [M, V]: e.g. a flattened [B, T, V]).
    Reductions in fp32. The loss is differentiable in ``hidden`` and ``weight``. ``fused``: the
    Triton kernels (default: on CUDA unless ``DRAFTRL_VOCAB_KL=torch`` or their one-time check
    failed there); True also runs them on CPU tensors (Triton's interpreter). ``block_elements``:
    rows x vocabulary of one block's logits (default ``BLOCK_ELEMENTS``).
    """
    if fused is None:
        fused = _wanted(hidden)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(hidden.dtype)
    target = target.reshape(-1, target.shape[-1])
    if target.stride(-1) != 1:
        target = target.contiguous()
    block_rows = max(1, (block_elements or BLOCK_ELEMENTS) // max(1, weight.shape[0]))
    with torch.autocast(device_type, enabled=False):
        return _FusedVocabKL.apply(hidden.contiguous(), weight, target, target_rows.contiguous(),
                                   row_weight.float(), block_rows, fused)


def _check(device: torch.device) -> str | None:
    """The kernels against the torch passes on a small case (``KernelGate``'s one-time check)."""
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(5, 5003, generator=generator, device=device) * 3).to(torch.bfloat16)
    target = (torch.randn(9, 5003, generator=generator, device=device) * 3).to(torch.bfloat16)
    rows = torch.tensor([8, 0, 3, 3, 7], device=device)
    want, got = torch_row_kl(logits, target, rows), kernel_row_kl(logits, target, rows)
    if not torch.equal(want[3], got[3]) or not all(
            torch.allclose(w, g, atol=1e-4, rtol=1e-4) for w, g in zip(want[:3], got[:3])):
        return "differs from the torch passes (forward)"
    scale = torch.rand(5, generator=generator, device=device)
    grad_want = torch_row_kl_grad_(logits.clone(), target, rows, want[1], want[2], scale)
    grad_got = kernel_row_kl_grad_(logits.clone(), target, rows, want[1], want[2], scale)
    if not torch.allclose(grad_want.float(), grad_got.float(), atol=1e-3, rtol=1e-2):
        return "differs from the torch passes (backward)"
    return None


_wanted = KernelGate("vocabulary KL", "DRAFTRL_VOCAB_KL", _check)
