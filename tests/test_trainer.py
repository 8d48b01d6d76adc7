"""The single-process trainer end to end on a tiny random target with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from speculative.config import load_config
from pipeline.trainer import Trainer
from tests.conftest import write_topic_chats


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_topic_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", 48)


def _config(tmp_path, target_dir, chat_file, max_steps, *extra):
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"target.model={target_dir}",
            f"data.source={chat_file}",
            "data.max_length=64",
            "data.eval_fraction=0.1",
            "drafter.draft_vocab_size=512",
            "training.ttt_steps=3",
            "training.batch_size=4",
            "training.lr=3e-3",
            "training.warmup_steps=2",
            f"training.max_steps={max_steps}",
            "training.log_every=2",
            "training.eval_every=4",
            "training.save_every=3",
            "training.device=cpu",
            *extra,
        ],
    )


def test_train_writes_vllm_drafter_logs_and_checkpoints(tmp_path, tiny_target_dir, chat_file):
    result = Trainer(_config(tmp_path, tiny_target_dir, chat_file, 8)).run()
    out = result.output_dir
    config = json.loads((result.drafter_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 512
    assert load_file(result.drafter_dir / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["split"] for m in metrics} == {"train", "eval"}
    assert (out / "curves.png").stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text() == "step_000008"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000006", "step_000008"]
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_config(tmp_path, tiny_target_dir, chat_file, 8)).run()


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_target_dir, chat_file):
    straight = Trainer(_config(tmp_path / "a", tiny_target_dir, chat_file, 6)).run()
    Trainer(_config(tmp_path / "b", tiny_target_dir, chat_file, 6), steps_this_run=4).run()
    resumed = Trainer(_config(tmp_path / "b", tiny_target_dir, chat_file, 6), resume=True).run()
    a = load_file(straight.drafter_dir / "model.safetensors")
    b = load_file(resumed.drafter_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_init_from_checks_the_target_layers(tmp_path, tiny_target_dir, chat_file):
    first = Trainer(_config(tmp_path / "a", tiny_target_dir, chat_file, 2)).run()
    config = _config(
        tmp_path / "b", tiny_target_dir, chat_file, 2,
        f"drafter.init_from={first.drafter_dir}", "target.aux_layer_ids=[1, 2, 3]",
    )
    with pytest.raises(ValueError, match="fuses target layers"):
        Trainer(config).run()


def test_evaluate_directory_reports_ttt_metrics(tmp_path, tiny_target_dir, chat_file):
    config = _config(tmp_path, tiny_target_dir, chat_file, 2)
    result = Trainer(config).run()
    metrics = Trainer(config).evaluate_directory(result.drafter_dir)
    assert set(metrics) >= {"loss", "top1/step1", "top1/step3", "accept_length_proxy"}
    # The exported bf16 drafter scores close to the fp32 weights it came from.
    assert metrics["loss"] == pytest.approx(result.eval_metrics["loss"], rel=0.05)


RL_OVERRIDES = {
    "gto": ["training.objective=gto", "gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8",
            "gto.group_size=3", "gto.groups_per_sequence=2"],
    "opd": ["training.objective=opd", "opd.chain_length=3", "opd.max_new_tokens=12", "opd.sft_weight=0.5"],
    "gto_opd": ["training.objective=gto_opd", "gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8",
                "gto.group_size=3", "gto.groups_per_sequence=2", "opd.chain_length=3", "opd.max_new_tokens=12"],
}


@pytest.mark.parametrize("objective", ["gto", "opd", "gto_opd"])
def test_rl_objectives_train_from_an_sft_drafter_and_resume_exactly(tmp_path, tiny_target_dir, chat_file, objective):
    """SFT warm-up, then GTO / Draft-OPD from its drafter in the same trainer: their metrics are
    logged, and a run stopped and resumed (GTO's frozen reference comes back from the
    checkpoint) ends bit-identical to an uninterrupted one."""
    sft = Trainer(_config(tmp_path / "sft", tiny_target_dir, chat_file, 4)).run()
    extra = [f"drafter.init_from={sft.drafter_dir}", *RL_OVERRIDES[objective]]
    straight = Trainer(_config(tmp_path / "a", tiny_target_dir, chat_file, 4, *extra)).run()
    metrics = [json.loads(line) for line in (straight.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*(m.keys() for m in metrics if m["split"] == "train"))
    expected = {"gto": {"gto/reward", "gto/clip_fraction", "gto/kl_reference", "token/loss"},
                "opd": {"opd/accepted_kl", "opd/rejected_kl", "rollout/tau", "sft/loss"},
                "gto_opd": {"gto/reward", "gto/loss", "token/loss", "opd/loss", "opd/rejected_kl", "rollout/tau"},
                }[objective]
    assert expected <= train_keys, train_keys
    train = [m for m in metrics if m["split"] == "train"]
    if objective in ("gto", "gto_opd"):
        assert (straight.output_dir / "checkpoints" / "step_000004" / "reference" / "model.safetensors").is_file()
        # the (peaked) target accepts tree paths, so the groups' advantages are not all zero and
        # the exact resume below covers a surrogate that actually moves the drafter
        assert any(m["gto/path_length"] > 0 and m["gto/advantage_abs"] > 0 for m in train), train
    if objective in ("opd", "gto_opd"):
        assert any(m["opd/accepted_states"] > 0 for m in train), train
    Trainer(_config(tmp_path / "b", tiny_target_dir, chat_file, 4, *extra), steps_this_run=3).run()
    resumed = Trainer(_config(tmp_path / "b", tiny_target_dir, chat_file, 4, *extra), resume=True).run()
    a = load_file(straight.drafter_dir / "model.safetensors")
    b = load_file(resumed.drafter_dir / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nonfinite_losses_are_skipped_and_counted_then_abort(tmp_path, tiny_target_dir, chat_file, monkeypatch):
    import pipeline.trainer as trainer_module

    real = trainer_module.objective_loss
    calls = {"n": 0}
    poison = {"from": 2, "to": 2}

    def injected(drafter, experience, config):  # an injected fault: NaN losses on chosen batches
        calls["n"] += 1
        loss, metrics = real(drafter, experience, config)
        if poison["from"] <= calls["n"] <= poison["to"]:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(trainer_module, "objective_loss", injected)
    result = Trainer(_config(tmp_path / "a", tiny_target_dir, chat_file, 4, "training.max_nonfinite=1")).run()
    assert result.final_step == 4  # the NaN batch was skipped, not the run
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in rows if r["split"] == "train"][-1] == 1
    assert all(torch.isfinite(t).all() for t in load_file(result.drafter_dir / "model.safetensors").values())

    calls["n"], poison["to"] = 0, 10**9  # from the 2nd batch on, every loss is NaN
    with pytest.raises(FloatingPointError, match="training.max_nonfinite = 2"):
        Trainer(_config(tmp_path / "b", tiny_target_dir, chat_file, 4, "training.max_nonfinite=2")).run()


def test_a_corrupted_checkpoint_is_refused_before_use(tmp_path, tiny_target_dir, chat_file):
    from speculative.files import CorruptedFiles

    Trainer(_config(tmp_path, tiny_target_dir, chat_file, 6), steps_this_run=3).run()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"
    state, weights = checkpoint / "trainer_state.pt", checkpoint / "drafter" / "model.safetensors"
    original = state.read_bytes()
    state.write_bytes(original[:-100])  # a truncated write
    with pytest.raises(CorruptedFiles, match="trainer_state.pt.*truncated"):
        Trainer(_config(tmp_path, tiny_target_dir, chat_file, 6), resume=True).run()
    state.write_bytes(original)
    intact = weights.read_bytes()
    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one bit pattern changed: only the hash sees it
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CorruptedFiles, match="model.safetensors.*corrupted"):
        Trainer(_config(tmp_path, tiny_target_dir, chat_file, 6), resume=True).run()
    weights.write_bytes(intact)
    assert Trainer(_config(tmp_path, tiny_target_dir, chat_file, 6), resume=True).run().final_step == 6


def test_opd_one_rollout_per_update_feeds_every_micro_batch(tmp_path, tiny_target_dir, chat_file, monkeypatch):
    """opd.rollout_per_update: one make_experience call per update (the grad_accum micro-batches'
    prompts together), split into grad_accum experiences, and the data cursor still advances by
    grad_accum per update (so a resumed run reads the same batches)."""
    import pipeline.trainer as trainer_module
    from actors.target_worker import TargetWorker

    calls, losses = [], []
    real_make, real_loss = TargetWorker.make_experience, trainer_module.objective_loss

    def make(self, config, batch, *args, **kwargs):
        calls.append(int(batch["input_ids"].shape[0]))
        return real_make(self, config, batch, *args, **kwargs)

    def loss(drafter, experience, config):
        losses.append(int(experience.rollout.input_ids.shape[0]))
        return real_loss(drafter, experience, config)

    monkeypatch.setattr(TargetWorker, "make_experience", make)
    monkeypatch.setattr(trainer_module, "objective_loss", loss)
    config = _config(tmp_path, tiny_target_dir, chat_file, 2, "training.objective=opd", "training.batch_size=2",
                     "training.grad_accum=2", "opd.chain_length=3", "opd.max_new_tokens=6",
                     "opd.rollout_per_update=true", "training.eval_every=100", "training.save_every=2")
    result = trainer_module.Trainer(config).run()
    assert calls == [4, 4] and losses == [2, 2, 2, 2]
    state = torch.load(result.output_dir / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["cursor"] == 4
