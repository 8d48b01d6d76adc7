"""The Triton kernels of the target's hot paths against the torch code they replace.

On CUDA they are compiled; here they run under Triton's interpreter (``TRITON_INTERPRET=1`` set
before Triton is imported, so in a subprocess). ``speculative.kernel_gate`` decides where each runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from speculative.kernel_gate import KernelGate

_INTERPRETED = r"""
import torch
from speculative.argmax_lse_kernel import argmax_lse, torch_argmax_lse
from speculative.decode_attention_kernel import decode_attention, torch_decode_attention
from speculative.rope_kernel import rope_in_place, torch_rope

generator = torch.Generator().manual_seed(5)

# argmax and the fp32 log-normaliser at a temperature, in one read
for vocab, dtype, temperature in [(49152, torch.bfloat16, 1.0), (10007, torch.float32, 0.7),
                                  (300, torch.bfloat16, 2.0), (5000, torch.bfloat16, 0.0)]:
    logits = (torch.randn(3, 4, vocab, generator=generator) * 4).to(dtype)
    logits[0, 0, -1] = 60.0  # the best entry in the short last chunk
    logits[0, 1, 17] = logits[0, 1, vocab - 2] = 60.0  # a tie across chunks: the first index
    logits[1, 2, :] = float("-inf")
    logits[1, 2, 7] = 1.0  # one finite entry
    logits[2, 3, :] = float("-inf")  # none: argmax 0, as torch
    want_ids, want_norm = torch_argmax_lse(logits, temperature)
    ids, norm = argmax_lse(logits, temperature, fused=True)
    assert torch.equal(ids, want_ids), (vocab, ids, want_ids)
    if temperature > 0:
        assert norm.dtype == torch.float32 and norm.shape == (3, 4)
        torch.testing.assert_close(norm, want_norm, atol=1e-5, rtol=1e-6)
    else:
        assert norm is None and want_norm is None
    strided = logits[:, 1:3]  # rows not evenly strided: the same statistics
    assert torch.equal(argmax_lse(strided, temperature, fused=True)[0], want_ids[:, 1:3])
empty_ids, empty_norm = argmax_lse(torch.zeros(0, 5, 64), 1.0, fused=True)
assert empty_ids.shape == (0, 5) and empty_norm.shape == (0, 5)

# a chain drafter's pick (the batched engine's): the kernel's argmax and log-probability against
# topk(log_softmax(.float()), 1), a tie across chunks to the first id
from speculative.argmax_lse_kernel import argmax_log_prob
for vocab, dtype in [(32000, torch.bfloat16), (2048, torch.float32)]:
    logits = (torch.randn(5, vocab, generator=generator) * 3).to(dtype)
    logits[1, 9] = logits[1, vocab - 3] = 40.0
    want_ids, want_logq = argmax_log_prob(logits, fused=False)
    ids, logq = argmax_log_prob(logits, fused=True)
    assert ids.shape == logq.shape == (5, 1) and logq.dtype == torch.float32
    assert torch.equal(ids, want_ids) and int(ids[1, 0]) == 9, (ids, want_ids)
    torch.testing.assert_close(logq, want_logq, atol=1e-5, rtol=1e-5)

# training-time test's KL over the draft vocabulary, the lm_head fused in: kernels against the torch
# passes (forward: KL, both log-normalisers, argmax; backward: the gradient over the logits), then
# the whole autograd function, in blocks, against log-softmaxes
from speculative import vocab_kl
assert vocab_kl._check(torch.device("cpu")) is None
for vocab, dtype in [(32000, torch.bfloat16), (10007, torch.float32), (300, torch.bfloat16)]:
    logits = (torch.randn(6, vocab, generator=generator) * 3).to(dtype)
    logits[0, 17] = logits[0, vocab - 2] = 50.0  # a tie across chunks: the first index
    target = (torch.randn(4, vocab, generator=generator) * 3).to(dtype)
    rows = torch.tensor([3, 0, 0, 2, 1, 3])
    want, got = vocab_kl.torch_row_kl(logits, target, rows), vocab_kl.kernel_row_kl(logits, target, rows)
    assert torch.equal(got[3], want[3]) and int(got[3][0]) == 17, (vocab, got[3], want[3])
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)
    scale = torch.rand(6, generator=generator)
    grad_want = vocab_kl.torch_row_kl_grad_(logits.clone(), target, rows, want[1], want[2], scale)
    grad_got = vocab_kl.kernel_row_kl_grad_(logits.clone(), target, rows, want[1], want[2], scale)
    torch.testing.assert_close(grad_got.float(), grad_want.float(), atol=1e-5 if dtype == torch.float32 else 2e-3,
                               rtol=1e-4 if dtype == torch.float32 else 2e-2)
