"""Each row's argmax and fp32 log-normaliser at a temperature, in one read of the logits (Triton).

GTO's verification reduces the target's [M, V] bf16 logits at every fed tree node (37 000 x
49 152, 3.7 GB, per forward on an H200 batch) to what scoring reads: the argmax and
``logsumexp(logits.float() / T)``. Eagerly that was an argmax pass, an fp32 copy (7.3 GB
written), an in-place division and a logsumexp over the copy: about 23 ms of each 104 ms
``verify_packed``. One program per row here streams the row once, keeping the first maximum and
an online (rescaled) sum of exponentials.

The argmax is torch's (the first index of the maximum); the normaliser equals torch's up to
the order of the fp32 sums. On CUDA the kernel is compiled by Triton; on CPU it runs only under
Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported: slow, for tests).
``DRAFTRL_VOCAB_REDUCTION=torch`` keeps the torch passes (an A/B: the same results).
"""

import functools

import torch

from speculative.kernel_gate import KernelGate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = tl = None


if triton is not None:
    # (no ``from __future__ import annotations`` in this module: Triton reads the tl.constexpr ones)
    @triton.jit
    def argmax_logsumexp_step(raw, scaled, start, best, best_index, running_max, running_sum):
        """One chunk of a row's streaming reduction: the first index of the maximum of ``raw`` (chunk
        offset ``start``) and the online (rescaled) sum of exp(``scaled``). Shared by the kernels that
        read a row of logits once (here and ``speculative.vocab_kl``)."""
        chunk_best, chunk_index = tl.max(raw, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = chunk_best > best  # strictly: an earlier chunk keeps a tie (torch's first index)
        best_index = tl.where(better, start + chunk_index.to(tl.int64), best_index)
        best = tl.where(better, chunk_best, best)
        new_max = tl.maximum(running_max, tl.max(scaled, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # an all -inf prefix: no nan
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(scaled - shift), axis=0)
        return best, best_index, new_max, running_sum

    def _argmax_lse(logits_ptr, argmax_ptr, lse_ptr, vocab, row_stride, temperature, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        source = logits_ptr + row * row_stride
        best = tl.full([1], float("-inf"), tl.float32)
        best_index = tl.full([1], 0, tl.int64)
        running_max = tl.full([1], float("-inf"), tl.float32)
        running_sum = tl.full([1], 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            raw = tl.load(source + offsets, mask=offsets < vocab, other=float("-inf")).to(tl.float32)
            best, best_index, running_max, running_sum = argmax_logsumexp_step(
                raw, raw / temperature, start, best, best_index, running_max, running_sum)
        tl.store(argmax_ptr + row + tl.arange(0, 1), best_index)
        tl.store(lse_ptr + row + tl.arange(0, 1), running_max + tl.log(running_sum))


@functools.cache
def _kernel():
    return triton.jit(_argmax_lse)  # an interpreted function when TRITON_INTERPRET=1 at import


def torch_argmax_lse(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The eager passes: (argmax [...], logsumexp(logits.float() / T) [...] or None when T <= 0)."""
    argmax = logits.argmax(-1)
    if temperature <= 0:
        return argmax, None
    return argmax, torch.logsumexp(logits.to(torch.float32, copy=True).div_(temperature), dim=-1)


def kernel_argmax_lse(logits: torch.Tensor, temperature: float,
                      block: int = 4096, num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch_argmax_lse`` by the one-read kernel."""
    if triton is None:
        raise RuntimeError("kernel_argmax_lse needs Triton (pip install triton)")
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    argmax = torch.empty(rows.shape[0], dtype=torch.long, device=logits.device)
    lse = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    if rows.shape[0]:
        _kernel()[(rows.shape[0],)](rows, argmax, lse, vocab, rows.stride(0),
                                    float(temperature) if temperature > 0 else 1.0,
                                    BLOCK=min(block, triton.next_power_of_2(vocab)), num_warps=num_warps)
    shape = logits.shape[:-1]
    return argmax.view(shape), (lse.view(shape) if temperature > 0 else None)


def argmax_lse(logits: torch.Tensor, temperature: float,
               fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's argmax and, for ``temperature > 0``, ``logsumexp(logits.float() / temperature)``
    (fp32). ``fused``: by the kernel (default: on CUDA, unless ``DRAFTRL_VOCAB_REDUCTION=torch`` or
    its one-time check failed there); True also runs it on CPU tensors (Triton's interpreter)."""
    if fused is None:
        fused = wanted(logits)
    return kernel_argmax_lse(logits, temperature) if fused else torch_argmax_lse(logits, temperature)


def argmax_log_prob(logits: torch.Tensor, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely id ``[..., 1]`` and its log-probability (fp32, T = 1) ``[..., 1]``: a
    chain drafter's pick. By the kernel (one read of the row, default: as ``argmax_lse``, never
    inside an Inductor trace) or as ``topk(log_softmax(logits.float()), 1)``; ties go to the first
    id either way, as the tree search's top-k picks them."""
    if fused is None:
        fused = not torch.compiler.is_compiling() and wanted(logits)
    if not fused:
        top = torch.topk(torch.log_softmax(logits.float(), -1), 1, dim=-1)
        return top.indices, top.values
    ids, lse = kernel_argmax_lse(logits, 1.0)
    ids = ids[..., None]
    return ids, logits.gather(-1, ids).float() - lse[..., None]


def _check(device: torch.device) -> str | None:
    """The kernel against the torch passes on a small case (``KernelGate``'s one-time check)."""
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(7, 10007, generator=generator, device=device) * 4).to(torch.bfloat16)
    logits[3, 9000] = logits[3, 17] = 100.0  # a tie across chunks: the first index wins
    want = torch_argmax_lse(logits, 0.7)
    got = kernel_argmax_lse(logits, 0.7)
    if torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-4, rtol=1e-5):
        return None
    return "differs from the torch passes"


wanted = KernelGate("argmax/log-normaliser", "DRAFTRL_VOCAB_REDUCTION", _check)
