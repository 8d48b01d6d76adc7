"""The sdpa TTT attention's merge of the causal block with the diagonal keys, forward and backward (Triton).

``speculative.sdpa_ttt`` computes step k's attention as a fused causal kernel over the step-1 keys,
merged by log-sum-exp with the k-1 diagonal keys (one key per query row a later step):

    out = w_0 * o_causal + sum_j w_j * v_j,   w = softmax([lse_causal, q . k_1 * scale, ...])

In torch that merge is a string of elementwise passes over [B, heads, T, d] per diagonal key (a
cast of the key, a product, a sum; a cast of the value, a product, an add), and about twice as many
in the backward; over a 7-step unroll that is 21 keys of each, every pass over [32, 9, 1024, 64]
in a GTO learner step of SmolLM2's drafter. Here one program reads a block of query rows once: q,
the causal output and its log-normaliser, and each diagonal key and value, and writes the merged
output (a single online softmax over the keys); the backward reads the gradient, the merged output,
q, the causal block's dq and the keys and values once, and writes dq and each key's and value's
gradient. The arithmetic is the torch code's, in
fp32, up to the order of its sums. With the drafter's fused RMSNorm, an H200 GTO learner step went
from 171 to 145 ms (``bench/results/throughput_h200/ninth_versions/run2``).

On CUDA the kernels are compiled by Triton; on CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported: slow, for tests).
"""

import functools

import torch

from speculative.kernel_gate import KernelGate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None


