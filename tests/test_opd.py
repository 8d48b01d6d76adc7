"""Draft-OPD: rollouts record the verifier's own error positions, replay reproduces the
drafter's inference-time states, and the distillation loss vanishes exactly at agreement."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from actors.opd_rollout import opd_experience
from actors.target_worker import TargetWorker
from learners.opd import correction_targets, distillation_terms, opd_loss, stream_masks
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


PAPER_LOSS = ("opd.rejected_weight=1", "opd.correction_weight=0", "opd.response_ttt_weight=0")


def test_loss_is_zero_at_agreement_and_positive_otherwise(pair, experience):
    """The paper's loss (forward KL on accepted states, reverse KL on rejected ones) alone."""
    _, drafter = pair
    config = _config(*PAPER_LOSS)
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


def test_rollout_precision_sets_the_engines_drafting_copy(pair, experience):
    """``opd.rollout_precision``: auto drafts with the drafter's own fp32 weights off CUDA (bf16 on
    CUDA); an explicit bf16 gives the engine a bf16 copy whose rollouts are still the target's text."""
    from actors.opd_rollout import rollout_drafter_dtype

    assert load_config(None).opd.rollout_precision == "auto"
    assert rollout_drafter_dtype("auto", torch.device("cpu")) == torch.float32
    assert rollout_drafter_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert rollout_drafter_dtype("fp32", torch.device("cuda")) == torch.float32
    with pytest.raises(Exception):
        load_config(None, ["opd.rollout_precision=fp16"])
    target, drafter = pair
    worker = TargetWorker(target, drafter.draft_to_target)
    bf16 = opd_experience(worker, _config("opd.rollout_precision=bf16"), _batch(), drafter, drafter_version=5)
    engine = worker._batch_engine
    assert engine.source_drafter is drafter and engine.drafter.fc.weight.dtype == torch.bfloat16
    assert drafter.fc.weight.dtype == torch.float32
    assert torch.equal(bf16.rollout.input_ids, experience.rollout.input_ids)
    # bf16 drafting may flip a near-tie (on these prompts two adjacent cycles of 38 trade one accepted
    # token): the acceptance stays about the same
    assert abs(int(bf16.accepted.sum()) - int(experience.accepted.sum())) <= 0.1 * int(experience.accepted.sum()) + 1


# ------------------------------------------------------------------------------------------
# The authors' EAGLE-3 recipe (docs/methods/draft_opd.md §8): each piece does what it says
# ------------------------------------------------------------------------------------------
def test_recipe_is_the_default_and_the_shipped_config():
    from speculative.runtime import adamw_with_schedule

    opd = load_config(None).opd
    assert (opd.rejected_weight, opd.correction_weight, opd.response_ttt_weight) == (0.0, 1.0, 1.0)
    assert opd.draft_vocab_mask and opd.log_prob_min_clamp == -10.0 and opd.loss_max_clamp is None
    assert opd.chain_length == 7 and opd.rollout_temperature == 0.0
    shipped = load_config("configs/opd_smollm2.yaml")
    training = shipped.training
    assert training.batch_size * training.grad_accum >= 64  # prompts per update
    assert 1024 <= shipped.opd.max_new_tokens <= 2048 and shipped.opd.rejected_weight == 0.0
    assert shipped.opd.rollout_per_update  # the update's prompts rolled out together
    assert training.lr == 1e-4 and training.warmup_ratio == 0.015 and training.min_lr_ratio == 0.0
    assert training.max_steps >= 300
    with pytest.raises(Exception):
        load_config(None, ["opd.rejected_weight=1.5"])
    # warm-up as a fraction of the run: ceil(0.015 * 300) = 5 steps, then cosine to 0
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = adamw_with_schedule([param], training)
    lrs = []
    for _ in range(training.max_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4 / 5) and lrs[4] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4)
    assert lrs[-1] < 1e-7


def _grads(drafter, experience, config) -> tuple[float, list[torch.Tensor]]:
    drafter.zero_grad(set_to_none=True)
    loss, _ = opd_loss(drafter, experience, config)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in drafter.trainable_parameters()]
    drafter.zero_grad(set_to_none=True)
    return float(loss), grads


