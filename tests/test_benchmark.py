"""``draftrl eval`` / ``draftrl generate``: benchmark prompts, multi-turn flow, reports (CPU, tiny models)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import speculative.data

from tools.benchmark import (
    TREE_DEFAULTS,
    BenchmarkError,
    BenchQuestion,
    answer_text,
    chat_prompt,
    check_dtypes,
    eos_token_ids,
    load_questions,
    resolve_bench,
    run_conversation,
)
from tools.cli import main
from speculative.checkpoint import save_drafter
from speculative.target import TargetModel, load_tokenizer
from speculative.tree import TreeConfig
from tests.conftest import graphs_on_cpu, stub_cuda_capture, tiny_drafter, tiny_llama

SHIPPED = ("mt_bench", "humaneval", "gsm8k")
TREE_ARGS = ["--depth", "3", "--top-k", "3", "--total-tokens", "8", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A random Llama with SmolLM2's vocabulary and tokenizer, and a drafter saved for it."""
    root = tmp_path_factory.mktemp("bench_models")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=8)
    model.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    save_drafter(tiny_drafter(TargetModel(model), seed=1), root / "drafter")
    return root / "target", root / "drafter"


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def two_turn_file(tmp_path):
    return _write(tmp_path / "chat.jsonl", [
        {"question_id": 7, "category": "writing", "turns": ["Tell me a joke.", "Now explain it."]},
        {"question_id": 8, "category": "math", "turns": ["What is 2 + 2?", "And 3 + 3?"]},
    ])


