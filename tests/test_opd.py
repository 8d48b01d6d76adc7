"""Draft-OPD: rollouts record the verifier's own error positions, replay reproduces the
drafter's inference-time states, and the distillation loss vanishes exactly at agreement."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from actors.opd_rollout import opd_experience
from actors.target_worker import TargetWorker
from learners.opd import distillation_terms, opd_loss, stream_masks
from speculative.config import load_config
from speculative.engine import SpeculativeGenerator
from speculative.tree import TreeConfig
from speculative.ttt import replay_chains
from tests.test_tree_engine import hf_greedy, train_agreeing_pair

pytestmark = pytest.mark.usefixtures("one_thread")

CHAIN = 4


@pytest.fixture(scope="module")
def pair():
    return train_agreeing_pair(steps=25)


def _config(*extra):
    return load_config(None, ["training.objective=opd", "training.ttt_steps=3", f"opd.chain_length={CHAIN}",
                              "opd.max_new_tokens=24", "data.max_length=64", *extra])


def _batch(n: int = 3, prompt: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompts of random tokens followed by (ignored) supervised filler: OPD only reads prompts."""
    ids = torch.randint(0, 64, (n, prompt + 4), generator=torch.Generator().manual_seed(seed))
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def experience(pair):
    target, drafter = pair
    worker = TargetWorker(target, drafter.draft_to_target)
    return opd_experience(worker, _config(), _batch(), drafter, drafter_version=5, seed=0)


def test_rollouts_follow_the_target_and_record_the_verifiers_error_positions(pair, experience):
    target, _ = pair
    exp = experience
    assert exp.drafter_version == 5 and exp.rollout.drafter_version == 5
    batch = _batch()
    accepted_total = 0
    for s in range(exp.rollout.input_ids.shape[0]):
        length = int(exp.rollout.attention_mask[s].sum())
        sequence = exp.rollout.input_ids[s, :length].tolist()
        prompt = batch["input_ids"][s, :6].tolist()
        assert sequence[:6] == prompt
        assert sequence[6:] == hf_greedy(target.model, prompt, 24)  # lossless at T = 0
    # Independently of the engine's verifier: at T = 0, cycle m accepts the longest prefix of
    # its proposals that matches the target's greedy text, and errs right after it.
    greedy = target.features(exp.rollout.input_ids).logits.argmax(-1)
    d2t = pair[1].draft_to_target
    for m in range(exp.accepted.numel()):
        s, t = int(exp.sequence[m]), int(exp.index[m])
        proposals = d2t[exp.proposals[m]].tolist()
        expected = 0
        context = exp.rollout.input_ids[s].tolist()
        for k in range(CHAIN):
            # state k+1 predicts the token after t+1+k; on the committed path it is the target's
            if t + 1 + k >= len(context) or proposals[k] != int(greedy[s, t + 1 + k]):
                break
            expected += 1
        assert int(exp.accepted[m]) == min(expected, CHAIN), m
        accepted_total += expected
    assert int((exp.accepted >= 2).sum()) >= 3  # multi-token cycles are exercised
    assert bool((exp.accepted < CHAIN).any())  # and errs sometimes: there are error positions


def test_batched_rollouts_equal_reference_rollouts(pair, experience):
    """The batched engine's experience (64 rows, and 2 rows that take the next prompt as one
    finishes) equals the single-sequence reference engine's: same text, cycles, error positions,
    and (to rounding) the same target and drafter log-probs."""
    target, drafter = pair
    worker = TargetWorker(target, drafter.draft_to_target)
    reference = opd_experience(worker, _config("opd.rollout_batch_size=0"), _batch(), drafter, drafter_version=5)
    two_rows = opd_experience(worker, _config("opd.rollout_batch_size=2"), _batch(), drafter, drafter_version=5)
    for exp in (experience, two_rows):
        for name in ("input_ids", "attention_mask", "loss_mask", "target_top1"):
            assert torch.equal(getattr(exp.rollout, name), getattr(reference.rollout, name)), name
        for name in ("sequence", "index", "accepted", "step_inputs", "proposals"):
            assert torch.equal(getattr(exp, name), getattr(reference, name)), name
        torch.testing.assert_close(exp.target_logprobs, reference.target_logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.rollout_logprobs, reference.rollout_logprobs, atol=1e-5, rtol=1e-5)
        assert exp.target_logprobs.dtype == reference.target_logprobs.dtype
        assert (exp.response_tokens, exp.target_forwards, exp.num_tokens) == (
            reference.response_tokens, reference.target_forwards, reference.num_tokens)