hidden = torch.randn(23, 16, generator=generator, requires_grad=True)
head = torch.randn(500, 16, generator=generator, requires_grad=True)
target, rows, weight = torch.randn(9, 500, generator=generator), torch.randint(0, 9, (23,), generator=generator), \
    torch.rand(23, generator=generator)
logq, logp = torch.log_softmax(hidden @ head.t(), -1), torch.log_softmax(target[rows], -1)
want = ((logp.exp() * (logp - logq)).sum(-1) * weight).sum()
want_grads = torch.autograd.grad(want, (hidden, head))
loss, argmax = vocab_kl.fused_vocab_kl(hidden, head, target, rows, weight, fused=True, block_elements=5 * 500)
assert torch.equal(argmax, (hidden @ head.t()).argmax(-1))
torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)
for got, expected in zip(torch.autograd.grad(loss, (hidden, head)), want_grads):
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

# the k best entries among each row's k best blocks, read where they lie
from speculative.block_stats_kernel import top_k_in_blocks
from speculative.vocab_topk import _top_k_in_blocks
for vocab, block, k, dtype in [(32000, 256, 10, torch.bfloat16), (10007, 128, 3, torch.float32),
                               (4000, 256, 10, torch.float32)]:
    order = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(6)])
    logits = (order.float() / 7).to(dtype) if dtype == torch.float32 else \
        torch.where(order >= vocab - 4 * k * block, (order - vocab).float() / 8, -1e4).to(dtype)  # distinct
    logits[0, -1] = 1e4  # the best entry in the short last block
    blocks_count = -(-vocab // block)
    padded = torch.full((6, blocks_count * block), float("-inf"), dtype=dtype)
    padded[:, :vocab] = logits
    maxima = padded.view(6, blocks_count, block).amax(-1)
    blocks = torch.topk(maxima, k, dim=-1).indices
    got = top_k_in_blocks(logits, blocks, block)
    assert torch.equal(got, _top_k_in_blocks(logits, maxima, k, block)), (vocab, k)
    assert torch.equal(got, torch.topk(logits, k, dim=-1).indices), (vocab, k)
    # ties (the smaller id first, -0.0 equal to +0.0, as a stable descending sort) and a row of -inf
    tied = logits.clone()
    tied[1, :] = 0.0
    tied[1, ::3] = -0.0
    tied[1, 5] = tied[1, vocab - 3] = tied[1, 2 * block + 1] = 7.0
    tied[2, :] = float("-inf")
    tied_maxima = torch.cat([tied, padded[:, vocab:]], -1).view(6, blocks_count, block).amax(-1)
    tied_blocks = torch.topk(tied_maxima, k, dim=-1, sorted=True).indices
    want = []
    for values, chosen in zip(tied.float().tolist(), tied_blocks.tolist()):
        entries = [i for b in chosen for i in range(b * block, min((b + 1) * block, vocab))]
        want.append(sorted(entries, key=lambda i: (-values[i], i))[:k])
    want = torch.tensor(want)
    assert torch.equal(top_k_in_blocks(tied, tied_blocks, block), want), (vocab, k)
    # and the block maxima and log-normaliser that choose those blocks, in one read (tests/test_vocab_topk.py
    # has the kernel's own cases; here its launches are recorded for the compile test below)
    from speculative.block_stats_kernel import block_stats
    got_maxima, got_lse = block_stats(logits, block)
    assert torch.equal(got_maxima, maxima.to(dtype)), (vocab, block)
    torch.testing.assert_close(got_lse, torch.logsumexp(logits.float(), -1, keepdim=True), atol=1e-4, rtol=1e-5)

# RoPE on merged q/k/v rows, in place, from the table by position
for heads, kv_heads, dim, dtype in [(9, 3, 64, torch.bfloat16), (4, 2, 16, torch.float32), (3, 1, 8, torch.bfloat16)]:
    rows = heads + 2 * kv_heads
    table = torch.randn(40, 2, 2, dim, generator=generator).to(dtype)
    table[:, 0, 1], table[:, 1, 1] = 1, 0  # identity on the v heads
    qkv = torch.randn(3, 7, rows, dim, generator=generator).to(dtype)  # 21 tokens: a short last program
    positions = torch.randint(0, 40, (3, 7), generator=generator)
    want = torch_rope(qkv, positions, table, heads + kv_heads)
    got = qkv.clone()
    assert rope_in_place(got, positions, table, heads + kv_heads) is got
    # two roundings each (the product, then the sum), bounded by the terms' size: the interpreter
    # rounds bf16 towards zero where CUDA rounds to nearest, so equal up to those roundings
    kind = torch.tensor([0] * (heads + kv_heads) + [1] * kv_heads)
    factors = table[positions[..., None], :, kind].float()
    terms = (qkv.float() * factors[..., 0, :]).abs() + (torch.roll(qkv.float(), dim // 2, -1) * factors[..., 1, :]).abs()
    unit = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7
    assert ((got.float() - want.float()).abs() <= 4 * unit * terms + 1e-30).all(), (heads, dtype)
    assert torch.equal(got[:, :, heads + kv_heads:], qkv[:, :, heads + kv_heads:])  # v untouched

# the MLP's silu(gate) * up over the merged projection, in one pass: rows of a strided view, a short
# last program and column block, fp32 and bf16 (up to the interpreter's bf16 rounding, towards zero)
from speculative import silu_mul_kernel
from speculative.silu_mul_kernel import silu_mul, torch_silu_mul
assert silu_mul_kernel._check(torch.device("cpu")) is None
for shape, dtype in [((3, 5, 2 * 700), torch.bfloat16), ((7, 2 * 33), torch.float32), ((2, 2 * 1536), torch.bfloat16)]:
    wide = (torch.randn(*shape[:-1], shape[-1] + 6, generator=generator) * 4).to(dtype)
    gate_up = wide[..., 3 : 3 + shape[-1]]  # each row contiguous, the rows strided
    want, got = torch_silu_mul(gate_up), silu_mul(gate_up, block=256)
    assert got.shape == want.shape and got.dtype == dtype
    unit = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7
    assert ((got.float() - want.float()).abs() <= 3 * unit * want.float().abs() + 1e-30).all(), (shape, dtype)

# FusedLlama with the RoPE kernel equals FusedLlama with the torch expression
from speculative.fused_llama import FusedLlama
from speculative.llama import FastLlama
from speculative.target import TargetModel
from tests.test_tree_engine import small_llama

fused = FusedLlama(FastLlama.from_target(TargetModel(small_llama(0, layers=3))))
ids = torch.randint(0, 64, (2, 9), generator=generator)
outputs = []
for kernel in (False, True):
    fused.rope_kernel = kernel
    cache = fused.new_cache(2, 32)
    prefill = fused(ids, torch.arange(9).expand(2, -1), cache, 0, None)
    positions = torch.tensor([[9, 10], [9, 10]])
    mask = torch.arange(32)[None, None] <= positions[..., None]
    step = fused(ids[:, :2], positions, cache, positions, mask)
    outputs.append((prefill.logits, step.logits, cache.storage.clone()))
for a, b in zip(*outputs):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
fused.rope_kernel = None
outputs = []
for kernel in (False, True):  # and with the SiLU-product kernel (the float32 test model)
    fused.silu_kernel = kernel
    cache = fused.new_cache(2, 32)
    outputs.append((fused(ids, torch.arange(9).expand(2, -1), cache, 0, None).logits, cache.storage.clone()))
for a, b in zip(*outputs):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
fused.silu_kernel = None

# one token's attention over each sequence's visible prefix of a strided cache view: GQA, MQA and
# MHA, head dims that are not powers of two, counts of one slot, past the span, a partial block
for batch, heads, kv_heads, span, dim, dtype in [(3, 9, 3, 150, 64, torch.bfloat16), (2, 4, 2, 70, 8, torch.float32),
                                                  (2, 8, 1, 64, 80, torch.float32), (1, 4, 4, 200, 16, torch.bfloat16)]:
    storage = torch.randn(2, 2, batch, kv_heads, span + 9, dim, generator=generator).to(dtype)  # [k/v, layer, ...]
    keys, values = storage[0, 1, :, :, :span], storage[1, 1, :, :, :span]
    q = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    visible = torch.tensor([1, span + 5, 67][:batch])
    want = torch_decode_attention(q, keys, values, visible, dim ** -0.5).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7 * 2  # bf16: the output's rounding, twice
    for settings in [None, (16, 4, 4), (32, 2, 3), (64, 4, 16), (16, 4, 0)]:  # one program a row; split spans
        got = decode_attention(q, keys, values, visible, dim ** -0.5, settings)
        assert got.shape == q.shape and got.dtype == dtype
        error = (got.float() - want).abs().max()
        assert error <= tolerance * max(1.0, want.abs().max().item()), (heads, kv_heads, dim, settings, error)
    if batch > 1:  # a sequence reads its own rows only: changing another's cache changes nothing of it
        storage[:, 1, 1:] = 0
        assert torch.equal(decode_attention(q, keys, values, visible, dim ** -0.5, settings)[0], got[0])

# several query tokens a sequence, each over its own prefix (a verified chain's): GQA and MHA, a
# sequence whose first token sees one slot, counts past the span, a query of a strided view
for batch, tokens, heads, kv_heads, span, dim, dtype in [(3, 8, 9, 3, 150, 64, torch.bfloat16),
                                                          (2, 3, 4, 4, 70, 16, torch.float32)]:
    storage = torch.randn(2, batch, kv_heads, span, dim, generator=generator).to(dtype)
    keys, values = storage[0], storage[1]
    qkv = torch.randn(batch, tokens, heads + 2 * kv_heads, dim, generator=generator).to(dtype)
    q = qkv[:, :, :heads]  # as FusedLlama hands it over
    visible = torch.tensor([0, span - tokens + 3, 40][:batch])[:, None] + torch.arange(1, tokens + 1)
    want = torch_decode_attention(q, keys, values, visible, dim ** -0.5).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7 * 2
    for settings in [None, (16, 4, 4), (32, 2, 1)]:
        got = decode_attention(q, keys, values, visible, dim ** -0.5, settings)
        assert got.shape == q.shape and got.dtype == dtype
        error = (got.float() - want).abs().max()
        assert error <= tolerance * max(1.0, want.abs().max().item()), (tokens, heads, settings, error)
    single = decode_attention(q[:, :1].reshape(batch, heads, dim), keys, values, visible[:, 0], dim ** -0.5)
    torch.testing.assert_close(single.float(), want[:, 0], atol=tolerance, rtol=0)

# the decode step of FusedLlama through the kernel, and greedy decoding of the batched engine with it
fused.rope_kernel = None
steps = []
for kernel in (False, True):
    fused.decode_kernel = kernel
    cache = fused.new_cache(2, 32)
    fused(ids, torch.arange(9).expand(2, -1), cache, 0, None)
    positions = torch.tensor([[9], [4]])  # the second row's step overwrites its slot 4
    mask = torch.arange(32)[None, None] <= positions[..., None]
    steps.append(fused(ids[:, :1], positions, cache, positions, mask, visible=positions[:, 0] + 1).logits)
torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-5)

# the sdpa TTT attention's merge with the diagonal keys: forward and backward against the torch code
# (rows of strided views, no diagonal key, a head size that is not a power of two), then the cache
# with the kernel against the dense fp32 reference over a 4-step unroll
from speculative import ttt_merge_kernel
assert ttt_merge_kernel._check(torch.device("cpu")) is None
for shape, diagonals, dtype in [((2, 3, 11, 16), 3, torch.float32), ((1, 2, 5, 64), 0, torch.bfloat16),
                                ((1, 1, 40, 80), 2, torch.float32), ((2, 2, 9, 64), 4, torch.bfloat16)]:
    def rand():
        return torch.randn(*shape, generator=generator).to(dtype)
    q, grad, causal_dq = rand(), rand(), rand()
    causal_out = rand().transpose(1, 2).contiguous().transpose(1, 2)  # the flash kernel's [B, T, H, d] memory
    lse = torch.randn(shape[0], shape[1], shape[2] + 3, generator=generator)[..., : shape[2]]  # a padded row's view
    keys, values = [rand() for _ in range(diagonals)], [rand() for _ in range(diagonals)]
    stack = (lambda ts: torch.stack(ts) if ts else q.new_empty(0, *shape))
    want_out, want_weights = ttt_merge_kernel.torch_merge(q, causal_out, lse, keys, values, 0.3)
    out, weights = ttt_merge_kernel.kernel_merge(q, causal_out, lse, stack(keys), stack(values), 0.3)
    assert out.dtype == dtype and weights.shape == (1 + diagonals, *shape[:3])
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, want_out, **tolerance)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)
    want = ttt_merge_kernel.torch_merge_backward(grad, q, want_out, want_weights, keys, values, causal_dq, 0.3)
    got = ttt_merge_kernel.kernel_merge_backward(grad.transpose(1, 2).contiguous().transpose(1, 2), q, want_out,
                                                 want_weights, stack(keys), stack(values), causal_dq, 0.3)
    torch.testing.assert_close(got[0], want[0], **tolerance)
    torch.testing.assert_close(got[1], stack(want[1]), **tolerance)
    torch.testing.assert_close(got[2], stack(want[2]), **tolerance)
    flat = torch.randn(*shape[:-1], 1, generator=generator).to(dtype).expand(shape)  # a gradient of stride 0 along d
    want = ttt_merge_kernel.torch_merge_backward(flat, q, want_out, want_weights, keys, values, causal_dq, 0.3)
    got = ttt_merge_kernel.kernel_merge_backward(flat, q, want_out, want_weights, stack(keys), stack(values),
                                                 causal_dq, 0.3)
    torch.testing.assert_close(got[0], want[0], **tolerance)
