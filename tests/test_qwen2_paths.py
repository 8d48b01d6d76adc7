"""Everything past the engines on a Qwen2 target (issue 21): the single-process trainer with SFT,
GTO, Draft-OPD and gto_opd, the Ray pipeline and ``draftrl eval``, all through ``target.model=<dir>``.

The target is ``tiny_qwen2_target_dir``: a random 8-layer Qwen2 (q/k/v biases randomised, RoPE
base 1e6, tied embeddings like Qwen2.5-Coder-1.5B) with SmolLM2's tokenizer. The tests of these
paths on Llama-shaped targets are tests/test_trainer.py, test_ray_pipeline.py and test_benchmark.py;
this file mirrors their essential checks. No mocks. The study on this target is
tests/test_study.py::test_a_qwen2_target_named_by_the_overrides_trains_and_scores.

Time on the shared 2-core box: 36 s for the file under pytest (45 s wall with start-up): the Ray test
23-25 s (53 s when the box was busier), everything else 1-2.5 s a test.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from pipeline.trainer import Trainer
from speculative.checkpoint import load_drafter
from speculative.config import load_config
from speculative.target import TargetModel
from tests.conftest import write_topic_chats
from tests.test_trainer import RL_OVERRIDES as TRAINER_RL_OVERRIDES
from tests.test_trainer import _config as trainer_config

QWEN2 = ["Qwen2ForCausalLM"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_topic_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", 32)


@pytest.fixture(scope="module")
def qwen2_target(tiny_qwen2_target_dir) -> TargetModel:
    return TargetModel.load(str(tiny_qwen2_target_dir))


def _config(out, target_dir, chat_file, max_steps, *extra):
    """test_trainer's tiny config, shorter and quieter; the cache shared by the runs of a test."""
    return trainer_config(out, target_dir, chat_file, max_steps, f"cache_dir={out.parent / 'cache'}",
                          "data.max_length=48", "training.warmup_steps=1", "training.log_every=1",
                          "training.eval_every=100", "training.eval_batches=1", "training.save_every=100",
                          "training.threads=1", *extra)


def _train_rows(result) -> list[dict]:
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _check_export(drafter_dir, target: TargetModel, objective: str) -> None:
    """The exported drafter loads back for the Qwen2 target and records the target's architecture."""
    data = json.loads((drafter_dir / "config.json").read_text())
    assert data["architectures"] == ["LlamaForCausalLMEagle3"]
    assert data["rope_theta"] == 1_000_000.0  # the target's RoPE base, not Llama's 1e4
    info = data["draftrl"]
    assert info["verifier_architectures"] == QWEN2 and info["objective"] == objective
    weights = load_file(drafter_dir / "model.safetensors")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    drafter = load_drafter(drafter_dir, target.embed_tokens.weight.float(), target.aux_layer_ids)
    assert drafter.config.aux_layer_ids == target.aux_layer_ids == (2, 4, 5)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_qwen2_target_dir, chat_file):
    return Trainer(_config(tmp_path_factory.mktemp("sft"), tiny_qwen2_target_dir, chat_file, 3,
                           "drafter.export_formats=[speculators]")).run()


def test_the_fixture_is_a_tied_qwen2_with_biases(qwen2_target, tiny_qwen2_target_dir):
    config = json.loads((tiny_qwen2_target_dir / "config.json").read_text())
    assert config["architectures"] == QWEN2 and config["tie_word_embeddings"] is True
    model = qwen2_target.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # randomised, survived the save
    assert (tiny_qwen2_target_dir / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (tiny_qwen2_target_dir / "tokenizer_config.json").read_text())


def test_sft_trains_and_exports_for_qwen2(sft_run, qwen2_target):
    train = _train_rows(sft_run)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["top1/step1"]) for r in train)
    assert math.isfinite(sft_run.eval_metrics["loss"]) and "accept_length_proxy" in sft_run.eval_metrics
    _check_export(sft_run.drafter_dir, qwen2_target, "sft")
    # the speculators export (what vLLM's speculators path reads) names the Qwen2 verifier
    speculators = json.loads((sft_run.output_dir / "drafter_speculators" / "config.json").read_text())
    assert speculators["speculators_config"]["verifier"]["architectures"] == QWEN2
    assert speculators["transformer_layer_config"]["rope_theta"] == 1_000_000.0


