"""Training-time test attention through PyTorch's fused attention kernels (``training.attention: sdpa``).

Step k of the unroll attends the step-1 keys causally and steps 2..k's keys on the diagonal only
(``speculative.ttt`` explains EAGLE-3's mask). The dense reference builds fp32 [B, heads, T, T]
scores, masks, softmaxes and their gradients at every step: most of a GTO learner step's memory
traffic. Here the causal part is one fused kernel that also returns its log-normaliser (flash
attention for bf16/fp16 on CUDA, memory-efficient attention for fp32 on CUDA and where flash
refuses the GPU or head size, the CPU flash kernel on CPU), and the k-1 diagonal scores are
merged with it by log-sum-exp:

    out = w_0 * o_causal + sum_j w_j * v_j,   w = softmax([lse_causal, d_1, ..., d_{k-1}])

The backward needs the gradient through ``lse_causal`` too, which torch's kernels do not take. It
does not need it as such: for this merge, the causal block's score gradient is
P * (dO_0 . v - dO_0 . out) with dO_0 = w_0 * dout, which is the kernel's own backward given
``out`` (the merged output) in place of its own output. So the kernel's backward serves unchanged.

Right-padded rows only (real tokens first): a real query then sees only real keys under the causal
mask, and padded rows, which no loss reads, attend whatever finite keys they see. No sliding window.
"""

from __future__ import annotations

import math

import torch

from speculative import ttt_merge_kernel
from speculative.flex_ttt import right_padded

aten = torch.ops.aten


def _causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(output, log-normaliser [B, H, T] fp32, what the backward needs) of causal attention."""
    length = q.shape[-2]
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse[..., :length], ("cpu", lse)
    if q.dtype in (torch.float16, torch.bfloat16):
        try:
            out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, True, False, scale=scale)
            return out, lse[..., :length], ("flash", lse, cum_q, cum_k, max_q, max_k, seed, offset)
        except RuntimeError:  # no flash kernel for this GPU or head size: the memory-efficient one below
            pass
    try:
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True,
                                                                              scale=scale)
    except RuntimeError as error:
        raise RuntimeError(f"training.attention 'sdpa': torch has no fused causal kernel for {q.dtype} at head "
                           f"size {q.shape[-1]} on this GPU ({error}); use training.attention 'dense'") from error
    return out, lse[..., :length], ("efficient", lse, seed, offset)


def _causal_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, state: tuple, scale: float):
    """(dq, dk, dv) of the causal kernel, with ``out`` standing in for its output (module docstring)."""
    kind = state[0]
    if kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, state[1], 0.0, True, scale=scale)
    if kind == "flash":
        lse, cum_q, cum_k, max_q, max_k, seed, offset = state[1:]
        return aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)
    lse, seed, offset = state[1:]
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, lse, seed, offset, 0.0,  # None: no bias (an undefined tensor)
        [True, True, True, False], True, scale=scale)
    return dq, dk, dv


class _CausalPlusDiagonal(torch.autograd.Function):
    """softmax over [causal step-1 keys ; one diagonal key per later step] for every query.

    Arguments: scale, q, k0, v0, then the later steps' keys and their values (as many of each).
    The merge with the diagonal keys runs by ``speculative.ttt_merge_kernel`` where its gate
    passes (CUDA), else by the same arithmetic in torch ops."""

    @staticmethod
    def forward(ctx, scale, q, k0, v0, *later):
        diagonal_keys, diagonal_values = later[: len(later) // 2], later[len(later) // 2:]
        causal_out, causal_lse, state = _causal_forward(q, k0, v0, scale)
        ctx.kernel = ttt_merge_kernel.wanted(q) and ttt_merge_kernel.fits(q, len(diagonal_keys))
        if ctx.kernel:
            out, weights = ttt_merge_kernel.kernel_merge(q, causal_out, causal_lse, _stacked(diagonal_keys, q),
                                                         _stacked(diagonal_values, q), scale)
        else:
            out, weights = ttt_merge_kernel.torch_merge(q, causal_out, causal_lse, diagonal_keys, diagonal_values,
                                                        scale)
        ctx.save_for_backward(q, k0, v0, out, weights, *later)
        ctx.state, ctx.scale = state, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k0, v0, out, weights, *later = ctx.saved_tensors
        diagonal_keys, diagonal_values = later[: len(later) // 2], later[len(later) // 2:]
        causal_grad = (weights[0, ..., None] * grad_out.to(weights.dtype)).to(q.dtype).contiguous()
        causal_dq, dk0, dv0 = _causal_backward(causal_grad, q, k0, v0, out, ctx.state, ctx.scale)
        if ctx.kernel:
            dq, dkeys, dvalues = ttt_merge_kernel.kernel_merge_backward(
                grad_out, q, out, weights, _stacked(diagonal_keys, q), _stacked(diagonal_values, q), causal_dq,
                ctx.scale)
            dkeys, dvalues = dkeys.unbind(0), dvalues.unbind(0)
        else:
            dq, dkeys, dvalues = ttt_merge_kernel.torch_merge_backward(
                grad_out, q, out, weights, diagonal_keys, diagonal_values, causal_dq, ctx.scale)
        return (None, dq, dk0, dv0, *dkeys, *dvalues)


def _stacked(tensors, like: torch.Tensor) -> torch.Tensor:
    """[J, *like.shape] (J may be 0): the kernel reads the diagonal keys or values as one tensor."""
    return torch.stack(tensors) if tensors else like.new_empty(0, *like.shape)


class SdpaTTTCache:
    """Drop-in for ``TTTCache``: the same attention, the causal part by a fused kernel."""

    applies_sliding_window = True  # it refuses a window rather than ignore one

    def __init__(self, key_padding_mask: torch.Tensor | None = None, sliding_window: int | None = None):
        if sliding_window is not None:
            raise ValueError(f"training.attention 'sdpa' has no sliding window (the drafter's is {sliding_window}); "
                             "use 'dense' or 'flex'")
        if key_padding_mask is not None and not right_padded(key_padding_mask):
            raise ValueError("training.attention 'sdpa' needs right-padded rows (real tokens first); "
                             "use 'dense' for other masks")
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # One dtype for the kernel (the rotary embedding may have promoted q and k), last dim contiguous.
        self.keys.append(k.to(q.dtype).contiguous())
        self.values.append(v.to(q.dtype).contiguous())
        return _CausalPlusDiagonal.apply(1.0 / math.sqrt(q.shape[-1]), q.contiguous(), self.keys[0],
                                         self.values[0], *self.keys[1:], *self.values[1:])