from speculative.sdpa_ttt import SdpaTTTCache
from speculative.ttt import TTTCache
ttt_merge_kernel.wanted = lambda like: True  # the cache's merge by the kernel on this CPU
mask = torch.tensor([[1] * 21, [1] * 8 + [0] * 13])
steps = [[torch.randn(2, 3, 21, 16, generator=generator, requires_grad=True) for _ in range(3)] for _ in range(4)]
loss_weights = [torch.randn(2, 3, 21, 16, generator=generator) * mask[:, None, :, None] for _ in range(4)]
results = []
for cache in (TTTCache(mask), SdpaTTTCache(mask)):
    outs = [cache.attend(q, k, v) for q, k, v in steps]
    loss = sum((out * weight).sum() for out, weight in zip(outs, loss_weights))
    results.append((outs, torch.autograd.grad(loss, [t for step in steps for t in step])))
real = mask.bool()[:, None, :, None].expand(2, 3, 21, 16)
for expected, got in zip(results[0][0], results[1][0]):
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
for expected, got in zip(results[0][1], results[1][1]):
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

from speculative.batch_engine import BatchGenerator
from tests.test_batch_engine import _greedy, _prompts
target = TargetModel(small_llama(7, layers=3))
prompts = _prompts(6, 3)
engine = BatchGenerator(target, None, 0, max_batch=4, span_step=16, sync_every=5)
engine.model.decode_kernel = True
assert engine.generate(prompts, 12).tokens == _greedy(target.model, prompts, 12)