# test_trainer's RL settings, with shorter OPD rollouts
RL_OVERRIDES = {objective: [o.replace("opd.max_new_tokens=12", "opd.max_new_tokens=8") for o in overrides]
                for objective, overrides in TRAINER_RL_OVERRIDES.items()}
RL_METRICS = {  # tests/test_trainer.py's essential keys, and the ones that must be finite
    "gto": ({"gto/reward", "gto/clip_fraction", "gto/kl_reference", "token/loss"},
            ("loss", "gto/reward", "gto/kl_reference")),
    "opd": ({"opd/accepted_kl", "opd/rejected_kl", "rollout/tau", "sft/loss"}, ("loss", "sft/loss", "rollout/tau")),
    "gto_opd": ({"gto/reward", "gto/loss", "token/loss", "opd/loss", "opd/rejected_kl", "rollout/tau"},
                ("loss", "gto/loss", "opd/loss", "rollout/tau")),
}


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, tiny_qwen2_target_dir, chat_file, sft_run):
    """``rl_run(objective)``: 2 updates of ``objective`` from the SFT drafter (each run once per module)."""
    runs = {}

    def run(objective: str):
        if objective not in runs:
            extra = [f"drafter.init_from={sft_run.drafter_dir}", "training.save_every=2", *RL_OVERRIDES[objective]]
            out = tmp_path_factory.mktemp(objective)
            runs[objective] = Trainer(_config(out, tiny_qwen2_target_dir, chat_file, 2, *extra)).run()
        return runs[objective]

    return run


@pytest.mark.parametrize("objective", ["gto", "opd", "gto_opd"])
def test_rl_objectives_train_from_the_sft_drafter_on_qwen2(rl_run, sft_run, qwen2_target, objective):
    result = rl_run(objective)
    assert result.final_step == 2
    train = _train_rows(result)
    keys = set().union(*(r.keys() for r in train))
    expected, finite = RL_METRICS[objective]
    assert expected <= keys, keys
    for row in train:
        assert all(math.isfinite(row[key]) for key in finite), row
    if objective in ("gto", "gto_opd"):
        # the target is peaked enough that trees get accepted paths and the groups non-zero advantages:
        # the policy gradient is not vacuous
        assert any(r["gto/path_length"] > 0 and r["gto/advantage_abs"] > 0 for r in train), train
        assert (result.output_dir / "checkpoints" / "step_000002" / "reference" / "model.safetensors").is_file()
    if objective in ("opd", "gto_opd"):
        # chain-of-3 rollouts verified by the Qwen2 target: 1 <= tau <= 4, the replay proposes what the
        # rollout did, and after the first update drafts are accepted (its KL term is trained)
        assert all(1.0 <= r["rollout/tau"] <= 4.0 and r["opd/replay_same_proposals"] == 1.0 for r in train), train
        assert all(r["opd/replay_logprob_drift"] < 1e-4 for r in train), train
        assert any(r["opd/accepted_states"] > 0 and r["opd/accepted_kl"] > 0 for r in train), train
    # the RL updates moved the drafter away from its SFT start
    start, end = load_file(sft_run.drafter_dir / "model.safetensors"), load_file(result.drafter_dir / "model.safetensors")
    assert any(not torch.equal(start[name], end[name]) for name in end if name in start)
    _check_export(result.drafter_dir, qwen2_target, objective)


# tests/test_ray_pipeline.py's smallest GTO run
RAY_GTO = ["gto.tree_depth=3", "gto.tree_top_k=2", "gto.tree_total_tokens=6", "gto.groups_per_sequence=2",
           "gto.group_size=2", "gto.positions_per_forward=4"]


