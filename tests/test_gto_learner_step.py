"""``bench/gto_learner_step.py`` on CPU with the tiny random target: the GTO learner step with the path
replayed at the roots and by training-time test, timed, and checked to compute the same log q(path)
and gradient."""

from __future__ import annotations

import json

from bench.gto_learner_step import main
from tests.conftest import write_topic_chats

GTO = ["gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8", "gto.group_size=3",
       "gto.groups_per_sequence=2", "training.ttt_steps=2"]


def test_learner_step_replays_timed_and_checked_equal(tmp_path, tiny_target_dir, one_thread):
    chats = write_topic_chats(tmp_path / "chats.jsonl", 24)
    out = tmp_path / "out"
    argv = ["--target", str(tiny_target_dir), "--data", str(chats), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--max-records", "24",
            "--draft-vocab-size", "512", "--batch-size", "3", "--chunk", "2x2", "--precision", "fp32",
            "--warmup", "1", "--reps", "2", "--profile", "--out", str(out), *[a for s in GTO for a in ("--set", s)]]
    assert main(argv) == 0
    report = json.loads((out / "gto_learner_step.json").read_text())
    full, ttt, rooted = report["rows"]
    assert (full["replay"], full["status"]) == ("ttt_full", "baseline")
    assert (ttt["replay"], ttt["status"]) == ("ttt", "equal")
    assert (rooted["replay"], rooted["status"]) == ("rooted", "equal")
    for row in (ttt, rooted):
        assert row["logprob_max_abs_diff"] <= 1e-4 and row["grad_rel_diff"] <= 1e-4
    for row in (full, ttt, rooted):  # fp32 on CPU: each replay is the fp32 TTT replay's log q
        assert row["logprob_vs_fp32"] <= 1e-4
    assert full["chains"] == rooted["chains"] > 0  # (an untrained drafter: the check uses full drafted paths)
    for row in (full, ttt, rooted):
        assert row["step_ms"]["reps"] == 2 and row["step_ms"]["median"] > 0 and row["check_path_length"] == 3
        assert row["profile_top_ops"]
    assert rooted["step_speedup"] > 0
    text = (out / "gto_learner_step.md").read_text()
    assert "| rooted |" in text and "equal" in text and "log q vs fp32" in text
