"""Drafters in draftrl's checkpoint layout load in real vLLM (eagle3) and are lossless.

Each vLLM engine runs in its own subprocess (``tools.vllm_check.run_vllm_isolated``), so
pytest never holds vLLM's process-wide state. One baseline run (no drafter) is shared by the
drafter cases. On an idle 2-core CPU each engine subprocess takes ~25-35 s (mostly importing
vLLM) plus 5-15 s of generation; the whole file runs in about 4 minutes.

The engines run in float32, where "lossless" can be checked token for token. In bf16 the
speculative path (k+1 tokens verified per forward) and plain decoding may round differently,
and where the target's two best tokens lie within a bf16 step of each other they may pick
differently: on SmolLM2 the haiku prompt has such a tie at token 17 (" shore" over " ocean" by
0.091 logit in float32, at logits ~16.2 where one bf16 step is 0.125; vLLM's bf16 logits for
the two are exactly equal), and whether a bf16 run splits there depends on the CPU's kernels.
The float32 premise is checked too: the baseline is the float32 target's own greedy choice at
every token, each chosen by a clear margin, and a forged lossy output is caught (the negative
control).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from actors.vllm_engine import SpecDecodeStats, _spec_counters, _stats_delta
from tools.vllm_check import (
    Completion,
    Float32Reference,
    VllmResult,
    compare,
    find_mismatches,
    load_prompts,
    rounding_step,
    run_vllm_isolated,
)

NUM_SPECULATIVE_TOKENS = 3
MAX_TOKENS = 32
DTYPE = "float32"  # exact equality is a float32 property (see the module docstring)
# Smallest float32 top-1/top-2 logit gap the baseline may have at a generated token for token
# equality to be the right test: ~1000x the difference float32 kernels make to a logit.
MIN_MARGIN = 0.01

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Count from 1 to 30, separated by commas."}],
    # SmolLM2 answers "No no no ...": consecutive repeats, which the "last_hidden" drafter
    # below proposes, so vLLM accepts drafts on this prompt.
    [{"role": "user", "content": "Repeat after me: no no no no no no no no no no no no"}],
]


def saved_random_drafter(smollm2_vllm_dir: Path, out_dir: Path, draft_vocab_size: int) -> Path:
    """A random drafter written by draftrl's own saver (``speculative.checkpoint.save_drafter``)."""
    from speculative.checkpoint import save_drafter
    from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
    from speculative.target import TargetModel
    from speculative.vocab import DraftVocab

    target = TargetModel.load(str(smollm2_vllm_dir))
    vocab = DraftVocab(torch.arange(draft_vocab_size), target.vocab_size)
    config = DrafterConfig.from_target(target.config, draft_vocab_size, target.aux_layer_ids)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter)
    return save_drafter(drafter, out_dir)