def test_rejected_weight_zero_gives_rejected_states_no_gradient(pair, experience):
    """Default (rejected_weight 0): the target's distributions at rejected states, however wrong,
    change neither the loss nor its gradient; at weight 0.2 they do."""
    _, drafter = pair
    acc, rej = stream_masks(experience.accepted, CHAIN, "suffix")
    assert bool(rej.any())
    noise = torch.randn(experience.target_logprobs.shape, generator=torch.Generator().manual_seed(1)) * 5
    scrambled = replace(experience, target_logprobs=torch.where(
        rej[..., None], torch.log_softmax(noise, -1), experience.target_logprobs))
    config = _config()
    loss, grads = _grads(drafter, experience, config)
    loss2, grads2 = _grads(drafter, scrambled, config)
    assert loss == loss2
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    weighted = _config("opd.rejected_weight=0.2")
    loss3, _ = _grads(drafter, experience, weighted)
    loss4, _ = _grads(drafter, scrambled, weighted)
    assert abs(loss3 - loss4) > 1e-3


def test_correction_token_cross_entropy(pair, experience):
    """The first-error state is trained toward the token the target committed there: the
    target's greedy token, which the drafter did not propose."""
    target, drafter = pair
    exp = experience
    only = _config("opd.accepted_weight=0", "opd.response_ttt_weight=0")
    label, has = correction_targets(exp, drafter)
    assert int(has.sum()) >= 3 and bool((exp.accepted[has] < CHAIN).all())
    greedy = target.features(exp.rollout.input_ids).logits.argmax(-1)
    rows = has.nonzero().squeeze(-1)
    s, t, r = exp.sequence[rows], exp.index[rows], exp.accepted[rows]
    assert torch.equal(drafter.to_target_ids(label[rows]), greedy[s, t + 1 + r])  # the target's token
    assert bool((label[rows] != exp.proposals[rows, r]).all())  # not the drafter's proposal
    with torch.no_grad():
        logits = torch.stack(replay_chains(drafter, exp.rollout.input_ids, exp.rollout.attention_mask,
                                           exp.rollout.aux_hidden, exp.sequence, exp.index, exp.step_inputs), 1)
    expected = -torch.log_softmax(logits[rows, r].float(), -1).gather(-1, label[rows, None]).clamp_min(-10).mean()
    loss, metrics = opd_loss(drafter, exp, only)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert metrics["opd/correction_ce"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["opd/correction_states"] == float(has.sum())
    off, _ = opd_loss(drafter, exp, _config("opd.accepted_weight=0", "opd.response_ttt_weight=0",
                                            "opd.correction_weight=0"))
    assert float(off) == 0.0
    # A correction token outside the draft vocabulary has no label: its state is dropped.
    outside = int(drafter.to_target_ids(label[rows[0]]))
    clipped = copy.deepcopy(drafter)
    clipped.target_to_draft[outside] = -1
    _, has_clipped = correction_targets(exp, clipped)
    gone = has & (drafter.to_target_ids(label) == outside)
    assert bool(gone.any()) and torch.equal(has_clipped, has & ~gone)


def test_response_ttt_covers_the_response_and_masks_targets_outside_the_draft_vocab(pair, experience):
    """The response TTT term is EAGLE-3's loss on the rollout text; states whose target argmax is
    outside the draft vocabulary are dropped (their target logits do not matter)."""
    from speculative.sft import sft_loss

    _, drafter = pair
    exp = experience
    rollout = exp.rollout
    assert rollout.target_draft_logits.shape[-1] == drafter.draft_to_target.numel()
    only = _config("opd.accepted_weight=0", "opd.correction_weight=0")
    loss, metrics = opd_loss(drafter, exp, only)
    plain, plain_metrics = sft_loss(drafter, rollout, 3, 0.8)
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)  # full draft vocabulary: nothing masked
    assert metrics["opd/response_ttt_states"] == plain_metrics["supervised_tokens"] > 0
    # Take the most frequent target argmax out of the draft vocabulary.
    response = (rollout.loss_mask * rollout.attention_mask).bool()
    common = int(rollout.target_top1[response].mode().values)
    clipped = copy.deepcopy(drafter)
    clipped.target_to_draft[common] = -1
    masked, masked_metrics = sft_loss(clipped, rollout, 3, 0.8, mask_outside_draft_vocab=True)
    # step 1 at index t is supervised by row t + 1 (predicting x_{t+2}), counted where x_{t+2} is a response token
    step1_rows = torch.zeros_like(response)
    step1_rows[:, 1:-1] = response[:, 2:]
    dropped = int((step1_rows & (rollout.target_top1 == common)).sum())
    assert dropped > 0
    assert masked_metrics["supervised_tokens"] == plain_metrics["supervised_tokens"] - dropped
    hit = rollout.target_top1 == common
    scrambled = replace(rollout, target_draft_logits=torch.where(
        hit[..., None], torch.randn_like(rollout.target_draft_logits) * 10, rollout.target_draft_logits))
    again, _ = sft_loss(clipped, scrambled, 3, 0.8, mask_outside_draft_vocab=True)
    assert float(again) == pytest.approx(float(masked), rel=1e-6)
    unmasked, _ = sft_loss(clipped, scrambled, 3, 0.8)
    assert abs(float(unmasked) - float(plain)) > 1e-3


