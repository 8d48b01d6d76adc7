"""Shared fixtures: tiny random Llama targets built from configs (no hub access needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
from speculative.target import TargetModel
from speculative.vocab import DraftVocab


def tiny_llama(vocab_size: int = 96, hidden: int = 32, layers: int = 6, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_drafter(target: TargetModel, draft_vocab: DraftVocab | None = None, seed: int = 0) -> Eagle3Drafter:
    vocab = draft_vocab or DraftVocab.full(target.vocab_size)
    config = DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=seed)
    return drafter


@pytest.fixture
def tiny_target() -> TargetModel:
    return TargetModel(tiny_llama())
