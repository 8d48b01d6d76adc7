"""GTO: the Draft Tree Reward against Monte-Carlo verification, batched trees at many positions
against the engine's own, group advantages and the clipped surrogate, its inertness at M = M0,
and a toy run where the surrogate on credited paths raises the reward (and on debited paths
lowers it). Why no test asserts a rise from GTO's own advantages: docs/methods/gto.md, section 8."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from actors.gto_rollout import choose_windows, gto_experience, tree_config, valid_indices
from actors.target_worker import TargetWorker
from learners.gto import clipped_surrogate, group_advantages, gto_loss
from speculative.config import load_config
from speculative.kv_cache import MaskedKVCache
from speculative.llama import FastLlama, causal_slot_mask
from speculative.position_trees import build_trees_at, drafter_prefix, prefill_sequence, verify_trees_at
from speculative.tree import DraftTree, TreeConfig, ancestor_mask, build_draft_tree, tree_size
from speculative.tree_reward import greedy_accepted_path, score_tree
from speculative.ttt import path_logprob
from speculative.verify import verify_tree
from tests.test_tree_engine import _tiny_vocab_pair, train_agreeing_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine_tree(target, drafter, ids: torch.Tensor, t: int, config: TreeConfig):
    """The engine's way: drafter prefill over x_0..x_{t+1} (root last), then one tree, then the
    target's verification forward over [root, nodes] behind its own cache."""
    fast = FastLlama.from_target(target)
    context = ids[: t + 2][None]
    n = t + 1  # target has read x_0..x_t; the root x_{t+1} goes into the chunk
    cache = fast.new_cache(1, n + 1 + config.total_tokens)
    out = fast(context[:, :n], torch.arange(n)[None], cache, 0, causal_slot_mask(0, n, n))
    draft_cache = MaskedKVCache()
    logits, prenorm = drafter(context[:, 1:], drafter.fuse_target_hidden(out.aux_hidden),
                              torch.arange(1, n + 1)[None], draft_cache)
    tree = build_draft_tree(drafter, draft_cache, logits[:, -1], prenorm[:, -1], torch.tensor([n]), config)
    chunk = torch.cat([context[:, -1:], tree.tokens], 1)
    mask = torch.cat([torch.ones(1, chunk.shape[1], n, dtype=torch.bool), tree.chunk_mask()], -1)
    return tree, fast(chunk, tree.chunk_positions(), cache, n, mask).logits


@torch.no_grad()
def test_trees_at_many_positions_equal_the_engines_trees():
    target, drafter = _tiny_vocab_pair(seed=3, vocab=16)
    ids = torch.randint(0, 16, (14,), generator=torch.Generator().manual_seed(0))
    config = TreeConfig(depth=3, top_k=3, total_tokens=9)
    fast = FastLlama.from_target(target)
    seq = prefill_sequence(fast, ids, room=4 * 9)
    prefix = drafter_prefix(drafter, ids, seq.aux_hidden)
    indices = torch.tensor([0, 3, 7, 11])
    trees = build_trees_at(drafter, prefix, indices, config)
    logits = verify_trees_at(fast, seq, trees, indices)
    for b, t in enumerate(indices.tolist()):
        tree, engine_logits = _engine_tree(target, drafter, ids, t, config)
        assert torch.equal(trees.tokens[b], tree.tokens[0])
        assert torch.equal(trees.parents[b], tree.parents[0])
        torch.testing.assert_close(trees.logprobs[b], tree.logprobs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[b], engine_logits[0], atol=1e-4, rtol=1e-4)


