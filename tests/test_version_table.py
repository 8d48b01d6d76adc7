"""``bench/version_table.py`` on the committed reports of the ninth session's H200 A/B (an older checkout
against this tree): which figure each report gives, ratios oriented so that > 1 means the new tree is
better, a part run at one checkout only, and a file that is not a version report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.version_table import load, main, rows

RUN = Path(__file__).resolve().parents[1] / "bench/results/throughput_h200/ninth_versions/run1"


def test_the_table_lines_up_old_and_new_with_ratios_where_more_is_better(tmp_path):
    reports = sorted(RUN.glob("*_learner.json")) + sorted(RUN.glob("*_gto.json")) + sorted(RUN.glob("*_summary.json"))
    assert main([str(tmp_path), *map(str, reports)]) == 0
    table = {(r["part"], r["measure"]): r for r in json.loads((tmp_path / "versions.json").read_text())}
    step = table[("learner", "step ms (median)")]
    assert step["old"] == pytest.approx(187.2, abs=0.05) and step["new"] == pytest.approx(169.0, abs=0.05)
    assert step["speed_up"] == pytest.approx(step["old"] / step["new"])  # less time: > 1
    updates = table[("ray", "updates/s")]
    assert updates["speed_up"] == pytest.approx(updates["new"] / updates["old"]) and updates["speed_up"] > 1
    assert table[("ray", "learner busy")]["speed_up"] is None  # neither direction is better in itself
    assert table[("gto", "s / batch (median)")]["old"] == pytest.approx(0.6135, abs=5e-4)
    text = (tmp_path / "versions.md").read_text()
    assert "| learner | step ms (median) | 187.2 | 169 | 1.107x |" in text


def test_a_part_run_at_one_checkout_only_has_no_ratio(tmp_path):
    shutil.copy(RUN / "new_learner.json", tmp_path / "new_learner.json")
    table = rows(load([tmp_path / "new_learner.json"]))
    assert {r["measure"] for r in table} == {"step ms (median)", "replay ms (median)", "peak GiB"}
    assert all(r["old"] is None and r["speed_up"] is None and r["new"] is not None for r in table)


def test_a_file_that_is_not_a_version_report_is_refused(tmp_path):
    (tmp_path / "learner.json").write_text("{}")
    with pytest.raises(ValueError, match="not a version report"):
        load([tmp_path / "learner.json"])