def test_replay_reproduces_inference_states_and_proposals(pair, experience):
    target, drafter = pair
    exp = experience
    replayed = torch.stack(
        replay_chains(drafter, exp.rollout.input_ids, exp.rollout.attention_mask, exp.rollout.aux_hidden,
                      exp.sequence, exp.index, exp.step_inputs), dim=1)
    assert torch.equal(replayed.argmax(-1), exp.proposals)  # same proposals
    logq = torch.log_softmax(replayed.float(), -1)
    torch.testing.assert_close(logq.gather(-1, exp.proposals[..., None]).squeeze(-1), exp.rollout_logprobs,
                               atol=1e-4, rtol=1e-4)
    # The whole drafted distributions too, against the engine's own recorded trees.
    engine = SpeculativeGenerator(target, drafter, TreeConfig.chain(CHAIN), record_steps=True)
    m = 0
    for s, prompt in enumerate(_batch()["input_ids"][:, :6]):
        result = engine.generate(prompt.tolist(), 24)
        for tree in result.trees:
            torch.testing.assert_close(logq[m], tree.dists[0, :CHAIN], atol=1e-4, rtol=1e-4)
            m += 1
    assert m == exp.accepted.numel()


def test_loss_is_zero_at_agreement_and_positive_otherwise(pair, experience):
    _, drafter = pair
    config = _config()
    loss, metrics = opd_loss(drafter, experience, config)
    assert float(loss) > 1e-3 and metrics["opd/replay_same_proposals"] == 1.0
    assert metrics["opd/accepted_states"] > 0 and metrics["opd/rejected_states"] > 0
    with torch.no_grad():  # a target that agrees with the drafter everywhere
        agreeing = torch.log_softmax(torch.stack(replay_chains(
            drafter, experience.rollout.input_ids, experience.rollout.attention_mask,
            experience.rollout.aux_hidden, experience.sequence, experience.index,
            experience.step_inputs), 1).float(), -1)
    zero, _ = opd_loss(drafter, replace(experience, target_logprobs=agreeing), config)
    assert abs(float(zero)) < 1e-5
    forward, reverse = distillation_terms(agreeing, agreeing.flip(-1))
    assert bool((forward >= 0).all() and (reverse >= 0).all()) and float(forward.sum()) > 0


def test_stream_masks_and_gradient():
    accepted = torch.tensor([0, 2, 4])
    acc, rej = stream_masks(accepted, 4, "suffix")
    assert acc.int().tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert rej.int().tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    _, first = stream_masks(accepted, 4, "first")
    assert first.int().tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_opd_steps_raise_rollout_acceptance():
    """Draft-OPD steps on a weak drafter's own rollouts raise its acceptance on held-out prompts
    (greedy rollouts: the run is deterministic)."""
    target, drafter = train_agreeing_pair(steps=8)
    drafter.train()
    worker = TargetWorker(target, drafter.draft_to_target)
    config = _config()
    optimizer = torch.optim.Adam(drafter.trainable_parameters(), lr=3e-3)
    held_out = _batch(n=4, seed=99)

    def tau() -> float:
        exp = opd_experience(worker, config, held_out, drafter)
        return exp.response_tokens / max(exp.target_forwards, 1)

    before = tau()
    for step in range(24):
        exp = opd_experience(worker, config, _batch(n=4, seed=step), drafter, drafter_version=step)
        loss, _ = opd_loss(drafter, exp, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert tau() > before + 0.04, before
