"""SpecForge and speculators drafters in and out: layouts, flags, aux numbering, vocab mappings.

Each direction is checked against an independent implementation of the formulas (``_formula``
below, written from the other tools' definitions, not from draftrl's modules): a checkpoint made
in the other tool's layout is loaded, trained one step and exported back, and the logits of the
loaded and of the exported weights are the formula's.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speculative.checkpoint import export_drafter, load_drafter, read_checkpoint, save_drafter
from speculative.checkpoint_formats import AuxLayerNumberingWarning, UnsupportedCheckpoint
from speculative.target import verifier_id
from speculative.ttt import restrict_to_draft_vocab, step_weights, training_time_test, unroll
from speculative.vocab import DraftVocab, load_vocab_mapping
from tests.conftest import tiny_drafter

H, I, HEADS, KV, D, V, N = 32, 64, 4, 2, 8, 96, 40  # the tiny target's shape; N draft tokens
EPS, THETA = 1e-5, 10000.0


# -- the formulas ----------------------------------------------------------------------------------
def _rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _rope(x, positions):  # x [heads, T, d]; rotate pairs (i, i + d/2) by angle pos * theta^(-2i/d)
    half = x.shape[-1] // 2
    freq = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions[:, None].double() * freq[None]
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _formula(w, layer, flags, embed, aux, ids, steps):
    """Per-step logits [T, N] of one sequence under training-time test, from raw tensors.

    ``w`` maps names to tensors, ``layer`` is the decoder layer's prefix ('midlayer.' or
    'layers.0.'). Step k at index t reads token ids[t + k] at position t + k and attends the
    step-1 keys of indices <= t plus its own keys of steps 2..k at index t.
    """
    T = aux.shape[0]
    x = aux
    if flags.get("norm_before_fc"):
        x = _rms(x, w["input_norm.weight"])
    if flags.get("fc_norm"):
        x = torch.cat([_rms(c, w[f"fc_norm.{i}.weight"]) for i, c in enumerate(x.chunk(3, -1))], -1)
    h = x @ w["fc.weight"].T
    keys, values, out = [], [], []
    for k in range(1, steps + 1):
        tok = torch.cat([ids[k:], torch.zeros(k, dtype=ids.dtype)])
        e = embed[tok]
        normed = _rms(h, w[layer + "hidden_norm.weight"])
        inp = torch.cat([_rms(e, w[layer + "input_layernorm.weight"]), normed], -1)
        pos = torch.arange(T) + k
        q = _rope((inp @ w[layer + "self_attn.q_proj.weight"].T).view(T, HEADS, D).transpose(0, 1), pos)
        kk = _rope((inp @ w[layer + "self_attn.k_proj.weight"].T).view(T, KV, D).transpose(0, 1), pos)
        vv = (inp @ w[layer + "self_attn.v_proj.weight"].T).view(T, KV, D).transpose(0, 1)
        kk, vv = kk.repeat_interleave(HEADS // KV, 0), vv.repeat_interleave(HEADS // KV, 0)
        keys.append(kk)
        values.append(vv)
        att = torch.zeros(HEADS, T, D)
        for t in range(T):
            ks = torch.cat([keys[0][:, : t + 1]] + [kj[:, t : t + 1] for kj in keys[1:]], 1)
            vs = torch.cat([values[0][:, : t + 1]] + [vj[:, t : t + 1] for vj in values[1:]], 1)
            p = torch.softmax((q[:, t : t + 1] @ ks.transpose(1, 2)) / math.sqrt(D), -1)
            att[:, t] = (p @ vs)[:, 0]
        residual = normed if flags.get("norm_before_residual") else h
        r = residual + att.transpose(0, 1).reshape(T, HEADS * D) @ w[layer + "self_attn.o_proj.weight"].T
        m = _rms(r, w[layer + "post_attention_layernorm.weight"])
        gate, up = m @ w[layer + "mlp.gate_proj.weight"].T, m @ w[layer + "mlp.up_proj.weight"].T
        r = r + (torch.nn.functional.silu(gate) * up) @ w[layer + "mlp.down_proj.weight"].T
        final = _rms(r, w["norm.weight"])
        out.append(final @ w["lm_head.weight"].T)
        h = final if flags.get("norm_output") else r
    return out


# -- building the other tools' checkpoints ------------------------------------------------------------
def _random_weights(layer: str, flags: dict, seed: int, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    def norm(size):
        return 1.0 + rnd(size, scale=0.1)

    w = {
        "fc.weight": rnd(H, 3 * H), "norm.weight": norm(H), "lm_head.weight": rnd(n, H),
        layer + "hidden_norm.weight": norm(H), layer + "input_layernorm.weight": norm(H),
        layer + "post_attention_layernorm.weight": norm(H),
        layer + "self_attn.q_proj.weight": rnd(HEADS * D, 2 * H), layer + "self_attn.k_proj.weight": rnd(KV * D, 2 * H),
        layer + "self_attn.v_proj.weight": rnd(KV * D, 2 * H), layer + "self_attn.o_proj.weight": rnd(H, HEADS * D),
        layer + "mlp.gate_proj.weight": rnd(I, H), layer + "mlp.up_proj.weight": rnd(I, H),
        layer + "mlp.down_proj.weight": rnd(H, I),
    }
    if flags.get("norm_before_fc"):
        w["input_norm.weight"] = norm(3 * H)
    if flags.get("fc_norm"):
        w.update({f"fc_norm.{i}.weight": norm(H) for i in range(3)})
    return w


VOCAB = DraftVocab(torch.arange(0, 2 * N, 2), V)  # every other target token


def _shape(vocab_size: int = V) -> dict:
    return {"hidden_size": H, "intermediate_size": I, "num_attention_heads": HEADS, "num_key_value_heads": KV,
            "head_dim": D, "vocab_size": vocab_size, "rms_norm_eps": EPS, "rope_theta": THETA, "hidden_act": "silu",
            "max_position_embeddings": 256, "num_hidden_layers": 1, "tie_word_embeddings": False}


def make_specforge_dir(path: Path, target, seed=1, vocab: DraftVocab = VOCAB, **extra) -> tuple[Path, dict]:
    """What SpecForge's trainer exports for an EAGLE 3.1 drafter: LlamaForCausalLMEagle3, fc_norm,
    norm_output (SpecForge's meaning: the logits see the final norm), output-numbered aux ids."""
    flags = {"fc_norm": True}
    weights = {**_random_weights("midlayer.", flags, seed, vocab.size), "d2t": vocab.d2t, "t2d": vocab.t2d}
    aux_out = [i - 1 for i in target.aux_layer_ids]  # SpecForge numbers layer outputs
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", **_shape(vocab.target_vocab_size),
              "draft_vocab_size": vocab.size, "fc_norm": True, "norm_output": True,
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux_out, "use_aux_hidden_state": True}, **extra}
    path.mkdir(parents=True)
    save_file(weights, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path, flags


SPECULATORS_FLAGS = {"norm_before_residual": True, "norm_before_fc": True, "norm_output": True}  # their defaults


def make_speculators_dir(path: Path, target, seed=2, **extra) -> tuple[Path, dict]:
    """What speculators' trainer saves with its EAGLE-3 defaults: Eagle3Speculator, nested
    transformer_layer_config, layers.0.*, the target's embedding and its verifier head copies."""
    flags = dict(SPECULATORS_FLAGS)
    weights = {**_random_weights("layers.0.", flags, seed), "d2t": VOCAB.d2t, "t2d": VOCAB.t2d,
               "embed_tokens.weight": target.embed_tokens.weight.detach().clone(),
               "verifier_norm.weight": torch.ones(H), "verifier_lm_head.weight": torch.zeros(N, H)}
    config = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.9.0",
        "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                               "verifier": {"name_or_path": "org/tiny-verifier", "architectures": ["LlamaForCausalLM"]}},
        "transformer_layer_config": {"model_type": "llama", **_shape(), "attention_bias": False, "mlp_bias": False,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": THETA},
                                     "layer_types": ["full_attention"]},
        "draft_vocab_size": N, "eagle_aux_hidden_state_layer_ids": list(target.aux_layer_ids),
        "fc_norm": False, "embed_requires_grad": False, **flags, **extra,
    }
    path.mkdir(parents=True)
    save_file(weights, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path, flags


# -- helpers -----------------------------------------------------------------------------------------
def _one_sequence(target, length=11, seed=5):
    ids = torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(seed))
    attention = torch.ones_like(ids)
    return ids, attention, target.features(ids, attention)


