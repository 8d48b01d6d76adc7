"""``bench/sft_profile.py`` on CPU with the tiny random target: every SFT phase is timed and reported."""

from __future__ import annotations

import json

from bench.sft_profile import main
from speculative.profiling import SFT_PHASES
from tests.conftest import write_topic_chats


def test_sft_profile_reports_every_phase(tmp_path, tiny_target_dir, one_thread):
    chats = write_topic_chats(tmp_path / "chats.jsonl", 24)
    out = tmp_path / "profile"
    sets = [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"target.model={tiny_target_dir}",
            f"data.source={chats}", "data.max_length=64", "data.eval_fraction=0.1", "drafter.draft_vocab_size=512",
            "training.ttt_steps=3", "training.batch_size=4", "training.group_by_length=true", "training.device=cpu"]
    assert main(["--config", "configs/sft_qwen_coder.yaml", *[a for s in sets for a in ("--set", s)],
                 "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads((out / "sft_profile.json").read_text())
    assert set(report["phases"]) == set(SFT_PHASES)
    assert all(p["wall_ms_per_step"] > 0 and p["device_ms_per_step"] is None for p in report["phases"].values())
    assert report["clean"]["step_ms"] > 0 and report["config"]["optimizer"] == "AdamW"
    assert report["top_kernels"] and len(report["top_kernels"]) <= 20
    assert report["last_metrics"]["loss"] > 0
    text = (out / "sft_profile.md").read_text()
    assert "`sft/target_forward`" in text and "Top 20 ops by self CPU time" in text
    assert not (tmp_path / "run").exists()  # the run's output directory is left alone
