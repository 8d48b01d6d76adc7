"""``FusedDrafter`` (merged projections, grouped cache, SDPA) computes ``Eagle3Drafter``'s function."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
from speculative.fused_drafter import FusedDrafter, GroupedDraftCache
from speculative.graphs import StaticDecoder, StaticDraftCache
from speculative.llama import FastLlama
from speculative.target import TargetModel
from speculative.vocab import DraftVocab
from tests.test_tree_engine import small_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT, SCRATCH = 24, 16


def make_drafter(seed: int = 0, **flags) -> Eagle3Drafter:
    config = DrafterConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, vocab_size=50, draft_vocab_size=30, target_hidden_size=32,
                           rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **flags)
    vocab = DraftVocab.from_counts(torch.arange(50, 0, -1), 30)
    embed = torch.randn(50, 32, generator=torch.Generator().manual_seed(seed + 1))
    drafter = Eagle3Drafter(config, vocab, embed).eval()
    init_drafter_weights(drafter, std=0.2, seed=seed)
    for norm in (drafter.midlayer.input_layernorm, drafter.midlayer.hidden_norm, drafter.norm):
        norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 2))
    return drafter


def calls(generator: torch.Generator):
    """A prefill of 6 tokens into context slots 0..5, then a tree level of 3 nodes in the scratch
    (each sees the context and itself), then a catch-up of 2 tokens at slots 6, 7 (tensor slots)."""
    size = CONTEXT + SCRATCH
    causal = torch.zeros(1, 6, size, dtype=torch.bool)
    causal[0, :, :6] = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    level = torch.zeros(1, 3, size, dtype=torch.bool)
    level[0, :, :6] = True
    level[0, torch.arange(3), CONTEXT + torch.arange(3)] = True
    catch_up = torch.zeros(1, 2, size, dtype=torch.bool)
    catch_up[0, :, :6] = True
    catch_up[0, :, 6:8] = torch.tril(torch.ones(2, 2, dtype=torch.bool))
    specs = [(6, 0, torch.arange(1, 7), causal), (3, CONTEXT, torch.full((3,), 7), level),
             (2, torch.tensor([6, 7]), torch.tensor([7, 8]), catch_up)]
    for width, slots, positions, mask in specs:
        ids = torch.randint(0, 50, (1, width), generator=generator)
        hidden = torch.randn(1, width, 32, generator=generator)
        yield ids, hidden, positions[None], slots, mask


@pytest.mark.parametrize("flags", [{}, {"norm_before_residual": True}, {"norm_output": True}],
                         ids=["eagle3", "norm_before_residual", "norm_output"])
def test_fused_drafter_matches_the_reference(flags):
    drafter = make_drafter(0, **flags)
    fused = FusedDrafter(drafter, CONTEXT + 8)
    reference_cache = StaticDraftCache(1, 4, CONTEXT, SCRATCH, 8, torch.float32, "cpu")
    grouped_cache = GroupedDraftCache(1, 2, CONTEXT, SCRATCH, 8, torch.float32, "cpu")
    with torch.no_grad():
        for ids, hidden, positions, slots, mask in calls(torch.Generator().manual_seed(0)):
            reference_cache.prepare(slots, mask)
            grouped_cache.prepare(slots, mask)
            want_logits, want_hidden = drafter(ids, hidden, positions, reference_cache)
            logits, following = fused(ids, hidden, positions, grouped_cache)
            torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(following, want_hidden, atol=2e-5, rtol=1e-5)
    # the grouped cache holds each key/value head once: the reference's copies 0 and 1 are head 0
    torch.testing.assert_close(grouped_cache.storage[0, :, 0, :8], reference_cache.keys[:, 1, :8], atol=1e-6, rtol=0)


def test_rope_table_equals_the_rotary_embedding():
    drafter = make_drafter(1)
    fused = FusedDrafter(drafter, 40)
    positions = torch.tensor([[0, 3, 17, 39]])
    table_cos, table_sin = fused._rope(torch.zeros(1), positions)
    direct_cos, direct_sin = fused._rope_direct(torch.zeros(1), positions)
    torch.testing.assert_close(table_cos, direct_cos)
    torch.testing.assert_close(table_sin, direct_sin)


def test_sync_weights_follows_training():
    """Rollouts draft with weights that an optimiser keeps changing: the merged copies follow."""
    drafter = make_drafter(2)
    fused = FusedDrafter(drafter, CONTEXT + 8)
    ids, hidden, positions, slots, mask = next(calls(torch.Generator().manual_seed(1)))
    qkv_address = fused.qkv.data_ptr()

    def both():
        reference_cache = StaticDraftCache(1, 4, CONTEXT, SCRATCH, 8, torch.float32, "cpu")
        grouped_cache = GroupedDraftCache(1, 2, CONTEXT, SCRATCH, 8, torch.float32, "cpu")
        reference_cache.prepare(slots, mask)
        grouped_cache.prepare(slots, mask)
        with torch.no_grad():
            return drafter(ids, hidden, positions, reference_cache)[0], fused(ids, hidden, positions, grouped_cache)[0]

    with torch.no_grad():
        for linear in (drafter.midlayer.self_attn.k_proj, drafter.midlayer.mlp.up_proj):
            linear.weight.mul_(1.5)
    want, stale = both()
    assert not torch.allclose(want, stale, atol=1e-3)
    fused.sync_weights()
    want, fresh = both()
    torch.testing.assert_close(fresh, want, atol=2e-5, rtol=1e-5)
    assert fused.qkv.data_ptr() == qkv_address  # in place: a captured graph still reads it


def test_static_decoder_drafts_fused_only_where_it_can():
    target = TargetModel(small_llama(3, layers=8))
    vocab = DraftVocab.full(target.vocab_size)
    config = DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids)
    fast = FastLlama.from_target(target)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    decoder = StaticDecoder(fast, drafter, max_len=64)
    assert isinstance(decoder.draft, FusedDrafter) and isinstance(decoder.draft_cache, GroupedDraftCache)
    assert decoder.draft_cache.size % 16 == 0
    assert StaticDecoder(fast, drafter, max_len=64, fused=False).draft is drafter
    windowed = Eagle3Drafter(dataclasses.replace(config, sliding_window=8), vocab, target.embed_tokens.weight)
    assert StaticDecoder(fast, windowed, max_len=64).draft is windowed
    with pytest.raises(ValueError, match="sliding window"):
        FusedDrafter(windowed, 64)
