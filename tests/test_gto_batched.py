"""The batched GTO experience (``speculative.batched_trees``) against the per-sequence reference
implementation (``actors.gto_rollout.per_sequence_gto_experience``), field by field, in float32:
same windows, trees, rewards, expected lengths, accepted paths and log-probabilities, and the
same learner features, over seeds, batch sizes, ragged lengths, chunkings that do not divide
the batch, sequences without any window, both reward temperatures and a draft vocabulary
smaller than the target's."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from actors.gto_rollout import gto_experience, per_sequence_gto_experience
from actors.target_worker import TargetWorker
from speculative.config import load_config
from speculative.batched_trees import (
    BatchedTreeOptions,
    drafter_step_one,
    grow_trees_at,
    rooted_path_logprob,
    score_trees_at_positions,
)
from speculative.llama import FastLlama
from speculative.position_trees import build_trees_at, drafter_prefix, prefill_sequence
from speculative.rooted_attention import prefix_block_mask, rooted_attention, rooted_attention_flex
from speculative.tree import TreeConfig
from speculative.ttt import path_logprob
from speculative.vocab import DraftVocab
from speculative.target import TargetModel
from tests.conftest import tiny_drafter, tiny_llama
from tests.test_gto import _sequences
from tests.test_tree_engine import train_agreeing_pair

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 5


@pytest.fixture(scope="module")
def pair():
    """The agreeing pair (real multi-token accepted paths) and a reference that differs from it."""
    target, drafter = train_agreeing_pair()
    reference = copy.deepcopy(drafter)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in reference.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return target, drafter, reference


def _config(**gto):
    return load_config(None, ["training.objective=gto", "training.ttt_steps=3",
                              *[f"gto.{k}={v}" for k, v in gto.items()]])


def _ragged(batch: dict[str, torch.Tensor], lengths: list[int], unsupervised: tuple[int, ...] = ()):
    """Cut sequence b to ``lengths[b]`` tokens (right padding with PAD); rows in
    ``unsupervised`` lose their loss mask (no valid window)."""
    out = {k: v.clone() for k, v in batch.items()}
    for b, n in enumerate(lengths):
        out["input_ids"][b, n:] = PAD
        out["attention_mask"][b, n:] = 0
        out["loss_mask"][b, n:] = 0
        if b in unsupervised:
            out["loss_mask"][b] = 0
    return out


def assert_same_experience(batched, reference, atol: float = 1e-5) -> None:
    for name in ("sequence", "index", "group", "path_ids", "path_length"):
        assert torch.equal(getattr(batched, name), getattr(reference, name)), name
    for name in ("reward", "reference_reward", "expected_length", "reference_expected_length",
                 "rollout_path_logprob", "reference_path_logprob"):
        torch.testing.assert_close(getattr(batched, name), getattr(reference, name), atol=atol, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in ("input_ids", "attention_mask", "loss_mask", "target_top1"):
        assert torch.equal(getattr(batched.sft, name), getattr(reference.sft, name)), name
    for name in ("aux_hidden", "target_draft_logits"):
        torch.testing.assert_close(getattr(batched.sft, name), getattr(reference.sft, name), atol=atol, rtol=1e-5)
    assert batched.drafter_version == reference.drafter_version


CASES = [
    # seed, batch, lengths (None = full 24), sequences_per_forward, positions_per_forward, gto overrides
    (0, 3, [24, 17, 11], 2, 4, {}),
    (1, 5, [24, 9, 20, 6, 15], 3, 5, {"reward_temperature": 0.0, "reward": "max"}),
    (2, 4, None, 4, 8, {"reward": "expected"}),
    (3, 6, [12, 24, 5, 24, 8, 19], 16, 3, {"reward": "mean", "reward_temperature": 0.7}),
    (4, 3, [24, 17, 11], 2, 4, {"tree_attention": "flex"}),  # the prefix part by FlexAttention
]


@pytest.mark.parametrize("seed,batch_size,lengths,seqs,positions,overrides", CASES)
def test_batched_experience_equals_the_per_sequence_reference(pair, seed, batch_size, lengths, seqs,
                                                              positions, overrides):
    target, drafter, reference = pair
    config = _config(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3,
                     groups_per_sequence=3, sequences_per_forward=seqs,
                     positions_per_forward=positions, **overrides)
    batch = _sequences(target, batch_size, 24, 4, seed=seed)
    if lengths is not None:
        batch = _ragged(batch, lengths, unsupervised=(1,) if batch_size > 4 else ())
    worker = TargetWorker(target, drafter.draft_to_target)
    new = gto_experience(worker, config, batch, drafter, reference, drafter_version=3, seed=seed)
    old = per_sequence_gto_experience(worker, config, batch, drafter, reference, drafter_version=3, seed=seed)
    assert_same_experience(new, old)
    # The comparison saw real work: several windows, accepted paths, and trees that differ.
    assert new.index.numel() >= 3 * batch_size
    assert int((new.path_length >= 2).sum()) >= 2
    assert not torch.allclose(new.rollout_path_logprob, new.reference_path_logprob)
    if config.gto.reward_temperature > 0:
        assert not torch.allclose(new.reward, new.reference_reward)
    if lengths is not None and batch_size > 4:  # sequences 1 (no loss mask) and the 5-5-token one
        assert 1 not in new.sequence.tolist()
        short = [b for b, n in enumerate(lengths) if n <= 6]
        assert short and all(b not in new.sequence.tolist() for b in short)


def test_fused_and_fast_target_forwards_give_the_same_experience(pair):
    """The target's prefill and verification through FusedLlama (default) or FastLlama
    (``gto.target_forward=fast``): the same experience, and the default really ran FusedLlama."""
    from speculative.fused_llama import FusedLlama

    target, drafter, reference = pair
    options = dict(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3, groups_per_sequence=3,
                   sequences_per_forward=2, positions_per_forward=4)
    batch = _ragged(_sequences(target, 3, 24, 4, seed=11), [24, 15, 20])
    worker = TargetWorker(target, drafter.draft_to_target)
    calls = []
    forward = FusedLlama.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedLlama, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
        fused = gto_experience(worker, _config(**options), batch, drafter, reference, seed=2)
        assert calls  # the prefill and every verification forward
        count = len(calls)
        fast = gto_experience(worker, _config(target_forward="fast", **options), batch, drafter, reference, seed=2)
        assert len(calls) == count  # the A/B path runs FastLlama only
    assert_same_experience(fused, fast)
    assert int((fused.path_length >= 2).sum()) >= 1


def test_batched_experience_with_a_reduced_draft_vocabulary():
    """Draft ids differ from target ids (d2t is not the identity): features, trees and paths."""
    target = TargetModel(tiny_llama(vocab_size=96, layers=4, seed=2), aux_layer_ids=(1, 2, 3))
    counts = torch.rand(96, generator=torch.Generator().manual_seed(0))
    vocab = DraftVocab.from_counts(counts, 40)
    drafter = tiny_drafter(target, vocab, seed=3)
    reference = tiny_drafter(target, vocab, seed=4)
    config = _config(tree_depth=3, tree_top_k=4, tree_total_tokens=10, group_size=2,
                     groups_per_sequence=4, sequences_per_forward=2, positions_per_forward=3)
    batch = _ragged(_sequences(target, 3, 20, 3, seed=5), [20, 14, 18])
    worker = TargetWorker(target, drafter.draft_to_target)
    new = gto_experience(worker, config, batch, drafter, reference, seed=9)
    old = per_sequence_gto_experience(worker, config, batch, drafter, reference, seed=9)
    assert_same_experience(new, old)
    assert new.sft.target_draft_logits.shape[-1] == 40 and new.index.numel() == 24


@pytest.mark.parametrize("target_forward", ["fused", "fast"])
def test_gto_experience_ships_hidden_states_and_the_learner_gets_the_same_logits(target_forward):
    """A GTO experience packed for the object store carries the target's final-norm hidden states at
    the rows the loss reads and its lm_head rows at the draft ids, not the [rows, Vd] logits (H + Vd*H/n
    numbers a row instead of Vd: fewer bytes at real sizes, not at these tiny ones); after pickling, the learner's merge (on a device or not) redoes the product and
    gets the dense experience's logits back, and the same token loss."""
    import pickle

    from speculative.experience import concat_experiences
    from speculative.sft import sft_loss

    target = TargetModel(tiny_llama(vocab_size=96, layers=4, seed=2), aux_layer_ids=(1, 2, 3))
    vocab = DraftVocab.from_counts(torch.rand(96, generator=torch.Generator().manual_seed(0)), 40)
    drafter = tiny_drafter(target, vocab, seed=3)
    config = _config(tree_depth=3, tree_top_k=4, tree_total_tokens=10, group_size=2, groups_per_sequence=4,
                     sequences_per_forward=2, positions_per_forward=3, target_forward=target_forward)
    batch = _ragged(_sequences(target, 3, 20, 3, seed=5), [20, 14, 18])
    worker = TargetWorker(target, drafter.draft_to_target)
    dense = gto_experience(worker, config, batch, drafter, copy.deepcopy(drafter), seed=9)
    head = worker.fast.lm_head.weight[drafter.draft_to_target]
    assert torch.equal(dense.sft.draft_head, head)
    real = dense.sft.attention_mask.bool()
    redone = torch.nn.functional.linear(dense.sft.target_hidden, head)
    torch.testing.assert_close(redone[real], dense.sft.target_draft_logits[real], rtol=1e-5, atol=1e-5)
    shipped = pickle.loads(pickle.dumps(dense.packed("hidden").to_host(), protocol=5))
    with pytest.raises(ValueError, match="packing form"):
        dense.packed("compressed")
    read = dense.sft.rows_read()
    assert shipped.sft.target_draft_logits.shape == (0, 40)  # the logits stay behind
    assert shipped.sft.target_hidden.shape == (int(read.sum()), target.model.config.hidden_size)
    assert torch.equal(shipped.sft.target_hidden, dense.sft.target_hidden[read])
    for merged in (concat_experiences([shipped], "cpu"), concat_experiences([shipped])):
        assert merged.sft.logit_rows is None and merged.sft.target_hidden is None
        torch.testing.assert_close(merged.sft.target_draft_logits[read], dense.sft.target_draft_logits[read],
                                   rtol=1e-5, atol=1e-5)
        assert int(merged.sft.target_draft_logits[~read].abs().sum()) == 0
        loss, _ = sft_loss(drafter, merged.sft, 3, 0.8)
        torch.testing.assert_close(loss, sft_loss(drafter, dense.sft, 3, 0.8)[0], rtol=1e-5, atol=1e-6)
    # without the head the logits rows themselves travel, as before
    plain = dataclasses.replace(dense, sft=dataclasses.replace(dense.sft, draft_head=None)).packed()
    assert plain.sft.target_draft_logits.shape == (int(read.sum()), 40) and plain.sft.target_hidden is None


