"""``speculative.timing``: the one path that times speculation against AR (CPU, tiny random target)."""

from __future__ import annotations

import importlib.util
import inspect
import time
from pathlib import Path

import pytest

import speculative.timing as timing
import tools.benchmark as benchmark
from speculative.engine import SpeculativeGenerator
from speculative.target import TargetModel
from speculative.timing import autoregressive_decoder, measure_speedup, speculative_decoder, warm_up
from speculative.tree import TreeConfig
from tests.conftest import tiny_drafter, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN = 64
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def decoders():
    target = TargetModel(tiny_llama(vocab_size=96, hidden=32, layers=8))
    engine = SpeculativeGenerator(target, tiny_drafter(target, seed=1), TreeConfig(depth=3, top_k=3, total_tokens=8),
                                  compile="static", max_len=MAX_LEN)
    ars = {"batch": autoregressive_decoder(target, "batch", compile="static", max_len=MAX_LEN),
           "static": autoregressive_decoder(target, "static", compile="static", max_len=MAX_LEN, engine=engine)}
    return speculative_decoder(engine), ars


def _single_turn(generate, prompt):
    return [generate(prompt, 0)]


BENCHES = {"a": [[1, 5, 9, 2], [3, 4, 7, 8, 10, 11], [12, 13]], "b": [[20, 21, 22, 23, 24], [30, 31]]}


def test_fields_tau_equality_order_and_spread(decoders):
    spec, ars = decoders
    assert warm_up([spec, *ars.values()], [1, 2, 3], 8, set(), rounds=1, prompts=[p for qs in BENCHES.values()
                                                                                for p in qs]) == 4  # lengths
    calls, pairs = [], []

    def spy(name, decoder):
        def call(ids, n, eos):
            calls.append(name)
            return decoder(ids, n, eos)
        call.name = name
        return call

    measurement = measure_speedup(
        spy("spec", spec), {"batch": spy("batch", ars["batch"]), "static": spy("static", ars["static"])}, BENCHES,
        _single_turn, max_new_tokens=10, eos=set(), temperature=0.0, repeats=2,
        on_pair=lambda *args: pairs.append(args), device=None,
    )
    assert not measurement.stopped_early and measurement.repeats_asked == 2
    assert len(pairs) == 2 * 5 and len(calls) == 3 * 2 * 5
    # benches round-robin per question index; spec first on even parity, AR first on odd
    assert [p[0] for p in pairs[:5]] == ["a", "b", "a", "b", "a"]
    firsts = [calls[3 * i] for i in range(10)]
    assert firsts[0] == "spec" and firsts[1] == "static" and firsts[5] != firsts[0]
    assert calls[3:6] == ["static", "batch", "spec"]  # odd: the reverse order, every pair swapped
    summaries = {s["bench"]: s for s in measurement.summaries()}
    assert set(summaries) == {"a", "b"}
    for name, s in summaries.items():
        accepted = [a for p in pairs if p[0] == name for turn in p[4] for a in turn.accept_lengths]
        assert s["verify_forwards"] == len(accepted) and s["accepted_tokens"] == sum(accepted)
        assert s["tau"] == pytest.approx(1 + sum(accepted) / len(accepted), abs=1e-4)
        assert s["questions"] == len(BENCHES[name]) and s["generations"] == len(BENCHES[name])
        assert s["timed_generations"] == 2 * len(BENCHES[name])
        assert s["mismatches"] == 0  # float32: speculation reproduces the AR greedy text
        assert s["repeats"] == s["complete_repeats"] == 2 and len(s["per_repeat"]) == 2
        assert s["ar_engine"] == "batch" and set(s["other_ar_tokens_per_s"]) == {"static"}
        for key in ("spec_tokens_per_s", "baseline_tokens_per_s", "speedup"):
            spread = s["spread"][key]
            assert spread["n"] == 2 and spread["min"] <= spread["mean"] <= spread["max"]
        assert s["speedup"] == pytest.approx(s["spec_tokens_per_s"] / s["baseline_tokens_per_s"], rel=1e-3)
        assert s["spec_tokens"] == s["baseline_tokens"] == sum(len(p[5][0].tokens) for p in pairs if p[0] == name)
    assert [g["when"] for g in measurement.gpu] == ["before", "after"] * 2
    table = timing.markdown_summary(measurement)
    assert "| a | 0 |" in table and "AR `static`" in table


def test_deadline_stops_cleanly_and_spec_only(decoders):
    spec, ars = decoders
    cut = measure_speedup(spec, ars["batch"], BENCHES, _single_turn, max_new_tokens=4, eos=set(),
                          repeats=3, deadline=time.perf_counter() - 1)
    assert cut.stopped_early and len(cut.benches["a"].repeats) == 1
    assert all(s["questions"] == 0 and s["complete_repeats"] == 0 for s in cut.summaries())
    first = []
    measure_speedup(lambda *a: first.append("spec") or spec(*a), lambda *a: first.append("ar") or ars["batch"](*a),
                    {"a": BENCHES["a"][:2]}, _single_turn, max_new_tokens=2, eos=set(), order="ar-first")
    assert first == ["ar", "spec", "ar", "spec"]
    alone = measure_speedup(spec, None, {"a": BENCHES["a"][:1]}, _single_turn, max_new_tokens=4, eos=set())
    s = alone.summaries()[0]
    assert s["speedup"] is None and s["mismatches"] is None and s["tau"] >= 1


