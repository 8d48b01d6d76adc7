"""Block top-k and the fp32 log-normaliser (speculative.vocab_topk) against torch's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speculative.vocab_topk import log_normaliser, top_k_ids


@pytest.mark.parametrize("vocab,block,k", [(32000, 256, 10), (10007, 128, 10), (5000, 256, 3), (300, 256, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_top_k_is_torch_top_k(vocab, block, k, dtype):
    generator = torch.Generator().manual_seed(vocab + k)
    # distinct values (a permutation), so the top-k set and its order are unique; in bf16 only
    # the 2k largest are kept distinct (small integers), the rest tie far below
    rows = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(6)]).view(2, 3, vocab)
    if dtype == torch.float32:
        logits = rows.float() / 7
    else:
        logits = torch.where(rows >= vocab - 2 * k, (rows - vocab).float(), -1e4).to(dtype)
    # the largest entries sit in the short last block too, sometimes
    logits[0, 0, -1] = 1e5
    got = top_k_ids(logits, k, block)
    want = torch.topk(logits, k, dim=-1)
    assert torch.equal(got, want.indices)
    assert torch.equal(logits.gather(-1, got), want.values)


def test_block_top_k_keeps_every_maximum_of_a_crowded_block():
    """All k largest entries in one block (the case the block argument must cover)."""
    logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(0))
    logits[:, 512:522] += 100.0
    assert torch.equal(top_k_ids(logits, 10), torch.topk(logits, 10).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_normaliser_is_fp32_logsumexp(dtype):
    logits = (torch.randn(3, 5, 32000, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    want = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    assert log_normaliser(logits).dtype == torch.float32
    torch.testing.assert_close(log_normaliser(logits), want, atol=1e-5, rtol=1e-6)


_KERNEL_CHECK = r"""
import torch
from speculative.block_stats_kernel import block_stats
from speculative.vocab_topk import top_k_logprobs

generator = torch.Generator().manual_seed(3)
for vocab, block, dtype in [(32000, 256, torch.bfloat16), (10007, 128, torch.float32), (600, 256, torch.float32)]:
    logits = (torch.randn(2, 3, vocab, generator=generator) * 4).to(dtype)
    logits[0, 0, -1] = 50.0  # the row's best entry in the short last block
    logits[1, 2, :] = float("-inf")
    logits[1, 2, 7] = 1.0  # one finite entry: the normaliser is that entry
    blocks = -(-vocab // block)
    padded = torch.full((2, 3, blocks * block), float("-inf"), dtype=dtype)
    padded[..., :vocab] = logits
    maxima, lse = block_stats(logits, block)
    assert maxima.dtype == dtype and lse.dtype == torch.float32, (maxima.dtype, lse.dtype)
    assert torch.equal(maxima, padded.view(2, 3, blocks, block).amax(-1)), vocab
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), -1, keepdim=True), atol=1e-5, rtol=1e-6)
    strided = logits.transpose(0, 1)  # not contiguous across rows: still the same statistics
    torch.testing.assert_close(block_stats(strided, block)[1], lse.transpose(0, 1))
    if vocab // block >= 40:
        ids, logq = top_k_logprobs(logits, 10, block, fused=True)
        want_ids, want_logq = top_k_logprobs(logits, 10, block, fused=False)
        # equal values (bf16 has many): the smaller id first, as a stable descending sort
        stable = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :10]
        assert torch.equal(ids[:, :2], stable[:, :2]), vocab
        assert torch.equal(ids[0, 2], stable[0, 2])
        assert torch.equal(ids[1, 2, 0], torch.tensor(7))  # the one finite entry, then -inf ties
        assert ids[1, 2].unique().numel() == 10
        torch.testing.assert_close(logq[:, :2], want_logq[:, :2], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(logq[0], want_logq[0], atol=1e-5, rtol=1e-6)
empty = block_stats(torch.zeros(0, 4, 512), 256)
assert empty[0].shape == (0, 4, 2) and empty[1].shape == (0, 4, 1)
print("kernel ok")
"""


def test_one_read_block_statistics_kernel_equals_the_torch_passes():
    """The Triton kernel GTO's tree search uses on CUDA, run by Triton's interpreter on CPU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kernel ok" in done.stdout


def test_vocab_reduction_bench_checks_every_triton_row(tmp_path):
    """``bench/vocab_reduction.py`` on CPU (Triton's interpreter): every configuration row equals torch,
    and the top-k kernel alone is timed here and in an "older" tree (this one, loaded apart: same ids)."""
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, str(repo / "bench" / "vocab_reduction.py"), "--device", "cpu", "--rows", "8",
         "--vocab", "12800", "--groups", "4,16", "--warps", "4", "--warmup", "0", "--reps", "1",
         "--old-tree", str(repo), "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "vocab_reduction.json").read_text())
    assert [row["status"] for row in report["variants"]] == ["baseline", "equal", "equal", "equal", "this tree",
                                                             "same ids"]
    table = (tmp_path / "vocab_reduction.md").read_text()
    assert "| triton g16 w4 |" in table and "| top-k kernel alone, old tree |" in table
