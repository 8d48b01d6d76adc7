"""Drafters in draftrl's checkpoint layout load in real vLLM (eagle3) and are lossless.

Each vLLM engine runs in its own subprocess (``pipeline.vllm_check.run_vllm_isolated``), so
pytest never holds vLLM's process-wide state. One baseline run (no drafter) is shared by the
drafter cases; on a 2-core CPU an engine takes roughly 30-60 s to start and ~10 s to generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.vllm_check import compare, run_vllm_isolated

pytestmark = pytest.mark.slow

NUM_SPECULATIVE_TOKENS = 3
MAX_TOKENS = 32

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Count from 1 to 30, separated by commas."}],
    [{"role": "user", "content": "Repeat the word 'hello' twenty times."}],
]


# --------------------------------------------------------------------------------------------
# Make a drafter directory. Stand-in for speculative.checkpoint.save_drafter: writes the same
# layout (config.json + model.safetensors, names as vLLM's llama_eagle3.py loads them).
# --------------------------------------------------------------------------------------------
def make_drafter_dir(
    target_dir: Path,
    out_dir: Path,
    *,
    draft_vocab_size: int | None = None,
    init: str = "random",
    aux_layer_ids: tuple[int, int, int] = (2, 15, 27),
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write an EAGLE-3 drafter for the target at ``target_dir``.

    ``draft_vocab_size`` None = the full target vocabulary (then no ``d2t``/``t2d`` is written:
    vLLM has no ``draft_id_to_target_id`` parameter to load it into); otherwise the draft
    vocabulary is the ``draft_vocab_size`` lowest target ids, with ``d2t`` and ``t2d``.

    ``init="random"``: small random weights (accepts next to nothing).
    ``init="last_hidden"``: a drafter that proposes the target's *current* argmax again, i.e.
    "the next token repeats the last one": ``fc`` selects the last aux state, which must then
    be the target's final pre-norm residual (aux id = num_layers), attention and MLP outputs
    are zero, ``norm`` = the target's final norm and ``lm_head`` = the target's (tied)
    embedding rows. On repetitive text it is accepted, so the acceptance path is exercised.
    """
    config = json.loads((target_dir / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    draft_ids = torch.arange(draft_vocab_size if draft_vocab_size is not None else vocab)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    weights = {
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "fc.weight": rand(hidden, 3 * hidden),
        "lm_head.weight": rand(len(draft_ids), hidden),
    }
    if init == "last_hidden":
        if aux_layer_ids[-1] != config["num_hidden_layers"]:
            raise ValueError("init='last_hidden' needs the last aux id = the target's layer count")
        with safe_open(target_dir / "model.safetensors", "pt") as target:
            embed = target.get_tensor("model.embed_tokens.weight").float()
            final_norm = target.get_tensor("model.norm.weight").float()
        weights["fc.weight"] = torch.cat(
            [torch.zeros(hidden, 2 * hidden), torch.eye(hidden)], dim=1
        )
        weights["midlayer.self_attn.o_proj.weight"].zero_()
        weights["midlayer.mlp.down_proj.weight"].zero_()
        weights["norm.weight"] = final_norm
        weights["lm_head.weight"] = embed[draft_ids]
    elif init != "random":
        raise ValueError(f"unknown init {init!r}")
    weights = {name: w.to(dtype).contiguous() for name, w in weights.items()}
    if draft_vocab_size is not None:
        weights["d2t"] = draft_ids - torch.arange(len(draft_ids))  # target = draft + d2t[draft]
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[draft_ids] = True
        weights["t2d"] = t2d

    rope = config.get("rope_parameters") or {
        "rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)
    }
    drafter_config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "vocab_size": vocab,
        "draft_vocab_size": len(draft_ids),
        "target_hidden_size": hidden,
        "hidden_act": config.get("hidden_act", "silu"),
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "max_position_embeddings": config["max_position_embeddings"],
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
            "use_aux_hidden_state": True,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(drafter_config, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_dir() -> Path:
    pytest.importorskip("vllm")
    from speculative.target import resolve_target

    try:
        return Path(resolve_target("smollm2"))
    except (FileNotFoundError, ImportError) as missing:
        pytest.skip(f"SmolLM2 target unavailable: {missing}")


@pytest.fixture(scope="module")
def baseline(target_dir: Path):
    """vLLM greedy output of the target alone, shared by every drafter case."""
    return run_vllm_isolated(
        target_dir, PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=True, seed=0
    )


def _check(report: dict) -> dict:
    spec = report["spec"]
    assert report["identical"], (
        "greedy output with EAGLE-3 speculation differs from the target alone: "
        f"{json.dumps(report['mismatches'], indent=1)}"
    )
    assert spec is not None
    assert spec["num_drafts"] > 0
    assert spec["num_draft_tokens"] == spec["num_drafts"] * NUM_SPECULATIVE_TOKENS
    assert 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    per_pos = spec["accepted_per_position"]
    assert len(per_pos) == NUM_SPECULATIVE_TOKENS
    assert sum(per_pos) == spec["num_accepted_tokens"]
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos
    assert spec["mean_acceptance_length"] == pytest.approx(
        1 + spec["num_accepted_tokens"] / spec["num_drafts"]
    )
    return spec


def test_random_drafter_with_draft_vocab_is_lossless(target_dir, baseline, tmp_path):
    drafter = make_drafter_dir(target_dir, tmp_path / "drafter", draft_vocab_size=8192)
    report = compare(
        target_dir, drafter, PROMPTS, baseline=baseline,
        num_speculative_tokens=NUM_SPECULATIVE_TOKENS, max_tokens=MAX_TOKENS, ignore_eos=True,
    )
    _check(report)
    assert report["num_output_tokens"] == len(PROMPTS) * MAX_TOKENS


def test_full_vocab_drafter_is_accepted_and_lossless(target_dir, baseline, tmp_path):
    """Full draft vocabulary (no d2t); a drafter that vLLM actually accepts on repeats."""
    layers = json.loads((target_dir / "config.json").read_text())["num_hidden_layers"]
    drafter = make_drafter_dir(
        target_dir, tmp_path / "drafter", init="last_hidden", aux_layer_ids=(2, 15, layers)
    )
    report = compare(
        target_dir, drafter, PROMPTS, baseline=baseline,
        num_speculative_tokens=NUM_SPECULATIVE_TOKENS, max_tokens=MAX_TOKENS, ignore_eos=True,
    )
    spec = _check(report)
    assert spec["num_accepted_tokens"] > 0, spec