def torch_merge(q: torch.Tensor, causal_out: torch.Tensor, causal_lse: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged output in q's dtype, weights [1 + J, B, H, T] fp32) of the causal block
    ``causal_out``/``causal_lse [B, H, T]`` and the J diagonal ``keys``/``values``, by torch ops."""
    wide = torch.promote_types(q.dtype, torch.float32)  # the merge's precision: fp32 at least
    qf = q.to(wide)
    scores = [causal_lse.to(wide)] + [(qf * key.to(wide)).sum(-1) * scale for key in keys]
    weights = torch.softmax(torch.stack(scores), dim=0)  # [1 + J, B, H, T]
    out = weights[0, ..., None] * causal_out.to(wide)
    for j, value in enumerate(values, start=1):
        out = out + weights[j, ..., None] * value.to(wide)
    return out.to(q.dtype), weights


def torch_merge_backward(grad: torch.Tensor, q: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                         keys: list[torch.Tensor], values: list[torch.Tensor], causal_dq: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dq in q's dtype, the keys' and the values' gradients in their dtypes) of ``torch_merge``,
    given the causal block's own dq (``causal_dq``, from its kernel's backward)."""
    wide = weights.dtype
    grad = grad.to(wide)
    dq = causal_dq.to(wide)
    grad_dot_out = (grad * out.to(wide)).sum(-1)
    qf = q.to(wide)
    dkeys, dvalues = [], []
    for j, (key, value) in enumerate(zip(keys, values), start=1):
        score_grad = weights[j] * ((grad * value.to(wide)).sum(-1) - grad_dot_out) * scale
        dq = dq + score_grad[..., None] * key.to(wide)
        dkeys.append((score_grad[..., None] * qf).to(key.dtype))
        dvalues.append((weights[j, ..., None] * grad).to(value.dtype))
    return dq.to(q.dtype), dkeys, dvalues


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    def _merge_forward(q_ptr, o_ptr, lse_ptr, k_ptr, v_ptr, out_ptr, score_ptr, norm_ptr,
                       rows_total, length, heads, diagonals, scale,
                       q_sb, q_sh, q_st, o_sb, o_sh, o_st, l_sb, l_sh, l_st,
                       DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        column = tl.arange(0, BLOCK_D)
        live_row = rows < rows_total
        live = live_row[:, None] & (column[None, :] < DIM)
        # row (b * heads + h) * length + t of the [B, heads, T, d] views, which may be strided
        t, b, h = rows % length, rows // length // heads, rows // length % heads
        q = tl.load(q_ptr + (b * q_sb + h * q_sh + t * q_st)[:, None] + column[None, :],
                    mask=live, other=0.0).to(tl.float32)
        acc = tl.load(o_ptr + (b * o_sb + h * o_sh + t * o_st)[:, None] + column[None, :],
                      mask=live, other=0.0).to(tl.float32)
        best = tl.load(lse_ptr + b * l_sb + h * l_sh + t * l_st, mask=live_row,
                       other=0.0).to(tl.float32)  # the running maximum starts at the causal block's score
        total = tl.full([ROWS], 1.0, tl.float32)  # sum of exp(score - best): the causal block's term
        dense = rows[:, None] * DIM + column[None, :]  # the stacked keys/values and the output: contiguous rows
        for j in range(diagonals):
            key = tl.load(k_ptr + j * rows_total * DIM + dense, mask=live, other=0.0).to(tl.float32)
            value = tl.load(v_ptr + j * rows_total * DIM + dense, mask=live, other=0.0).to(tl.float32)
            score = tl.sum(q * key, axis=1) * scale
            tl.store(score_ptr + (j + 1) * rows_total + rows, score, mask=live_row)
            new_best = tl.maximum(best, score)
            shrink = tl.exp(best - new_best)
            weight = tl.exp(score - new_best)
            acc = acc * shrink[:, None] + weight[:, None] * value
            total = total * shrink + weight
            best = new_best
        tl.store(out_ptr + dense, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(norm_ptr + rows, best + tl.log(total), mask=live_row)

    def _merge_backward(grad_ptr, out_ptr, q_ptr, cdq_ptr, k_ptr, v_ptr, w_ptr, dq_ptr, dk_ptr, dv_ptr,
                        rows_total, length, heads, diagonals, scale,
                        g_sb, g_sh, g_st, c_sb, c_sh, c_st,
                        DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        column = tl.arange(0, BLOCK_D)
        live_row = rows < rows_total
        live = live_row[:, None] & (column[None, :] < DIM)
        dense = rows[:, None] * DIM + column[None, :]
        t, b, h = rows % length, rows // length // heads, rows // length % heads
        grad = tl.load(grad_ptr + (b * g_sb + h * g_sh + t * g_st)[:, None] + column[None, :],
                       mask=live, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + dense, mask=live, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + dense, mask=live, other=0.0).to(tl.float32)
        dq = tl.load(cdq_ptr + (b * c_sb + h * c_sh + t * c_st)[:, None] + column[None, :],
                     mask=live, other=0.0).to(tl.float32)
        grad_dot_out = tl.sum(grad * out, axis=1)
        for j in range(diagonals):
            key = tl.load(k_ptr + j * rows_total * DIM + dense, mask=live, other=0.0).to(tl.float32)
            value = tl.load(v_ptr + j * rows_total * DIM + dense, mask=live, other=0.0).to(tl.float32)
            weight = tl.load(w_ptr + (j + 1) * rows_total + rows, mask=live_row, other=0.0)
            score_grad = weight * (tl.sum(grad * value, axis=1) - grad_dot_out) * scale
            dq += score_grad[:, None] * key
            tl.store(dk_ptr + j * rows_total * DIM + dense, (score_grad[:, None] * q).to(dk_ptr.dtype.element_ty),
                     mask=live)
            tl.store(dv_ptr + j * rows_total * DIM + dense, (weight[:, None] * grad).to(dv_ptr.dtype.element_ty),
                     mask=live)
        tl.store(dq_ptr + dense, dq.to(dq_ptr.dtype.element_ty), mask=live)


@functools.cache
def _kernels():
    return triton.jit(_merge_forward), triton.jit(_merge_backward)  # interpreted when TRITON_INTERPRET=1


def _strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    if tensor.stride(-1) != 1:
        raise ValueError("the TTT merge kernel needs each row's last dimension contiguous")
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def _check_rows(q: torch.Tensor, stacked: torch.Tensor) -> None:
    if q.dim() != 4 or not q.is_contiguous() or not stacked.is_contiguous() or stacked.shape[1:] != q.shape:
        raise ValueError(f"the TTT merge kernel needs q [B, H, T, d] and stacked keys [J, B, H, T, d], contiguous "
                         f"(q {tuple(q.shape)}, keys {tuple(stacked.shape)})")


ROWS_PER_PROGRAM = 32


def kernel_merge(q: torch.Tensor, causal_out: torch.Tensor, causal_lse: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_merge`` by the kernel; ``keys``/``values`` stacked ``[J, B, H, T, d]`` (contiguous, as q)."""
    _check_rows(q, keys)
    _check_rows(q, values)
    batch, heads, length, dim = q.shape
    rows = batch * heads * length
    if causal_out.stride(-1) != 1:
        causal_out = causal_out.contiguous()
    out = torch.empty_like(q)
    scores = torch.empty(1 + keys.shape[0], batch, heads, length, dtype=torch.float32, device=q.device)
    scores[0] = causal_lse
    norm = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if rows:
        forward, _ = _kernels()
        forward[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
            q, causal_out, causal_lse, keys, values, out, scores, norm, rows, length, heads, keys.shape[0], scale,
            *_strides(q), *_strides(causal_out), *causal_lse.stride(),
            DIM=dim, ROWS=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(dim))
    return out, torch.exp(scores - norm)


def kernel_merge_backward(grad: torch.Tensor, q: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                          keys: torch.Tensor, values: torch.Tensor, causal_dq: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch_merge_backward`` by the kernel: (dq, the keys' gradients ``[J, B, H, T, d]``, the values')."""
    _check_rows(q, keys)
    _check_rows(q, values)
    if not out.is_contiguous() or not weights.is_contiguous():
        raise ValueError("the TTT merge kernel's backward needs the merged output and the weights contiguous")
    batch, heads, length, dim = q.shape
    rows = batch * heads * length
    grad, causal_dq = (t if t.stride(-1) == 1 else t.contiguous() for t in (grad, causal_dq))  # e.g. expanded
    dq = torch.empty_like(q)
    dkeys, dvalues = torch.empty_like(keys), torch.empty_like(values)
    if rows:
        _, backward = _kernels()
        backward[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
            grad, out, q, causal_dq, keys, values, weights, dq, dkeys, dvalues, rows, length, heads, keys.shape[0],
            scale, *_strides(grad), *_strides(causal_dq),
            DIM=dim, ROWS=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(dim))
    return dq, dkeys, dvalues


def _check(device: torch.device) -> str | None:
    """The kernels against the torch code on a small case (``KernelGate``'s one-time check)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(torch.bfloat16)

    q, causal_out, grad = rand(2, 3, 37, 64), rand(2, 3, 37, 64), rand(2, 3, 37, 64)
    lse = torch.randn(2, 3, 37, generator=generator, device=device)
    keys, values = [rand(2, 3, 37, 64) for _ in range(3)], [rand(2, 3, 37, 64) for _ in range(3)]
    causal_dq = rand(2, 3, 37, 64)
    want_out, weights = torch_merge(q, causal_out, lse, keys, values, 0.125)
    got_out, got_weights = kernel_merge(q, causal_out, lse, torch.stack(keys), torch.stack(values), 0.125)
    want = torch_merge_backward(grad, q, want_out, weights, keys, values, causal_dq, 0.125)
    got = kernel_merge_backward(grad, q, want_out, weights, torch.stack(keys), torch.stack(values), causal_dq, 0.125)
    pairs = [(got_out, want_out), (got_weights, weights), (got[0], want[0]), (got[1], torch.stack(want[1])),
             (got[2], torch.stack(want[2]))]
    for a, b in pairs:
        error = (a.float() - b.float()).abs().max().item()
        if error > 0.02 * max(b.float().abs().max().item(), 1e-3):
            return f"differs by {error:.3g}"
    return None


def fits(q: torch.Tensor, diagonals: int) -> bool:
    """Whether the kernels' element offsets into the stacked keys (key j's plane starts at
    j * q.numel(), int32 arithmetic) stay below 2**31 for ``diagonals`` keys like ``q``; larger
    shapes take the torch code."""
    return (diagonals + 1) * q.numel() < 2**31


# Whether the merge runs by the kernels on a tensor's device: on CUDA unless ``DRAFTRL_TTT_MERGE=torch``
wanted = KernelGate("TTT merge", "DRAFTRL_TTT_MERGE", _check)
