"""The speculative decoding engine: fast target forward, draft trees, verification, losslessness."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
from speculative.engine import SpeculativeGenerator
from speculative.kv_cache import MaskedKVCache
from speculative.llama import FastLlama, causal_slot_mask
from speculative.target import TargetModel
from speculative.tree import DraftTree, TreeConfig, ancestor_mask, build_draft_tree
from speculative.ttt import restrict_to_draft_vocab, step_weights, training_time_test
from speculative.verify import VerifyStep, verify_tree
from speculative.vocab import DraftVocab
from tests.conftest import TARGET_ARCHS, tiny_causal_lm, tiny_drafter


pytestmark = pytest.mark.usefixtures("one_thread")


def small_llama(seed: int, vocab: int = 64, layers: int = 4, arch: str = "llama", **overrides) -> LlamaForCausalLM:
    """A tiny random target; ``arch="qwen2"`` gives the same shape as a Qwen2 (random q/k/v
    biases, RoPE base 1e6)."""
    config = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return tiny_causal_lm(arch, seed, **config)


@torch.no_grad()
def hf_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy decoding with plain Hugging Face forwards and its own cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson goodness-of-fit p-value; cells expected below ``min_expected`` are pooled.

    P(chi2_df > x) = Q(df / 2, x / 2), the regularised upper incomplete gamma function.
    """
    observed = observed.double().flatten()
    expected = probs.double().flatten() * observed.sum()
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(float(len(exp) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


# --------------------------------------------------------------------------------------------
# FastLlama == Hugging Face


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),  # GQA 4/2, head_dim = hidden / heads
        ("llama", {  # head_dim != hidden / heads, tied embeddings, Llama-3 RoPE scaling, MHA
            "head_dim": 16, "num_key_value_heads": 4, "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        }),
        ("qwen2", {}),  # q/k/v biases, RoPE base 1e6, untied (Qwen2.5-7B and up)
        ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),  # tied, MQA (0.5B-3B)
    ],
    ids=["llama-gqa", "llama-mha-llama3-rope-tied", "qwen2-gqa", "qwen2-mqa-tied"],
)
def test_fast_llama_matches_hf_prefill_decode_tree_and_compaction(arch, overrides):
    hf = small_llama(3, arch=arch, **overrides)
    target = TargetModel(hf, aux_layer_ids=(0, 2, 3))
    fast = FastLlama.from_target(target)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 14), generator=gen)

    def close(a, b):
        return torch.allclose(a, b, atol=1e-5, rtol=1e-5)

    # Full prefill, batch of 2.
    ref = target.features(ids)
    cache = fast.new_cache(2, 64)
    pos = torch.arange(14).expand(2, -1)
    out = fast(ids, pos, cache, 0, causal_slot_mask(0, 14, 14, 2))
    assert close(out.logits, ref.logits) and close(out.aux_hidden, ref.aux_hidden)

    # Prefill 10, then 4 single-token decodes through per-sequence slot tensors; the mask
    # spans the whole static cache (fully static shapes).
    cache = fast.new_cache(2, 64)
    fast(ids[:, :10], pos[:, :10], cache, 0, causal_slot_mask(0, 10, 64, 2))
    for t in range(10, 14):
        slots = torch.full((2, 1), t)
        o = fast(ids[:, t : t + 1], slots, cache, slots, causal_slot_mask(t, 1, 64, 2))
        assert close(o.logits[:, 0], ref.logits[:, t]) and close(o.aux_hidden[:, 0], ref.aux_hidden[:, t])

    # A tree chunk [root, 7 nodes] after the 14-token prefix (batch row 0), in ONE forward.
    seq = ids[:1]
    root = 5
    parents = torch.tensor([[-1, -1, 0, 0, 1, 2, 5]])
    node_tokens = torch.tensor([[7, 9, 11, 13, 15, 17, 19]])
    anc = ancestor_mask(parents, 4)
    depths = anc.sum(-1)
    chunk = torch.cat([torch.tensor([[root]]), node_tokens], 1)
    positions = torch.cat([torch.tensor([[14]]), 14 + depths], 1)
    tree_part = torch.zeros(1, 8, 8, dtype=torch.bool)
    tree_part[:, :, 0] = True
    tree_part[:, 1:, 1:] = anc
    mask = torch.cat([torch.ones(1, 8, 14, dtype=torch.bool), tree_part], -1)
    cache1 = fast.new_cache(1, 64)
    fast(seq, pos[:1], cache1, 0, causal_slot_mask(0, 14, 14))
    tree_out = fast(chunk, positions, cache1, 14, mask)

    def path_tokens(node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(int(node_tokens[0, node]))
            node = int(parents[0, node])
        return [root] + path[::-1]

    for node in range(-1, 7):
        context = torch.cat([seq, torch.tensor([path_tokens(node) if node >= 0 else [root]])], 1)
        r = target.features(context)
        assert close(tree_out.logits[0, node + 1], r.logits[0, -1]), node
        assert close(tree_out.aux_hidden[0, node + 1], r.aux_hidden[0, -1]), node

    # Accept root -> node 1 -> node 4 and compact; the next decode sees a contiguous prefix.
    cache1.compact(torch.tensor([[14 + 1 + 1, 14 + 1 + 4]]), 15)
    nxt = 23
    o = fast(torch.tensor([[nxt]]), torch.tensor([[17]]), cache1, 17, causal_slot_mask(17, 1, 18))
    r = target.features(torch.cat([seq, torch.tensor([path_tokens(4) + [nxt]])], 1))
    assert close(o.logits[0, 0], r.logits[0, -1]) and close(o.aux_hidden[0, 0], r.aux_hidden[0, -1])


# --------------------------------------------------------------------------------------------
# Draft trees


def _drafter_prefix(target, drafter, ids: torch.Tensor):
    """Target features + drafter prefill over ``ids`` (the last token is the root)."""
    feats = target.features(ids[:, :-1])
    cache = MaskedKVCache()
    with torch.no_grad():
        logits, prenorm = drafter(
            ids[:, 1:], drafter.fuse_target_hidden(feats.aux_hidden),
            torch.arange(1, ids.shape[1])[None].expand(ids.shape[0], -1), cache,
        )
    return cache, logits[:, -1], prenorm[:, -1]


def _chain_logits(drafter, cache: MaskedKVCache, root_hidden, root_pos: int, tokens: list[int]):
    """Draft-vocab log-probs after feeding ``tokens`` one by one as a chain (drafter only)."""
    cache = _copy_cache(cache)
    hidden = root_hidden[None, None]
    logq = None
    with torch.no_grad():
        for i, tok in enumerate(tokens):
            logits, hidden = drafter(torch.tensor([[tok]]), hidden, torch.tensor([[root_pos + 1 + i]]), cache)
            logq = torch.log_softmax(logits[0, 0].float(), -1)
    return logq


def _copy_cache(cache: MaskedKVCache) -> MaskedKVCache:
    out = MaskedKVCache()
    out.keys, out.values = cache.keys.clone(), cache.values.clone()
    return out


def test_draft_tree_invariants_and_tree_attention():
    target = TargetModel(small_llama(5))
    counts = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    drafter = tiny_drafter(target, DraftVocab.from_counts(counts, 40), seed=2)  # scattered ids
    drafter.eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    cache, root_logits, root_hidden = _drafter_prefix(target, drafter, ids)
    config = TreeConfig(depth=4, top_k=3, total_tokens=14)
    tree = build_draft_tree(drafter, cache, root_logits, root_hidden, torch.tensor([8, 8]), config)
    assert cache.length == 8  # tree entries were cropped away
    assert tree.tokens.shape == (2, 14) and tree.dists.shape == (2, 1 + 3 * 3, 40)
    assert torch.equal(tree.tokens, drafter.draft_to_target[tree.draft_ids])

    for b in range(2):
        parents, depths = tree.parents[b].tolist(), tree.depths[b].tolist()
        chosen_min = float(tree.scores[b].min())
        for i in range(14):
            p = parents[i]
            assert p < i  # parents precede children (ancestor-closed, topological)
            assert depths[i] == (1 if p < 0 else depths[p] + 1)
            anc = {i}
            while p >= 0:
                anc.add(p)
                p = parents[p]
            assert set(torch.nonzero(tree.mask[b, i]).flatten().tolist()) == anc
            # score = parent's score + log q(node) under the distribution it was drawn from
            dist = tree.dists[b, tree.parent_dist[b, i]]
            assert math.isclose(float(tree.logprobs[b, i]), float(dist[tree.draft_ids[b, i]]), abs_tol=1e-6)
            base = 0.0 if parents[i] < 0 else float(tree.scores[b, parents[i]])
            assert math.isclose(float(tree.scores[b, i]), base + float(tree.logprobs[b, i]), abs_tol=1e-5)
        # Siblings are the parent's top-k, in descending probability; any top-k child of a
        # chosen expanded node that was left out scores no higher than every chosen node (top-N).
        for node in range(-1, 14):
            row = 0 if node < 0 else int(tree.node_dist[b, node])
            kids = [i for i in range(14) if parents[i] == node]
            if row < 0:
                assert not kids
                continue
            top = torch.topk(tree.dists[b, row], 3)
            assert tree.draft_ids[b, kids].tolist() == top.indices[: len(kids)].tolist()
            base = 0.0 if node < 0 else float(tree.scores[b, node])
            for value in top.values[len(kids) :]:
                assert base + float(value) <= chosen_min + 1e-6
        # Tree attention in the drafter == drafting each root-to-node path as a chain.
        single_cache, _, _ = _drafter_prefix(target, drafter, ids[b : b + 1])
        for node in range(14):
            row = int(tree.node_dist[b, node])
            if row < 0:
                continue
            path = [int(tree.tokens[b, j]) for j in tree.path_to(b, node)]
            chain = _chain_logits(drafter, single_cache, root_hidden[b], 8, path)
            assert torch.allclose(tree.dists[b, row], chain, atol=1e-5), (b, node)
        # Batch rows are independent: tree b equals the tree built for sequence b alone.
        alone = build_draft_tree(
            drafter, single_cache, root_logits[b : b + 1], root_hidden[b : b + 1], torch.tensor([8]), config
        )
        assert torch.equal(alone.tokens[0], tree.tokens[b]) and torch.equal(alone.parents[0], tree.parents[b])

    # Chain drafting is top_k = 1: the drafter's greedy chain.
    chain = build_draft_tree(drafter, cache, root_logits, root_hidden, torch.tensor([8, 8]), TreeConfig.chain(4))
    assert chain.parents[0].tolist() == [-1, 0, 1, 2] and chain.depths[0].tolist() == [1, 2, 3, 4]
    single_cache, _, _ = _drafter_prefix(target, drafter, ids[:1])
    expected = [int(drafter.draft_to_target[root_logits[0].argmax()])]
    for _ in range(3):
        expected.append(int(drafter.draft_to_target[_chain_logits(drafter, single_cache, root_hidden[0], 8, expected).argmax()]))
    assert chain.tokens[0].tolist() == expected
    # total_tokens caps the tree; the best N are kept.
    small = build_draft_tree(drafter, cache, root_logits, root_hidden, torch.tensor([8, 8]), TreeConfig(4, 3, 5))
    assert small.num_nodes == 5
    assert torch.allclose(small.scores.sort(-1).values, tree.scores.topk(5, -1).values.sort(-1).values)
    with pytest.raises(ValueError, match="chains"):
        TreeConfig(depth=3, top_k=2, total_tokens=4, sample_temperature=1.0)


# --------------------------------------------------------------------------------------------
# Losslessness at T = 0


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_greedy_speculative_equals_target_greedy_random_drafters(arch):
    """Random drafters: almost everything is rejected, so this exercises the correction path."""
    for seed in range(16 if arch == "llama" else 8):
        hf = small_llama(100 + seed, layers=3, arch=arch)
        target = TargetModel(hf)
        # Odd seeds draft over 40 scattered target ids (the d2t mapping is on the path).
        vocab = DraftVocab.from_counts(torch.randperm(64), 40) if seed % 2 else None
        drafter = tiny_drafter(target, vocab, seed=seed)
        tree = TreeConfig(depth=3 + seed % 3, top_k=2 + seed % 3, total_tokens=6 + seed)
        engine = SpeculativeGenerator(target, drafter, tree)
        prompt = torch.randint(0, 64, (1 + 2 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = hf_greedy(hf, prompt, 32)
        result = engine.generate(prompt, 32)
        assert result.tokens == want, seed
        if seed % 4 == 0:
            assert engine.generate_autoregressive(prompt, 32).tokens == want
        assert result.target_forwards == 1 + len(result.accept_lengths)


def _predictable_target(seed: int = 1) -> TargetModel:
    """A tiny Llama whose next token is mostly a fixed permutation of the current one.

    The lm_head reads a permuted copy of the (normalised) embeddings; the layers are scaled up
    so that context still flips ~1/4 of greedy tokens, keeping the KV cache relevant.
    """
    hf = small_llama(seed, layers=4)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.mul_(2.0)
            layer.mlp.down_proj.weight.mul_(2.0)
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        emb = hf.model.embed_tokens.weight[torch.argsort(perm)]
        hf.lm_head.weight.copy_(emb / emb.norm(dim=-1, keepdim=True) * 4.0)
    return TargetModel(hf, aux_layer_ids=(1, 2, 3))


def train_agreeing_pair(steps: int = 40):
    """A drafter trained by TTT for ``steps`` steps on the target's own greedy outputs."""
    target = _predictable_target()
    prompts = torch.randint(0, 64, (48, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        data = prompts
        for _ in range(18):
            data = torch.cat([data, target.features(data).logits[:, -1:].argmax(-1)], 1)
    feats = target.features(data)
    drafter = tiny_drafter(target, seed=0)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=2e-2)
    attention = torch.ones_like(data)
    loss_mask = attention.clone()
    loss_mask[:, :6] = 0
    restricted = restrict_to_draft_vocab(feats.logits, drafter.draft_to_target)
    for _ in range(steps):
        result = training_time_test(
            drafter, data, attention, loss_mask, *restricted, feats.aux_hidden, 3, step_weights(3, 0.8)
        )
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    return target, drafter.eval()


@pytest.fixture(scope="module")
def trained_pair():
    return train_agreeing_pair()


def test_greedy_speculative_equals_target_greedy_trained_drafter(trained_pair):
    """A drafter that mostly agrees: multi-token acceptance and KV compaction are exercised."""
    target, drafter = trained_pair
    accepted, steps = 0, 0
    for seed in range(16):
        tree = [TreeConfig(depth=5, top_k=4, total_tokens=16), TreeConfig.chain(4)][seed % 2]
        engine = SpeculativeGenerator(target, drafter, tree)
        prompt = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(100 + seed)).tolist()
        result = engine.generate(prompt, 32)
        assert result.tokens == hf_greedy(target.model, prompt, 32), seed
        accepted += sum(result.accept_lengths)
        steps += len(result.accept_lengths)
        assert len(result.tokens) <= 1 + sum(a + 1 for a in result.accept_lengths)
    assert accepted / steps > 1.5, accepted / steps


def test_eos_and_max_new_tokens(trained_pair):
    target, drafter = trained_pair
    engine = SpeculativeGenerator(target, drafter, TreeConfig(depth=5, top_k=4, total_tokens=16))
    prompt = [1, 2, 3, 4, 5, 6]
    full = engine.generate(prompt, 20).tokens
    assert len(full) == 20 and len(engine.generate(prompt, 7).tokens) == 7
    eos = full[9]
    cut = engine.generate(prompt, 20, eos_token_id=eos).tokens
    assert cut == full[: full.index(eos) + 1]


# --------------------------------------------------------------------------------------------
# Losslessness at T > 0


def _tiny_vocab_pair(seed: int = 0, vocab: int = 8, arch: str = "llama"):
    """A vocab-8 target with spread-out (not near-uniform) next-token distributions."""
    hf = small_llama(seed, vocab=vocab, layers=2, arch=arch, hidden_size=16, intermediate_size=32,
                     num_attention_heads=2, num_key_value_heads=1)
    with torch.no_grad():
        hf.lm_head.weight.mul_(25.0)
    target = TargetModel(hf, aux_layer_ids=(0, 1, 1))
    return target, tiny_drafter(target, seed=seed + 1).eval()


@torch.no_grad()
def _exact_joint(target: TargetModel, context: list[int], temperature: float, vocab: int) -> torch.Tensor:
    """P(t1, t2, t3 | context) under the target at ``temperature``: [V, V, V]."""
    grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # [V^2, 2]
    ids = torch.cat([torch.tensor(context).expand(len(grid), -1), grid], 1)
    probs = torch.softmax(target.features(ids).logits.double() / temperature, -1)
    p1 = probs[0, len(context) - 1]  # [V]
    p2 = probs[::vocab, len(context)]  # [V(t1), V]
    p3 = probs[:, len(context) + 1].reshape(vocab, vocab, vocab)
    return p1[:, None, None] * p2[:, :, None] * p3


def _one_step_tokens(target, drafter, context, config, temperature, n, seed, verifier=verify_tree):
    """n independent speculative steps from ``context`` (its last token is the root), batched."""
    fast = FastLlama.from_target(target)
    gen = torch.Generator().manual_seed(seed)
    length = len(context) - 1
    ids = torch.tensor(context).expand(n, -1)
    cache = fast.new_cache(n, length + 1 + config.total_tokens)
    out = fast(ids[:, :-1], torch.arange(length).expand(n, -1), cache, 0, causal_slot_mask(0, length, length, n))
    draft_cache = MaskedKVCache()
    logits, prenorm = drafter(ids[:, 1:], drafter.fuse_target_hidden(out.aux_hidden),
                              torch.arange(1, length + 1).expand(n, -1), draft_cache)
    tree = build_draft_tree(drafter, draft_cache, logits[:, -1], prenorm[:, -1],
                            torch.full((n,), length), config, generator=gen)
    chunk = torch.cat([ids[:, -1:], tree.tokens], 1)
    mask = torch.cat([torch.ones(n, chunk.shape[1], length, dtype=torch.bool), tree.chunk_mask()], -1)
    logits = fast(chunk, tree.chunk_positions(), cache, length, mask).logits
    return tree, verifier(tree, logits, temperature, gen), gen


def _complete_counts(steps: list[VerifyStep], joint_tables, gen, vocab: int) -> torch.Tensor:
    """Counts of the first 3 tokens; a step that emitted fewer is completed from the exact target
    conditionals (what the next, separately lossless, steps would do)."""
    p1, p2, p3 = joint_tables
    counts = torch.zeros(vocab, vocab, vocab)
    for step in steps:
        toks = step.tokens[:3]
        if len(toks) < 2:
            toks.append(int(torch.multinomial(p2[toks[0]].float(), 1, generator=gen)))
        if len(toks) < 3:
            toks.append(int(torch.multinomial(p3[toks[0], toks[1]].float(), 1, generator=gen)))
        counts[toks[0], toks[1], toks[2]] += 1
    return counts


def _tables(joint: torch.Tensor):
    p1 = joint.sum((1, 2))
    p12 = joint.sum(2)
    return p1, p12 / p12.sum(1, keepdim=True), joint / p12[..., None]


def always_accept(tree: DraftTree, logits: torch.Tensor, temperature: float, gen) -> list[VerifyStep]:
    """A broken verifier (negative control): take the first child down to a leaf."""
    steps = []
    for b in range(tree.tokens.shape[0]):
        kids, node, path = tree.children(b), -1, []
        while kids[node]:
            node = kids[node][0]
            path.append(node)
        p = torch.softmax(logits[b, node + 1].double() / temperature, -1)
        bonus = int(torch.multinomial(p.float(), 1, generator=gen))
        steps.append(VerifyStep(path, [int(tree.tokens[b, i]) for i in path], bonus, node, None))
    return steps


def drafter_ratio(tree: DraftTree, logits, temperature, gen) -> list[VerifyStep]:
    """A subtly broken verifier (negative control): the min(1, p/q) test with the drafter's q on
    top-k children, which were never sampled from q."""
    return verify_tree(dataclasses.replace(tree, sampled=True), logits, temperature, gen)


@pytest.mark.parametrize(
    "config,verifier,lossless,n",
    [
        (TreeConfig(depth=3, top_k=2, total_tokens=8), verify_tree, True, 6000),
        (TreeConfig.chain(3, sample_temperature=1.0), verify_tree, True, 6000),
        (TreeConfig(depth=3, top_k=2, total_tokens=8), always_accept, False, 1500),
        (TreeConfig(depth=3, top_k=2, total_tokens=8), drafter_ratio, False, 1500),
    ],
    ids=["topk-tree", "sampled-chain", "control-always-accept", "control-drafter-ratio"],
)
def test_stochastic_verification_is_lossless(config, verifier, lossless, n):
    """One speculative step (real tree, real target logits), batched n times: the law of the next
    3 tokens equals the target's exact joint (Pearson chi-square); broken verifiers fail."""
    target, drafter = _tiny_vocab_pair()
    context, temperature = [3, 1, 4, 1, 5], 1.0
    joint = _exact_joint(target, context, temperature, 8)
    tree, steps, gen = _one_step_tokens(target, drafter, context, config, temperature, n, seed=7, verifier=verifier)
    counts = _complete_counts(steps, _tables(joint), gen, 8)
    depth_two = sum(s.accept_length >= 2 for s in steps) / n
    pvalue = chi_square_pvalue(counts, joint)
    if lossless:
        assert depth_two > 0.05  # deep acceptance is actually exercised
        assert pvalue > 1e-3, pvalue
    else:
        assert pvalue < 1e-6, pvalue


def _engine_counts(engine, prompt, n: int) -> tuple[torch.Tensor, int]:
    """Counts of n 3-token continuations, and how many verifications accepted a draft token."""
    counts, accepting = torch.zeros(8, 8, 8), 0
    for _ in range(n):
        result = engine.generate(prompt, 3)
        t1, t2, t3 = result.tokens
        counts[t1, t2, t3] += 1
        accepting += sum(a > 0 for a in result.accept_lengths)
    return counts, accepting


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_engine_sampling_matches_target_distribution(monkeypatch, arch):
    """End to end at T = 0.8: 3-token continuations from the engine vs the target's exact law
    (prefill sample, verification, compaction and drafter catch-up all on the path)."""
    target, drafter = _tiny_vocab_pair(seed=3, arch=arch)
    prompt, temperature = [2, 7, 1, 6], 0.8
    joint = _exact_joint(target, prompt, temperature, 8)
    engine = SpeculativeGenerator(target, drafter, TreeConfig(depth=2, top_k=3, total_tokens=6),
                                  temperature=temperature, seed=11)
    counts, accepting = _engine_counts(engine, prompt, 400)
    assert accepting > 100
    assert chi_square_pvalue(counts, joint) > 1e-3
    # Negative control: the same test with an always-accepting verifier fails.
    monkeypatch.setattr("speculative.engine.verify_tree", always_accept)
    assert chi_square_pvalue(_engine_counts(engine, prompt, 200)[0], joint) < 1e-6


# --------------------------------------------------------------------------------------------
# Real model


@pytest.mark.slow
def test_smollm2_speculative_greedy_equals_target_greedy():
    from speculative.target import load_tokenizer

    target = TargetModel.load("smollm2")
    tokenizer = load_tokenizer("smollm2")
    vocab = DraftVocab(torch.arange(4096), target.vocab_size)
    config = DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=0)
    engine = SpeculativeGenerator(target, drafter.eval(), TreeConfig(depth=3, top_k=3, total_tokens=8))
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        prompt = list(encoded["input_ids"])
        result = engine.generate(prompt, 24)
        assert result.tokens == hf_greedy(target.model, prompt, 24), question
        assert result.target_forwards == 1 + len(result.accept_lengths)


def _acceptance_tree() -> tuple[DraftTree, TreeConfig]:
    """The batch-2 top-k tree (depth 4, top-k 3, 14 nodes) of a random drafter over a random target
    that the device-acceptance tests steer target logits down; the same tree on every call."""
    target = TargetModel(small_llama(5))
    drafter = tiny_drafter(target, DraftVocab.from_counts(torch.randperm(64), 40), seed=2).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    cache, root_logits, root_hidden = _drafter_prefix(target, drafter, ids)
    config = TreeConfig(depth=4, top_k=3, total_tokens=14)
    tree = build_draft_tree(drafter, cache, root_logits, root_hidden, torch.tensor([8, 8]), config)
    return tree, config


def test_greedy_acceptance_on_device_equals_the_host_walk():
    """``greedy_accept_on_device`` (what the T = 0 draft+verify graph runs) against ``verify_greedy``
    on target logits steered down random paths of real trees: nothing, part of a path, a whole one."""
    from speculative.verify import greedy_accept_on_device, verify_greedy

    tree, config = _acceptance_tree()
    generator = torch.Generator().manual_seed(3)
    counts = set()
    for trial in range(60):
        logits = torch.randn(2, 15, 64, generator=generator)
        for b in range(2):
            end = int(torch.randint(-1, 14, (), generator=generator))  # -1: steer nothing
            path = tree.path_to(b, end) if end >= 0 else []
            keep = int(torch.randint(0, len(path) + 1, (), generator=generator))  # steer a prefix
            for node in path[:keep]:
                logits[b, int(tree.parents[b, node]) + 1, int(tree.tokens[b, node])] += 50.0
        count, nodes, bonus = greedy_accept_on_device(tree, logits, config.depth)
        for b in range(2):
            want = verify_greedy(tree, b, logits[b])
            got = nodes[b, : int(count[b])].tolist()
            assert got == want.accepted_nodes, (trial, b)
            assert int(bonus[b]) == want.bonus_token
            counts.add(int(count[b]))
    assert {0, 1, 2, 3} <= counts  # rejections at the root, mid-path and full-depth acceptances


def test_stochastic_acceptance_on_device_equals_the_host_walk():
    """``stochastic_accept_on_device`` (what the T > 0 draft+verify graph runs) against
    ``_verify_topk_stochastic`` fed the same uniforms, on real top-k trees and target logits
    steered down random paths, with tied sibling probabilities and zero-probability tokens:
    the same accepted path, and the bonus drawn from the same residual distribution."""
    from speculative.verify import _verify_topk_stochastic, stochastic_accept_on_device

    tree, config = _acceptance_tree()
    assert not tree.sampled
    generator = torch.Generator().manual_seed(3)
    counts, stops_with_children = set(), 0
    for trial in range(80):
        temperature = (0.7, 1.0, 1.3)[trial % 3]
        logits = torch.randn(2, 15, 64, generator=generator, dtype=torch.float64)
        for b in range(2):
            end = int(torch.randint(-1, 14, (), generator=generator))
            path = tree.path_to(b, end) if end >= 0 else []
            keep = int(torch.randint(0, len(path) + 1, (), generator=generator))
            for node in path[:keep]:
                logits[b, int(tree.parents[b, node]) + 1, int(tree.tokens[b, node])] += 3.0
            kind = trial % 4
            for node in range(tree.num_nodes):
                row, token = int(tree.parents[b, node]) + 1, int(tree.tokens[b, node])
                if kind == 1 and node % 3 == 0:  # zero-probability drafted tokens
                    logits[b, row, token] = float("-inf")
                elif kind == 2:  # ties: every sibling as likely as its parent's first child
                    logits[b, row, token] = 1.5
            if kind == 3:  # a node whose children carry all of its mass
                row = 1 + int(tree.parents[b, 0])
                kids = tree.tokens[b][tree.parents[b] == tree.parents[b, 0]]
                logits[b, row] = float("-inf")
                logits[b, row, kids] = torch.rand(len(kids), generator=generator, dtype=torch.float64)
        seeds = [1000 * trial + b for b in range(2)]
        uniforms = torch.stack([torch.rand(15, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                                for s in seeds])  # at each node, then the bonus's
        count, nodes, bonus, residual = stochastic_accept_on_device(
            tree, logits, config.depth, temperature, uniforms=uniforms, return_residual=True)
        assert nodes.shape == (2, config.depth)
        for b in range(2):
            want = _verify_topk_stochastic(tree, b, logits[b], temperature, torch.Generator().manual_seed(seeds[b]))
            assert nodes[b, : int(count[b])].tolist() == want.accepted_nodes, (trial, b)
            # the host's residual: p at the stop node, the rejected children's tokens zeroed
            p = torch.softmax(logits[b, want.stop_node + 1] / temperature, -1)
            kids = [c for c in want.rejected_nodes if int(tree.parents[b, c]) == want.stop_node]
            expected = p.clone()
            if kids and float(p[tree.tokens[b, kids]].sum()) < 1.0:
                expected[tree.tokens[b, kids]] = 0.0
            stops_with_children += bool(kids)
            assert torch.allclose(residual[b] / residual[b].sum(), expected / expected.sum(), atol=1e-9), (trial, b)
            assert float(residual[b, int(bonus[b])]) > 0 and float(expected[want.bonus_token]) > 0
            counts.add(int(count[b]))
    assert {0, 1, 2, 3} <= counts and stops_with_children > 20
