"""Block top-k and the fp32 log-normaliser (speculative.vocab_topk) against torch's own."""

from __future__ import annotations

import pytest
import torch

from speculative.vocab_topk import _eager_block_stats, block_stats, log_normaliser, top_k_ids, top_k_logprobs


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


@pytest.mark.parametrize("vocab", [32000, 10007])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_stats_give_block_maxima_and_the_logsumexp(vocab, dtype):
    """One read for both: the maxima of every block (the last one short when 256 does not divide
    the vocabulary) and the row's fp32 logsumexp; a block of -inf only adds nothing."""
    logits = (torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(vocab)) * 4).to(dtype)
    logits[1, 2, :256] = float("-inf")
    maxima, normaliser = block_stats(logits)
    blocks = -(-vocab // 256)
    padded = torch.full((2, 3, blocks * 256), float("-inf"))
    padded[..., :vocab] = logits.float()
    assert torch.equal(maxima, padded.view(2, 3, blocks, 256).amax(-1))
    assert normaliser.dtype == torch.float32
    torch.testing.assert_close(normaliser, torch.logsumexp(logits.float(), -1, keepdim=True), atol=1e-5, rtol=1e-6)
    ids, logq = top_k_logprobs(logits, 10)
    assert torch.equal(logits.gather(-1, ids), logits.topk(10).values)  # the top-k (bf16 ties in any order)
    torch.testing.assert_close(logq, torch.log_softmax(logits.float(), -1).gather(-1, ids), atol=1e-5, rtol=1e-6)


def test_compiled_block_stats_equal_eager():
    """What CUDA runs (the reduction compiled by Inductor, dynamic rows) against eager, on the
    CPU backend: two row counts through one graph."""
    compiled = torch.compile(_eager_block_stats, dynamic=True)
    for rows in (5, 9):
        logits = (torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows)) * 3).to(torch.bfloat16)
        for got, want in zip(compiled(logits, 256), _eager_block_stats(logits, 256)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
