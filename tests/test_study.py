"""experiments/study.py end to end on a tiny target: train (twice: the second does nothing), eval,
report; and a bad study file refused, naming the file and the field, before any run starts."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from experiments import gpu_monitor
from experiments.study import REPO_ROOT, UNFINISHED, StudyError, load_study, main
from speculative.config import load_config
from pipeline.trainer import Trainer
from tests.conftest import write_topic_chats

TINY = ["data.max_length=64", "data.eval_fraction=0.1", "training.ttt_steps=3", "training.batch_size=4",
        "training.warmup_steps=1", "training.log_every=1", "training.eval_every=1", "training.eval_batches=1",
        "training.save_every=1", "training.device=cpu"]
TINY_GTO = ["gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8", "gto.group_size=3",
            "gto.groups_per_sequence=2"]


def _setting(root: Path, target_dir: Path, chat_count: int, sft_steps: int,
             questions: dict[str, list[list[str]]]) -> dict[str, Path]:
    """Chats, an SFT start drafter on ``target_dir``, and ``questions`` as one bench file each."""
    chats = write_topic_chats(root / "chats.jsonl", chat_count)
    common = [f"target.model={target_dir}", f"data.source={chats}", f"cache_dir={root / 'cache'}", *TINY]
    start = Trainer(load_config(None, [*common, f"output_dir={root / 'sft'}", "drafter.draft_vocab_size=512",
                                       "training.lr=3e-3", f"training.max_steps={sft_steps}"])).run().drafter_dir
    benches = root / "bench"
    benches.mkdir()
    for name, items in questions.items():
        (benches / f"{name}.jsonl").write_text("".join(
            json.dumps({"question_id": i, "category": name, "turns": turns}) + "\n" for i, turns in enumerate(items)))
    return {"root": root, "common": common, "start": start, "benches": benches}


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_target_dir) -> dict[str, Path]:
    """Chats, a 3-step SFT start drafter, two tiny benches (one with a second turn)."""
    questions = {"mini_chat": [["Tell me about the sea.", "And about rain?"], ["Say hi."]],
                 "mini_math": [["What is 2 + 2?"], ["What is 3 + 5?"]]}
    return _setting(tmp_path_factory.mktemp("study"), tiny_target_dir, 48, 3, questions)


def _study(setting: dict[str, Path], path: Path, **changes) -> Path:
    study = {
        "name": "tiny_study", "start_drafter": str(setting["start"]), "seeds": [1], "minutes_per_arm": 3,
        "parallel": 2, "overhead_minutes": 0.5, "overrides": setting["common"],
        "arms": {"sft": {"config": "configs/gto_smollm2.yaml",
                         "set": ["training.objective=sft", "training.max_steps=2"]},
                 "gto": {"config": "configs/gto_smollm2.yaml", "set": [*TINY_GTO, "training.max_steps=2"],
                         "paper_gain": "+7.4%"}},
        "eval": {"num_prompts": 2, "temperatures": [0, 1], "max_new_tokens": 6, "bench": "mini_chat,mini_math",
                 "bench_dir": str(setting["benches"])},
        "vllm": {"seed": 1, "num_prompts": 1},
        **changes,
    }
    path.write_text(yaml.safe_dump(study))
    return path


def _snapshot(out: Path) -> dict[str, str]:
    files = [*out.glob("runs/*/study_state.json"), *out.glob("logs/*.log")]
    return {str(p.relative_to(out)): p.read_text() for p in files}


def test_train_twice_eval_report(setting, tmp_path):
    study, out = _study(setting, tmp_path / "study.yaml"), tmp_path / "out"
    args = ["--study", str(study), "--out", str(out)]
    assert main(["train", *args]) == 0
    for name in ("sft-s1", "gto-s1"):
        state = json.loads((out / "runs" / name / "study_state.json").read_text())
        assert state["step"] == 2 and len(state["slots"]) == 1 and state["minutes"] > 0
        assert (out / "runs" / name / "drafter" / "model.safetensors").is_file()
    before = _snapshot(out)
    assert main(["train", *args]) == 0  # finished: nothing runs, nothing is credited or logged
    assert _snapshot(out) == before

    assert main(["eval", *args]) == 0
    assert sorted(p.name for p in out.glob("logs/eval-*.log")) == ["eval-T0.log", "eval-T1.log"]  # one process per T
    for name in ("start", "sft-s1", "gto-s1"):
        for t in ("T0", "T1"):
            record = json.loads((out / "eval" / f"{name}-{t}" / "compare.json").read_text())
            scores, baseline = record["results"][name], record["baseline"]
            assert set(scores) == set(baseline) == {"mini_chat", "mini_math"}
            for bench, s in scores.items():
                assert s["tau"] >= 1 and baseline[bench]["tau"] == 1
                assert s["speedup"] == pytest.approx(s["tokens_per_s"] / baseline[bench]["tokens_per_s"])
    logs = _snapshot(out)
    assert main(["eval", *args]) == 0 and _snapshot(out) == logs  # all scored: skipped

    assert main(["report", *args]) == 0
    report = out / "report"
    for name in ("results.json", "results.md", "curves.png", "tau.png"):
        assert (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    assert {r["steps"] for r in results["runs"].values()} == {2}
    markdown = (report / "results.md").read_text()
    assert markdown.count("## T = ") == 2
    number = r"\d+\.\d{3}"
    for row in ("start", "sft", "gto"):
        lines = [line for line in markdown.splitlines() if line.startswith(f"| {row} |")]
        assert len(lines) == 2 and all(len(re.findall(number, line)) >= 3 for line in lines), lines
    assert "+7.4%" in markdown and "s1: 2" in markdown
    assert len(re.findall(r"\| \d+\.\d\dx \|", markdown)) == 6  # a speed-up per row and temperature
    assert markdown.count("AR tokens/s per scoring: mini_chat ") == 2


def test_eval_without_time_for_one_scoring_starts_nothing(setting, tmp_path):
    study, out = _study(setting, tmp_path / "study.yaml"), tmp_path / "out"
    assert main(["eval", "--study", str(study), "--out", str(out), "--minutes", "1"]) == UNFINISHED
    assert not list(out.glob("eval/*"))


def test_a_scoring_past_its_deadline_starts_no_drafter(setting, tmp_path):
    """``--deadline`` (the GPU slot's end, set by ``eval``) is checked before every drafter."""
    import subprocess
    import sys
    import time

    from experiments.study import child_env

    argv = [sys.executable, str(REPO_ROOT / "bench" / "compare_drafters.py"), "--target",
            str(setting["common"][0].split("=", 1)[1]), "--out", str(tmp_path / "{name}"), "--num-prompts", "1",
            "--max-new-tokens", "4", "--bench", "mini_chat", "--bench-dir", str(setting["benches"]),
            "--deadline", f"{time.time() - 1:.0f}", f"a={setting['start']}", f"b={setting['start']}"]
    done = subprocess.run(argv, check=False, env=child_env(1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unscored: ['a', 'b']" in done.stdout and not list(tmp_path.glob("*/compare.json"))


def test_no_budget_left_starts_nothing(setting, tmp_path):
    study, out = _study(setting, tmp_path / "study.yaml"), tmp_path / "out"
    assert main(["train", "--study", str(study), "--out", str(out), "--minutes", "0.1"]) == UNFINISHED
    assert not list(out.glob("logs/*")) and not list(out.glob("runs/*/study_state.json"))


def test_a_bad_study_is_refused_before_any_run(setting, tmp_path, capsys):
    out = tmp_path / "out"
    bad = _study(setting, tmp_path / "bad.yaml", minutes_per_arm="lots",
                 arms={"sft": {"config": "configs/missing.yaml"}})
    assert main(["train", "--study", str(bad), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "minutes_per_arm" in error
    assert "arms.sft.config" in error and "configs/missing.yaml does not exist" in error

    typo = _study(setting, tmp_path / "typo.yaml",
                  arms={"gto": {"config": "configs/gto_smollm2.yaml", "set": ["gto.tree_dept=3"]}})
    assert main(["train", "--study", str(typo), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert str(typo) in error and "arms.gto" in error and "tree_dept" in error
    assert not out.exists() or not list(out.rglob("*.log"))


def test_the_shipped_study_validates():
    shipped = REPO_ROOT / "experiments" / "smollm2_study.yaml"
    sets = [] if (REPO_ROOT / "configs" / "gto_opd_smollm2.yaml").is_file() else [
        "arms.gto_opd.config=configs/gto_smollm2.yaml"]  # the gto_opd arm's config lands separately
    study = load_study(shipped, sets, start="/tmp/sft_drafter")
    assert list(study.arms) == ["sft", "gto", "opd", "gto_opd"] and study.seeds == [1, 2]
    assert study.eval.temperatures == [0, 1] and study.vllm.num_speculative_tokens == 3
    with pytest.raises(StudyError, match="vllm.seed.*not one of the seeds"):
        load_study(shipped, [*sets, "vllm.seed=3"])


def test_pmon_samples_are_attributed_to_runs():
    text = ("# gpu         pid   type     sm    mem    enc    dec    jpg    ofa    command\n"
            "# Idx           #    C/G      %      %      %      %      %      %    name\n"
            "    0       4242     C     37     10      -      -      -      -    python\n"
            "    0       4343     C      -      -      -      -      -      -    python\n")
    usage = gpu_monitor.parse_pmon(text)
    assert usage == {4242: 37.0, 4343: 0.0}
    assert gpu_monitor.attribute(usage, {4242: "gto-s1"}) == {"gto-s1": 37.0}
    assert gpu_monitor.parse_query("0, 85, 20123\n") == [{"index": 0, "util": 85.0, "memory_mib": 20123.0}]


def test_report_of_two_seeds_shows_the_spread_and_gpu_share(tmp_path):
    """The report alone, on a study directory laid out as the stages leave it (two seeds)."""
    out = tmp_path / "out"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "two_seeds", "seeds": [1, 2], "minutes_per_arm": 1, "arms": {
            "sft": {"config": "configs/gto_smollm2.yaml"},
            "gto": {"config": "configs/gto_smollm2.yaml", "paper_gain": "+7.4%"}},
        "eval": {"temperatures": [0]}}, sort_keys=False))
    taus = {"start": (2.0, 2.0), "sft-s1": (2.1, 2.1), "sft-s2": (2.1, 2.1), "gto-s1": (2.0, 3.0),
            "gto-s2": (2.2, 3.2)}
    for name, (b1, b2) in taus.items():
        folder = out / "eval" / f"{name}-T0"
        folder.mkdir(parents=True)
        scores = {"b1": {"tau": b1}, "b2": {"tau": b2}}
        record = {"results": {name: scores}}
        if name.startswith("gto"):  # timed against an AR baseline in the same process; the others not
            fast = 0.3 if name == "gto-s2" else 0.0
            scores["b1"]["speedup"], scores["b2"]["speedup"] = 1.0 + fast, 1.2 + fast
            record["baseline"] = {"b1": {"tau": 1.0, "tokens_per_s": 100.0 + 10 * fast},
                                  "b2": {"tau": 1.0, "tokens_per_s": 90.0}}
        (folder / "compare.json").write_text(json.dumps(record))
        if name != "start":
            run = out / "runs" / name
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "latest").write_text("step_000040")
            (run / "study_state.json").write_text(json.dumps({"minutes": 1.0, "slots": []}))
            rows = [{"step": s, "split": "eval", "accept_length_proxy": 1 + s / 100} for s in (0, 20, 40, 40)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    samples = [{"running": ["gto-s1", "sft-s1"], "runs": {"gto-s1": 40.0}, "gpus": [{"util": 80.0}]},
               {"running": ["gto-s1"], "runs": {"gto-s1": 60.0}, "gpus": [{"util": 60.0}]}]
    (out / "gpu_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))

    assert main(["report", "--study", str(study), "--out", str(out)]) == 0
    markdown = (out / "report" / "results.md").read_text()
    gto = next(line for line in markdown.splitlines() if line.startswith("| gto |"))
    cells = [cell.strip() for cell in gto.strip("|").split("|")]
    assert cells == ["gto", "2.100 (2.000–2.200)", "3.100 (3.000–3.200)", "2.600 (2.500–2.700)", "+30.0%",
                     "1.25x (1.10–1.40)", "+7.4%", "s1: 40, s2: 40", "50"]  # s2 was never sampled: not a 0
    sft = next(line for line in markdown.splitlines() if line.startswith("| sft |"))
    assert sft.endswith("| 0 |") and "+5.0% | — |" in sft  # sampled while running, no SM use; not timed
    assert "AR tokens/s per scoring: b1 100.0, 103.0; b2 90.0." in markdown
    assert "Mean GPU utilisation while training: 70%" in markdown
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["summary"]["0"]["rows"]["sft"]["mean"]["n"] == 2
    assert (out / "report" / "curves.png").stat().st_size > 0


def test_jobs_still_running_when_the_budget_is_spent_are_stopped_and_deferred(tmp_path):
    """A scoring has no clock of its own: the pool stops it at the slot's end instead of
    outliving the GPU lease, and reports it as deferred."""
    import sys
    import time

    from experiments.study import Budget, Job, run_pool

    finished: list[int] = []

    def job(name: str, seconds: float) -> Job:
        return Job(name, tmp_path / f"{name}.log",
                   lambda: [sys.executable, "-c", f"import time; time.sleep({seconds})"],
                   lambda code, _: finished.append(code))

    started = time.time()
    result = run_pool([job("quick", 0), job("slow", 120), job("queued", 120)], 2, budget=Budget(0.1))
    assert time.time() - started < 60
    assert finished == [0]  # only the quick one ran to its end
    assert result.failed == [] and result.deferred == ["slow", "queued"]


def test_pool_pins_each_job_to_the_least_loaded_gpu(tmp_path):
    """``gpus`` > 1: every job gets its own CUDA_VISIBLE_DEVICES, spread over the GPUs."""
    from experiments.study import Job, run_pool

    seen: dict[str, str] = {}

    def job(name: str) -> Job:
        out = tmp_path / f"{name}.txt"
        argv = [sys.executable, "-c", f"import os, time; open({str(out)!r}, 'w').write("
                "os.environ.get('CUDA_VISIBLE_DEVICES', '-')); time.sleep(0.5)"]
        return Job(name, tmp_path / f"{name}.log", lambda: argv,
                   lambda code, seconds: seen.__setitem__(name, out.read_text()))

    result = run_pool([job(f"j{i}") for i in range(4)], parallel=2, gpus=2)
    assert not result.failed and sorted(seen.values()) == ["0", "0", "1", "1"]
    seen.clear()
    run_pool([job("solo")], parallel=1)
    assert seen == {"solo": os.environ.get("CUDA_VISIBLE_DEVICES", "-")}


def test_chain_scorings_get_their_own_folders_and_flag(tmp_path):
    from experiments.study import Budget, eval_job
    from experiments.study_spec import eval_folder

    shipped = REPO_ROOT / "experiments" / "smollm2_study.yaml"
    study = load_study(shipped, ["eval.chain_lengths=[7]"], start="/tmp/sft_drafter")
    assert study.eval.chain_lengths == [7]
    assert eval_folder(tmp_path, "gto-s1", 0.0).name == "gto-s1-T0"
    assert eval_folder(tmp_path, "gto-s1", 1.0, 7).name == "gto-s1-T1-chain7"
    job = eval_job(study, 1.0, [("a", tmp_path)], "smollm2", tmp_path, Budget(None), chain=7)
    argv = job.argv()
    assert job.name == "eval-T1-chain7" and argv[argv.index("--chain") + 1] == "7"
    assert argv[argv.index("--out") + 1].endswith("{name}-T1-chain7")
    assert "--baseline" in argv  # AR is timed alongside each drafter (speculative.timing), never cached
    tree_job = eval_job(study, 0.0, [("a", tmp_path)], "smollm2", tmp_path, Budget(None))
    assert tree_job.name == "eval-T0" and tree_job.argv()[tree_job.argv().index("--chain") + 1] == "0"


def test_study_v2_validates_with_equal_minutes_three_seeds_and_enough_updates():
    study = load_study(REPO_ROOT / "experiments" / "smollm2_study_v2.yaml", start="/tmp/sft_drafter")
    assert list(study.arms) == ["sft", "gto", "opd", "gto_opd"] and study.seeds == [1, 2, 3]
    assert study.gpus == study.parallel == 2 and study.eval.num_prompts == 80 and study.eval.chain_lengths == [7]
    configs = {name: load_config(arm.config, [*study.overrides, *arm.set]) for name, arm in study.arms.items()}
    assert configs["gto"].training.max_steps >= 1000 and configs["opd"].training.max_steps >= 300
    for name in ("opd", "gto_opd"):  # gto_opd gets fewer updates at equal minutes (docs/results.md)
        training = configs[name].training
        assert training.batch_size * training.grad_accum >= 64
        assert configs[name].opd.rejected_weight == 0.0 and configs[name].opd.max_new_tokens >= 1024


def test_summary_json_has_issue_18s_schema(tmp_path):
    from experiments.study_report import collect, summary_json
    from experiments.study_spec import eval_folder, study_runs, write_json

    study = load_study(REPO_ROOT / "experiments" / "smollm2_study_v2.yaml", start="/tmp/sft_drafter")
    out = tmp_path

    def scored(name: str, t: float, chain: int, tau: float) -> None:
        write_json(eval_folder(out, name, t, chain) / "compare.json",
                   {"results": {name: {b: {"tau": tau + i} for i, b in enumerate(("mt_bench", "humaneval", "gsm8k"))}}})

    scored("start", 0.0, 0, 2.0)
    scored("start", 1.0, 0, 1.5)
    scored("start", 0.0, 7, 1.8)
    for run in study_runs(study, out):
        write_json(run.directory / "study_state.json", {"minutes": 70.0, "slots": [], "step": 100 * run.seed})
        if run.arm == "gto":
            scored(run.name, 0.0, 0, 2.0 + 0.1 * run.seed)
    summary = summary_json(study, out, collect(study, out))
    assert summary["start"]["tau_t0"] == pytest.approx(3.0) and summary["start"]["tau_t1"] == pytest.approx(2.5)
    assert summary["start"]["tau_t0_chain7"] == pytest.approx(2.8) and summary["start"]["tau_t1_chain7"] is None
    gto = summary["arms"]["gto"]
    assert gto["tau_t0"] == pytest.approx([3.1, 3.2, 3.3]) and gto["tau_t1"] == [None, None, None]
    assert gto["updates"] == [100, 200, 300] and gto["gpu_minutes"] == [70.0] * 3 and gto["seeds"] == [1, 2, 3]
    assert set(summary["arms"]) == {"sft", "gto", "opd", "gto_opd"}




def test_a_qwen2_target_named_by_the_overrides_trains_and_scores(tiny_qwen2_target_dir, tmp_path):
    """Issue 21: the study runs on a Qwen2 target given only through ``target.model`` in its
    overrides (one GTO arm from a Qwen2 SFT drafter, scored at T = 0)."""
    root = tmp_path / "setup"
    root.mkdir()
    setting = _setting(root, tiny_qwen2_target_dir, 32, 2, {"mini_chat": [["Say hi."]]})
    benches = setting["benches"]
    study = _study(setting, tmp_path / "study.yaml", arms={
        "gto": {"config": "configs/gto_smollm2.yaml", "set": [*TINY_GTO, "training.max_steps=2"]}},
        eval={"num_prompts": 1, "temperatures": [0], "max_new_tokens": 4, "bench": "mini_chat",
              "bench_dir": str(benches)})
    out = tmp_path / "out"
    args = ["--study", str(study), "--out", str(out)]
    assert main(["train", *args]) == 0
    drafter = out / "runs" / "gto-s1" / "drafter"
    info = json.loads((drafter / "config.json").read_text())["draftrl"]
    assert info["target"] == str(tiny_qwen2_target_dir) and info["verifier_architectures"] == ["Qwen2ForCausalLM"]
    assert main(["eval", *args]) == 0
    for name in ("start", "gto-s1"):  # both drafters scored on the Qwen2 target, lossless at T = 0
        score = json.loads((out / "eval" / f"{name}-T0" / "compare.json").read_text())["results"][name]["mini_chat"]
        assert score["tau"] >= 1 and score["mismatches"] == 0, score
