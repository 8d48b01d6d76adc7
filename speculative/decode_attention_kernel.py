"""One token's attention over a prefix of the KV cache, per sequence (Triton).

The target's autoregressive step (``BatchGenerator`` with ``chain_length=0``, the speed-up
baseline) attends one query token per sequence over the cache slots ``0 .. visible - 1``. Through
SDPA that is a cuDNN flash kernel, a memset and a mask kernel a layer, over the whole span the step
was captured for (H200, batch 1, Inductor + CUDA graph: 6.5 us of cuDNN a layer, 195 us of a
1.10 ms token; ``bench/results/ar_b1_h200``). One program here takes one sequence's kv head with
all the query heads that share it (GQA), and loops over the visible slots only, keeping an online
softmax: one kernel a layer, and no work past the sequence's length.

Under Inductor the kernel is the custom op ``draftrl::decode_attention`` (``torch.library.triton_op``),
which Inductor calls from its compiled step; eagerly (and in eager CUDA graph captures) it is
launched directly. On CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported: slow, for tests).
"""

import functools

import torch

from speculative.kernel_gate import KernelGate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None


def torch_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """What ``decode_attention`` computes, through SDPA and a prefix mask."""
    batch, heads, dim = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    allowed = torch.arange(span, device=q.device)[None, :] < visible[:, None]  # [B, S]
    grouped = q.view(batch, kv_heads, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=allowed[:, None, None],
                                                           scale=scale)
    return out.reshape(batch, heads, dim)


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    def _decode_rows(q_ptr, k_ptr, v_ptr, out_ptr, visible_ptr, span, scale,
                     q_batch, q_head, k_batch, k_head, k_slot, v_batch, v_head, v_slot, o_batch, o_head,
                     DIM, GROUPS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        sequence = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        row = tl.arange(0, ROWS)  # the query heads of this kv head (padded to ROWS for tl.dot)
        column = tl.arange(0, WIDTH)  # the head dim, padded to a power of two >= 16
        live = row < GROUPS
        within = column < DIM
        head = kv_head * GROUPS + row
        q = tl.load(q_ptr + sequence * q_batch + head[:, None] * q_head + column[None, :],
                    mask=live[:, None] & within[None, :], other=0.0)
        count = tl.minimum(tl.load(visible_ptr + sequence).to(tl.int32), span)
        keys = k_ptr + sequence * k_batch + kv_head * k_head
        values = v_ptr + sequence * v_batch + kv_head * v_head
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, WIDTH], tl.float32)
        # the dots in fp32 (exact for bf16/fp16 inputs; Triton's interpreter gets bf16 dots wrong),
        # the weights rounded to the values' dtype first, as flash kernels multiply them
        for start in range(0, count, BLOCK):
            slot = start + tl.arange(0, BLOCK)
            inside = slot < count
            k = tl.load(keys + slot[:, None] * k_slot + column[None, :], mask=inside[:, None] & within[None, :], other=0.0)
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            scores = tl.where(inside[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(values + slot[:, None] * v_slot + column[None, :], mask=inside[:, None] & within[None, :], other=0.0)
            rounded = weights.to(v.dtype).to(tl.float32)
            acc = acc * rescale[:, None] + tl.dot(rounded, v.to(tl.float32), input_precision="ieee")
            best = new_best
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # no visible slot: zeros, not NaN
        tl.store(out_ptr + sequence * o_batch + head[:, None] * o_head + column[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None] & within[None, :])


@functools.cache
def _kernel():
    return triton.jit(_decode_rows)  # an interpreted function when TRITON_INTERPRET=1 at import


def _shapes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> int:
    """Checks the layout the kernel reads; returns the query heads per kv head."""
    batch, heads, dim = q.shape
    if keys.shape != values.shape or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[3] != dim:
        raise ValueError(f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}: "
                         "want q [B, heads, d] and keys/values [B, kv_heads, S, d]")
    if heads % keys.shape[1]:
        raise ValueError(f"{heads} query heads do not share {keys.shape[1]} kv heads evenly")
    if visible.shape != (batch,):
        raise ValueError(f"visible {tuple(visible.shape)}: want one count per sequence [{batch}]")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention needs q, keys and values contiguous in each head")
    return heads // keys.shape[1]


def _launch(launcher, q, keys, values, visible, scale, out, block: int = 64) -> None:
    groups = q.shape[1] // keys.shape[1]
    grid = (q.shape[0], keys.shape[1])
    launcher[grid](q, keys, values, out, visible, keys.shape[2], scale,
                   q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
                   values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1),
                   q.shape[2], GROUPS=groups, ROWS=max(16, triton.next_power_of_2(groups)),
                   WIDTH=max(16, triton.next_power_of_2(q.shape[2])), BLOCK=block)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``q [B, heads, d]`` (one token a sequence; head h reads kv head h // (heads / kv_heads))
    over ``keys``/``values [B, kv_heads, S, d]`` (strided views of a cache are fine), slots
    ``0 .. visible[b] - 1`` only; returns ``[B, heads, d]``. Inside ``torch.compile`` it is the
    custom op Inductor compiles around; eagerly a direct launch."""
    if triton is None:
        raise RuntimeError("decode_attention needs Triton (pip install triton)")
    _shapes(q, keys, values, visible)
    if torch.compiler.is_compiling():
        if _decode_op is None:
            raise RuntimeError("decode_attention under torch.compile needs compiled Triton (not its interpreter)")
        return _decode_op(q, keys, values, visible, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(_kernel(), q, keys, values, visible, scale, out)
    return out


def _register_op():
    """``draftrl::decode_attention`` for Inductor (only with compiled Triton: the interpreter's
    functions are not ``JITFunction``s, which the op's tracing needs)."""
    if triton is None or not isinstance(_kernel(), triton.runtime.JITFunction):
        return None
    from torch.library import triton_op, wrap_triton

    @triton_op("draftrl::decode_attention", mutates_args=())
    def op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
           scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _launch(wrap_triton(_kernel()), q, keys, values, visible, scale, out)
        return out

    return op


_decode_op = _register_op()


def _check(device: torch.device) -> str | None:
    """The kernel against ``torch_decode_attention`` (``KernelGate``'s one-time check): GQA, a
    strided cache view, a count past the span, different lengths per sequence."""
    generator = torch.Generator(device=device).manual_seed(0)
    storage = torch.randn(2, 3, 3, 200, 64, generator=generator, device=device).to(torch.bfloat16)
    keys, values = storage[0, :, :, :150], storage[1, :, :, :150]
    q = torch.randn(3, 9, 64, generator=generator, device=device).to(torch.bfloat16)
    visible = torch.tensor([1, 97, 400], device=device)
    want = torch_decode_attention(q, keys, values, visible, 0.125).float()
    error = (decode_attention(q, keys, values, visible, 0.125).float() - want).abs().max().item()
    return None if error <= 0.02 * want.abs().max().item() else f"differs by {error:.3g}"


# The default for a decode step on a tensor's device: the kernel on CUDA unless
# ``DRAFTRL_DECODE_ATTENTION=torch``
wanted = KernelGate("decode attention", "DRAFTRL_DECODE_ATTENTION", _check)
