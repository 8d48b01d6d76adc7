"""One token's attention over a prefix of the KV cache, per sequence (Triton).

The target's autoregressive step (``BatchGenerator`` with ``chain_length=0``, the speed-up
baseline) attends one query token per sequence over the cache slots ``0 .. visible - 1``. Through
SDPA that is a cuDNN flash kernel, a memset and a mask kernel a layer, over the whole span the step
was captured for (H200, batch 1, Inductor + CUDA graph: 6.5 us of cuDNN a layer, 195 us of a
1.10 ms token; ``bench/results/ar_b1_h200``). One program here takes one sequence's kv head with
all the query heads that share it (GQA), and loops over the visible slots only, keeping an online
softmax: one kernel a layer, and no work past the sequence's length.

The same kernel takes several query tokens a sequence, each over its own prefix: the batched
engine's chain verification (``speculative.batch_engine``), K + 1 tokens a sequence whose masks are
prefixes of the cache, where SDPA ran cuDNN's flash kernel with a mask over the whole span (1.16 ms
of a 64-sequence OPD step's 7.0 ms of kernels on an H200, ``bench/results/opd_engine_h200``). A
program then holds every (query head, token) row of its kv head.

Under Inductor the kernel is the custom op ``draftrl::decode_attention`` (``torch.library.triton_op``),
which Inductor calls from its compiled step; eagerly (and in eager CUDA graph captures) it is
launched directly. On CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported: slow, for tests; there the products are taken in fp32, exact for bf16 inputs,
as the interpreter's bf16 dots are wrong, where CUDA uses the tensor cores with fp32 accumulation).
"""

import functools
import os

import torch

from speculative.kernel_gate import KernelGate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None