def test_ray_pipeline_gto_on_qwen2(tmp_path, tiny_qwen2_target_dir, chat_file, qwen2_target):
    """GTO on two DeepSpeed learners and two rollout actors (local Ray, gloo): every broadcast
    checksum-identical on both actors, two updates, each experience made by the drafter it trained."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    from pipeline.driver import run_distributed
    from tests.test_ray_pipeline import assert_every_broadcast_bit_identical, overrides

    cfg = load_config(None, overrides(tmp_path / "run", tiny_qwen2_target_dir, chat_file, 2,
                                      "training.objective=gto", *RAY_GTO))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        result = run_distributed(cfg)
    finally:
        ray.shutdown()
    assert result.final_step == 2
    assert_every_broadcast_bit_identical(result, 2)
    assert [s["experience_versions"] for s in result.steps] == [[0, 0], [1, 1]]
    assert math.isfinite(result.train_metrics["loss"]) and "gto/reward" in result.train_metrics
    data = json.loads((result.drafter_dir / "config.json").read_text())
    assert data["draftrl"]["verifier_architectures"] == QWEN2 and data["rope_theta"] == 1_000_000.0
    load_drafter(result.drafter_dir, qwen2_target.embed_tokens.weight.float(), qwen2_target.aux_layer_ids)


def test_eval_at_t0_is_the_qwen2_targets_greedy_output(tmp_path, tiny_qwen2_target_dir, rl_run, one_thread):
    """``draftrl eval`` with the Draft-OPD-trained drafter: drafts are accepted (the tree path is exercised),
    no T = 0 mismatch against its own autoregressive run, and the text is what Hugging Face's greedy
    ``generate`` of the Qwen2 target writes."""
    from transformers import AutoModelForCausalLM

    from tools.benchmark import answer_text, eos_token_ids
    from tools.cli import main
    from speculative.target import load_tokenizer

    bench = tmp_path / "one.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["Write a haiku about rain."]}) + "\n")
    out, new_tokens = tmp_path / "eval", 12
    assert main(["eval", "--drafter", str(rl_run("opd").drafter_dir), "--target", str(tiny_qwen2_target_dir),
                 "--bench", str(bench), "--temperature", "0", "--max-new-tokens", str(new_tokens),
                 "--dtype", "float32", "--out", str(out), "--depth", "3", "--top-k", "3",
                 "--total-tokens", "8", "--threads", "1"]) == 0
    block = json.loads((out / "results.json").read_text())["results"][0]
    assert block["mismatches"] == 0 and block["generations"] == 1
    assert block["tau"] > 1.0 and sum(block["accept_histogram"][1:]) > 0, block  # drafts were accepted
    record = json.loads((out / "generations.jsonl").read_text().splitlines()[0])
    assert record["identical"]

    tokenizer = load_tokenizer(str(tiny_qwen2_target_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_target_dir, dtype=torch.float32).eval()
    ids = tokenizer(record["spec"]["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = eos_token_ids(tokenizer)
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, eos_token_id=sorted(eos), pad_token_id=min(eos))
    want = answer_text(tokenizer, greedy[0, ids.shape[1]:].tolist(), eos)
    assert record["spec"]["text"] == want and record["baseline"]["text"] == want


def test_eval_check_mode_on_qwen2(tmp_path, tiny_qwen2_target_dir, rl_run, one_thread):
    """``draftrl eval --check``: eager and fixed-shape (static) engines, autoregressive and
    speculative, all identical to eager greedy decoding of the Qwen2 target."""
    from tools.cli import main

    bench = tmp_path / "one.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["Write a haiku about rain."]}) + "\n")
    assert main(["eval", "--check", "--drafter", str(rl_run("opd").drafter_dir), "--target", str(tiny_qwen2_target_dir),
                 "--bench", str(bench), "--max-new-tokens", "8", "--out", str(tmp_path / "check"), "--depth", "3",
                 "--top-k", "3", "--total-tokens", "8", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "check" / "check.json").read_text())
    assert not report["failures"]
    assert {(r["mode"], r["kind"]) for r in report["runs"]} == {
        (m, k) for m in ("off", "static") for k in ("autoregressive", "speculative")}
    assert all(r["identical_to_eager_greedy"] for r in report["runs"])