@pytest.mark.parametrize("hidden_smaller", [True, False])
def test_a_shipping_gto_experience_is_the_packed_one_made_without_the_dense_logits(monkeypatch, hidden_smaller):
    """``gto_experience(shipping=True)`` (a rollout actor's) is field for field what packing the dense
    experience gives: where the hidden states ship (forced here: at these tiny sizes the logits rows are
    fewer numbers) it never makes the dense [B, T, Vd] logits; otherwise it packs the logits rows."""
    import actors.gto_rollout as gto_rollout
    from speculative import batched_trees

    target = TargetModel(tiny_llama(vocab_size=96, layers=4, seed=2), aux_layer_ids=(1, 2, 3))
    vocab = DraftVocab.from_counts(torch.rand(96, generator=torch.Generator().manual_seed(0)), 40)
    drafter = tiny_drafter(target, vocab, seed=3)
    config = _config(tree_depth=3, tree_top_k=4, tree_total_tokens=10, group_size=2, groups_per_sequence=4,
                     sequences_per_forward=2, positions_per_forward=3)
    batch = _ragged(_sequences(target, 3, 20, 3, seed=5), [20, 14, 18])
    worker = TargetWorker(target, drafter.draft_to_target)
    dense = gto_experience(worker, config, batch, drafter, copy.deepcopy(drafter), seed=9)
    monkeypatch.setattr(gto_rollout, "hidden_is_smaller", lambda rows, head: hidden_smaller)
    made = []
    scorer = batched_trees.score_trees_at_positions
    monkeypatch.setattr(gto_rollout, "score_trees_at_positions",
                        lambda *args: made.append(args[-1].draft_logits) or scorer(*args))
    shipped = gto_experience(worker, config, batch, drafter, copy.deepcopy(drafter), seed=9, shipping=True)
    assert made == [not hidden_smaller]
    want = dense.packed("hidden" if hidden_smaller else "logits")
    assert (want.sft.target_hidden is not None) == hidden_smaller
    for name, value in [(f.name, getattr(want, f.name)) for f in dataclasses.fields(want) if f.name != "sft"] + \
            [(f"sft.{f.name}", getattr(want.sft, f.name)) for f in dataclasses.fields(want.sft)]:
        got = getattr(shipped.sft, name[4:]) if name.startswith("sft.") else getattr(shipped, name)
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value), name
        else:
            assert got == value, name
    assert shipped.packed().sft is shipped.sft  # nothing left to pack


