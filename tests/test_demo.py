"""``make demo`` (``tools/demo.py``): its stages are valid configs, and its τ stage runs end to end.

The demo itself trains on the real SmolLM2 target for minutes; here the τ stage runs on a tiny
random target (SmolLM2's tokenizer) with two random drafters, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from speculative.checkpoint import save_drafter
from speculative.config import load_config
from speculative.target import TargetModel, load_tokenizer
from tests.conftest import tiny_drafter, tiny_llama
from tools.demo import RL_UPDATES, stages, tau_stage, tau_table

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_demo_stage_is_a_shipped_config_with_valid_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config paths are the ones `make demo` passes, from the repository root
    out = tmp_path / "demo"
    plan = stages(out)
    assert [(name, config) for name, config, _ in plan] == [
        ("SFT", "configs/demo.yaml"), ("GTO", "configs/gto_smollm2.yaml"), ("Draft-OPD", "configs/opd_smollm2.yaml")]
    configs = {name: load_config(Path(config), overrides) for name, config, overrides in plan}
    sft = configs["SFT"]
    assert sft.training.objective == "sft" and not sft.distributed.enabled and Path(sft.output_dir) == out
    for name, objective in (("GTO", "gto"), ("Draft-OPD", "opd")):
        cfg = configs[name]
        assert cfg.training.objective == objective
        assert Path(cfg.drafter.init_from) == out / "drafter"  # from the SFT drafter
        assert Path(cfg.output_dir).parent == out
        assert cfg.target.model == sft.target.model == "smollm2"
        assert cfg.training.max_steps == RL_UPDATES and cfg.training.log_every == 1
        dist = cfg.distributed
        assert dist.enabled and dist.num_learners == 2 and dist.num_rollout_actors == 2
        assert dist.broadcast_every == 1 and dist.gpus_per_learner == 0 == dist.gpus_per_rollout_actor
        # The RL stages read the SFT stage's data slice (one tokenisation, then the cache).
        assert (cfg.data.source, cfg.data.max_records, cfg.data.max_length) == (
            sft.data.source, sft.data.max_records, sft.data.max_length)


def test_tau_stage_compares_drafters_and_writes_the_plot(tmp_path):
    tokenizer = load_tokenizer("smollm2")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=8)
    model.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    target = TargetModel(model)
    drafters = {}
    for seed, name in ((1, "SFT"), (2, "GTO (+3)")):
        save_drafter(tiny_drafter(target, seed=seed), tmp_path / f"drafter{seed}")
        drafters[name] = tmp_path / f"drafter{seed}"
    out = tmp_path / "demo"
    results = tau_stage(drafters, str(tmp_path / "target"), out, num_prompts=1, max_new_tokens=4,
                        tree={"depth": 3, "top_k": 3, "total_tokens": 8}, threads=1)
    assert list(results) == ["SFT", "GTO (+3)"]
    for blocks in results.values():
        assert [b["bench"] for b in blocks] == ["mt_bench", "humaneval", "gsm8k"]
        assert all(b["temperature"] == 0 and b["tau"] >= 1.0 for b in blocks)
        assert all(b["mismatches"] == 0 for b in blocks)  # speculative output == the target's greedy output
    assert (out / "tau.png").stat().st_size > 10_000
    assert (out / "tau" / "sft" / "results.json").is_file() and (out / "tau" / "gto_3" / "results.md").is_file()
    table = tau_table(results)
    assert table[0].split()[:4] == ["drafter", "mt_bench", "humaneval", "gsm8k"]
    assert table[1].startswith("SFT") and table[1].endswith("4/4")  # MT-Bench's question has two turns