def _drafter_logits(drafter, ids, attention, feats, steps=2):
    with torch.no_grad():
        return [logits[0] for _, logits, _ in unroll(drafter, ids, attention, feats.aux_hidden, steps)]


def _assert_formula(drafter, weights, layer, flags, target, steps=2):
    ids, attention, feats = _one_sequence(target)
    ours = _drafter_logits(drafter, ids, attention, feats, steps)
    theirs = _formula(weights, layer, flags, target.embed_tokens.weight.detach(), feats.aux_hidden[0], ids[0], steps)
    for k, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (k, float((a - b).abs().max()))


def _train_one_step(drafter, target):
    ids, attention, feats = _one_sequence(target, length=16, seed=9)
    loss_mask = attention.clone()
    before = {n: p.detach().clone() for n, p in drafter.named_parameters() if p.requires_grad}
    result = training_time_test(drafter, ids, attention, loss_mask,
                                *restrict_to_draft_vocab(feats.logits, drafter.draft_to_target),
                                feats.aux_hidden, 3, step_weights(3, 0.8))
    result.loss.backward()
    torch.optim.SGD(drafter.trainable_parameters(), lr=0.5).step()
    changed = [n for n, p in drafter.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert "fc.weight" in changed and len(changed) == len(before)


# -- the round trips ---------------------------------------------------------------------------------
def test_specforge_drafter_in_and_out(tmp_path, tiny_target):
    source, flags = make_specforge_dir(tmp_path / "specforge", tiny_target)
    with pytest.warns(AuxLayerNumberingWarning, match=r"read as \[2, 4, 5\]"):
        drafter = load_drafter(source, tiny_target.embed_tokens.weight)
    assert drafter.config.aux_layer_ids == tuple(tiny_target.aux_layer_ids) == (2, 4, 5)
    assert drafter.config.active_variants() == ["fc_norm"]
    assert torch.equal(drafter.draft_to_target, VOCAB.draft_to_target)
    _assert_formula(drafter, load_file(source / "model.safetensors"), "midlayer.", flags, tiny_target)

    _train_one_step(drafter, tiny_target)
    out = save_drafter(drafter, tmp_path / "back", dtype=torch.float32, format="specforge")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # output-numbered again
    assert config["fc_norm"] is True and "norm_before_residual" not in config and "norm_output" not in config
    exported = load_file(out / "model.safetensors")
    assert {"midlayer.hidden_norm.weight", "fc_norm.2.weight", "d2t", "t2d"} <= exported.keys()
    assert not any(n.startswith("embed_tokens") for n in exported)
    _assert_formula(drafter, exported, "midlayer.", flags, tiny_target)
    with warnings.catch_warnings():  # draftrl's own block records the numbering: no guess, no warning
        warnings.simplefilter("error")
        again = load_drafter(out, tiny_target.embed_tokens.weight)
    assert again.config.aux_layer_ids == (2, 4, 5)


def test_speculators_drafter_in_and_out(tmp_path, tiny_target):
    source, flags = make_speculators_dir(tmp_path / "speculators", tiny_target)
    drafter = load_drafter(source, tiny_target.embed_tokens.weight)
    assert drafter.config.aux_layer_ids == (2, 4, 5)  # speculators numbers inputs, like vLLM
    assert set(drafter.config.active_variants()) == set(SPECULATORS_FLAGS)
    _assert_formula(drafter, load_file(source / "model.safetensors"), "layers.0.", flags, tiny_target, steps=3)

    _train_one_step(drafter, tiny_target)
    out = save_drafter(drafter, tmp_path / "back", dtype=torch.float32, format="speculators",
                       verifier="org/tiny-verifier", verifier_architectures=["LlamaForCausalLM"], speculative_tokens=5)
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    assert config["speculators_config"]["verifier"] == {"name_or_path": "org/tiny-verifier",
                                                        "architectures": ["LlamaForCausalLM"]}
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert {k: config[k] for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")} == {
        "norm_before_residual": True, "norm_before_fc": True, "fc_norm": False, "norm_output": True}
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["vocab_size"] == V
    exported = load_file(out / "model.safetensors")
    assert "layers.0.self_attn.q_proj.weight" in exported and "input_norm.weight" in exported
    assert not any(n.startswith(("midlayer.", "verifier_", "embed_tokens")) for n in exported)
    _assert_formula(drafter, exported, "layers.0.", flags, tiny_target, steps=3)


def test_draftrl_drafter_to_speculators_and_specforge(tmp_path, tiny_target):
    """A plain draftrl drafter exported to both tools (file level, no target needed)."""
    drafter = tiny_drafter(tiny_target, VOCAB, seed=4)
    native = save_drafter(drafter, tmp_path / "native", dtype=torch.float32,
                          metadata={"target": "smollm2"}, verifier=verifier_id("smollm2"))
    spec = export_drafter(native, tmp_path / "spec", "speculators", speculative_tokens=3)
    config = json.loads((spec / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["norm_before_residual"] is False  # vLLM's reader would default a missing one to true
    forge = export_drafter(native, tmp_path / "forge", "sglang")
    assert json.loads((forge / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    ids, attention, feats = _one_sequence(tiny_target)
    reference = _drafter_logits(drafter, ids, attention, feats, 3)
    for directory in (spec, forge):
        loaded = load_drafter(directory, tiny_target.embed_tokens.weight)
        assert loaded.config.aux_layer_ids == (2, 4, 5)
        for a, b in zip(_drafter_logits(loaded, ids, attention, feats, 3), reference):
            assert torch.allclose(a, b, atol=1e-6)


def test_rope_scaling_is_written_for_legacy_readers(tmp_path, tiny_target):
    drafter = tiny_drafter(tiny_target, VOCAB)
    drafter.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}
    for fmt in ("vllm", "speculators", "specforge"):
        out = save_drafter(drafter, tmp_path / fmt, format=fmt, verifier="org/x")
        config = json.loads((out / "config.json").read_text())
        shape = config.get("transformer_layer_config", config)
        assert shape["rope_parameters"]["rope_type"] == "llama3"
        assert shape["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        assert shape["rope_theta"] == 500000.0
        assert read_checkpoint(out)[0].rope_parameters == drafter.config.rope_parameters


# -- refusals, each naming what it refuses ---------------------------------------------------------
@pytest.mark.parametrize("maker,extra,field", [
    (make_specforge_dir, {"norm_before_residual": True}, "norm_before_residual"),
    (make_specforge_dir, {"norm_output": False}, "norm_output"),
    (make_specforge_dir, {"num_hidden_layers": 2}, "num_hidden_layers"),
    (make_specforge_dir, {"attention_bias": True}, "attention_bias"),
    (make_speculators_dir, {"embed_requires_grad": True}, "embed_requires_grad"),
    (make_speculators_dir, {"fc_norm": True}, "norm_before_fc"),
])
def test_unsupported_flags_are_refused_by_name(tmp_path, tiny_target, maker, extra, field):
    source, _ = maker(tmp_path / "ckpt", tiny_target, **extra)
    with pytest.raises(UnsupportedCheckpoint, match=field), warnings.catch_warnings():
        warnings.simplefilter("ignore", AuxLayerNumberingWarning)
        load_drafter(source, tiny_target.embed_tokens.weight)


def test_speculators_refusals_inside_the_layer_config(tmp_path, tiny_target):
    source, _ = make_speculators_dir(tmp_path / "qwen", tiny_target)
    config = json.loads((source / "config.json").read_text())
    config["transformer_layer_config"]["model_type"] = "qwen3"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint, match="transformer_layer_config.model_type"):
        load_drafter(source, tiny_target.embed_tokens.weight)
    del config["norm_before_residual"]
    config["transformer_layer_config"]["model_type"] = "llama"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint, match="norm_before_residual' is missing"):
        load_drafter(source, tiny_target.embed_tokens.weight)


def test_speculators_embedding_must_be_the_targets(tmp_path, tiny_target):
    source, _ = make_speculators_dir(tmp_path / "ckpt", tiny_target)
    weights = load_file(source / "model.safetensors")
    weights["embed_tokens.weight"] = weights["embed_tokens.weight"] + 0.5
    save_file(weights, source / "model.safetensors")
    with pytest.raises(UnsupportedCheckpoint, match="embed_tokens.weight"):
        load_drafter(source, tiny_target.embed_tokens.weight)


def test_sliding_window_is_read_and_written(tmp_path, tiny_target):
    source, _ = make_speculators_dir(tmp_path / "ckpt", tiny_target)
    config = json.loads((source / "config.json").read_text())
    config["transformer_layer_config"].update(layer_types=["sliding_attention"], sliding_window=6)
    (source / "config.json").write_text(json.dumps(config))
    drafter = load_drafter(source, tiny_target.embed_tokens.weight)
    assert drafter.config.sliding_window == 6
    out = save_drafter(drafter, tmp_path / "back", format="speculators", verifier="org/x")
    assert json.loads((out / "config.json").read_text())["transformer_layer_config"]["layer_types"] == ["sliding_attention"]
    with pytest.raises(UnsupportedCheckpoint, match="sliding_window"):
        save_drafter(drafter, tmp_path / "forge", format="specforge")


def test_specforge_export_refuses_what_sglang_does_not_compute(tmp_path, tiny_target):
    source, _ = make_speculators_dir(tmp_path / "ckpt", tiny_target)
    with pytest.raises(UnsupportedCheckpoint, match="norm_before_residual"):
        export_drafter(source, tmp_path / "forge", "specforge")


# -- vocabulary mappings -----------------------------------------------------------------------------
def test_vocab_mappings_of_both_tools(tmp_path):
    torch.save({"d2t": VOCAB.d2t, "t2d": VOCAB.t2d}, tmp_path / "specforge.pt")
    assert torch.equal(load_vocab_mapping(tmp_path / "specforge.pt", V).draft_to_target, VOCAB.draft_to_target)
    np.save(tmp_path / "d2t.npy", VOCAB.d2t.numpy())
    np.save(tmp_path / "t2d.npy", VOCAB.t2d.numpy())
    vocab = load_vocab_mapping(tmp_path / "d2t.npy", V, t2d_path=tmp_path / "t2d.npy")
    assert torch.equal(vocab.draft_to_target, VOCAB.draft_to_target)
    with pytest.raises(ValueError, match="field 't2d' has shape"):
        load_vocab_mapping(tmp_path / "d2t.npy", V + 4, t2d_path=tmp_path / "t2d.npy")
    np.save(tmp_path / "other_t2d.npy", np.roll(VOCAB.t2d.numpy(), 1))
    with pytest.raises(ValueError, match="field 't2d' marks"):
        load_vocab_mapping(tmp_path / "d2t.npy", V, t2d_path=tmp_path / "other_t2d.npy")
    with pytest.raises(ValueError, match="field 'd2t'.*outside"):
        load_vocab_mapping(tmp_path / "d2t.npy", 50)
    torch.save({"t2d": VOCAB.t2d}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="field 'd2t' missing"):
        load_vocab_mapping(tmp_path / "bad.pt", V)