# chain drafting with the kernel's picks: the torch picks' cycles, the target's greedy text
from speculative import argmax_lse_kernel
from tests.conftest import tiny_drafter
drafter = tiny_drafter(target, seed=2)
runs = []
for kernel in (False, True):
    argmax_lse_kernel.wanted = lambda like, kernel=kernel: kernel
    chained = BatchGenerator(target, drafter, 3, record_cycles=True, max_batch=4, span_step=16)
    runs.append(chained.generate(prompts, 10))
assert runs[1].tokens == runs[0].tokens == _greedy(target.model, prompts, 10)
assert torch.equal(runs[1].cycles.proposals, runs[0].cycles.proposals)
torch.testing.assert_close(runs[1].cycles.rollout_logprobs, runs[0].cycles.rollout_logprobs, atol=1e-5, rtol=1e-5)
# ... and the decode-attention kernel in the chain's verification (K + 1 tokens a sequence) and in the
# drafter's attention (its cache: one token a level, K + 1 in the catch-up), each on its own, then both
for target_kernel, drafter_kernel in [(True, False), (False, True), (True, True)]:
    chained = BatchGenerator(target, drafter, 3, record_cycles=True, max_batch=4, span_step=16, max_len=40)
    chained.model.decode_kernel, chained.draft_cache.kernel = target_kernel, drafter_kernel
    verified = chained.generate(prompts, 10)
    assert verified.tokens == runs[0].tokens and verified.accept_lengths == runs[0].accept_lengths
    assert torch.equal(verified.cycles.proposals, runs[0].cycles.proposals)
    torch.testing.assert_close(verified.cycles.rollout_logprobs, runs[0].cycles.rollout_logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(verified.cycles.target_logprobs, runs[0].cycles.target_logprobs, atol=1e-4, rtol=1e-4)
print("kernels ok")
"""


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The interpreter script's run, its launches recorded (``tests/kernel_launches.py``)."""
    pytest.importorskip("triton")
    launches = tmp_path_factory.mktemp("kernels") / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    script = f"import tests.kernel_launches as k; k.record({str(launches)!r})\n" + _INTERPRETED
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    return done, launches


def test_kernels_equal_the_torch_code_under_the_interpreter(interpreted):
    done, _ = interpreted
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "kernels ok" in done.stdout


def test_every_launch_the_interpreter_ran_compiles_for_an_h200(interpreted):
    """What the interpreter accepts and the compiler refuses (a plain Python helper called from a
    kernel did, once) fails here, on a CPU: each recorded launch compiled for sm_90, PTX and cubin."""
    done, launches = interpreted
    assert done.returncode == 0 and launches.exists(), done.stderr[-3000:]
    names = {launch["name"] for launch in json.loads(launches.read_text())}
    assert {"_argmax_lse", "_kl_forward", "_kl_backward", "_block_stats", "_top_k_in_blocks", "_rope_rows",
            "_decode_rows", "_merge_splits", "_merge_forward", "_merge_backward", "_silu_mul"} <= names, names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    compiled = subprocess.run([sys.executable, "-m", "tests.kernel_launches", str(launches), "90"], env=env,
                              capture_output=True, text=True, timeout=900, cwd=REPO)
    assert compiled.returncode == 0, compiled.stdout[-6000:] + compiled.stderr[-3000:]


def test_decode_attention_settings_from_the_environment():
    from speculative.decode_attention_kernel import _settings_from_env, auto_splits

    # the H200 table's fastest splits (bench/results/ar_b1_h200/decode_kernel/)
    assert [auto_splits(1, 3, span) for span in (256, 512, 1024, 2048)] == [1, 1, 4, 8]
    assert [auto_splits(16, 3, span) for span in (256, 512, 1024, 2048)] == [1, 1, 2, 2]

    assert _settings_from_env(None) is None and _settings_from_env("") is None
    assert _settings_from_env("128x8x4") == (128, 8, 4)
    assert _settings_from_env("128x4x0") == (128, 4, 0)  # splits by the span
    for bad in ("128x8", "100x4x1", "64x0x1", "64x4x-1", "fast"):
        with pytest.raises(ValueError, match="DRAFTRL_DECODE_ATTENTION_SETTINGS"):
            _settings_from_env(bad)


def test_kernel_gate_runs_kernels_on_cuda_only_after_their_check(monkeypatch):
    calls = []

    def check(device):
        calls.append(device)
        return None

    gate = KernelGate("test", "DRAFTRL_TEST_KERNEL", check)
    assert not gate(torch.zeros(1))  # CPU tensors: the torch code, no check
    assert calls == []
    assert gate._passes(torch.device("cpu")) and calls == [torch.device("cpu")]

    def broken(device):
        raise RuntimeError("no compiler")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not KernelGate("broken", "DRAFTRL_TEST_KERNEL", broken)._passes(torch.device("cpu"))
        assert not KernelGate("wrong", "DRAFTRL_TEST_KERNEL", lambda d: "differs")._passes(torch.device("cpu"))
    messages = [str(w.message) for w in caught]
    assert any("broken kernel failed (RuntimeError: no compiler)" in m and "DRAFTRL_TEST_KERNEL=torch" in m
               for m in messages), messages
    assert any("wrong kernel differs" in m for m in messages), messages


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the environment switch matters on CUDA only")
def test_kernel_gate_environment_switch(monkeypatch):  # pragma: no cover - GPU machines
    gate = KernelGate("test", "DRAFTRL_TEST_KERNEL", lambda device: None)
    monkeypatch.setenv("DRAFTRL_TEST_KERNEL", "torch")
    assert not gate(torch.zeros(1, device="cuda"))
    monkeypatch.delenv("DRAFTRL_TEST_KERNEL")
    assert gate(torch.zeros(1, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel and its tensor-core branch need CUDA")
def test_decode_attention_on_cuda_equals_sdpa():  # pragma: no cover - GPU machines
    """The branch the interpreter cannot run (bf16 products on the tensor cores), every settings
    shape of the H200 table, against SDPA with a prefix mask."""
    from speculative.decode_attention_kernel import decode_attention, torch_decode_attention

    generator = torch.Generator(device="cuda").manual_seed(3)
    for batch, span in [(1, 256), (1, 2048), (16, 1024)]:
        storage = torch.randn(2, batch, 3, span + 32, 64, generator=generator, device="cuda").to(torch.bfloat16)
        keys, values = storage[0, :, :, :span], storage[1, :, :, :span]
        q = torch.randn(batch, 9, 64, generator=generator, device="cuda").to(torch.bfloat16)
        visible = torch.randint(1, span + 1, (batch,), generator=generator, device="cuda")
        want = torch_decode_attention(q, keys, values, visible, 0.125).float()
        for settings in [None, (64, 4, 1), (128, 4, 4), (256, 8, 8)]:
            got = decode_attention(q, keys, values, visible, 0.125, settings).float()
            assert (got - want).abs().max() <= 2 ** -6 * max(1.0, want.abs().max().item()), (batch, span, settings)
        chain = torch.randn(batch, 8, 9, 64, generator=generator, device="cuda").to(torch.bfloat16)  # 8 tokens
        counts = (visible.clamp_max(span - 8)[:, None] + torch.arange(1, 9, device="cuda")).clamp_min(1)
        want = torch_decode_attention(chain, keys, values, counts, 0.125).float()
        for settings in [None, (64, 4, 1), (128, 4, 4)]:
            got = decode_attention(chain, keys, values, counts, 0.125, settings).float()
            assert (got - want).abs().max() <= 2 ** -6 * max(1.0, want.abs().max().item()), (batch, span, settings)


def test_silu_mul_bench_runs_and_counts_differences(tmp_path):
    """``bench/silu_mul.py`` on CPU (Triton's interpreter): a row per shape, its outputs compared."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "silu_mul.py"), "--device", "cpu", "--shapes",
                           "5x64,3x1030", "--dtype", "float32", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "silu_mul.json").read_text())
    assert [(row["tokens"], row["width"]) for row in report["rows"]] == [(5, 64), (3, 1030)]
    assert all(row["max_relative_diff"] < 1e-5 for row in report["rows"])  # float32: the same arithmetic
    assert "| 3 x 1030 |" in (tmp_path / "silu_mul.md").read_text()
