"""The Llama MLP's ``silu(gate) * up`` in one pass over the merged gate/up projection (Triton).

``FusedLlama`` projects gate and up in one GEMM, ``[tokens, 2 I]``, and eagerly ran ``silu`` on
the gate half (a new tensor) and then the product with the up half (another): three reads and two
writes of ``[tokens, I]``. On an H200 GTO batch those two kernels took 11.5 and 11.2 ms over the
210 verification layer calls and 8.5 ms more in the prefill (bench/results/throughput_h200/
ninth_all/gto_profile.txt), about 8 % of the batch's kernel time. One program here reads a block of
both halves once and writes the product: 1.83x the pair at a verification forward's 12 288 x 3 072 and
2.83x at the prefill's 32 768 x 3 072, the same bf16 values (H200, bench/results/throughput_h200/
tenth_kernels).

The arithmetic is the eager expression's: ``silu`` in fp32, rounded to the input's dtype (as
torch's ``silu`` kernel returns it), then the product in fp32, rounded once.

On CUDA the kernel is compiled by Triton; on CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported: slow, for tests).
"""

import functools

import torch
import torch.nn.functional as F

from speculative.kernel_gate import KernelGate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """What ``silu_mul`` computes, as the eager torch expression."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    def _silu_mul(gate_up_ptr, out_ptr, rows, width, row_stride,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        column = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        live = (row[:, None] < rows) & (column[None, :] < width)
        source = gate_up_ptr + row[:, None] * row_stride + column[None, :]
        gate = tl.load(source, mask=live, other=0.0)
        up = tl.load(source + width, mask=live, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out_ptr + row[:, None] * width + column[None, :],
                 (silu * up).to(gate.dtype, fp_downcast_rounding="rtne"), mask=live)


@functools.cache
def _kernel():
    return triton.jit(_silu_mul)  # an interpreted function when TRITON_INTERPRET=1 at import


def silu_mul(gate_up: torch.Tensor, rows_per_program: int = 4, block: int = 512) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [..., 2 I]`` (gate first, as ``chunk(2)`` splits it): a new
    ``[..., I]`` tensor. The rows may be strided; each row's entries must be contiguous."""
    if triton is None:
        raise RuntimeError("silu_mul needs Triton (pip install triton)")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate/up width {gate_up.shape[-1]} is odd")
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] and width:
        grid = (triton.cdiv(rows.shape[0], rows_per_program), triton.cdiv(width, block))
        _kernel()[grid](rows, out, rows.shape[0], width, rows.stride(0), ROWS=rows_per_program, BLOCK=block)
    return out


def _check(device: torch.device) -> str | None:
    """The kernel against ``torch_silu_mul`` on a small case (``KernelGate``'s one-time check)."""
    generator = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(37, 2 * 700, generator=generator, device=device) * 4).to(torch.bfloat16)
    want = torch_silu_mul(gate_up).float()
    error = (silu_mul(gate_up).float() - want).abs().max().item()
    return None if error <= 2 ** -7 * want.abs().max().item() else f"differs by {error:.3g}"


# The default for a forward on a tensor's device: the kernel on CUDA unless ``DRAFTRL_SILU_MUL=torch``
wanted = KernelGate("SiLU-product", "DRAFTRL_SILU_MUL", _check)
