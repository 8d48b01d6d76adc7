"""Block top-k and the fp32 log-normaliser (speculative.vocab_topk) against torch's own."""

from __future__ import annotations

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