def test_clamps_hold_on_extreme_logits(pair, experience):
    big = torch.zeros(2, 3, 16)
    big[..., 0], big[1, :, 5] = 3e4, 6e4
    other = torch.zeros(2, 3, 16)
    other[..., 7] = -3e4
    other[..., 3] = 4e4
    forward, reverse = distillation_terms(big, other)
    assert float(forward.max()) > 1e3 and float(reverse.max()) > 1e3  # no clamp: unbounded
    forward, reverse = distillation_terms(big, other, log_prob_min=-10.0)
    assert bool(torch.isfinite(forward).all() and torch.isfinite(reverse).all())
    assert float(forward.max()) <= 10.0 + 1e-4 and float(reverse.max()) <= 10.0 + 1e-4
    forward, reverse = distillation_terms(big, other, log_prob_min=None, loss_max=5.0)
    assert float(forward.max()) <= 5.0 and float(reverse.max()) <= 5.0
    # Through the whole loss: a drafter with huge logits costs at most 10 per correction state.
    _, drafter = pair
    loud = copy.deepcopy(drafter)
    with torch.no_grad():
        loud.lm_head.weight.mul_(1e4)
    _, metrics = opd_loss(loud, experience, _config("opd.rejected_weight=1", "opd.response_ttt_weight=0"))
    assert 0 < metrics["opd/correction_ce"] <= 10.0 + 1e-4
    assert metrics["opd/accepted_kl"] <= 10.0 + 1e-4 and metrics["opd/rejected_kl"] <= 10.0 + 1e-4
    _, unclamped = opd_loss(loud, experience, _config("opd.rejected_weight=1", "opd.response_ttt_weight=0",
                                                      "opd.log_prob_min_clamp=null"))
    assert unclamped["opd/correction_ce"] > 10.0