def test_ar_engines_and_gpu_state():
    assert timing.parse_ar_engines("batch,static") == ["batch", "static"]
    with pytest.raises(ValueError):
        timing.parse_ar_engines("fast")
    assert timing.DEFAULT_AR_ENGINE == "batch"
    assert timing.gpu_state("cpu") == {}


def test_both_entry_points_time_through_the_same_function():
    """``draftrl eval`` and the study's ``bench/compare_drafters.py`` (and ``bench/one_bench.py``)
    call ``speculative.timing.measure_speedup``; their old timing loops are gone."""
    modules = {}
    for name in ("compare_drafters", "one_bench"):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
        assert module.measure_speedup is measure_speedup
    compare = modules["compare_drafters"]
    for old in ("_score_bench", "score_autoregressive", "_engine"):
        assert not hasattr(compare, old), old
    assert not hasattr(benchmark, "BlockStats")
    assert "measure_speedup(" in inspect.getsource(benchmark.run_eval)
    assert "measure_speedup(" in inspect.getsource(compare.score_drafter)
    for source in (inspect.getsource(benchmark.run_eval), inspect.getsource(compare)):
        assert "generate_autoregressive" not in source and "wall_time" not in source


def test_one_bench_writes_summary_and_spread(tmp_path):
    """``bench/one_bench.py`` end to end on the shipped benches (1 question each, 2 repeats)."""
    import json

    from speculative.checkpoint import save_drafter
    from speculative.target import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=8)
    model.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    save_drafter(tiny_drafter(TargetModel(model), seed=1), tmp_path / "drafter")
    spec = importlib.util.spec_from_file_location("_bench_one_bench_run", REPO_ROOT / "bench" / "one_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    assert module.main(["--target", str(tmp_path / "target"), "--drafter", str(tmp_path / "drafter"),
                        "--out", str(out), "--num-prompts", "1", "--max-new-tokens", "4", "--repeats", "2",
                        "--ar-engine", "batch,static", "--depth", "3", "--top-k", "3", "--total-tokens", "8",
                        "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    benches = {b["bench"]: b for b in summary["measurement"]["benches"]}
    assert set(benches) == {"mt_bench", "humaneval", "gsm8k"}
    assert all(b["complete_repeats"] == 2 and b["spread"]["speedup"]["n"] == 2 for b in benches.values())
    assert benches["mt_bench"]["generations"] == 2  # two turns
    assert summary["config"]["ar_engine"] == ["batch", "static"] and summary["config"]["compile"] == "off"
    table = (out / "summary.md").read_text()
    assert "| gsm8k | 0 |" in table and "AR `static`" in table


def test_several_speculative_decoders_share_one_ar_baseline(decoders):
    """A tree sweep: ``spec`` as ``{name: decoder}``, every one against the same AR generations."""
    spec, ars = decoders
    target = spec.engine.target
    other = speculative_decoder(SpeculativeGenerator(target, spec.engine.drafter, TreeConfig(2, 2, 3),
                                                     compile="static", max_len=MAX_LEN))
    calls, pairs = [], []

    def spy(name, decoder):
        def call(ids, n, eos):
            calls.append(name)
            return decoder(ids, n, eos)
        return call

    benches = {"a": BENCHES["a"][:2]}
    measurement = measure_speedup({"3x3x8": spy("t1", spec), "2x2x3": spy("t2", other)}, spy("ar", ars["batch"]),
                                  benches, _single_turn, max_new_tokens=6, eos=set(), temperature=0.0,
                                  on_pair=lambda *args: pairs.append(args))
    assert calls == ["t1", "t2", "ar", "ar", "t2", "t1"]  # odd questions: the reverse order
    assert set(measurement.benches) == {("3x3x8", "a"), ("2x2x3", "a")}
    summaries = {s["spec"]: s for s in measurement.summaries()}
    assert set(summaries) == {"3x3x8", "2x2x3"}
    assert summaries["3x3x8"]["baseline_time_s"] == summaries["2x2x3"]["baseline_time_s"]  # one AR baseline
    for s in summaries.values():
        assert s["tau"] >= 1 and s["questions"] == 2 and s["mismatches"] == 0
        assert s["cycle_ms"] == pytest.approx(1000 * s["spec_time_s"] / s["verify_forwards"], rel=1e-3)
    assert summaries["2x2x3"]["tau"] <= 3  # depth 2: at most 2 accepted + the bonus
    assert all(set(p[4]) == {"3x3x8", "2x2x3"} for p in pairs)  # on_pair: {name: turns}
    assert "a `2x2x3`" in timing.markdown_summary(measurement)
    with pytest.raises(ValueError, match="empty"):
        measure_speedup({}, ars["batch"], benches, _single_turn, max_new_tokens=2, eos=set())
