"""bench/actor_table.py on two committed H200 runs (sixth session, one and two rollout actors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.actor_table import main, ray_settings, row

RUNS = Path(__file__).resolve().parent.parent / "bench" / "results" / "throughput_h200" / "sixth_ray_actors"


def test_rows_read_the_actor_count_from_the_overrides_and_the_sizes() -> None:
    one = row("one", json.loads((RUNS / "one_actor_summary.json").read_text()))
    two = row("two", json.loads((RUNS / "two_actors_summary.json").read_text()))
    assert (one["actors"], two["actors"]) == (1, 2)  # --ray-set for one, the bench's size for two
    assert one["updates"] == 78 and abs(one["updates_per_s"] - 1.1855) < 1e-3
    assert ray_settings(["x", "--ray-set", "a.b=1", "--set", "c=2", "--ray-set", "d=e=f"]) == {"a.b": "1", "d": "e=f"}


def test_table_has_a_ratio_to_the_first_row_and_a_line_for_a_failed_run(tmp_path: Path) -> None:
    paths = []
    for name, source in (("two", "two_actors_summary.json"), ("one", "one_actor_summary.json")):
        (tmp_path / name).mkdir()
        paths.append(shutil.copy(RUNS / source, tmp_path / name / "summary.json"))
    failed = json.loads((RUNS / "one_actor_summary.json").read_text())
    failed["ray"]["async"] = {"error": "OutOfMemoryError: CUDA out of memory"}
    (tmp_path / "oom").mkdir()
    (tmp_path / "oom" / "summary.json").write_text(json.dumps(failed))
    main([str(tmp_path / "out"), *map(str, paths), str(tmp_path / "oom" / "summary.json")])
    lines = (tmp_path / "out" / "actors.md").read_text().splitlines()
    assert "| two | 2 | 2 | 73 | 1.211 | 1.000x |" in lines[2]
    assert "| one | 1 | 2 | 78 | 1.186 | 0.979x |" in lines[3]
    assert lines[4].startswith("| oom | failed: OutOfMemoryError")
    assert len(json.loads((tmp_path / "out" / "actors.json").read_text())) == 3


def test_a_summary_without_a_ray_run_is_named() -> None:
    with pytest.raises(ValueError, match="norun: summary has no ray.async run"):
        row("norun", {"ray": {}, "errors": {"ray_async": "boom"}})
