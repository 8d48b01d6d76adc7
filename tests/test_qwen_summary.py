"""``bench/qwen_summary.py`` rebuilds the committed Qwen run summary from the committed result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.qwen_summary import build

RUN = Path(__file__).resolve().parents[1] / "bench" / "results" / "qwen_coder_1.5b_h200"


def _assert_rebuilt(run: Path) -> dict:
    summary = build([run / "eval_t0", run / "eval_t1"], run / "sft", RUN / "regen" / "manifest.json")
    committed = json.loads((run / "summary.json").read_text())
    for key in ("tau_t0", "speedup_t0", "tau_t1", "speedup_t1", "ar_tok_s"):
        assert summary[key] == committed[key], key
    results = json.loads((run / "eval_t0" / "results.json").read_text())["results"]
    assert summary["tau_t0"] == pytest.approx(sum(r["tau"] for r in results) / len(results), abs=1e-4)
    humaneval = summary["per_bench_t0"]["humaneval"]
    assert humaneval["questions"] == 80
    assert summary["targets_met"]["tau_t0_humaneval"] is (humaneval["tau"] >= 3.5)
    assert summary["regen"]["conversations"] == 2514
    return summary


def test_summary_is_rebuilt_from_the_committed_files():
    """Run 4 (the newest, top level) timed T = 0 and T = 1 on all 80 questions, without a profile."""
    summary = _assert_rebuilt(RUN)
    assert "profile" not in summary
    assert all(bench["questions"] == 80 for bench in summary["per_bench_t1"].values())


def test_run3_summary_with_its_profile_is_rebuilt():
    summary = _assert_rebuilt(RUN / "run3")
    assert summary["profile"]["cycle_in_ar_steps"] == pytest.approx(
        summary["profile"]["clean_cycle_ms"] / summary["profile"]["clean_ar_step_ms"], abs=1e-3)


def test_summary_names_the_engine_paths_when_the_run_recorded_them(tmp_path):
    """Runs since run 3 record ``span_step`` and ``greedy_verify`` (the A/B switches); run 2 did not."""
    assert "greedy_verify" not in build([RUN / "run2" / "eval_t0"], None, None)
    recorded = build([RUN / "run3" / "eval_t0"], None, None)
    assert (recorded["span_step"], recorded["greedy_verify"]) == (128, "pipelined")
    folder = tmp_path / "eval_t0"
    folder.mkdir()
    results = json.loads((RUN / "run3" / "eval_t0" / "results.json").read_text())
    results["config"].update(span_step=None, greedy_verify="host")
    (folder / "results.json").write_text(json.dumps(results))
    summary = build([folder], None, None)
    assert (summary["span_step"], summary["greedy_verify"]) == (None, "host")


def test_run2_summary_is_rebuilt_from_its_files():
    run2 = RUN / "run2"
    summary = build([run2 / "eval_t0", run2 / "eval_t1"], run2 / "sft", RUN / "regen" / "manifest.json")
    committed = json.loads((run2 / "summary.json").read_text())
    for key in ("tau_t0", "speedup_t0", "tau_t1", "speedup_t1", "ar_tok_s"):
        assert summary[key] == committed[key], key