def _subtree(tree: DraftTree, nodes: list[int]) -> DraftTree:
    """Tree 0 restricted to ``nodes`` (ancestor-closed, in node order)."""
    keep = torch.tensor(nodes)
    remap = {old: new for new, old in enumerate(nodes)}
    parents = torch.tensor([[remap.get(int(p), -1) if p >= 0 else -1 for p in tree.parents[0, keep]]])
    depth = int(tree.depths[0, keep].max())
    return replace(
        tree, tokens=tree.tokens[:1, keep], draft_ids=tree.draft_ids[:1, keep], parents=parents,
        depths=tree.depths[:1, keep], mask=ancestor_mask(parents, depth), scores=tree.scores[:1, keep],
        logprobs=tree.logprobs[:1, keep], parent_dist=tree.parent_dist[:1, keep],
        node_dist=tree.node_dist[:1, keep], dists=tree.dists[:1],
    )


def _monte_carlo(tree: DraftTree, logits: torch.Tensor, temperature: float, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(
        [float(verify_tree(tree, logits, temperature, gen)[0].accept_length) for _ in range(n)]
    )
    return lengths.mean().item(), lengths.std().item() / math.sqrt(n)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_reward_equals_monte_carlo_acceptance(seed):
    """E = sum_v P(v) is the mean accepted length of the engine's stochastic verifier over the
    whole tree, and each branch value L_i the mean accepted length of verifying that branch
    alone; both within 4.5 standard errors of n samples (a false failure has p < 1e-5)."""
    target, drafter = _tiny_vocab_pair(seed=seed, vocab=8)
    ids = torch.randint(0, 8, (6,), generator=torch.Generator().manual_seed(seed))
    tree, logits = _engine_tree(target, drafter, ids, 4, TreeConfig(depth=3, top_k=3, total_tokens=10))
    score = score_tree(tree, logits, temperature=1.0, eta=1.0, aggregation="lse")
    expected = float(score.expected_length[0])
    assert 0.1 < expected < 2.9  # a non-degenerate case: neither always nor never accepted
    mean, stderr = _monte_carlo(tree, logits, 1.0, 3000, seed)
    assert abs(mean - expected) < 4.5 * stderr + 1e-9, (mean, expected, stderr)

    branch_values = []
    for leaf in torch.nonzero(score.is_leaf[0]).flatten().tolist():
        path = tree.path_to(0, leaf)
        value = float(score.branch_values[0, leaf])
        mean, stderr = _monte_carlo(_subtree(tree, path), logits[:, [0] + [1 + i for i in path]], 1.0, 800, leaf)
        assert abs(mean - value) < 4.5 * stderr + 1e-9, (leaf, mean, value, stderr)
        branch_values.append(value)
    # Eq. 5: the log-sum-exp sits between the best branch and best + log(#branches) / eta.
    reward = float(score.reward[0])
    assert max(branch_values) <= reward <= max(branch_values) + math.log(len(branch_values)) + 1e-6
    assert reward == pytest.approx(math.log(sum(math.exp(v) for v in branch_values)), rel=1e-5)


@pytest.fixture(scope="module")
def agreeing_pair():
    return train_agreeing_pair()


@torch.no_grad()
def test_reward_reduces_to_greedy_accepted_length_at_temperature_zero(agreeing_pair):
    target, drafter = agreeing_pair
    config = TreeConfig(depth=4, top_k=3, total_tokens=20)
    generator = torch.Generator().manual_seed(0)
    seen_long = 0
    for trial in range(12):
        ids = torch.randint(0, 64, (10,), generator=generator)
        tree, logits = _engine_tree(target, drafter, ids, 6, config)
        step = verify_tree(tree, logits, 0.0)[0]
        score = score_tree(tree, logits, temperature=0.0, aggregation="max")
        assert float(score.expected_length[0]) == step.accept_length
        assert float(score.reward[0]) == step.accept_length  # max over branches = greedy length
        assert set(score.branch_values[0].unique().tolist()) <= set(range(config.depth + 1))
        _, nodes, length = greedy_accepted_path(tree, logits, config.depth)
        assert int(length[0]) == step.accept_length
        assert nodes[0, : step.accept_length].tolist() == step.accepted_nodes
        seen_long += step.accept_length >= 2
    assert seen_long >= 3  # the check saw real multi-token paths


def test_group_advantages_and_clipped_surrogate():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 5.0, 5.0, 7.0, 0.0])
    group = torch.tensor([4, 4, 4, 4, 9, 9, 9, 9])
    valid = torch.tensor([True, True, True, False, True, True, True, False])
    adv, used, dense = group_advantages(rewards, group, valid)
    assert used.tolist() == valid.tolist()
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    first = adv[4:7]
    assert abs(float(first.sum())) < 1e-5 and float(first.std()) == pytest.approx(1.0, abs=1e-4)
    # A group with a single valid member is dropped.
    _, used, _ = group_advantages(rewards, group, torch.tensor([True, False, False, False] + [True] * 4))
    assert used.tolist() == [False] * 4 + [True] * 4

    log_ratio = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.1, -0.1, 0.3, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 0.0, 1.0, 1.0, -1.0, 0.0])
    used = torch.tensor([True, True, True, False, True, True, True, False])
    loss, clipped = clipped_surrogate(log_ratio, adv, used, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 0.2)
    # Position 0: ratio e^0.5 > 1.2 with A > 0 -> clipped (no gradient); position 2: ratio
    # e^-0.5 < 0.8 with A < 0 -> clipped; position 6: ratio e^0.3 > 1.2 with A < 0 -> unclipped.
    assert clipped.tolist() == [True, False, True, False, False, False, False, False]
    loss.backward()
    assert log_ratio.grad[0] == 0 and log_ratio.grad[2] == 0 and log_ratio.grad[6] > 0
    assert log_ratio.grad[3] == 0 and log_ratio.grad[7] == 0