def test_one_rollout_per_update_splits_into_the_micro_batches_own_rollouts(pair):
    """opd.rollout_per_update: one batched rollout of 6 prompts, split in 3, equals the three
    micro-batches rolled out on their own (T = 0), cycles, logits and loss included."""
    from actors.opd_rollout import split_experience

    target, drafter = pair
    worker = TargetWorker(target, drafter.draft_to_target)
    config = _config("opd.sft_weight=0.5")
    whole = _batch(n=6, seed=7)
    # uneven prompt lengths: sequence widths differ, so the parts are trimmed differently
    whole["attention_mask"][1, -3:] = 0
    whole["loss_mask"][1, -3:] = 0
    merged = opd_experience(worker, config, whole, drafter, drafter_version=2)
    parts = split_experience(merged, 3)
    assert sum(p.accepted.numel() for p in parts) == merged.accepted.numel()
    for k, part in enumerate(parts):
        alone = opd_experience(worker, config, {key: v[2 * k : 2 * k + 2] for key, v in whole.items()},
                               drafter, drafter_version=2)
        width = alone.rollout.input_ids.shape[1]
        assert part.rollout.input_ids.shape[1] == width
        for name in ("input_ids", "attention_mask", "loss_mask", "target_top1"):
            assert torch.equal(getattr(part.rollout, name), getattr(alone.rollout, name)), name
        for name in ("sequence", "index", "accepted", "step_inputs", "proposals"):
            assert torch.equal(getattr(part, name), getattr(alone, name)), name
        torch.testing.assert_close(part.target_logprobs, alone.target_logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.rollout.target_draft_logits, alone.rollout.target_draft_logits,
                                   atol=1e-4, rtol=1e-4)
        assert (part.response_tokens, part.target_forwards) == (alone.response_tokens, alone.target_forwards)
        assert part.data.input_ids.shape[0] == 2
        loss_part, _ = opd_loss(drafter, part, config)
        loss_alone, _ = opd_loss(drafter, alone, config)
        assert float(loss_part) == pytest.approx(float(loss_alone), rel=1e-4)


@pytest.mark.parametrize("rejected", ["first", "suffix"])
def test_shipped_experience_carries_target_states_and_the_learner_redoes_the_same_distributions(pair, rejected,
                                                                                                monkeypatch):
    """The batched engine records the target's final-norm states with each verification's log-probs;
    an experience packed for the object store ships those states (and the lm_head rows at the draft
    ids) instead of [states, Vd] log-probs, and the learner's merge, after pickling, gets back the
    distributions the loss reads and the same loss and gradient."""
    import pickle

    from speculative.experience import concat_experiences

    target, drafter = pair
    worker = TargetWorker(target, drafter.draft_to_target)
    config = _config(f"opd.rejected={rejected}")
    dense = opd_experience(worker, config, _batch(), drafter, drafter_version=5, seed=0)
    head = worker.fast.lm_head.weight[drafter.draft_to_target]
    assert dense.target_hidden.shape == (*dense.step_inputs.shape, target.model.config.hidden_size)
    assert torch.equal(dense.draft_head, head)
    redone = torch.log_softmax(torch.nn.functional.linear(dense.target_hidden, head).float(), -1)
    torch.testing.assert_close(redone, dense.target_logprobs.float(), atol=1e-5, rtol=1e-5)
    shipped = pickle.loads(pickle.dumps(dense.packed("hidden").to_host(), protocol=5))
    read = dense.logprob_rows_read()
    # auto: whichever form has fewer numbers (these tiny sizes may pick either)
    rows, (vocab, width) = int(read.sum()), dense.draft_head.shape
    auto = dense.packed()
    assert (auto.target_hidden is not None) == (rows * width + vocab * width < rows * vocab)
    as_logits = dense.packed("logits")
    assert as_logits.target_logprobs.shape[0] == (rows if rejected == "first" else dense.accepted.numel())
    assert as_logits.target_hidden is None and as_logits.draft_head is None  # one form travels, not both
    monkeypatch.setattr("speculative.experience.LOGPROB_BLOCK_ROWS", 5)  # several row blocks
    assert shipped.target_logprobs.shape == (0, dense.target_logprobs.shape[-1])  # the log-probs stay behind
    assert shipped.target_hidden.shape == (int(read.sum()), target.model.config.hidden_size)
    assert bool(read.all()) == (rejected == "suffix") and int(read.sum()) > 0
    want_loss, want_grads = _grads(drafter, dense, config)
    for merged in (concat_experiences([shipped], "cpu"), concat_experiences([shipped])):
        assert merged.logprob_rows is None and merged.target_hidden is None
        torch.testing.assert_close(merged.target_logprobs[read], dense.target_logprobs[read], atol=1e-5, rtol=1e-5)
        assert int(merged.target_logprobs[~read].abs().sum()) == 0
        loss, grads = _grads(drafter, merged, config)
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