def test_batch_without_any_window_gives_the_same_empty_experience(pair):
    target, drafter, reference = pair
    config = _config(tree_depth=3, tree_top_k=2, tree_total_tokens=5, group_size=4, groups_per_sequence=2)
    batch = _ragged(_sequences(target, 2, 12, 4, seed=0), [12, 7], unsupervised=(0,))
    worker = TargetWorker(target, drafter.draft_to_target)
    new = gto_experience(worker, config, batch, drafter, reference)
    old = per_sequence_gto_experience(worker, config, batch, drafter, reference)
    assert new.index.numel() == 0 and new.path_ids.shape == (0, 3)
    assert_same_experience(new, old)


def _fixed_positions(target):
    """Four ragged sequences and hand-picked windows (the last sequence has only one)."""
    batch = _ragged(_sequences(target, 4, 24, 4, seed=7), [24, 19, 22, 13])
    lengths = batch["attention_mask"].sum(-1).tolist()
    indices = torch.tensor([[2, 3, 4, 9, 10, 11], [5, 6, 7, 12, 13, 14], [1, 2, 3, 15, 16, 17], [4, 5, 6, 0, 0, 0]])
    return batch, lengths, indices, [6, 6, 6, 3]


@torch.no_grad()
def test_sharing_reference_nodes_changes_nothing(pair):
    """Reference nodes read from the current tree's rows (same path, same target context) give
    the scores that verifying them separately gives; and sharing really happened."""
    target, drafter, reference = pair
    batch, lengths, indices, counts = _fixed_positions(target)
    fast = FastLlama.from_target(target)
    results = {}
    for share in (True, False):
        options = BatchedTreeOptions(TreeConfig(depth=4, top_k=3, total_tokens=12), sequences_per_forward=3,
                                     positions_per_forward=2, share_nodes=share, verify_width_multiple=16)
        results[share] = score_trees_at_positions(fast, drafter, reference, batch["input_ids"], lengths, indices,
                                                  counts, drafter.draft_to_target, options)
    shared, alone = results[True], results[False]
    total = 2 * sum(counts) * 12  # 2 trees x 12 nodes per position (padding slots aside)
    assert alone.shared_nodes == 0 and 0 < shared.shared_nodes < total // 2
    assert shared.verified_nodes < alone.verified_nodes
    for name in ("path_ids", "path_length", "target_top1"):
        assert torch.equal(getattr(shared, name), getattr(alone, name)), name
    for name in ("reward", "reference_reward", "expected_length", "reference_expected_length", "rollout_path_logprob"):
        torch.testing.assert_close(getattr(shared, name), getattr(alone, name), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_leaves_are_not_fed_to_the_target(pair):
    """Only nodes with children are verified (a leaf's acceptance reads its parent's logits):
    with the reference equal to the drafter, the forwards hold fewer slots than the current
    trees have nodes, and the scores equal the per-sequence path that verifies every node."""
    target, drafter, _ = pair
    batch, lengths, indices, counts = _fixed_positions(target)
    fast = FastLlama.from_target(target)
    options = BatchedTreeOptions(TreeConfig(depth=4, top_k=3, total_tokens=12), sequences_per_forward=3,
                                 positions_per_forward=2, verify_width_multiple=16)  # slots counted, padding too
    result = score_trees_at_positions(fast, drafter, drafter, batch["input_ids"], lengths, indices, counts,
                                      drafter.draft_to_target, options)
    slots = 2 * 3 * 2 * 12 + 2 * 1 * 2 * 12  # (sequences x positions) per forward x 12 nodes, 2 chunks
    assert 0 < result.verified_nodes < slots
    every = score_trees_at_positions(fast, drafter, drafter, batch["input_ids"], lengths, indices, counts,
                                     drafter.draft_to_target, dataclasses.replace(options, verify_leaves=True))
    assert every.verified_nodes >= slots  # the switch that measures the saving feeds every node
    for name in ("reward", "expected_length", "path_length", "rollout_path_logprob", "reference_path_logprob"):
        torch.testing.assert_close(getattr(every, name), getattr(result, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.reward, result.reference_reward, atol=0, rtol=0)
    config = _config(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3, groups_per_sequence=2,
                     sequences_per_forward=3, positions_per_forward=2)
    worker = TargetWorker(target, drafter.draft_to_target)
    new = gto_experience(worker, config, batch, drafter, copy.deepcopy(drafter), seed=4)
    old = per_sequence_gto_experience(worker, config, batch, drafter, copy.deepcopy(drafter), seed=4)
    assert_same_experience(new, old)


def _score_far_apart(pair, options: BatchedTreeOptions):
    """Two sequences of 24 tokens: one with 8 early positions, one with 3 late ones."""
    target, drafter, reference = pair
    batch = _sequences(target, 2, 24, 4, seed=3)
    indices = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [19, 20, 21, 0, 0, 0, 0, 0]])
    return score_trees_at_positions(FastLlama.from_target(target), drafter, reference, batch["input_ids"], [24, 24],
                                    indices, [8, 3], drafter.draft_to_target, options)