def test_choose_windows_are_disjoint_valid_and_reproducible():
    valid = torch.tensor([False, True, True, True, True, False, True, True, True, True, True, True, False])
    windows = choose_windows(valid, 3, 5, torch.Generator().manual_seed(0))
    flat = [t for w in windows for t in w]
    assert len(flat) == len(set(flat)) and all(valid[t] for t in flat)
    assert all(w == list(range(w[0], w[0] + 3)) for w in windows)
    assert len(windows) == 3  # 1-4 holds one window, 6-11 two
    assert windows == choose_windows(valid, 3, 5, torch.Generator().manual_seed(0))


def _gto_config(**gto):
    overrides = [f"gto.{k}={v}" for k, v in gto.items()]
    return load_config(None, ["training.objective=gto", "training.ttt_steps=3", *overrides])


def _sequences(target, n: int, length: int, prompt: int, seed: int) -> dict[str, torch.Tensor]:
    """The target's own greedy continuations of random prompts, the continuation supervised."""
    data = torch.randint(0, target.vocab_size, (n, prompt), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for _ in range(length - prompt):
            data = torch.cat([data, target.features(data).logits[:, -1:].argmax(-1)], 1)
    loss_mask = torch.ones_like(data)
    loss_mask[:, :prompt] = 0
    return {"input_ids": data, "attention_mask": torch.ones_like(data), "loss_mask": loss_mask}


def test_gto_experience_is_consistent_with_replay_and_the_engine(agreeing_pair):
    """Path log-probs recomputed by replay (what the learner differentiates) equal the ones the
    tree search computed; the rewards equal scoring each tree through the engine's own path."""
    target, drafter = agreeing_pair
    drafter = copy.deepcopy(drafter)
    reference = copy.deepcopy(drafter)
    with torch.no_grad():  # a reference that differs from the current drafter
        for p in reference.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    config = _gto_config(tree_depth=4, tree_top_k=3, tree_total_tokens=16, group_size=3,
                         groups_per_sequence=2, positions_per_forward=4)
    batch = _sequences(target, 2, 20, 6, seed=0)
    worker = TargetWorker(target, drafter.draft_to_target)
    exp = gto_experience(worker, config, batch, drafter, reference, drafter_version=7, seed=0)
    assert exp.drafter_version == 7 and exp.index.numel() == 12
    assert (exp.path_length > 0).float().mean() > 0.5
    with torch.no_grad():
        replayed = path_logprob(drafter, exp.sft.input_ids, exp.sft.attention_mask, exp.sft.aux_hidden, exp.sequence, exp.index, exp.path_ids, exp.path_length)
    torch.testing.assert_close(replayed, exp.rollout_path_logprob, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(exp.reference_path_logprob, exp.rollout_path_logprob)

    trees = tree_config(config.gto)
    for p in [0, 5, 11]:
        s, t = int(exp.sequence[p]), int(exp.index[p])
        tree, logits = _engine_tree(target, drafter, batch["input_ids"][s], t, trees)
        score = score_tree(tree, logits, 1.0, 1.0, "lse")
        assert float(exp.reward[p]) == pytest.approx(float(score.reward[0]), abs=1e-4)
        ref_tree, ref_logits = _engine_tree(target, reference, batch["input_ids"][s], t, trees)
        ref_score = score_tree(ref_tree, ref_logits, 1.0, 1.0, "lse")
        assert float(exp.reference_reward[p]) == pytest.approx(float(ref_score.reward[0]), abs=1e-4)
        assert int(exp.path_length[p]) == verify_tree(tree, logits, 0.0)[0].accept_length

    loss, metrics = gto_loss(drafter, exp, config)
    loss.backward()
    assert math.isfinite(float(loss)) and metrics["gto/rollout_logprob_drift"] < 1e-4
    assert 0 <= metrics["gto/clip_fraction"] <= 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in drafter.trainable_parameters())


def test_surrogate_gradient_raises_positive_advantage_paths_and_lowers_negative_ones(agreeing_pair):
    """First-order sanity of Eq. 12's sign: one small step on the surrogate alone raises the
    advantage-weighted log-probability of the accepted paths: paths with A > 0 rise, and more
    than those with A < 0."""
    target, trained = agreeing_pair
    drafter = copy.deepcopy(trained)
    reference = copy.deepcopy(trained)
    with torch.no_grad():  # the current drafter drifts from the reference: R != 0
        generator = torch.Generator().manual_seed(3)
        for p in drafter.trainable_parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    config = _gto_config(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=4,
                         groups_per_sequence=3, token_loss_weight=0.0, loss_weight=1.0)
    worker = TargetWorker(target, drafter.draft_to_target)
    exp = gto_experience(worker, config, _sequences(target, 4, 24, 4, seed=0), drafter, reference)
    has_path = exp.path_length > 0
    advantages, used, _ = group_advantages(exp.reward - exp.reference_reward, exp.group,
                                           torch.ones_like(has_path))
    used = used & has_path
    assert int((used & (advantages > 0.1)).sum()) >= 2 and int((used & (advantages < -0.1)).sum()) >= 2

    def logprob():
        return path_logprob(drafter, exp.sft.input_ids, exp.sft.attention_mask, exp.sft.aux_hidden, exp.sequence, exp.index, exp.path_ids, exp.path_length)

    before = logprob().detach()
    loss, _ = gto_loss(drafter, exp, config)
    loss.backward()
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.sub_(1e-4 * p.grad)  # plain gradient descent, small enough to be first order
    change = logprob().detach() - before
    up, down = used & (advantages > 0.1), used & (advantages < -0.1)
    # The drafter's parameters are shared across positions, so a path can move with its
    # neighbours; what the gradient guarantees is the advantage-weighted direction.
    assert float((advantages[used] * change[used]).sum()) > 0
    assert float(change[up].mean()) > float(change[down].mean())
    assert float((change[up] > 0).float().mean()) >= 0.75


def test_gto_surrogate_is_inert_when_the_drafter_is_the_reference(agreeing_pair):
    """At the paper's starting point (M = M0) both trees of every position are the same tree, the
    debiased rewards R_i = r(T_i) - r(T0_i) are exactly 0, so are the advantages, and the surrogate
    has no gradient at all: GTO's surrogate alone never leaves M0; the token loss moves it first."""
    target, trained = agreeing_pair
    drafter, reference = copy.deepcopy(trained), copy.deepcopy(trained)
    config = _gto_config(tree_depth=4, tree_top_k=2, tree_total_tokens=6, group_size=4,
                         groups_per_sequence=3, token_loss_weight=0.0, loss_weight=1.0)
    worker = TargetWorker(target, drafter.draft_to_target)
    exp = gto_experience(worker, config, _sequences(target, 4, 24, 4, seed=0), drafter, reference)
    assert (exp.path_length > 0).sum() >= 8 and exp.reward.std() > 0.1  # real, varied trees
    assert torch.equal(exp.reward, exp.reference_reward)
    drafter.train()
    loss, metrics = gto_loss(drafter, exp, config)
    loss.backward()
    assert metrics["gto/advantage_abs"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in drafter.trainable_parameters())


@torch.no_grad()
def _mean_tree_reward(worker, drafter, config, batch) -> float:
    """Mean reward (``config.gto``'s) of the drafter's own trees at every valid index of ``batch``."""
    trees = tree_config(config.gto)
    nodes, _ = tree_size(trees, drafter.config.draft_vocab_size)
    was_training = drafter.training
    drafter.eval()
    rewards = []
    for s, ids in enumerate(batch["input_ids"]):
        indices = torch.nonzero(valid_indices(batch["loss_mask"][s], ids.shape[0])).flatten()
        seq = prefill_sequence(worker.fast, ids, room=indices.numel() * nodes)
        tree = build_trees_at(drafter, drafter_prefix(drafter, ids, seq.aux_hidden), indices, trees)
        logits = verify_trees_at(worker.fast, seq, tree, indices)
        gto = config.gto
        rewards.append(score_tree(tree, logits, gto.reward_temperature, gto.eta, gto.reward).reward)
    drafter.train(was_training)
    return float(torch.cat(rewards).mean())


def test_surrogate_on_credited_paths_raises_tree_reward(agreeing_pair):
    """Reward-level gradient sanity of Eq. 12 on a toy where the tree budget binds (depth 4, top-2,
    6 nodes out of 14 candidates): 20 on-policy steps of the clipped surrogate with every accepted
    path credited (A = +1, ratio against the rollout drafter) raise the tree reward, here the greedy
    accepted length of the drafter's own trees at all 160 indices of fixed contexts; the same steps
    with A = -1 (the control) lower it.

    Measured over 4 context seeds: +0.24..+0.67 accepted tokens credited, -0.81..-1.18 debited,
    from 1.46..2.29. The paper's own advantages do not give such a rise on these toys
    (docs/methods/gto.md, section 8): they are centred within each group, so they debit as many
    accepted paths as they credit, and the test above shows they vanish at M = M0."""
    target, trained = agreeing_pair
    config = _gto_config(tree_depth=4, tree_top_k=2, tree_total_tokens=6, group_size=4,
                         groups_per_sequence=4, reward_temperature=0.0, reward="max")
    batch = _sequences(target, 8, 24, 4, seed=100)

    def train(sign: float) -> tuple[float, float]:
        drafter = copy.deepcopy(trained)
        worker = TargetWorker(target, drafter.draft_to_target)
        optimizer = torch.optim.Adam(drafter.trainable_parameters(), lr=3e-4, betas=(0.9, 0.95))
        before = _mean_tree_reward(worker, drafter, config, batch)
        for step in range(20):
            exp = gto_experience(worker, config, batch, drafter, drafter, seed=step)
            has_path = exp.path_length > 0
            _, _, dense = group_advantages(exp.reward, exp.group, has_path)
            drafter.train()
            logprob = path_logprob(drafter, exp.sft.input_ids, exp.sft.attention_mask, exp.sft.aux_hidden,
                                   exp.sequence, exp.index, exp.path_ids, exp.path_length)
            per_token = (logprob - exp.rollout_path_logprob) / exp.path_length.clamp_min(1)
            loss, _ = clipped_surrogate(per_token, sign * has_path.float(), has_path, dense,
                                        config.gto.clip_epsilon)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return before, _mean_tree_reward(worker, drafter, config, batch)

    before, credited = train(+1.0)
    _, debited = train(-1.0)
    assert 1.0 < before < 3.0  # neither hopeless nor saturated (max 4)
    assert credited > before + 0.15, (before, credited)
    assert debited < before - 0.3, (before, debited)


# ------------------------------------------------------------------------------------------
# Issue 18: per-update statistics and the ablation knobs (each test fails if its knob is ignored)
# ------------------------------------------------------------------------------------------
def _drifted_experience(agreeing_pair, **gto):
    target, trained = agreeing_pair
    drafter, reference = copy.deepcopy(trained), copy.deepcopy(trained)
    with torch.no_grad():  # the current drafter drifts from the reference: debiased rewards != 0
        generator = torch.Generator().manual_seed(3)
        for p in drafter.trainable_parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    settings = dict(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=4, groups_per_sequence=3)
    config = _gto_config(**{**settings, **gto})
    worker = TargetWorker(target, drafter.draft_to_target)
    exp = gto_experience(worker, config, _sequences(target, 4, 24, 4, seed=0), drafter, reference)
    return drafter, exp, config


def test_gto_logs_reward_advantage_kl_and_ratio_statistics(agreeing_pair):
    from speculative.evaluation import mean_metrics

    drafter, exp, config = _drifted_experience(agreeing_pair)
    _, metrics = gto_loss(drafter, exp, config)
    debiased = exp.reward - exp.reference_reward
    assert metrics["gto/debiased_reward"] == pytest.approx(float(debiased.mean()), abs=1e-6)
    assert metrics["gto/debiased_reward_std"] == pytest.approx(float(debiased.std(unbiased=False)), abs=1e-6)
    assert metrics["gto/debiased_reward_abs"] == pytest.approx(float(debiased.abs().mean()), abs=1e-6)
    assert abs(metrics["gto/advantage_mean"]) < 0.5 and metrics["gto/advantage_std"] > 0.3  # group-centred
    assert metrics["gto/advantage_abs"] > 0
    for key in ("gto/kl_reference", "gto/clip_fraction", "gto/ratio_min", "gto/ratio_max"):
        assert key in metrics and math.isfinite(metrics[key])
    assert metrics["gto/ratio_min"] <= metrics["gto/ratio"] <= metrics["gto/ratio_max"]
    merged = mean_metrics([{"gto/ratio_min": 0.9, "gto/ratio_max": 1.1, "gto/ratio": 1.0},
                           {"gto/ratio_min": 0.7, "gto/ratio_max": 1.05, "gto/ratio": 0.9}])
    assert merged == {"gto/ratio_min": 0.7, "gto/ratio_max": 1.1, "gto/ratio": pytest.approx(0.95)}


def test_reward_knob_soft_is_the_paper_and_greedy_integer_is_the_greedy_length(agreeing_pair):
    _, paper, _ = _drifted_experience(agreeing_pair)
    _, soft, _ = _drifted_experience(agreeing_pair, reward="soft")
    _, greedy, _ = _drifted_experience(agreeing_pair, reward="greedy_integer")
    assert torch.equal(soft.reward, paper.reward)
    assert not torch.equal(paper.reward, paper.reward.round())  # soft: not integers
    assert torch.equal(greedy.reward, greedy.reward.round())
    assert torch.equal(greedy.reward.long(), greedy.path_length)  # the greedy verifier's accepted length
    assert torch.equal(greedy.reference_reward, greedy.reference_reward.round())


def test_std_floor_knob_damps_groups_of_near_equal_rewards(agreeing_pair):
    rewards = torch.tensor([0.001, -0.001, 0.002, 0.0, 1.0, 2.0, 3.0, 4.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    valid = torch.ones(8, dtype=torch.bool)
    plain, _, _ = group_advantages(rewards, group, valid)
    floored, _, _ = group_advantages(rewards, group, valid, std_floor=0.1)
    assert float(plain[:4].abs().mean()) > 0.5  # noise amplified to unit scale (the paper's form)
    assert float(floored[:4].abs().max()) < 0.02  # damped below the floor
    torch.testing.assert_close(floored[4:], plain[4:])  # groups with real spread are untouched
    drafter, exp, config = _drifted_experience(agreeing_pair)
    _, metrics = gto_loss(drafter, exp, config)
    high = config.model_copy(update={"gto": config.gto.model_copy(update={"std_floor": 1000.0})})
    _, damped = gto_loss(drafter, exp, high)
    assert metrics["gto/std_floor_abs"] == 0.0 and damped["gto/std_floor_abs"] > 0
    assert damped["gto/advantage_abs"] < 0.01 * metrics["gto/advantage_abs"]


def test_advantage_clip_negative_knob_keeps_only_positive_advantages(agreeing_pair):
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv, used, _ = group_advantages(rewards, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool))
    pos, _, _ = group_advantages(rewards, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                                 positive_only=True)
    assert bool((adv < 0).any()) and torch.equal(pos, adv.clamp_min(0))
    drafter, exp, config = _drifted_experience(agreeing_pair, advantage_clip_negative=True)
    _, metrics = gto_loss(drafter, exp, config)
    assert metrics["gto/advantage_mean"] > 0
    assert metrics["gto/advantage_mean"] == pytest.approx(metrics["gto/advantage_abs"], rel=1e-6)


def test_train_tree_depth_knob_matches_the_evaluation_tree(agreeing_pair):
    from tools.benchmark import TREE_DEFAULTS

    eval_config = _gto_config(tree_depth=4, train_tree_depth="eval").gto
    assert eval_config.training_depth == TreeConfig().depth == TREE_DEFAULTS["depth"]
    assert tree_config(eval_config).depth == TREE_DEFAULTS["depth"]
    assert _gto_config(tree_depth=4).gto.training_depth == 4  # unset: the paper's tree_depth
    _, exp, _ = _drifted_experience(agreeing_pair, train_tree_depth=2)
    assert exp.path_ids.shape[1] == 2 and int(exp.path_length.max()) <= 2
    _, deep, _ = _drifted_experience(agreeing_pair)
    assert deep.path_ids.shape[1] == 4 and int(deep.path_length.max()) > 2


def test_plot_gto_diagnostics_draws_every_logged_statistic(tmp_path):
    import json

    from bench.plot_gto_diagnostics import plot

    keys = ("gto/debiased_reward", "gto/debiased_reward_std", "gto/advantage_mean", "gto/advantage_std",
            "gto/advantage_abs", "gto/kl_reference", "gto/ratio", "gto/ratio_min", "gto/ratio_max",
            "gto/clip_fraction", "gto/reward", "gto/reference_reward")
    rows = [{"step": s, "split": "train", **{k: 0.01 * s + i for i, k in enumerate(keys)}} for s in range(1, 6)]
    rows.append({"step": 5, "split": "eval", "loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "figure.png"
    last = plot([tmp_path], out, ["run"])
    assert out.stat().st_size > 10_000
    assert set(last["run"]) == set(keys) - {"gto/debiased_reward_std"}  # the std is drawn as a band
    assert last["run"]["gto/kl_reference"] == pytest.approx(0.05 + keys.index("gto/kl_reference"))