def test_load_and_resolve_questions(tmp_path, monkeypatch):
    path = _write(tmp_path / "mini.jsonl", [
        {"question_id": i, "category": "c", "turns": [f"q{i}"], "reference": ["x"]} for i in range(3)
    ] + [""])
    questions = load_questions(path)
    assert [q.question_id for q in questions] == [0, 1, 2] and questions[0].turns == ["q0"]
    assert questions[0].bench == "mini" and len(load_questions(path, limit=2)) == 2
    assert resolve_bench("mini", tmp_path) == ("mini", tmp_path / "mini.jsonl")
    assert resolve_bench(str(path)) == ("mini", path)
    monkeypatch.setenv("DRAFTRL_BENCH_DIR", str(tmp_path))
    assert resolve_bench("mini") == ("mini", tmp_path / "mini.jsonl")
    with pytest.raises(BenchmarkError, match=r"'nope' not found.*\['mini'\]"):
        resolve_bench("nope")
    with pytest.raises(BenchmarkError, match="not found"):
        resolve_bench(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"question_id": 2, "turns": ["a"', "not valid JSON"),
        ('{"question_id": 2, "category": "x"}', "'turns' must be a non-empty list"),
        ('{"question_id": 2, "turns": []}', "'turns' must be a non-empty list"),
        ('{"question_id": 2, "turns": ["fine", 3]}', "turn 1 is not a non-empty string"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_malformed_question_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.jsonl", [{"question_id": 1, "turns": ["ok"]}, bad])
    with pytest.raises(BenchmarkError, match=message) as error:
        load_questions(path)
    assert f"{path}:2:" in str(error.value)


def test_shipped_benchmarks_load(monkeypatch):
    """The prompts ship inside the package: found with no flag, no env var and no folder beside the clone."""
    monkeypatch.delenv("DRAFTRL_BENCH_DIR", raising=False)
    package_dir = Path(speculative.data.__file__).parent / "bench"
    paths = [resolve_bench(name)[1] for name in SHIPPED]
    assert all(path.parent == package_dir for path in paths), paths
    assert (package_dir / "LICENSES.md").is_file()
    for path in paths:
        questions = load_questions(path)
        assert len(questions) == 80 and len({q.question_id for q in questions}) == 80
    assert all(len(q.turns) == 2 for q in load_questions(paths[0]))  # MT-Bench: two turns


def test_eval_runs_on_the_shipped_benchmarks_by_default(tmp_path, models, monkeypatch):
    """``draftrl eval`` with no --bench and no --bench-dir: what a fresh clone runs."""
    monkeypatch.delenv("DRAFTRL_BENCH_DIR", raising=False)
    target_dir, drafter_dir = models
    out = tmp_path / "eval"
    assert main(["eval", "--drafter", str(drafter_dir), "--target", str(target_dir), "--num-prompts", "1",
                 "--temperature", "0", "--max-new-tokens", "3", "--out", str(out), *TREE_ARGS]) == 0
    blocks = json.loads((out / "results.json").read_text())["results"]
    assert [b["bench"] for b in blocks] == list(SHIPPED)
    assert [b["generations"] for b in blocks] == [2, 1, 1]  # MT-Bench's question has two turns
    assert all(b["mismatches"] == 0 for b in blocks)


def test_tree_defaults_match_the_engine():
    default = TreeConfig()
    assert TREE_DEFAULTS == {"depth": default.depth, "top_k": default.top_k, "total_tokens": default.total_tokens}


def test_chat_prompt_and_stop_tokens(tokenizer):
    ids, text = chat_prompt(tokenizer, [{"role": "user", "content": "Hi there"}])
    assert text.endswith("<|im_start|>assistant\n") and "Hi there" in text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = eos_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    tokens = tokenizer("Paris is lovely.", add_special_tokens=False)["input_ids"]
    assert answer_text(tokenizer, tokens + [min(eos)], eos) == "Paris is lovely."


@dataclass
class _Fake:
    tokens: list[int]
    wall_time: float = 0.01
    accept_lengths: tuple = ()


def test_second_turn_follows_the_models_own_first_answer(tokenizer):
    """MT-Bench protocol: turn 2's prompt holds the answer the *same* decoder gave to turn 1."""
    eos = eos_token_ids(tokenizer)
    answers = iter(["The answer is forty-two.", "Because six times seven."])
    prompts = []

    def generate(ids, turn):
        prompts.append((turn, ids))
        return _Fake(tokenizer(next(answers), add_special_tokens=False)["input_ids"] + [min(eos)])

    question = BenchQuestion(1, "reasoning", ["What is the answer?", "Why?"])
    turns = run_conversation(generate, tokenizer, question, eos)
    assert [t.text for t in turns] == ["The answer is forty-two.", "Because six times seven."]
    assert [turn for turn, _ in prompts] == [0, 1]
    second = turns[1].prompt_text
    assert second.index("What is the answer?") < second.index("The answer is forty-two.") < second.index("Why?")
    assert tokenizer.decode(prompts[1][1]) == second


def test_eval_end_to_end(tmp_path, models, two_turn_file, capsys):
    target_dir, drafter_dir = models
    out = tmp_path / "eval"
    code = main([
        "eval", "--drafter", str(drafter_dir), "--target", str(target_dir), "--bench", str(two_turn_file),
        "--temperature", "0,1", "--max-new-tokens", "6", "--out", str(out), *TREE_ARGS,
    ])
    assert code == 0
    assert "| chat | 0 |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["tree"]["depth"] == 3 and results["config"]["compile"] == "off"
    blocks = {b["temperature"]: b for b in results["results"]}
    assert set(blocks) == {0.0, 1.0}
    for block in blocks.values():
        assert block["bench"] == "chat" and block["questions"] == 2 and block["generations"] == 4
        assert block["tau"] >= 1.0 and block["spec_tokens"] > 0 and block["baseline_tokens"] > 0
        assert block["spec_tokens_per_s"] > 0 and block["speedup"] > 0
        assert sum(block["accept_histogram"]) == block["verify_forwards"]
    assert blocks[0.0]["mismatches"] == 0 and blocks[1.0]["mismatches"] is None
    assert "| chat | 1 |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for first, second in zip(records[::2], records[1::2]):
        assert (first["turn"], second["turn"]) == (0, 1)
        for side in ("spec", "baseline"):  # each run continues its own conversation
            assert second[side]["prompt"].startswith(first[side]["prompt"])
            assert first[side]["text"] in second[side]["prompt"]
        if first["temperature"] == 0:
            assert first["identical"] and second["identical"]


def test_eval_tree_sweep(tmp_path, models, two_turn_file, capsys):
    """``--trees``: one tree engine per shape on the loaded models, all against the same AR runs."""
    target_dir, drafter_dir = models
    out = tmp_path / "sweep"
    assert main(["eval", "--drafter", str(drafter_dir), "--target", str(target_dir), "--bench", str(two_turn_file),
                 "--temperature", "0", "--max-new-tokens", "5", "--compile", "static", "--threads", "1",
                 "--trees", "3x3x8,2x2x3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["config"]["trees"]) == ["3x3x8", "2x2x3"]
    blocks = {b["spec"]: b for b in results["results"]}
    assert list(blocks) == ["3x3x8", "2x2x3"] and len(results["results"]) == 2  # one row per tree
    for block in blocks.values():
        assert block["bench"] == "chat" and block["tau"] >= 1 and block["generations"] == 4
        assert block["mismatches"] == 0 and block["speedup"] > 0 and block["cycle_ms"] > 0
    assert blocks["3x3x8"]["baseline_time_s"] == blocks["2x2x3"]["baseline_time_s"]  # one AR baseline
    best = results["best_tree"]
    assert best["overall"]["tree"] == max(blocks, key=lambda t: blocks[t]["speedup"])
    table = (out / "results.md").read_text()
    assert table.startswith("# Tree sweep") and "| `3x3x8` | chat | 0 |" in table and "| `2x2x3` | chat | 0 |" in table
    assert f"best overall: `{best['overall']['tree']}`" in table and "Tree sweep" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert sorted({r["tree"] for r in records}) == ["2x2x3", "3x3x8"] and len(records) == 8


@pytest.mark.parametrize("value", ["6x10", "0x1x1", "a,b", "6x10x59,6x10x59", "6x10x59,"])
def test_eval_trees_malformed_fails_early(value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--drafter", "/nonexistent", "--trees", value])
    assert stop.value.code == 2
    assert "--trees" in capsys.readouterr().err


def test_eval_trees_too_many_tokens_fails_before_loading(capsys):
    assert main(["eval", "--drafter", "/nonexistent", "--trees", "6x10x59,6x2x59"]) == 2
    assert "--trees 6x2x59: a depth-6 top-2 tree has only 22 candidate nodes" in capsys.readouterr().err
    assert main(["eval", "--drafter", "/nonexistent", "--trees", "3x3x8", "--profile", "2"]) == 2
    assert "--trees" in capsys.readouterr().err


def test_eval_static_path_and_check_mode(tmp_path, models, two_turn_file):
    """The fixed-shape path (what CUDA graphs replay) through the CLI, and the self-check."""
    target_dir, drafter_dir = models
    common = ["--drafter", str(drafter_dir), "--target", str(target_dir), *TREE_ARGS]
    out = tmp_path / "static"
    assert main(["eval", *common, "--bench", str(two_turn_file), "--temperature", "0",
                 "--max-new-tokens", "5", "--compile", "static", "--out", str(out)]) == 0
    block = json.loads((out / "results.json").read_text())["results"][0]
    assert block["mismatches"] == 0 and block["generations"] == 4
    fast = tmp_path / "static_fast"  # the A/B alternatives: FastLlama, the whole cache, host verification
    assert main(["eval", *common, "--bench", str(two_turn_file), "--temperature", "0", "--max-new-tokens", "5",
                 "--compile", "static", "--target-forward", "fast", "--span-step", "0", "--greedy-verify", "host",
                 "--out", str(fast)]) == 0
    results = json.loads((fast / "results.json").read_text())
    assert results["config"]["target_forward"] == "fast" and results["results"][0]["mismatches"] == 0
    assert results["config"]["span_step"] is None and results["config"]["greedy_verify"] == "host"
    default = json.loads((out / "results.json").read_text())["config"]
    assert (default["target_forward"], default["span_step"], default["greedy_verify"]) == ("fused", 128, "pipelined")
    assert json.loads((fast / "results.json").read_text())["results"][0]["tau"] == block["tau"]
    unpipelined = tmp_path / "static_device"  # acceptance on the device, the catch-up replayed by the host
    assert main(["eval", *common, "--bench", str(two_turn_file), "--temperature", "0", "--max-new-tokens", "5",
                 "--compile", "static", "--greedy-verify", "device", "--out", str(unpipelined)]) == 0
    results = json.loads((unpipelined / "results.json").read_text())
    assert results["config"]["greedy_verify"] == "device" and results["results"][0]["mismatches"] == 0
    assert results["results"][0]["tau"] == block["tau"]
    assert default["sampled_verify"] == "pipelined"
    sampled = tmp_path / "static_sampled"  # T > 0: rejection sampling in the draft+verify step, host catch-up
    assert main(["eval", *common, "--bench", str(two_turn_file), "--temperature", "1", "--max-new-tokens", "5",
                 "--compile", "static", "--sampled-verify", "device", "--out", str(sampled)]) == 0
    results = json.loads((sampled / "results.json").read_text())
    assert results["config"]["sampled_verify"] == "device" and results["results"][0]["generations"] == 4
    with pytest.raises(SystemExit):  # a span that is not a multiple of 64 slows every layer's SDPA
        main(["eval", *common, "--bench", str(two_turn_file), "--span-step", "100", "--out", str(tmp_path / "x")])
    check = tmp_path / "check"
    assert main(["eval", "--check", *common, "--bench", str(two_turn_file), "--max-new-tokens", "8",
                 "--out", str(check)]) == 0
    report = json.loads((check / "check.json").read_text())
    assert not report["failures"]
    assert {(r["mode"], r["kind"]) for r in report["runs"]} == {
        (m, k) for m in ("off", "static") for k in ("autoregressive", "speculative")
    }
    assert all(r["identical_to_eager_greedy"] for r in report["runs"])


def test_check_reports_a_path_that_fell_back(tmp_path, models, two_turn_file, monkeypatch, capsys):
    """``draftrl eval --check`` must not claim a path it did not run: the graph engine's T = 1 rebuild
    (rejection sampling in the cycle graphs) fails to capture (an injected fault, as on the H200 in
    float32), the engine falls back to ``static``, and the check prints it, records it in check.json
    and fails. ``compile='graph'`` runs on CPU here: the capture sequence with stand-ins for the CUDA
    calls, then the steps eagerly."""
    import contextlib

    import speculative.engine
    import tools.benchmark
    from speculative.graphs import StaticDecoder

    target_dir, drafter_dir = models
    resolve = speculative.engine.resolve_compile_mode
    monkeypatch.setattr(speculative.engine, "resolve_compile_mode",
                        lambda mode, device: mode if mode == "graph" else resolve(mode, device))
    monkeypatch.setattr(tools.benchmark, "check_modes", lambda device, compile: ["off", "static", "graph"])
    monkeypatch.setattr(StaticDecoder, "__init__", graphs_on_cpu(StaticDecoder.__init__))
    capture, failing = StaticDecoder._capture, []

    def flagged_capture(self, key, fn, reset=None):
        failing[:] = [self.sampling and key[0] == "cycle"]
        return capture(self, key, fn, reset)

    @contextlib.contextmanager
    def graph(graph, **kwargs):  # the injected fault
        yield
        if failing[0]:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture (injected)")

    stub_cuda_capture(monkeypatch, graph)
    monkeypatch.setattr(StaticDecoder, "_capture", flagged_capture)
    check = tmp_path / "check"
    with pytest.warns(UserWarning, match="compile='graph' failed"):
        code = main(["eval", "--check", "--drafter", str(drafter_dir), "--target", str(target_dir), *TREE_ARGS,
                     "--bench", str(two_turn_file), "--max-new-tokens", "8", "--check-dtypes", "float32",
                     "--out", str(check)])
    assert code == 1
    report = json.loads((check / "check.json").read_text())
    assert report["dtypes"] == ["float32"]
    # T = 0: every path ran as named (graph: the captured steps, eagerly) and equals eager greedy
    assert all(r["identical_to_eager_greedy"] and r["fell_back_to"] is None for r in report["runs"])
    assert {r["mode"] for r in report["runs"]} == {"off", "static", "graph"}
    sampled = {r["mode"]: r for r in report["sampling_runs"]}
    assert sampled["static"]["fell_back_to"] is None and sampled["static"]["ok"]
    fell = sampled["graph"]
    assert fell["fell_back_to"] == "static" and fell["ok"] and len(fell["compile_errors"]) == 1
    assert "capture of CUDA graph ('cycle', " in fell["compile_errors"][0]
    assert "target float32, drafter float32, sampling on" in fell["compile_errors"][0]
    assert report["failures"] == [f"float32 graph T=1 speculative: fell back to static: {fell['compile_errors']}"]
    out = capsys.readouterr().out
    assert "[check] float32  graph  T=1 speculative FELL BACK to static (8 tokens" in out
    assert "[check] FAILED" in out and "T=1 speculative ok" in out  # (the static engine's)


def test_check_dtypes_option(models, capsys):
    assert check_dtypes("bfloat16, float32") == ["bfloat16", "float32"]  # in the order given
    for bad in ("float32,float32", "fp8", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            check_dtypes(bad)
    target_dir, drafter_dir = models
    assert main(["eval", "--check", "--drafter", str(drafter_dir), "--target", str(target_dir),
                 "--check-dtypes", "float32", "--dtype", "bfloat16"]) == 2  # both pick the dtypes
    assert "give one of them" in capsys.readouterr().err


def test_generate_prompt_and_jsonl(tmp_path, models, two_turn_file, capsys):
    target_dir, drafter_dir = models
    common = ["--target", str(target_dir), "--max-new-tokens", "4", *TREE_ARGS]
    assert main(["generate", "Say hello.", "--drafter", str(drafter_dir), *common]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "tau" in captured.err
    answers = tmp_path / "answers.jsonl"
    assert main(["generate", "--input", str(two_turn_file), "--out", str(answers), *common]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [7, 8] and all(len(r["answers"]) == 2 for r in rows)
    assert main(["generate", *common]) == 2  # neither a prompt nor --input
    assert main(["generate", "--input", "no_such_bench", "--bench-dir", str(tmp_path), *common]) == 2


def test_eval_profile_counts_every_phase(tmp_path, models, two_turn_file, capsys):
    """``draftrl eval --profile 1``: one range per phase instance, cross-checked with the timed run's
    generations (same seeds at T = 0, so the profiled pass decodes the same tokens)."""
    import gzip

    target_dir, drafter_dir = models
    out = tmp_path / "eval"
    assert main(["eval", "--drafter", str(drafter_dir), "--target", str(target_dir), "--bench", str(two_turn_file),
                 "--temperature", "0", "--max-new-tokens", "6", "--ar-engine", "batch,static", "--profile", "1",
                 "--out", str(out), *TREE_ARGS]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["config"]["questions"] == [7] and report["config"]["device_times"] is False
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    first = [r for r in records if r["question_id"] == 7]
    assert [r["turn"] for r in first] == [0, 1]
    cycles = sum(len(r["spec"]["accept_lengths"]) for r in first)  # one verification forward per cycle
    entered = sum(1 for r in first if r["spec"]["accept_lengths"])  # generations with at least one cycle
    assert cycles > entered  # some cycles caught up: the counts below can tell the phases apart

    spec = report["decoders"]["spec"]
    counts = {name: row["count"] for name, row in spec["ranges"].items()}
    assert counts == {"spec/prefill": 2, "spec/drafter_prefill": entered, "spec/draft_verify": cycles,
                      "spec/verify_host": cycles, "spec/catch_up": cycles - entered}  # the last cycle: no catch-up
    assert [g["verifications"] for g in spec["generations"]] == [len(r["spec"]["accept_lengths"]) for r in first]
    assert [g["tokens"] for g in spec["generations"]] == [r["spec"]["tokens"] for r in first]
    assert spec["per_cycle"]["cycles"] == cycles and spec["per_cycle"]["cycle_wall_ms"] > 0
    assert all(row["device_total_ms"] is None and row["cpu_total_ms"] > 0 for row in spec["ranges"].values())
    assert spec["top_ops"] and len(spec["top_ops"]) <= 25

    baseline = [r["baseline"]["tokens"] for r in first]
    assert baseline == [6, 6]  # no EOS inside a window of batched steps: one step per token after the first
    for name in ("batch", "static"):
        ar = report["decoders"][name]
        assert [g["tokens"] for g in ar["generations"]] == baseline
        assert ar["ranges"]["ar/prefill"]["count"] == 2
        assert ar["ranges"]["ar/decode"]["count"] == sum(t - 1 for t in baseline)  # the prefill samples one
        assert ar["per_step"]["steps"] == sum(t - 1 for t in baseline) and not any(
            key.startswith("spec/") for key in ar["ranges"])

    md = (out / "profile.md").read_text()
    assert "## Per speculative cycle" in md and "| `spec/draft_verify` |" in md and "| `batch` | 10 |" in md
    trace = out / "profile_trace.json.gz"
    assert trace.stat().st_size < 16 * 2**20
    names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert {"spec/draft_verify", "spec/catch_up", "ar/decode"} <= names


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_profile_of_pipelined_cycles(models, two_turn_file, tmp_path, temperature):
    """The static path pipelines its cycles (T = 0, and T > 0 with top-k trees): one launch more
    than the cycles read per generation, no separate catch-up, and the report's cycles are the
    ones read."""
    target_dir, drafter_dir = models
    out = tmp_path / "eval"
    assert main(["eval", "--drafter", str(drafter_dir), "--target", str(target_dir), "--bench", str(two_turn_file),
                 "--temperature", temperature, "--max-new-tokens", "6", "--compile", "static", "--profile", "1",
                 "--out", str(out), *TREE_ARGS]) == 0
    first = [r for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())
             if r["question_id"] == 7]
    cycles = sum(len(r["spec"]["accept_lengths"]) for r in first)
    entered = sum(1 for r in first if r["spec"]["accept_lengths"])
    spec = json.loads((out / "profile.json").read_text())["decoders"]["spec"]
    counts = {name: row["count"] for name, row in spec["ranges"].items()}
    assert counts == {"spec/prefill": 2, "spec/drafter_prefill": entered, "spec/draft_verify": cycles + entered,
                      "spec/verify_host": cycles}
    assert (spec["per_cycle"]["cycles"], spec["per_cycle"]["launched"]) == (cycles, cycles + entered)
    assert "Pipelined cycles" in (out / "profile.md").read_text()


def test_profile_phases_are_free_when_not_recording():
    import torch

    from speculative.profiling import PhaseRecorder, phase, range_table, recording

    assert phase("spec/draft_verify") is phase("ar/decode")  # one shared nullcontext, no record_function
    recorder = PhaseRecorder("cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, recording(recorder):
        with phase("spec/catch_up"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        with phase("spec/catch_up", sync=False):
            pass
    with phase("spec/catch_up"):  # recording has ended
        pass
    assert len(recorder.walls["spec/catch_up"]) == 2
    for device in (False, True):  # True: the device columns' code path, with no device events
        row = range_table(prof, device=device)["spec/catch_up"]
        assert row["count"] == 2 and row["cpu_total_ms"] > 0
        assert (row["window_total_ms"], row["device_total_ms"]) == ((0.0, 0.0) if device else (None, None))


def test_eval_profile_only_with_zero_minutes(tmp_path, models, two_turn_file, capsys):
    """``--max-minutes 0 --profile N``: no timed part, the profile alone (what a short GPU call runs)."""
    target_dir, drafter_dir = models
    out = tmp_path / "eval"
    assert main(["eval", "--drafter", str(drafter_dir), "--target", str(target_dir), "--bench", str(two_turn_file),
                 "--temperature", "1,0", "--max-new-tokens", "3", "--max-minutes", "0", "--profile", "2",
                 "--out", str(out), *TREE_ARGS]) == 0
    assert not (out / "results.json").exists() and (out / "generations.jsonl").read_text() == ""
    report = json.loads((out / "profile.json").read_text())
    assert report["config"]["questions"] == [7, 8] and report["config"]["temperature"] == 1.0
    assert set(report["decoders"]) == {"spec", "batch"}
    assert report["decoders"]["spec"]["ranges"]["spec/prefill"]["count"] == 4  # 2 questions x 2 turns
    assert "# draftrl eval --profile" in capsys.readouterr().out
