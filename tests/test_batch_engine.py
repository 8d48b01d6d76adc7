"""The batched engine: fused target forward, lossless batched chain speculation (T = 0 and T > 0),
batched autoregressive decoding, and cycle records equal to the single-sequence engine's.

On GPU ``compile="graph"`` captures exactly the step function these tests run eagerly
(``static``), so they are what keeps the graph path lossless.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from speculative.batch_engine import BatchGenerator, accept_chain
from speculative.engine import SpeculativeGenerator
from speculative.llama import FastLlama, causal_slot_mask
from speculative.fused_llama import FusedLlama
from speculative.target import TargetModel
from speculative.tree import TreeConfig
from speculative.vocab import DraftVocab
from tests.conftest import TARGET_ARCHS, tiny_drafter
from tests.test_tree_engine import (
    _exact_joint, _tiny_vocab_pair, chi_square_pvalue, hf_greedy, small_llama, train_agreeing_pair,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def agreeing_pair():
    """A drafter trained by TTT on the target's own greedy outputs: long acceptances."""
    return train_agreeing_pair(steps=25)


@pytest.fixture(scope="module")
def greedy_64(agreeing_pair):
    """64 ragged prompts and the target's own greedy continuations (24 tokens), computed once."""
    prompts = _prompts(64, 5, longest=9)
    return prompts, _greedy(agreeing_pair[0].model, prompts, 24)


def _prompts(count: int, seed: int, longest: int = 12, vocab: int = 64) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=gen)
    return [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in lengths]


def _greedy(model, prompts, n):
    return [hf_greedy(model, p, n) for p in prompts]


# --------------------------------------------------------------------------------------------
# The fused target forward


