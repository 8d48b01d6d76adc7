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
            "--vocab-losses", "fused,dense", "--warmup", "1", "--reps", "2", "--profile", "--out", str(out),
            *[a for s in GTO for a in ("--set", s)]]
    assert main(argv) == 0
    report = json.loads((out / "gto_learner_step.json").read_text())
    full, ttt, rooted, *dense = report["rows"]
    assert (full["replay"], full["vocab_loss"], full["status"]) == ("ttt_full", "fused", "baseline")
    assert (ttt["replay"], ttt["status"]) == ("ttt", "equal")
    assert (rooted["replay"], rooted["status"]) == ("rooted", "equal")
    assert [(row["replay"], row["vocab_loss"], row["status"]) for row in dense] == [
        ("ttt_full", "dense", "equal"), ("ttt", "dense", "equal"), ("rooted", "dense", "equal")]
    for row in (ttt, rooted, *dense):
        assert row["logprob_max_abs_diff"] <= 1e-4 and row["grad_rel_diff"] <= 1e-4
        assert row["step_loss_rel_diff"] <= 1e-5 and row["step_grad_rel_diff"] <= 1e-4
    for row in (full, ttt, rooted):  # fp32 on CPU: each replay is the fp32 TTT replay's log q
        assert row["logprob_vs_fp32"] <= 1e-4
    assert full["chains"] == rooted["chains"] > 0  # (an untrained drafter: the check uses full drafted paths)
    for row in (full, ttt, rooted):
        assert row["step_ms"]["reps"] == 2 and row["step_ms"]["median"] > 0 and row["check_path_length"] == 3
        assert row["profile_top_ops"]
    assert rooted["step_speedup"] > 0
    text = (out / "gto_learner_step.md").read_text()
    assert "| rooted | fused |" in text and "| rooted | dense |" in text and "log q vs fp32" in text


def test_cpu_autocast_rows_are_measured_against_the_fp32_replay(tmp_path, tiny_target_dir, one_thread):
    """--cpu-autocast: the step in bf16 on CPU; every row's log q is compared with the fp32 replay's
    (which bf16 moves away from), and the rows still come out equal or equal to rounding, also with
    training.attention sdpa."""
    chats = write_topic_chats(tmp_path / "chats.jsonl", 24)
    out = tmp_path / "out"
    argv = ["--target", str(tiny_target_dir), "--data", str(chats), "--device", "cpu", "--cpu-autocast",
            "--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--max-records", "24",
            "--draft-vocab-size", "512", "--batch-size", "3", "--chunk", "2x2", "--precision", "fp32",
            "--replays", "ttt,rooted", "--attentions", "dense,sdpa", "--warmup", "0", "--reps", "1", "--out", str(out),
            *[a for s in GTO for a in ("--set", s)]]
    assert main(argv) == 0
    report = json.loads((out / "gto_learner_step.json").read_text())
    assert report["bf16_autocast"] and report["tolerance"]["logprob_abs"] == 5e-2
    ttt, rooted, *sdpa = report["rows"]
    assert ttt["status"] == "baseline" and rooted["status"].startswith("equal")
    # training.attention sdpa (torch's fused causal kernel in bf16): the same step, to bf16 rounding
    assert [(row["replay"], row["attention"]) for row in sdpa] == [("ttt", "sdpa"), ("rooted", "sdpa")]
    assert all(row["status"].startswith("equal") for row in sdpa)
    assert ttt["logprob_vs_fp32"] > 0  # bf16 rounding shows against the fp32 replay
    assert "under bf16 autocast" in (out / "gto_learner_step.md").read_text()