def torch_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """What ``decode_attention`` computes, through SDPA and a prefix mask per query token."""
    if q.dim() == 3:  # one token a sequence
        return torch_decode_attention(q[:, None], keys, values, visible[:, None], scale)[:, 0]
    batch, tokens, heads, dim = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    allowed = torch.arange(span, device=q.device)[None, None, :] < visible[..., None]  # [B, T, S]
    grouped = q.view(batch, tokens, kv_heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(
        batch, kv_heads, groups * tokens, dim)  # rows (group member, token), group-major
    mask = allowed[:, None, None].expand(batch, 1, groups, tokens, span).reshape(batch, 1, groups * tokens, span)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.view(batch, kv_heads, groups, tokens, dim).permute(0, 3, 1, 2, 4).reshape(batch, tokens, heads, dim)


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    def _decode_rows(q_ptr, k_ptr, v_ptr, out_ptr, best_ptr, total_ptr, visible_ptr, span, chunk, scale,
                     q_batch, q_token, q_head, k_batch, k_head, k_slot, v_batch, v_head, v_slot,
                     o_batch, o_token, o_head, visible_batch,
                     DIM, GROUPS: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                     BLOCK: tl.constexpr, SPLITS: tl.constexpr, EXACT_DOT: tl.constexpr):
        """One (sequence, kv head, split): the query heads that share the kv head, at each of the
        sequence's TOKENS query tokens (row = member * TOKENS + token), over the split's slots, each
        row up to its own token's count. One split: the normalised output; several: the
        unnormalised sums and maxima, merged next."""
        sequence = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        row = tl.arange(0, ROWS)  # (group member, token) pairs (padded to ROWS for tl.dot)
        column = tl.arange(0, WIDTH)  # the head dim, padded to a power of two >= 16
        live = row < GROUPS * TOKENS
        within = column < DIM
        token = row % TOKENS
        head = kv_head * GROUPS + row // TOKENS
        q = tl.load(q_ptr + sequence * q_batch + token[:, None] * q_token + head[:, None] * q_head + column[None, :],
                    mask=live[:, None] & within[None, :], other=0.0)
        count = tl.load(visible_ptr + sequence * visible_batch + token, mask=live, other=0).to(tl.int32)
        count = tl.minimum(count, span)  # [ROWS]: each row's visible slots
        first = split * chunk
        stop = tl.minimum(first + chunk, tl.max(count, 0))
        keys = k_ptr + sequence * k_batch + kv_head * k_head
        values = v_ptr + sequence * v_batch + kv_head * v_head
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, WIDTH], tl.float32)
        for start in range(first, stop, BLOCK):
            slot = start + tl.arange(0, BLOCK)
            inside = slot < stop
            k = tl.load(keys + slot[:, None] * k_slot + column[None, :], mask=inside[:, None] & within[None, :], other=0.0)
            if EXACT_DOT:  # IEEE fp32 products (of bf16/fp16 inputs, which fp32 holds exactly)
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:  # the tensor cores' product of the same inputs, accumulated in fp32
                scores = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
            scores = (scores * scale).to(tl.float32)  # (a float argument may arrive as fp64)
            scores = tl.where(slot[None, :] < count[:, None], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row with nothing visible yet: no NaN
            weights = tl.exp(scores - shift[:, None])
            rescale = tl.exp(best - shift)
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(values + slot[:, None] * v_slot + column[None, :], mask=inside[:, None] & within[None, :], other=0.0)
            rounded = weights.to(v.dtype)  # the weights at the values' precision, as flash kernels
            if EXACT_DOT:
                acc = acc * rescale[:, None] + tl.dot(rounded.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(rounded, v, out_dtype=tl.float32)
            best = new_best
        if SPLITS == 1:
            out = acc / tl.where(total > 0, total, 1.0)[:, None]  # no visible slot: zeros, not NaN
            tl.store(out_ptr + sequence * o_batch + token[:, None] * o_token + head[:, None] * o_head + column[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=live[:, None] & within[None, :])
        else:  # partials [B, kv_heads, SPLITS, ROWS(, WIDTH)], fp32
            part = (sequence * tl.num_programs(1) + kv_head) * SPLITS + split
            tl.store(best_ptr + part * ROWS + row, best)
            tl.store(total_ptr + part * ROWS + row, total)
            tl.store(out_ptr + (part * ROWS + row[:, None]) * WIDTH + column[None, :], acc)

    def _merge_splits(acc_ptr, best_ptr, total_ptr, out_ptr, o_batch, o_token, o_head, DIM, GROUPS: tl.constexpr,
                      TOKENS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr, SPLITS: tl.constexpr):
        """One (sequence, kv head): its splits' partial softmax sums, rescaled to one maximum."""
        sequence = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split, row, column = tl.arange(0, SPLITS), tl.arange(0, ROWS), tl.arange(0, WIDTH)
        part = (sequence * tl.num_programs(1) + kv_head) * SPLITS + split  # [SPLITS]
        best = tl.load(best_ptr + part[:, None] * ROWS + row[None, :])  # [SPLITS, ROWS]
        top = tl.max(best, 0)
        weight = tl.where(best > float("-inf"), tl.exp(best - top[None, :]), 0.0)  # an empty split: 0
        total = tl.sum(weight * tl.load(total_ptr + part[:, None] * ROWS + row[None, :]), 0)
        acc = tl.load(acc_ptr + (part[:, None, None] * ROWS + row[None, :, None]) * WIDTH + column[None, None, :])
        out = tl.sum(weight[:, :, None] * acc, 0) / tl.where(total > 0, total, 1.0)[:, None]
        token = row % TOKENS
        head = kv_head * GROUPS + row // TOKENS
        tl.store(out_ptr + sequence * o_batch + token[:, None] * o_token + head[:, None] * o_head + column[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(row < GROUPS * TOKENS)[:, None] & (column < DIM)[None, :])


@functools.cache
def _kernels():
    # interpreted functions when TRITON_INTERPRET=1 at import
    return triton.jit(_decode_rows), triton.jit(_merge_splits)


def _interpreted() -> bool:
    return not isinstance(_kernels()[0], triton.runtime.JITFunction)


def _shapes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> int:
    """Checks the layout the kernel reads; returns the query heads per kv head."""
    if q.dim() not in (3, 4):
        raise ValueError(f"q {tuple(q.shape)}: want [B, heads, d] or [B, T, heads, d]")
    batch, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
    if keys.shape != values.shape or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[3] != dim:
        raise ValueError(f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}: "
                         "want q [B, (T,) heads, d] and keys/values [B, kv_heads, S, d]")
    if heads % keys.shape[1]:
        raise ValueError(f"{heads} query heads do not share {keys.shape[1]} kv heads evenly")
    if visible.shape != q.shape[:-2]:
        raise ValueError(f"visible {tuple(visible.shape)}: want one count per query token {tuple(q.shape[:-2])}")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention needs q, keys and values contiguous in each head")
    return heads // keys.shape[1]


def _settings_from_env(text: str | None) -> tuple[int, int, int] | None:
    """``DRAFTRL_DECODE_ATTENTION_SETTINGS=BLOCKxWARPSxSPLITS`` (a benchmark's override)."""
    if not text:
        return None
    try:
        block, warps, splits = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"DRAFTRL_DECODE_ATTENTION_SETTINGS={text!r}: want BLOCKxWARPSxSPLITS, e.g. 64x4x1") from None
    if block < 16 or block & (block - 1) or warps < 1 or splits < 0:
        raise ValueError(f"DRAFTRL_DECODE_ATTENTION_SETTINGS={text!r}: block a power of two >= 16, warps >= 1, "
                         "splits >= 0 (0: by the span)")
    return block, warps, splits


def auto_splits(batch: int, kv_heads: int, span: int) -> int:
    """Splits of the span for settings whose splits are 0. H200, 3 kv heads (bench/decode_attention.py,
    results/ar_b1_h200/decode_kernel/): one program a (sequence, kv head) is fastest up to 512
    slots; past that, a split per 256 slots while there are few programs (batch 1: 4 at 1 024,
    8 at 2 048), two at batch 16."""
    if span <= 512:
        return 1
    return max(1, min(span // 256, max(2, 32 // (batch * kv_heads))))


# Launch settings: (slots a block, warps, splits; 0: ``auto_splits``), from bench/decode_attention.py
DEFAULT_SETTINGS = _settings_from_env(os.environ.get("DRAFTRL_DECODE_ATTENTION_SETTINGS")) or (128, 4, 0)


def _exact_dot(dtype: torch.dtype) -> bool:
    """IEEE fp32 products: under the interpreter (its bf16 dots are wrong) and for fp32 inputs (on
    CUDA ``tl.dot`` would round them to TF32, and an fp32 target is run to be exact)."""
    return _interpreted() or dtype == torch.float32


def _launch(wrap, q, keys, values, visible, scale, settings: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel(s); ``wrap`` turns a Triton kernel into what launches it (``wrap_triton``
    inside the custom op, the identity eagerly)."""
    block, warps, splits = settings or DEFAULT_SETTINGS
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.dim() == 3:  # one token a sequence: [B, heads, d], visible [B]: T = 1, no token strides (no views made)
        (batch, heads, dim), tokens = q.shape, 1
        q_strides, out_strides = (q.stride(0), 0, q.stride(1)), (out.stride(0), 0, out.stride(1))
    else:
        batch, tokens, heads, dim = q.shape
        q_strides, out_strides = (q.stride(0), q.stride(1), q.stride(2)), (out.stride(0), out.stride(1), out.stride(2))
    kv_heads, span = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    splits = splits or auto_splits(batch, kv_heads, span)
    rows, width = max(16, triton.next_power_of_2(groups * tokens)), max(16, triton.next_power_of_2(dim))
    splits = max(1, min(splits, triton.cdiv(span, block)))
    splits = triton.next_power_of_2(splits) if splits > 1 else 1
    chunk = triton.cdiv(triton.cdiv(span, splits), block) * block
    decode, merge = _kernels()
    if splits == 1:
        target, best, total = out, out, out  # (the partial buffers are not written)
    else:
        target = torch.empty(batch, kv_heads, splits, rows, width, dtype=torch.float32, device=q.device)
        best = torch.empty(batch, kv_heads, splits, rows, dtype=torch.float32, device=q.device)
        total = torch.empty_like(best)
    if visible.stride(-1) != 1:
        visible = visible.contiguous()
    wrap(decode)[(batch, kv_heads, splits)](
        q, keys, values, target, best, total, visible, span, chunk, scale,
        *q_strides, keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), *out_strides, visible.stride(0), dim,
        GROUPS=groups, TOKENS=tokens, ROWS=rows, WIDTH=width, BLOCK=block, SPLITS=splits,
        EXACT_DOT=_exact_dot(q.dtype), num_warps=warps)
    if splits > 1:
        wrap(merge)[(batch, kv_heads)](target, best, total, out, *out_strides, dim,
                                       GROUPS=groups, TOKENS=tokens, ROWS=rows, WIDTH=width, SPLITS=splits)
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float, settings: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``q [B, heads, d]`` (one token a sequence; head h reads kv head h // (heads / kv_heads))
    over ``keys``/``values [B, kv_heads, S, d]`` (strided views of a cache are fine), slots
    ``0 .. visible[b] - 1`` only; returns ``[B, heads, d]``. Or ``q [B, T, heads, d]`` with
    ``visible [B, T]``: T query tokens a sequence, each over its own prefix (a verified chain's
    tokens, each seeing the slots up to its own), one program still reading each kv head once for
    all of them; returns ``[B, T, heads, d]``. ``settings``: (slots a block, warps, splits of the
    span; several splits run in parallel, then a second kernel merges them; 0 splits:
    ``auto_splits``).
    Inside ``torch.compile`` it is the custom op Inductor compiles around (default settings);
    eagerly a direct launch."""
    if triton is None:
        raise RuntimeError("decode_attention needs Triton (pip install triton)")
    _shapes(q, keys, values, visible)
    if torch.compiler.is_compiling():
        if _decode_op is None:
            raise RuntimeError("decode_attention under torch.compile needs compiled Triton (not its interpreter)")
        return _decode_op(q, keys, values, visible, scale)
    return _launch(lambda kernel: kernel, q, keys, values, visible, scale, settings)


def _register_op():
    """``draftrl::decode_attention`` for Inductor (only with compiled Triton: the interpreter's
    functions are not ``JITFunction``s, which the op's tracing needs)."""
    if triton is None or _interpreted():
        return None
    from torch.library import triton_op, wrap_triton

    @triton_op("draftrl::decode_attention", mutates_args=())
    def op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
           scale: float) -> torch.Tensor:
        return _launch(wrap_triton, q, keys, values, visible, scale)

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
    if error > 0.02 * want.abs().max().item():
        return f"differs by {error:.3g}"
    chain = torch.randn(3, 4, 9, 64, generator=generator, device=device).to(torch.bfloat16)  # 4 tokens a sequence
    counts = torch.tensor([[1, 2, 3, 4], [94, 95, 96, 97], [147, 148, 149, 150]], device=device)
    want = torch_decode_attention(chain, keys, values, counts, 0.125).float()
    error = (decode_attention(chain, keys, values, counts, 0.125).float() - want).abs().max().item()
    return None if error <= 0.02 * want.abs().max().item() else f"differs by {error:.3g} (several tokens a sequence)"


# The default for a decode step on a tensor's device: the kernel on CUDA unless
# ``DRAFTRL_DECODE_ATTENTION=torch``
wanted = KernelGate("decode attention", "DRAFTRL_DECODE_ATTENTION", _check)
