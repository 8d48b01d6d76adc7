"""The EAGLE-3 drafter core: vocabulary maps, checkpoint layout, and TTT == inference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from speculative.checkpoint import load_drafter, save_drafter
from speculative.kv_cache import MaskedKVCache
from speculative.ttt import TTTCache, restrict_to_draft_vocab, shift_left, step_weights, training_time_test
from speculative.vocab import DraftVocab
from tests.conftest import tiny_drafter


def test_draft_vocab_keeps_most_frequent_and_maps_like_vllm():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3])
    vocab = DraftVocab.from_counts(counts, 4)
    assert vocab.draft_to_target.tolist() == [0, 2, 3, 5]
    # vLLM: target id = draft id + d2t[draft id]
    assert (torch.arange(4) + vocab.d2t).tolist() == [0, 2, 3, 5]
    assert vocab.t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert vocab.target_to_draft.tolist() == [0, -1, 1, 2, -1, 3, -1, -1]
    assert DraftVocab.from_d2t(vocab.d2t, 8).draft_to_target.tolist() == [0, 2, 3, 5]
    assert vocab.coverage(counts) == pytest.approx(30 / 34)
    assert DraftVocab.from_counts(counts, 100).size == 8  # capped by the target vocabulary


def test_draft_vocab_rejects_bad_ids():
    with pytest.raises(ValueError, match="outside"):
        DraftVocab(torch.tensor([0, 9]), 8)
    with pytest.raises(ValueError, match="repeats"):
        DraftVocab(torch.tensor([1, 1]), 8)


def _batch(target, length=24, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (batch, length), generator=generator)
    attention = torch.ones_like(ids)
    if batch > 1:
        attention[1, length - 5 :] = 0  # right padding on the second row
    loss_mask = attention.clone()
    loss_mask[:, :4] = 0
    return ids, attention, loss_mask


def test_checkpoint_layout_and_roundtrip(tmp_path, tiny_target):
    vocab = DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 40)
    drafter = tiny_drafter(tiny_target, vocab).to(torch.bfloat16)
    out = save_drafter(drafter, tmp_path / "drafter")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 40 and config["vocab_size"] == tiny_target.vocab_size
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    names = set(load_file(out / "model.safetensors"))
    assert {"fc.weight", "lm_head.weight", "norm.weight", "d2t", "t2d"} <= names
    assert "midlayer.self_attn.q_proj.weight" in names and "midlayer.hidden_norm.weight" in names
    assert not any(n.startswith("embed_tokens") for n in names)
    loaded = load_drafter(out, tiny_target.embed_tokens.weight).to(torch.bfloat16)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.draft_to_target, vocab.draft_to_target)


def test_full_vocabulary_drafter_has_no_d2t(tmp_path, tiny_target):
    """vLLM refuses d2t on a drafter whose draft vocabulary is the whole target vocabulary."""
    out = save_drafter(tiny_drafter(tiny_target), tmp_path / "drafter")
    assert not {"d2t", "t2d"} & set(load_file(out / "model.safetensors"))
    loaded = load_drafter(out, tiny_target.embed_tokens.weight)
    assert torch.equal(loaded.draft_to_target, torch.arange(tiny_target.vocab_size))


def test_aux_layers_must_ascend_like_vllm_captures_them():
    from speculative.target import TargetModel
    from tests.conftest import tiny_llama

    with pytest.raises(ValueError, match="ascending"):
        TargetModel(tiny_llama(), (5, 2, 4))
    with pytest.raises(ValueError, match="out of range"):
        TargetModel(tiny_llama(), (2, 4, 8))


def test_checkpoint_refuses_corruption_and_wrong_target(tmp_path, tiny_target):
    out = save_drafter(tiny_drafter(tiny_target), tmp_path / "drafter")
    with pytest.raises(ValueError, match="config.json: drafter is for vocab .* but the target embedding"):
        load_drafter(out, torch.zeros(tiny_target.vocab_size + 1, tiny_target.hidden_size))
    with pytest.raises(ValueError, match=r"config.json: drafter is for .* hidden 32, but the target embedding is \(96, 40\)"):
        load_drafter(out, torch.zeros(tiny_target.vocab_size, tiny_target.hidden_size + 8))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="checksum"):
        load_drafter(out, tiny_target.embed_tokens.weight)


def test_ttt_equals_inference_time_chain(tiny_target):
    """Step k of the unrolled training equals drafting k tokens with a KV cache at inference."""
    drafter = tiny_drafter(tiny_target)
    ids, attention, loss_mask = _batch(tiny_target, batch=1)
    attention[:] = 1
    feats = tiny_target.features(ids, attention)
    num_steps = 4
    cache = TTTCache(attention)
    positions = torch.arange(ids.shape[1])[None]
    hidden = drafter.fuse_target_hidden(feats.aux_hidden)
    ttt_logits = []
    with torch.no_grad():
        for k in range(1, num_steps + 1):
            logits, hidden = drafter(shift_left(ids, k), hidden, positions + k, cache)
            ttt_logits.append(logits)
        for t in (0, 5, 11):
            kv = MaskedKVCache()
            # prefill: the real context, indices 0..t (tokens x_1..x_{t+1})
            logits, prenorm = drafter(
                ids[:, 1 : t + 2],
                drafter.fuse_target_hidden(feats.aux_hidden[:, : t + 1]),
                torch.arange(1, t + 2)[None],
                kv,
            )
            assert torch.allclose(logits[:, -1], ttt_logits[0][:, t], atol=1e-5)
            hidden = prenorm[:, -1:]
            for k in range(2, num_steps + 1):
                logits, hidden = drafter(ids[:, t + k : t + k + 1], hidden, torch.tensor([[t + k]]), kv)
                assert torch.allclose(logits[:, 0], ttt_logits[k - 1][:, t], atol=1e-5), (t, k)


def test_ttt_loss_trains_only_the_drafter_and_falls(tiny_target):
    drafter = tiny_drafter(tiny_target)
    ids, attention, loss_mask = _batch(tiny_target)
    feats = tiny_target.features(ids, attention)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=3e-3)
    embed_before = drafter.embed_tokens.weight.clone()
    losses, accs = [], []
    for _ in range(60):
        result = training_time_test(
            drafter, ids, attention, loss_mask, *restrict_to_draft_vocab(feats.logits, drafter.draft_to_target), feats.aux_hidden, 3, step_weights(3, 0.8)
        )
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.step_loss[0])
        accs.append(result.step_accuracy[0])
    assert drafter.embed_tokens.weight.grad is None
    assert torch.equal(drafter.embed_tokens.weight, embed_before)
    assert losses[-1] < 0.5 * losses[0]
    assert accs[-1] > accs[0]
    assert result.step_count[0] == int(loss_mask[:, 2:].sum())  # step 1 predicts x_{t+2}


def test_ttt_loss_is_zero_when_drafter_matches_the_target(tiny_target):
    """KL is zero when the drafter's distribution equals the target's: pin the lm_head output."""
    drafter = tiny_drafter(tiny_target)
    ids, attention, loss_mask = _batch(tiny_target)
    feats = tiny_target.features(ids, attention)
    result = training_time_test(
        drafter, ids, attention, loss_mask, *restrict_to_draft_vocab(feats.logits, drafter.draft_to_target), feats.aux_hidden, 2, [1.0, 1.0]
    )
    assert result.loss > 0
    # A drafter that returns the target's own logits at each step has zero KL.
    class Oracle(torch.nn.Module):
        ttt_vocab_loss = "dense"  # it returns logits, it has no lm_head to fuse into the loss

        def __init__(self):
            super().__init__()
            self.step = 0
            self.inner = drafter
            self.draft_to_target = drafter.draft_to_target

        def fuse_target_hidden(self, aux):
            return drafter.fuse_target_hidden(aux)

        def to_target_ids(self, ids):
            return drafter.to_target_ids(ids)

        def forward(self, input_ids, hidden, position_ids, cache):
            self.step += 1
            _, prenorm = drafter(input_ids, hidden, position_ids, cache)
            return shift_left(feats.logits, self.step, 0.0), prenorm

    oracle = Oracle()
    result = training_time_test(oracle, ids, attention, loss_mask, *restrict_to_draft_vocab(feats.logits, drafter.draft_to_target), feats.aux_hidden, 2, [1.0, 1.0])
    assert result.loss.abs() < 1e-5
    assert result.step_accuracy == [1.0, 1.0]
    assert result.accept_length_proxy == pytest.approx(3.0)


def test_loads_eagle_original_bin_checkpoint(tmp_path, tiny_target):
    """EAGLE's published EAGLE-3 drafters: pytorch_model.bin, no aux layer ids in config.json."""
    vocab = DraftVocab.from_counts(torch.arange(tiny_target.vocab_size), 50)
    drafter = tiny_drafter(tiny_target, vocab, seed=3)
    weights = {n: w for n, w in drafter.state_dict().items() if not n.startswith("embed_tokens")}
    weights.update(d2t=vocab.d2t, t2d=vocab.t2d, **{"embed_tokens.weight": drafter.embed_tokens.weight})
    out = tmp_path / "eagle3"
    out.mkdir()
    torch.save(weights, out / "pytorch_model.bin")
    cfg = drafter.config
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
        "draft_vocab_size": 50, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 10000.0,
        "max_position_embeddings": 256,
    }))
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
        load_drafter(out, tiny_target.embed_tokens.weight)
    loaded = load_drafter(out, tiny_target.embed_tokens.weight, aux_layer_ids=tiny_target.aux_layer_ids)
    assert torch.equal(loaded.lm_head.weight, drafter.lm_head.weight)
    assert torch.equal(loaded.draft_to_target, vocab.draft_to_target)
