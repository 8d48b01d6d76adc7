"""FlexAttention TTT (packed sequences, block masks) against the dense fp32 reference."""

from __future__ import annotations

import pytest
import torch

import speculative.flex_ttt as flex_ttt
from speculative.flex_ttt import (
    BLOCK, FlexTTTCache, PackedLayout, listed_blocks, masked_reference_kernel, ttt_block_mask,
)
from speculative.ttt import TTTCache, restrict_to_draft_vocab, step_weights, training_time_test
from speculative.vocab import DraftVocab
from tests.conftest import padded_batch, tiny_drafter


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("lengths", [[130, 5, 200], [256], [1, 129, 40, 70]])
def test_block_mask_lists_every_block_the_mask_needs(lengths, window):
    """A block left out of the list would be skipped by the CUDA kernel: none may be."""
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None])
    layout = PackedLayout(mask)
    for steps in (1, 2, 3):
        block_mask = ttt_block_mask(layout, steps, window)
        q = torch.arange(layout.padded)[:, None]
        kv = torch.arange(steps * layout.padded)[None]
        zero = torch.zeros((), dtype=torch.long)
        needed = block_mask.mask_mod(zero, zero, q, kv)
        blocks_needed = needed.view(layout.padded // BLOCK, BLOCK, -1, BLOCK).any(3).any(1)
        listed = listed_blocks(block_mask, layout.padded // BLOCK, steps * layout.padded // BLOCK)
        assert not (blocks_needed & ~listed).any(), (lengths, window, steps)
        # and the mask is EAGLE-3's: step 1 causal within a sequence, later steps the diagonal
        doc = layout.doc
        j = kv % layout.padded
        step = kv // layout.padded
        same = (doc[q] == doc[j]) & (doc[q] >= 0)
        causal = (j <= q) & ((q - j < window) if window else True)
        assert torch.equal(needed, same & torch.where(step == 0, causal, j == q))


def _ttt(drafter, batch, target, steps=3):
    ids, attention, loss_mask = batch
    feats = target.features(ids, attention)
    return training_time_test(drafter, ids, attention, loss_mask,
                              *restrict_to_draft_vocab(feats.logits, drafter.draft_to_target),
                              feats.aux_hidden, steps, step_weights(steps, 0.8))


@pytest.mark.parametrize("window", [None, 6])
def test_flex_forward_equals_dense_on_cpu(tiny_target, window):
    """torch's own flex_attention (eager, forward only on CPU) gives the dense path's losses."""
    drafter = tiny_drafter(tiny_target)
    drafter.config.sliding_window = window
    batch = padded_batch(tiny_target, [40, 23, 31], 40)
    with torch.no_grad():
        dense = _ttt(drafter, batch, tiny_target)
        drafter.ttt_attention = "flex"
        flex = _ttt(drafter, batch, tiny_target)
    assert float(flex.loss) == pytest.approx(float(dense.loss), rel=1e-5, abs=1e-6)
    assert flex.step_loss == pytest.approx(dense.step_loss, rel=1e-5, abs=1e-6)
    assert flex.step_accuracy == dense.step_accuracy
    if window:  # the window changes the result, so it is really applied
        drafter.ttt_attention = "dense"
        drafter.config.sliding_window = None
        with torch.no_grad():
            full = _ttt(drafter, batch, tiny_target)
        assert abs(float(full.loss) - float(dense.loss)) > 1e-4


def test_flex_losses_and_gradients_equal_dense(tiny_target, monkeypatch):
    """Packing, masks, block lists and the unpacking carry gradients exactly like the dense path.

    torch has no FlexAttention backward on CPU, so the kernel here is flex's result computed
    densely from the same block mask (``masked_reference_kernel``); ``bench/ttt_attention_memory.py
    --device cuda`` compares torch's compiled kernel's gradients the same way on a GPU.
    """
    vocab = DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 48)
    drafter = tiny_drafter(tiny_target, vocab)
    batch = padded_batch(tiny_target, [37, 12, 29], 37)

    def grads(backend):
        drafter.zero_grad(set_to_none=True)
        drafter.ttt_attention = backend
        result = _ttt(drafter, batch, tiny_target, steps=4)
        result.loss.backward()
        return float(result.loss), {n: p.grad.clone() for n, p in drafter.named_parameters() if p.grad is not None}

    dense_loss, dense_grads = grads("dense")
    monkeypatch.setattr(flex_ttt, "default_kernel", lambda device: masked_reference_kernel)
    flex_loss, flex_grads = grads("flex")
    assert flex_loss == pytest.approx(dense_loss, rel=1e-5)
    assert dense_grads.keys() == flex_grads.keys() and len(dense_grads) > 5
    for name, grad in dense_grads.items():
        assert torch.allclose(flex_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_flex_training_on_cpu_is_refused_by_name(tiny_target):
    drafter = tiny_drafter(tiny_target)
    drafter.ttt_attention = "flex"
    with pytest.raises(NotImplementedError, match="training.attention 'dense'"):
        _ttt(drafter, padded_batch(tiny_target, [20, 11], 20), tiny_target)


def test_flex_cache_is_a_drop_in_for_the_dense_cache():
    """The cache alone, random q/k/v over 3 steps, padding and a window: same outputs."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 9 + [0] * 3, [1] * 12, [1] * 4 + [0] * 8])
    dense, flex = TTTCache(mask, sliding_window=5), FlexTTTCache(mask, sliding_window=5)
    for _ in range(3):
        q, k, v = (torch.randn(3, 2, 12, 8, generator=generator) for _ in range(3))
        expected, got = dense.attend(q, k, v), flex.attend(q, k, v)
        real = mask.bool()[:, None, :, None].expand_as(expected)
        assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_flex_refuses_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        PackedLayout(torch.tensor([[0, 1, 1]]))
