"""The SFT step's faster forms give what the straightforward ones gave (same experience, same loss,
same gradients, same metrics), on the tiny random target."""

from __future__ import annotations

import pytest
import torch

from speculative.ttt import restrict_to_draft_vocab, shift_left, step_weights, training_time_test, unroll
from speculative.vocab import DraftVocab
from tests.conftest import tiny_drafter


def reference_ttt(drafter, input_ids, attention_mask, loss_mask, target_draft_logits, target_top1, aux_hidden,
                  num_steps, weights, in_draft_vocab=None):
    """``training_time_test`` as it was before the hot-path changes: a shifted copy of the target's
    log-probabilities per step and three host reads per step. (loss, step_loss, step_accuracy,
    step_count, proxy)."""
    target_logp = torch.log_softmax(target_draft_logits.float(), dim=-1)
    mask = loss_mask.float() * attention_mask.float()
    total = aux_hidden.new_zeros((), dtype=torch.float32)
    step_loss, step_accuracy, step_count = [], [], []
    run_alive = None
    run_length = torch.zeros_like(input_ids, dtype=torch.float32)
    all_valid = torch.ones_like(run_length)
    for k, logits, _ in unroll(drafter, input_ids, attention_mask, aux_hidden, num_steps):
        valid = shift_left(mask, k + 1, 0.0)
        if in_draft_vocab is not None:
            valid = valid * shift_left(in_draft_vocab[target_top1].float(), k, 0.0)
        p_logp = shift_left(target_logp, k, 0.0)
        kl = (p_logp.exp() * (p_logp - torch.log_softmax(logits.float(), dim=-1))).sum(-1)
        count = valid.sum()
        step_mean = (kl * valid).sum() / count.clamp_min(1.0)
        total = total + weights[k - 1] * step_mean
        agree = (drafter.to_target_ids(logits.argmax(-1)) == shift_left(target_top1, k)).float()
        step_loss.append(float(step_mean.detach()))
        step_accuracy.append(float((agree * valid).sum() / count.clamp_min(1.0)))
        step_count.append(int(count))
        run_alive = agree if run_alive is None else run_alive * agree
        run_length = run_length + run_alive
        all_valid = all_valid * valid
    proxy = 1.0 + float((run_length * all_valid).sum() / all_valid.sum().clamp_min(1.0))
    return total, step_loss, step_accuracy, step_count, proxy


def _batch(target, length, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (batch, length), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, length - 5:] = 0  # right padding
    attention[2, length // 2:] = 0
    loss_mask = attention.clone()
    loss_mask[:, :3] = 0
    return ids, attention, loss_mask


@pytest.mark.parametrize("vocab_loss", ["fused", "dense"])
@pytest.mark.parametrize("length,steps,outside", [(20, 3, False), (20, 4, True), (3, 4, False)])
def test_ttt_equals_the_per_step_shift_reference(tiny_target, length, steps, outside, vocab_loss, monkeypatch):
    """Loss, gradients and every metric as before; ``(3, 4)``: sequences shorter than the unroll.
    The fused vocabulary loss in blocks of 7 rows (several per step, the last one short)."""
    monkeypatch.setattr("speculative.vocab_kl.BLOCK_ELEMENTS", 7 * 40)
    vocab = DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 40)  # a real restriction
    drafter = tiny_drafter(tiny_target, vocab)
    drafter.ttt_vocab_loss = vocab_loss
    ids, attention, loss_mask = _batch(tiny_target, length)
    feats = tiny_target.features(ids, attention)
    draft_logits, top1 = restrict_to_draft_vocab(feats.logits, drafter.draft_to_target)
    in_vocab = drafter.target_to_draft >= 0 if outside else None
    weights = step_weights(steps, 0.8)
    args = (drafter, ids, attention, loss_mask, draft_logits, top1, feats.aux_hidden, steps, weights, in_vocab)

    loss, step_loss, step_accuracy, step_count, proxy = reference_ttt(*args)
    drafter.zero_grad()
    loss.backward()
    reference_grads = [p.grad.clone() for p in drafter.trainable_parameters()]

    result = training_time_test(*args)
    drafter.zero_grad()
    result.loss.backward()
    assert torch.allclose(result.loss, loss, rtol=1e-5, atol=1e-6)
    assert result.loss_value == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
    assert result.step_loss == pytest.approx(step_loss, rel=1e-5, abs=1e-6)
    assert result.step_accuracy == step_accuracy and result.step_count == step_count
    assert result.accept_length_proxy == pytest.approx(proxy, rel=1e-6)
    for param, expected in zip(drafter.trainable_parameters(), reference_grads):
        assert torch.allclose(param.grad, expected, rtol=1e-4, atol=1e-7)