# --------------------------------------------------------------------------------------------
# A hand-built drafter with weights copied from the target (see its docstring): it needs an
# aux id (num_layers) that draftrl's trainer does not use, so it is written directly in the
# layout vLLM's llama_eagle3.py loads.
# --------------------------------------------------------------------------------------------
def make_drafter_dir(
    smollm2_vllm_dir: Path,
    out_dir: Path,
    *,
    draft_vocab_size: int | None = None,
    init: str = "random",
    aux_layer_ids: tuple[int, int, int] = (2, 15, 27),
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write an EAGLE-3 drafter for the target at ``smollm2_vllm_dir``.

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
    config = json.loads((smollm2_vllm_dir / "config.json").read_text())
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
        with safe_open(smollm2_vllm_dir / "model.safetensors", "pt") as target:
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


def test_spec_counters_are_summed_over_engines_and_differenced():
    """vLLM's metric snapshot -> SpecDecodeStats (no vLLM needed)."""
    from types import SimpleNamespace as M

    def snapshot(drafts, tokens, accepted, per_pos):
        return [
            M(name="vllm:spec_decode_num_drafts", value=drafts),
            M(name="vllm:spec_decode_num_draft_tokens", value=tokens),
            M(name="vllm:spec_decode_num_accepted_tokens", value=accepted),
            M(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=per_pos),
            M(name="vllm:spec_decode_num_drafts", value=1),  # a second engine
            M(name="vllm:num_requests_running", value=3),
        ]

    before = _spec_counters(snapshot(2, 6, 3, [2, 1, 0]))
    after = _spec_counters(snapshot(12, 36, 13, [7, 4, 2]))
    stats = _stats_delta(before, after, 3)
    assert stats == SpecDecodeStats(10, 30, 10, [5, 3, 2])
    assert stats.mean_acceptance_length == pytest.approx(2.0)
    assert stats.per_position_rate == pytest.approx([0.5, 0.3, 0.2])
    assert SpecDecodeStats.from_dict(stats.to_dict()) == stats


def test_load_prompts_accepts_chats_messages_and_strings(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "\n".join(json.dumps(x) for x in [chat, {"messages": chat}, {"prompt": "raw"}, "raw2"])
    )
    assert load_prompts(path) == [chat, chat, "raw", "raw2"]


@pytest.fixture(scope="module")
def baseline(smollm2_vllm_dir: Path):
    """vLLM greedy output of the target alone, shared by every drafter case."""
    return run_vllm_isolated(
        smollm2_vllm_dir, PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=True, seed=0, dtype=DTYPE
    )


@pytest.fixture(scope="module")
def reference(smollm2_vllm_dir: Path) -> Float32Reference:
    return Float32Reference(smollm2_vllm_dir)


def _compare(smollm2_vllm_dir: Path, drafter: Path, baseline: VllmResult) -> dict:
    return compare(
        smollm2_vllm_dir, drafter, PROMPTS, baseline=baseline, dtype=DTYPE,
        num_speculative_tokens=NUM_SPECULATIVE_TOKENS, max_tokens=MAX_TOKENS, ignore_eos=True,
    )


def _check(report: dict) -> dict:
    spec = report["spec"]
    # On a mismatch, compare() adds the float32 logit gap between the two tokens at the split.
    assert report["identical"], (
        "greedy output with EAGLE-3 speculation differs from the target alone: "
        f"{json.dumps(report['mismatches'], indent=1)}"
    )
    assert spec is not None
    assert spec["num_drafts"] > 0
    # Each draft has k tokens here; vLLM may trim drafts that would overrun max_model_len.
    assert 0 < spec["num_draft_tokens"] <= spec["num_drafts"] * NUM_SPECULATIVE_TOKENS
    assert 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    per_pos = spec["accepted_per_position"]
    assert len(per_pos) == NUM_SPECULATIVE_TOKENS
    assert sum(per_pos) == spec["num_accepted_tokens"]
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos
    assert spec["mean_acceptance_length"] == pytest.approx(
        1 + spec["num_accepted_tokens"] / spec["num_drafts"]
    )
    return spec


@pytest.mark.slow
def test_random_drafter_with_draft_vocab_is_lossless(smollm2_vllm_dir, baseline, tmp_path):
    drafter = saved_random_drafter(smollm2_vllm_dir, tmp_path / "drafter", draft_vocab_size=8192)
    report = _compare(smollm2_vllm_dir, drafter, baseline)
    spec = _check(report)
    assert report["num_output_tokens"] == len(PROMPTS) * MAX_TOKENS
    # A useless drafter is (next to) never accepted: the counters tell drafters apart.
    assert spec["num_accepted_tokens"] <= 0.05 * spec["num_draft_tokens"], spec


@pytest.mark.slow
def test_full_vocab_drafter_is_accepted_and_lossless(smollm2_vllm_dir, baseline, tmp_path):
    """Full draft vocabulary (no d2t); a drafter that vLLM actually accepts on repeats."""
    layers = json.loads((smollm2_vllm_dir / "config.json").read_text())["num_hidden_layers"]
    drafter = make_drafter_dir(
        smollm2_vllm_dir, tmp_path / "drafter", init="last_hidden", aux_layer_ids=(2, 15, layers)
    )
    report = _compare(smollm2_vllm_dir, drafter, baseline)
    spec = _check(report)
    assert spec["num_accepted_tokens"] > 0, spec


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_baseline_is_the_float32_targets_greedy_by_clear_margins(baseline, reference):
    """The premise of exact equality: vLLM's float32 target is Hugging Face's float32 target at
    every generated token, and no token was a near-tie another kernel could order otherwise."""
    for i, completion in enumerate(baseline.outputs):
        margins = reference.greedy_margins(completion)
        assert not margins["not_fp32_argmax"], (i, margins)
        assert margins["min_top_gap"] >= MIN_MARGIN, (
            f"prompt {i} has a float32 near-tie at generated token {margins['min_top_gap_position']} "
            f"(gap {margins['min_top_gap']:.2e}): exact equality could flip there; pick other prompts"
        )


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_lossy_verifier_fails_the_check(baseline, reference):
    """Negative control: the output a verifier would give if it kept a drafted token that the
    target ranks second (injected at the target's most decisive token) is caught, at that
    token, with a float32 gap far beyond any rounding."""
    prompt = 2
    completion = baseline.outputs[prompt]
    ids = list(completion.prompt_token_ids) + list(completion.token_ids)
    logits = reference.logits(ids)[len(completion.prompt_token_ids) - 1 : -1]
    top = logits.topk(2, dim=-1)
    position = int((top.values[:, 0] - top.values[:, 1]).argmax())
    forged_tokens = list(completion.token_ids)
    forged_tokens[position] = int(top.indices[position, 1])
    forged = VllmResult(
        outputs=[
            Completion(out.prompt_token_ids, forged_tokens if i == prompt else out.token_ids, out.text)
            for i, out in enumerate(baseline.outputs)
        ],
        spec=None, load_seconds=0.0, generate_seconds=0.0,
    )
    mismatches = find_mismatches(baseline, forged)
    assert [(m["prompt"], m["first_diff"]) for m in mismatches] == [(prompt, position)]
    split = reference.split_gap(completion, forged.outputs[prompt], DTYPE)
    assert split["fp32_argmax"] == completion.token_ids[position]
    # Several bf16 steps: not a tie that even bf16 rounding could explain.
    assert split["fp32_gap"] > 4 * rounding_step(split["logit"], "bfloat16"), split


@pytest.mark.slow
def test_trained_drafter_accepts_in_vllm_as_in_draftrl(smollm2_sft_run):
    """A drafter trained and saved by draftrl gets the same acceptance in vLLM as in our engine."""
    pytest.importorskip("vllm")
    from tools.vllm_agreement import agreement

    report = agreement("smollm2", smollm2_sft_run.drafter_dir, max_tokens=32, dtype="float32")
    ours, theirs = report["draftrl"], report["vllm"]
    assert theirs["accepted_per_position"][0] > 0, report
    assert abs(ours["mean_acceptance_length"] - theirs["mean_acceptance_length"]) <= 0.05, report