@torch.no_grad()
def test_sequences_with_windows_far_apart_share_a_chunk(pair):
    """A chunk holding a sequence with many early positions and one with few late ones (whose
    position slots run out first) scores each exactly as when it is alone in its chunk: the
    cache slots a forward overwrites behind its roots are never read by a later forward."""
    tree = TreeConfig(depth=4, top_k=3, total_tokens=12)
    results = [
        _score_far_apart(pair, BatchedTreeOptions(tree, sequences_per_forward=seqs, positions_per_forward=3,
                                                  length_multiple=4, verify_prefix_multiple=4))
        for seqs in (2, 1)
    ]
    together, alone = results
    assert torch.equal(together.path_length, alone.path_length)
    for name in ("reward", "reference_reward", "expected_length", "rollout_path_logprob", "reference_path_logprob"):
        torch.testing.assert_close(getattr(together, name), getattr(alone, name), atol=1e-5, rtol=1e-5)
    assert float(together.reward[1, :3].abs().sum()) > 0


@torch.no_grad()
def test_rounding_verification_shapes_changes_no_score(pair):
    """Verification forwards round their packed width and prefix cut up (a few repeated attention
    shapes): exact rounding (multiples of 1), fine and coarse multiples give the same scores;
    coarser rounding feeds more (padding) slots, never fewer."""
    tree = TreeConfig(depth=4, top_k=3, total_tokens=12)
    results = [
        _score_far_apart(pair, BatchedTreeOptions(tree, sequences_per_forward=2, positions_per_forward=3,
                                                  length_multiple=4, verify_width_multiple=width,
                                                  verify_prefix_multiple=prefix))
        for width, prefix in ((1, 1), (16, 8), (128, 256))
    ]
    exact = results[0]
    for rounded in results[1:]:
        assert torch.equal(rounded.path_length, exact.path_length)
        assert torch.equal(rounded.path_ids, exact.path_ids)
        for name in ("reward", "reference_reward", "expected_length", "rollout_path_logprob", "reference_path_logprob"):
            torch.testing.assert_close(getattr(rounded, name), getattr(exact, name), atol=1e-5, rtol=1e-5)
    fed = [r.verified_nodes for r in results]
    assert fed == sorted(fed) and fed[0] < fed[-1], fed