def test_ttt_with_no_steps_reads_nothing(tiny_target):
    """An unroll of zero steps returns before the host read: a zero loss, no per-step metrics, proxy 1."""
    drafter = tiny_drafter(tiny_target, DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 40))
    ids, attention, loss_mask = _batch(tiny_target, 8)
    feats = tiny_target.features(ids, attention)
    draft_logits, top1 = restrict_to_draft_vocab(feats.logits, drafter.draft_to_target)
    result = training_time_test(drafter, ids, attention, loss_mask, draft_logits, top1, feats.aux_hidden, 0, [])
    assert float(result.loss) == 0.0 and result.loss_value == 0.0
    assert result.step_loss == result.step_accuracy == result.step_count == []
    assert result.accept_length_proxy == 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2_tied"])
def test_draft_features_equal_features_then_restriction(arch, monkeypatch):
    """The chunked head gives ``features`` + ``restrict_to_draft_vocab``'s tensors (chunks of 7 rows:
    several per batch, the last one short)."""
    from speculative.target import TargetModel
    from tests.conftest import tiny_llama, tiny_qwen2

    model = tiny_llama() if arch == "llama" else tiny_qwen2(tie_word_embeddings=arch == "qwen2_tied")
    target = TargetModel(model)
    assert target.plain_head()
    vocab = DraftVocab.from_counts(torch.arange(target.vocab_size).flip(0), 40)
    ids, attention, _ = _batch(target, 17)
    features = target.features(ids, attention)
    expected_draft, expected_top1 = restrict_to_draft_vocab(features.logits, vocab.draft_to_target)
    monkeypatch.setattr(TargetModel, "HEAD_CHUNK_BYTES", 7 * target.vocab_size * 4)
    draft, top1, aux = target.draft_features(ids, attention, vocab.draft_to_target)
    assert torch.equal(aux, features.aux_hidden)
    assert torch.equal(top1, expected_top1)
    assert draft.shape == expected_draft.shape and torch.allclose(draft, expected_draft, rtol=1e-5, atol=1e-6)
    # a head that is not a plain lm_head of the last hidden state: the features path
    monkeypatch.setattr(TargetModel, "PLAIN_HEAD_TYPES", ())
    draft, top1, aux = target.draft_features(ids, attention, vocab.draft_to_target)
    assert torch.equal(draft, expected_draft) and torch.equal(top1, expected_top1)


def test_sft_experience_is_unchanged(tiny_target):
    """``TargetWorker.sft_experience`` (chunked head) against the experience built the old way."""
    from actors.target_worker import TargetWorker

    vocab = DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 40)
    ids, attention, loss_mask = _batch(tiny_target, 19)
    experience = TargetWorker(tiny_target, vocab.draft_to_target).sft_experience(
        {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask})
    features = tiny_target.features(ids, attention)
    draft, top1 = restrict_to_draft_vocab(features.logits, vocab.draft_to_target)
    assert torch.equal(experience.aux_hidden, features.aux_hidden) and torch.equal(experience.target_top1, top1)
    assert torch.allclose(experience.target_draft_logits, draft, rtol=1e-5, atol=1e-6)
    assert torch.equal(experience.loss_mask, loss_mask) and torch.equal(experience.input_ids, ids)


def test_an_unknown_vocabulary_loss_is_named(tiny_target):
    from speculative.config import load_config

    drafter = tiny_drafter(tiny_target, DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 40))
    drafter.ttt_vocab_loss = "sparse"
    ids, attention, loss_mask = _batch(tiny_target, 8)
    feats = tiny_target.features(ids, attention)
    draft_logits, top1 = restrict_to_draft_vocab(feats.logits, drafter.draft_to_target)
    with pytest.raises(ValueError, match="unknown TTT vocabulary loss 'sparse'"):
        training_time_test(drafter, ids, attention, loss_mask, draft_logits, top1, feats.aux_hidden, 2, [1.0, 0.8])
    with pytest.raises(ValueError, match="vocab_loss"):
        load_config(None, ["training.vocab_loss=sparse"])
    assert load_config(None, []).training.vocab_loss == "fused"
