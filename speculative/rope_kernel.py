"""RoPE on a merged q/k/v row in place, its factors read from the table by position (Triton).

``FusedLlama`` applies RoPE eagerly as ``addcmul(qkv * cos, roll(qkv, d/2), sin')`` over cos and
sin' rows gathered per token from its table: two copies to gather the factors a forward, then per
layer a roll, a product and an addcmul, each a pass over ``[tokens, heads + 2 kv_heads, d]``. On
an H200 GTO batch that was 33 ms of a 617 ms batch (the roll 16.7 ms, the products 15.7 ms over
90 layer calls). One program here reads a few tokens' q and k heads once, the factors from the
table (a few KB, cached), and writes the rotated heads back over the input; v heads are left as
they are (the identity the table holds for them).

The arithmetic is the torch expression's: the product ``x * cos`` is rounded to the input's dtype
first (as the eager ``qkv * cos`` is), then ``+ partner * sin'`` in fp32, rounded once.

On CUDA the kernel is compiled by Triton; on CPU it runs only under Triton's interpreter
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


def torch_rope(qkv: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rotated_heads: int) -> torch.Tensor:
    """What ``rope_in_place`` computes, as the eager torch expression (a new tensor)."""
    kind = torch.tensor([0] * rotated_heads + [1] * (qkv.shape[-2] - rotated_heads), device=qkv.device)
    factors = table[positions[..., None], :, kind]  # [..., rows, 2, d]
    cos, sin = factors[..., 0, :], factors[..., 1, :]
    return torch.addcmul(qkv * cos, torch.roll(qkv, qkv.shape[-1] // 2, -1), sin)


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    def _rope_rows(qkv_ptr, position_ptr, table_ptr, tokens, row_stride, table_stride, rotated,
                   DIM: tl.constexpr, TOKENS: tl.constexpr, WIDTH: tl.constexpr):
        first = tl.program_id(0).to(tl.int64) * TOKENS
        token = first + tl.arange(0, TOKENS)  # [TOKENS]
        column = tl.arange(0, WIDTH)  # [WIDTH]: entries of the q and k heads (rotated of them)
        within = column % DIM
        partner = column - within + (within + DIM // 2) % DIM
        live = (token[:, None] < tokens) & (column[None, :] < rotated)
        row = qkv_ptr + token[:, None] * row_stride
        x = tl.load(row + column[None, :], mask=live, other=0.0)
        other = tl.load(row + partner[None, :], mask=live, other=0.0).to(tl.float32)
        position = tl.load(position_ptr + token, mask=token < tokens, other=0).to(tl.int64)
        factors = table_ptr + position[:, None] * table_stride + within[None, :]
        cos = tl.load(factors, mask=live, other=0.0).to(tl.float32)  # table[pos, 0 (cos), 0 (q/k), d]
        sin = tl.load(factors + 2 * DIM, mask=live, other=0.0).to(tl.float32)  # table[pos, 1 (sin'), 0, d]
        scaled = (x.to(tl.float32) * cos).to(x.dtype, fp_downcast_rounding="rtne").to(tl.float32)  # rounded as the eager product
        tl.store(row + column[None, :], (scaled + other * sin).to(x.dtype, fp_downcast_rounding="rtne"), mask=live)


@functools.cache
def _kernel():
    return triton.jit(_rope_rows)  # an interpreted function when TRITON_INTERPRET=1 at import


def rope_in_place(qkv: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rotated_heads: int,
                  tokens_per_program: int = 4) -> torch.Tensor:
    """Rotate the first ``rotated_heads`` heads (q, then k) of ``qkv [..., rows, d]`` in place by
    the factors of ``table [P, 2 (cos, sin'), 2 (q/k, v), d]`` (``fused_llama.qkv_rope_table``) at
    ``positions [...]`` (one per token); the v heads are not touched. Returns ``qkv``."""
    if triton is None:
        raise RuntimeError("rope_in_place needs Triton (pip install triton)")
    dim = qkv.shape[-1]
    if dim % 2 or table.shape[1:] != (2, 2, dim):
        raise ValueError(f"head dim {dim} and table {tuple(table.shape)} do not fit [P, 2, 2, {dim}]")
    rows = qkv.view(-1, qkv.shape[-2] * dim)  # a view: the caller's tensor is what changes
    if rows.stride(-1) != 1 or not table.is_contiguous():
        raise ValueError("rope_in_place needs each token's q/k/v row and the table contiguous")
    flat_positions = positions.reshape(-1)
    if flat_positions.numel() != rows.shape[0]:
        raise ValueError(f"{flat_positions.numel()} positions for {rows.shape[0]} tokens")
    rotated = rotated_heads * dim
    width = triton.next_power_of_2(rotated)
    if rows.shape[0]:
        grid = (triton.cdiv(rows.shape[0], tokens_per_program),)
        _kernel()[grid](rows, flat_positions, table, rows.shape[0], rows.stride(0), table.stride(0), rotated,
                        DIM=dim, TOKENS=tokens_per_program, WIDTH=width)
    return qkv


def _check(device: torch.device) -> str | None:
    """The kernel against ``torch_rope`` on a small case (``KernelGate``'s one-time check)."""
    generator = torch.Generator(device=device).manual_seed(0)
    table = torch.randn(16, 2, 2, 64, generator=generator, device=device).to(torch.bfloat16)
    table[:, 0, 1], table[:, 1, 1] = 1, 0  # identity on the v heads, as a real table
    qkv = torch.randn(3, 5, 15, 64, generator=generator, device=device).to(torch.bfloat16)
    positions = torch.randint(0, 16, (3, 5), generator=generator, device=device)
    want = torch_rope(qkv, positions, table, 12)
    error = (rope_in_place(qkv.clone(), positions, table, 12).float() - want.float()).abs().max().item()
    return None if error <= 0.02 * want.float().abs().max().item() else f"differs by {error:.3g}"


# The default for a forward on a tensor's device: the kernel on CUDA unless ``DRAFTRL_ROPE=torch``
wanted = KernelGate("RoPE", "DRAFTRL_ROPE", _check)