@torch.no_grad()
@pytest.mark.parametrize("attention", ["eager", "flex"])
def test_trees_of_all_roots_of_a_batch_equal_the_per_sequence_trees(pair, attention):
    """The joint prefix/tree attention of ``RootedTreeCache`` (eager, or FlexAttention for the
    prefix) grows the very trees that ``build_trees_at`` grows one sequence at a time (and their
    log-probabilities)."""
    target, drafter, _ = pair
    fast = FastLlama.from_target(target)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(4))
    indices = torch.tensor([[0, 5, 9, 13], [2, 3, 4, 12], [13, 1, 7, 0]])
    config = TreeConfig(depth=4, top_k=3, total_tokens=14)
    aux = torch.stack([prefill_sequence(fast, row, room=0).aux_hidden for row in ids])
    batched = grow_trees_at(drafter, drafter_step_one(drafter, ids, aux, indices), config, attention)
    for s in range(3):
        per_seq = build_trees_at(drafter, drafter_prefix(drafter, ids[s], aux[s]), indices[s], config)
        rows = slice(4 * s, 4 * s + 4)
        for name in ("tokens", "parents", "depths", "mask", "root_positions"):
            assert torch.equal(getattr(batched, name)[rows], getattr(per_seq, name)), name
        torch.testing.assert_close(batched.logprobs[rows], per_seq.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.scores[rows], per_seq.scores, atol=1e-5, rtol=1e-5)
    assert batched.dists is None  # not kept for thousands of trees