def test_fused_forwards_over_one_target_share_one_copy_of_the_merged_weights():
    """Every FusedLlama over the same target layers (the tree engine's, the AR baseline's, GTO's)
    reads one merged copy per device and dtype, not one each."""
    target = TargetModel(small_llama(0, layers=3))
    first, second = FusedLlama(FastLlama.from_target(target)), FusedLlama(FastLlama.from_target(target))
    assert all(a[0] is b[0] for a, b in zip(first.qkv + first.gate_up, second.qkv + second.gate_up))
    other = FusedLlama(FastLlama.from_target(TargetModel(small_llama(0, layers=3))))  # same values, other model
    assert other.qkv[0][0] is not first.qkv[0][0] and torch.equal(other.qkv[0][0], first.qkv[0][0])
    target.model.to(torch.float64)  # moved: a copy of its own, in the new dtype
    moved = FusedLlama(FastLlama.from_target(target))
    assert moved.qkv[0][0].dtype == torch.float64 and first.qkv[0][0].dtype == torch.float32
    gone = weakref.ref(moved.qkv[0][0])
    del moved
    gc.collect()
    assert gone() is None  # the last fused forward over it took the copy with it


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA 4/2
        {"head_dim": 16, "num_key_value_heads": 4, "tie_word_embeddings": True,  # MHA, head_dim != H/heads
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
        {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},  # MQA, biases
        {"arch": "qwen2"},  # random q/k/v biases (o_proj has none), RoPE base 1e6
        {"arch": "qwen2", "tie_word_embeddings": True, "num_key_value_heads": 1},
        {"num_hidden_layers": 7},  # aux layers (2, 3, 4) between layers whose residual adds are in place
    ],
    ids=["gqa", "mha-llama3-rope-tied", "mqa-biases", "qwen2-gqa", "qwen2-mqa-tied", "gqa-7-layers"],
)
def test_fused_llama_matches_fast_llama(overrides):
    """Ragged causal prefill, then per-sequence chunks at different positions through a mask."""
    target = TargetModel(small_llama(0, layers=3, **overrides))
    fast = FastLlama.from_target(target)
    fused = FusedLlama(fast)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(10).expand(3, -1)
    reference_cache, cache = fast.new_cache(3, 32), fused.new_cache(3, 32)
    want = fast(ids, positions, reference_cache, 0, causal_slot_mask(0, 10, 10, 3))
    last = torch.tensor([[9], [4], [6]])
    got = fused(ids, positions, cache, 0, None, logits_index=last)
    torch.testing.assert_close(got.logits[:, 0], want.logits[torch.arange(3), last[:, 0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_hidden, want.aux_hidden, atol=1e-5, rtol=1e-5)
    # The next chunk of each sequence starts right after its own (ragged) prefix.
    positions = last + 1 + torch.arange(3)
    chunk = torch.randint(0, 64, (3, 3), generator=torch.Generator().manual_seed(2))
    mask = torch.arange(32)[None, None] <= positions[..., None]
    want = fast(chunk, positions, reference_cache, positions, mask)
    got = fused(chunk, positions, cache, positions, mask)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    table, fused.rope_table = fused.rope_table, None  # RoPE from its table: the same numbers as computed
    assert table is not None and torch.equal(fused(chunk, positions, cache, positions, mask).logits, got.logits)
    fused.rope_table = table
    torch.testing.assert_close(got.aux_hidden, want.aux_hidden, atol=1e-5, rtol=1e-5)
    keys = torch.stack([torch.stack(reference_cache.keys), torch.stack(reference_cache.values)])
    for b in range(3):
        used = list(range(int(last[b]) + 1)) + positions[b].tolist()
        torch.testing.assert_close(cache.storage[:, :, b, :, used], keys[:, :, b, :, used], atol=1e-5, rtol=1e-5)
    # and both equal the Hugging Face forward of the whole sequence
    hf = target.model(torch.cat([ids[:1, : int(last[0]) + 1], chunk[:1]], 1)).logits[0, -3:]
    torch.testing.assert_close(got.logits[0], hf, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Losslessness at T = 0


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_batched_greedy_equals_target_greedy_random_drafters(arch):
    """Mostly rejections (the correction path), ragged prompts, scattered draft vocabularies,
    fewer rows than prompts (finished rows take the next prompt), small attention spans."""
    for seed in range(3):
        target = TargetModel(small_llama(300 + seed, layers=3, arch=arch))
        vocab = DraftVocab.from_counts(torch.randperm(64), 40) if seed % 2 else None
        drafter = tiny_drafter(target, vocab, seed=seed)
        prompts = _prompts(8, seed)
        engine = BatchGenerator(target, drafter, chain_length=1 + 2 * seed, max_batch=4 + 4 * (seed % 2),
                                span_step=16, sync_every=1 + seed)
        result = engine.generate(prompts, 16)
        assert result.tokens == _greedy(target.model, prompts, 16), seed
        assert [len(a) for a in result.accept_lengths] == [f - 1 for f in result.target_forwards]


@pytest.mark.parametrize("chain_length", [2, 5])
def test_batched_greedy_equals_target_greedy_trained_drafter(agreeing_pair, greedy_64, chain_length):
    """Long acceptances, 64 sequences at once."""
    target, drafter = agreeing_pair
    prompts, want = greedy_64
    engine = BatchGenerator(target, drafter, chain_length, max_batch=64, span_step=32, sync_every=4)
    result = engine.generate(prompts, 24)
    assert result.tokens == want
    assert result.tau > 1.5, result.tau
    # every sequence's committed tokens: one per verification plus the accepted drafts
    for tokens, accepted in zip(result.tokens, result.accept_lengths):
        assert len(tokens) <= 1 + sum(a + 1 for a in accepted)


def test_eos_and_max_new_tokens_mid_batch(agreeing_pair, greedy_64):
    """Stop tokens end some sequences early (inside a multi-token step too), others run to the
    limit; max_new_tokens = 1 and a first token that is EOS end at the prefill."""
    target, drafter = agreeing_pair
    prompts, full = greedy_64[0][:12], [t[:20] for t in greedy_64[1][:12]]
    eos = {full[0][6], full[3][11]}
    want = []
    for tokens in full:
        cut = next((i for i, t in enumerate(tokens) if t in eos), None)
        want.append(tokens if cut is None else tokens[: cut + 1])
    assert any(len(w) < 20 for w in want) and any(len(w) == 20 for w in want)
    engine = BatchGenerator(target, drafter, 4, max_batch=8, span_step=16, sync_every=3)
    assert engine.generate(prompts, 20, eos).tokens == want
    for k in (7, 1):
        assert engine.generate(prompts, k).tokens == [t[:k] for t in full]
    firsts = {t[0] for t in full[:2]}
    result = engine.generate(prompts, 20, firsts)
    assert result.tokens[:2] == [[full[0][0]], [full[1][0]]] and result.accept_lengths[:2] == [[], []]
    autoregressive = BatchGenerator(target, None, 0, max_batch=8, span_step=16, sync_every=3)
    assert autoregressive.generate(prompts, 20, eos).tokens == want


def test_batched_autoregressive_equals_target_greedy():
    target = TargetModel(small_llama(7, layers=3))
    prompts = _prompts(20, 3)
    want = _greedy(target.model, prompts, 16)
    for batch, sync in ((1, 1), (8, 5), (32, 16)):
        engine = BatchGenerator(target, None, 0, max_batch=batch, span_step=16, sync_every=sync)
        result = engine.generate(prompts if batch > 1 else prompts[:4], 16)
        assert result.tokens == (want if batch > 1 else want[:4]), batch
    with pytest.raises(ValueError, match="chain_length"):
        BatchGenerator(target, None, 3)
    with pytest.raises(ValueError, match="CUDA"):
        BatchGenerator(target, None, 0, compile="graph")


@pytest.mark.parametrize("chain", [0, 2], ids=["autoregressive", "chain"])
def test_inductor_step_equals_static_step_on_cpu(chain):
    """``compile="inductor"`` off CUDA runs the torch.compile'd step (no graphs): the step the GPU
    captures after compiling. Greedy AR decoding (batch 1, as the AR benchmark) and chain
    speculation (batch 2) give the eager step's tokens and accepted lengths exactly, attending
    spans of the 64-slot caches as the graph step does, each span its own compiled variant (the
    compile-only forms, whole-storage KV write and broadcast mask, within the span): the first
    calls stay in the 32-slot span, the last, longer one crosses into the 64-slot one. Every span
    is compiled at the first call, as CUDA graphs are captured: that later call compiles nothing
    (two compiles a mode; on this 2-core box 30-50 s in all on a cold cache, so the target is tiny)."""
    from torch._dynamo.utils import counters

    target = TargetModel(small_llama(7, layers=2))
    prompts = _prompts(3, 3)
    drafter, batch = (tiny_drafter(target, seed=1), 2) if chain else (None, 1)
    results, spans = {}, {}
    for mode in ("static", "inductor"):
        engine = BatchGenerator(target, drafter, chain, compile=mode, max_batch=batch, max_len=48,
                                sync_every=2 if chain else 4, span_step=32)
        used = []
        run_step = engine._run_step
        engine._run_step = lambda width, span: (used.append(span), run_step(width, span))
        runs = [engine.generate(prompts if batch > 1 else prompts[:1], 12)]
        compiled, prepared = counters["stats"]["unique_graphs"], set(engine._graphs)
        runs += [engine.generate([p], 12) for p in prompts[1:]] if batch == 1 else []
        runs.append(engine.generate(prompts[:batch], 40))  # later and longer: up to the last span
        assert counters["stats"]["unique_graphs"] == compiled and set(engine._graphs) == prepared, mode
        assert engine.max_len == 64 and engine.compile == mode and not engine.compile_errors, engine.compile_errors
        results[mode] = ([t for r in runs for t in r.tokens], [a for r in runs for a in r.accept_lengths])
        spans[mode] = used
    assert results["inductor"] == results["static"]
    assert results["static"][0] == _greedy(target.model, prompts, 12) + _greedy(target.model, prompts[:batch], 40)
    assert spans["inductor"] == spans["static"] and set(spans["inductor"]) == set(engine._spans())
    assert set(engine._graphs) == {(batch, s) for s in engine._spans()}  # compiled: every span, at the first call


def test_inductor_options_reach_torch_compile():
    """``inductor_options`` go to ``torch.compile`` with the engine's own: an option Inductor does
    not know fails the compile, loudly, and the engine falls back to the eager step (off CUDA)."""
    from bench.opd_throughput import inductor_options

    assert inductor_options("max_autotune=true, coordinate_descent_tuning=false,unroll=4") == {
        "max_autotune": True, "coordinate_descent_tuning": False, "unroll": 4}
    with pytest.raises(ValueError, match="key=value"):
        inductor_options("max_autotune")
    target = TargetModel(small_llama(7, layers=2))
    engine = BatchGenerator(target, None, 0, compile="inductor", max_batch=1, max_len=32,
                            inductor_options={"no_such_inductor_option": True})
    out = engine.generate(_prompts(1, 3), 4)
    assert engine.compile == "static" and len(engine.compile_errors) == 1
    assert "no_such_inductor_option" in engine.compile_errors[0]
    assert out.tokens[0] == _greedy(target.model, _prompts(1, 3), 4)[0]


def test_batched_cycles_equal_single_sequence_cycles(agreeing_pair, greedy_64):
    """At T = 0 the records are the reference engine's: roots, proposals, accepted counts, and
    (to rounding) the drafter's and the target's log-probs at every drafted state."""
    target, drafter = agreeing_pair
    chain = 4
    prompts = greedy_64[0][20:29]
    batched = BatchGenerator(target, drafter, chain, record_cycles=True, max_batch=4, span_step=16)
    result = batched.generate(prompts, 24)
    cycles = result.cycles
    reference = SpeculativeGenerator(target, drafter, TreeConfig.chain(chain), record_steps=True)
    m = 0
    d2t = drafter.draft_to_target
    for s, prompt in enumerate(prompts):
        want = reference.generate(prompt, 24)
        assert result.tokens[s] == want.tokens and result.accept_lengths[s] == want.accept_lengths
        for step, tree, logits, root in zip(want.steps, want.trees, want.verify_logits, want.root_positions):
            assert int(cycles.sequence[m]) == s and int(cycles.root_pos[m]) == root
            assert int(cycles.accepted[m]) == step.accept_length
            assert int(cycles.root_token[m]) == (prompt + want.tokens)[root]
            assert torch.equal(cycles.proposals[m], tree.draft_ids[0])
            assert torch.equal(d2t[cycles.proposals[m]], tree.tokens[0])
            torch.testing.assert_close(cycles.rollout_logprobs[m], tree.logprobs[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cycles.target_logprobs[m], torch.log_softmax(logits[:chain].float(), -1),
                                       atol=1e-5, rtol=1e-5)
            m += 1
    assert m == len(cycles) and int((cycles.accepted >= 2).sum()) > 5 and bool((cycles.accepted < chain).any())


def test_drafting_copy_in_another_dtype_follows_the_drafter(agreeing_pair, greedy_64):
    """``drafter_dtype``: the engine drafts with its own copy of the drafter (float64 here, bf16 on a
    GPU), its weights only converted and refreshed at every ``generate``: the target's greedy text,
    the cycles of the drafter's own dtype (to rounding), and a weight changed in place is followed."""
    target, drafter = agreeing_pair
    prompts, want = greedy_64[0][:8], [t[:16] for t in greedy_64[1][:8]]
    engine = BatchGenerator(target, drafter, 3, record_cycles=True, max_batch=8, drafter_dtype=torch.float64)
    assert engine.drafter is not drafter and engine.source_drafter is drafter
    assert engine.drafter.fc.weight.dtype == torch.float64 and drafter.fc.weight.dtype == torch.float32
    assert engine.drafter.rotary.inv_freq.dtype == drafter.rotary.inv_freq.dtype  # RoPE as it was
    assert BatchGenerator(target, drafter, 3, drafter_dtype=torch.float32).drafter is drafter  # no copy
    result = engine.generate(prompts, 16)
    own = BatchGenerator(target, drafter, 3, record_cycles=True, max_batch=8).generate(prompts, 16)
    assert result.tokens == own.tokens == want
    assert torch.equal(result.cycles.proposals, own.cycles.proposals)
    torch.testing.assert_close(result.cycles.rollout_logprobs, own.cycles.rollout_logprobs, atol=1e-5, rtol=1e-5)
    saved = drafter.lm_head.weight.detach().clone()
    with torch.no_grad():
        drafter.lm_head.weight.neg_()  # (a broadcast's in-place update) proposes what the target rejects
    try:
        flipped = engine.generate(prompts, 16)
        assert torch.equal(engine.drafter.lm_head.weight, drafter.lm_head.weight.double())
        assert flipped.tokens == want and flipped.tau < result.tau - 0.5, (flipped.tau, result.tau)
    finally:
        with torch.no_grad():
            drafter.lm_head.weight.copy_(saved)


# --------------------------------------------------------------------------------------------
# Losslessness at T > 0


def _continuation_counts(engine: BatchGenerator, prompt: list[int], n: int) -> tuple[torch.Tensor, int]:
    result = engine.generate([prompt] * n, 3)
    counts = torch.zeros(8, 8, 8)
    for t1, t2, t3 in result.tokens:
        counts[t1, t2, t3] += 1
    return counts, sum(a > 0 for row in result.accept_lengths for a in row)


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_batched_sampling_matches_target_distribution(monkeypatch, arch):
    """End to end at T = 0.8: 3-token continuations from the batched engine (prefill sample,
    vectorised rejection sampling, catch-up, refilled rows) vs the target's exact law; the
    autoregressive mode too. A verifier that accepts every proposal fails the same test."""
    target, drafter = _tiny_vocab_pair(seed=3, arch=arch)
    prompt, temperature = [2, 7, 1, 6], 0.8
    joint = _exact_joint(target, prompt, temperature, 8)
    engine = BatchGenerator(target, drafter, 2, temperature=temperature, seed=11, max_batch=256, sync_every=2)
    counts, accepting = _continuation_counts(engine, prompt, 1200)
    assert accepting > 300
    assert chi_square_pvalue(counts, joint) > 1e-3
    autoregressive = BatchGenerator(target, None, 0, temperature=temperature, seed=12, max_batch=256)
    assert chi_square_pvalue(_continuation_counts(autoregressive, prompt, 1200)[0], joint) > 1e-3

    def always_accept(logits, drafted, temperature, uniforms):
        accepted, _ = accept_chain(logits, drafted, 0.0, None)
        full = torch.full_like(accepted, drafted.shape[1])
        probs = torch.softmax(logits[:, -1].float() / temperature, -1)
        return full, torch.multinomial(probs, 1)[:, 0]

    monkeypatch.setattr("speculative.batch_engine.accept_chain", always_accept)
    assert chi_square_pvalue(_continuation_counts(engine, prompt, 600)[0], joint) < 1e-6


# --------------------------------------------------------------------------------------------
# Real model


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_target_greedy():
    from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
    from speculative.target import load_tokenizer

    target = TargetModel.load("smollm2")
    tokenizer = load_tokenizer("smollm2")
    vocab = DraftVocab(torch.arange(4096), target.vocab_size)
    config = DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=0)
    questions = ("What is the capital of France?", "Write a haiku about the sea.")
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                    ["input_ids"]) for q in questions]
    want = _greedy(target.model, prompts, 20)
    assert BatchGenerator(target, drafter.eval(), 3, max_batch=2).generate(prompts, 20).tokens == want
    assert BatchGenerator(target, None, 0, max_batch=2).generate(prompts, 20).tokens == want


def test_no_garbage_collection_during_a_batch_step_capture(agreeing_pair, monkeypatch):
    """The batched engine's step captures collect first and pause the cyclic collector, as the tree
    engine's do: a dead decoder freed mid-capture would destroy its CUDA graphs inside the capture
    and invalidate it (tests/test_static_engine.py::test_no_garbage_collection_during_a_capture)."""
    from tests.conftest import collector_probe, stub_cuda_capture

    target, drafter = agreeing_pair
    engine = BatchGenerator(target, drafter, 4, max_batch=8, span_step=16, sync_every=3)
    engine.generate(_prompts(2, seed=5), 4)  # builds the caches (CPU: no graphs)

    class Cycle:  # a reference cycle standing in for a dropped decoder
        def __init__(self):
            self.me = self

    dropped = Cycle()
    dead = weakref.ref(dropped)
    del dropped
    assert dead() is not None
    graph, seen = collector_probe(dead)
    stub_cuda_capture(monkeypatch, graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    # the CUDA capture branch; the step itself is not under test (and would need CUDA tensors)
    monkeypatch.setattr(BatchGenerator, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(engine, "_step_fn", lambda width, span: None)
    engine.compile = "graph"
    engine._graphs.clear()
    engine._prepare_graphs(1)
    assert len(seen) == len(engine._spans()) and seen == [(False, True)] * len(seen)
    assert gc.isenabled()