def _rooted_inputs(seqs: int, positions: int, heads: int, width: int, length: int, fed: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows, dim = seqs * positions, 8
    q = torch.randn(rows, heads, width, dim, generator=gen)
    prefix_keys, prefix_values = (torch.randn(seqs, heads, length, dim, generator=gen) for _ in range(2))
    tree_keys, tree_values = (torch.randn(rows, heads, fed, dim, generator=gen) for _ in range(2))
    roots = torch.randint(0, length, (seqs, positions), generator=gen)
    visible = torch.arange(length)[None, None] <= roots[..., None]
    tree_mask = torch.rand(rows, width, fed, generator=gen) < 0.5
    tree_mask[..., 0] = True  # every node sees at least one tree entry (its own, in the real cache)
    return q, prefix_keys, prefix_values, tree_keys, tree_values, visible, tree_mask


def _dense_rooted_attention(q, prefix_keys, prefix_values, tree_keys, tree_values, visible, tree_mask):
    """Row by row: the row's sequence prefix and its own tree entries as one key set, one masked SDPA."""
    seqs, positions, length = visible.shape
    out = []
    for row in range(q.shape[0]):
        s, p = divmod(row, positions)
        keys = torch.cat([prefix_keys[s], tree_keys[row]], dim=-2)
        values = torch.cat([prefix_values[s], tree_values[row]], dim=-2)
        mask = torch.cat([visible[s, p].expand(q.shape[2], length), tree_mask[row]], dim=-1)
        out.append(torch.nn.functional.scaled_dot_product_attention(q[row], keys, values, attn_mask=mask))
    return torch.stack(out)


def test_rooted_attention_equals_dense_attention():
    """The split prefix/tree attention the trees grow with (the prefix scored once per sequence,
    the tree part per row, one softmax over both) equals a plain masked attention per row, eager
    and by FlexAttention (merged through log-sum-exps), at two tree widths; one flipped prefix
    cell must show."""
    for fed, seed in ((3, 0), (7, 1)):
        inputs = _rooted_inputs(seqs=2, positions=3, heads=2, width=3, length=10, fed=fed, seed=seed)
        dense = _dense_rooted_attention(*inputs)
        torch.testing.assert_close(rooted_attention(*inputs), dense, atol=1e-5, rtol=1e-5)
        q, pk, pv, tk, tv, visible, tree_mask = inputs
        roots = visible.sum(-1) - 1  # visible is a prefix up to each root
        flex = rooted_attention_flex(q, pk, pv, tk, tv, tree_mask, prefix_block_mask(roots, 3, 10))
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    q, pk, pv, tk, tv, visible, tree_mask = inputs
    wrong = visible.clone()
    wrong[0, 0, -1] = ~wrong[0, 0, -1]
    assert not torch.allclose(rooted_attention(q, pk, pv, tk, tv, wrong, tree_mask), dense, atol=1e-5)

def test_path_replay_at_the_roots_equals_the_ttt_replay_with_its_gradient(pair):
    """What the GTO learner differentiates: ``rooted_path_logprob`` (step 1 at every index, the
    later steps at the roots only) gives the TTT replay's log q(path) and the same gradient, on
    ragged sequences with chains in any order and empty paths among them."""
    target, drafter, reference = pair
    batch = _ragged(_sequences(target, 3, 24, 4, seed=5), [24, 15, 19])
    worker = TargetWorker(target, drafter.draft_to_target)
    common = dict(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3, groups_per_sequence=3)
    exp = gto_experience(worker, _config(**common), batch, drafter, reference, seed=4)
    assert (exp.path_length == 0).any() and (exp.path_length > 1).any()
    shuffle = torch.randperm(exp.index.numel(), generator=torch.Generator().manual_seed(0))
    sft = exp.sft
    args = (exp.sequence[shuffle], exp.index[shuffle], exp.path_ids[shuffle], exp.path_length[shuffle])
    model = copy.deepcopy(drafter)
    results = []
    for replay in ("ttt", "rooted"):
        model.zero_grad()
        if replay == "ttt":
            logprob = path_logprob(model, sft.input_ids, sft.attention_mask, sft.aux_hidden, *args)
        else:
            logprob = rooted_path_logprob(model, sft.input_ids, sft.aux_hidden, *args)
        (logprob * torch.linspace(-1.0, 1.0, logprob.numel())).sum().backward()
        results.append((logprob.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}))
    (ttt, ttt_grads), (rooted, rooted_grads) = results
    torch.testing.assert_close(rooted, ttt, atol=1e-5, rtol=1e-5)
    assert float(ttt.abs().sum()) > 0
    assert ttt_grads.keys() == rooted_grads.keys() and len(ttt_grads) > 3
    for name, grad in ttt_grads.items():
        torch.testing.assert_close(rooted_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    wrong = rooted_path_logprob(model, sft.input_ids, sft.aux_hidden, args[0], args[1] + 1, args[2], args[3])
    assert not torch.allclose(wrong.detach(), ttt, atol=1e-3)  # the roots matter: shifted, it shows


def test_gto_loss_is_the_same_with_either_path_replay(pair):
    """``gto.path_replay`` changes how the learner computes, not what: the same loss and gradient."""
    from learners.gto import gto_loss

    target, drafter, reference = pair
    worker = TargetWorker(target, drafter.draft_to_target)
    common = dict(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3, groups_per_sequence=3)
    exp = gto_experience(worker, _config(**common), _sequences(target, 3, 24, 4, seed=8), drafter, reference, seed=1)
    assert (exp.path_length > 1).any()
    results = []
    for replay in ("ttt", "rooted"):
        model = copy.deepcopy(drafter)
        loss, metrics = gto_loss(model, exp, _config(path_replay=replay, **common))
        loss.backward()
        results.append((loss.detach(), metrics["gto/ratio"], [p.grad for p in model.trainable_parameters()]))
    (loss_ttt, ratio_ttt, grads_ttt), (loss_rooted, ratio_rooted, grads_rooted) = results
    torch.testing.assert_close(loss_rooted, loss_ttt, atol=1e-5, rtol=1e-5)
    assert abs(ratio_rooted - ratio_ttt) < 1e-5 and ratio_ttt != 1.0  # the reference differs
    for got, want in zip(grads_rooted, grads_ttt):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bf16_trees_stay_close_to_fp32_trees(pair):
    """``gto.tree_precision: bf16`` grows the trees under bf16 autocast: the arithmetic really
    changes (log-probs differ) while the trees, paths and rewards stay nearly the same."""
    target, drafter, reference = pair
    batch = _sequences(target, 3, 24, 4, seed=11)
    worker = TargetWorker(target, drafter.draft_to_target)
    common = dict(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3, groups_per_sequence=3)
    fp32 = gto_experience(worker, _config(**common), batch, drafter, reference, seed=2)
    bf16 = gto_experience(worker, _config(tree_precision="bf16", **common), batch, drafter, reference, seed=2)
    assert torch.equal(fp32.index, bf16.index)
    assert not torch.equal(fp32.rollout_path_logprob, bf16.rollout_path_logprob)
    assert float((fp32.path_length == bf16.path_length).float().mean()) >= 0.75
    assert float((fp32.reward - bf16.reward).abs().mean()) < 0.1
    torch.testing.assert_close(fp32.sft.aux_hidden, bf16.sft.aux_hidden)  # the target is untouched


def test_reference_path_replay_precision(pair):
    """With bf16 trees the reference's log q(path), the PPO ratio's denominator, is replayed at the
    trees' precision from their own step 1 (``reference_path_precision: tree``) or in fp32: the
    same trees and paths, a rounding-level difference in the denominator only."""
    target, drafter, reference = pair
    batch = _sequences(target, 3, 24, 4, seed=11)
    worker = TargetWorker(target, drafter.draft_to_target)
    common = dict(tree_depth=4, tree_top_k=3, tree_total_tokens=12, group_size=3, groups_per_sequence=3,
                  tree_precision="bf16")
    tree = gto_experience(worker, _config(**common), batch, drafter, reference, seed=2)
    fp32 = gto_experience(worker, _config(reference_path_precision="fp32", **common), batch, drafter, reference,
                          seed=2)
    assert torch.equal(tree.path_ids, fp32.path_ids) and torch.equal(tree.reward, fp32.reward)
    assert torch.equal(tree.rollout_path_logprob, fp32.rollout_path_logprob)
    has_path = fp32.path_length > 0
    assert bool(has_path.any())
    gap = (tree.reference_path_logprob - fp32.reference_path_logprob)[has_path].abs()
    assert float(gap.max()) > 0 and float(gap.mean()) < 0.1
    fp32_trees = gto_experience(worker, _config(**{**common, "tree_precision": "fp32"}), batch, drafter, reference,
                                seed=2)
    same_path = (fp32_trees.path_ids == fp32.path_ids).all(-1) & has_path
    torch.testing.assert_close(fp32.reference_path_logprob[same_path], fp32_trees.reference_path_logprob[same_path],
                               atol=1e-5, rtol=1e-5)  # fp32 either way: the fp32 trees' own replay
