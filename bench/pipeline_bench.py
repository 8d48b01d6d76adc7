"""Throughput of the Ray pipeline: rollout, learner, broadcast and GPU busy fraction per mode.

Runs the real driver (``pipeline.driver.run_distributed``) once per (objective, mode) on the
local Ray cluster of this machine, for a fixed number of minutes (or steps), while a sampler
reads every GPU's utilisation from ``nvidia-smi``. Prints one markdown table and writes
``pipeline_bench.json`` (every run's per-step rows and every broadcast) and ``pipeline_bench.md``.

    python bench/pipeline_bench.py --run gto=configs/gto_smollm2.yaml --run opd=configs/opd_smollm2.yaml \
        --out OUT --modes sync,async --minutes 1.5 --set target.model=... [--set ...]

The layout (colocated on one GPU, or learner and rollout on separate GPUs) comes from the
``distributed.*`` overrides; ``bench/gpu_pipeline.sh`` holds the two layouts we measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from speculative.config import load_config  # noqa: E402


class GpuSampler:
    """Samples ``utilization.gpu`` of every GPU every ``period_s`` in a background thread."""

    def __init__(self, period_s: float = 0.25):
        self.period_ms = int(period_s * 1000)
        self.samples: list[tuple[float, int, float]] = []  # (time, gpu index, percent busy)
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            return self
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
             f"-lms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                index, busy = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), int(index), busy))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def busy(self, start: float, end: float) -> dict[str, float]:
        """Mean utilisation (fraction of samples' percent / 100) of each GPU in [start, end]."""
        per_gpu: dict[int, list[float]] = {}
        for when, index, busy in self.samples:
            if start <= when <= end:
                per_gpu.setdefault(index, []).append(busy / 100.0)
        return {f"gpu{index}": statistics.fmean(values) for index, values in sorted(per_gpu.items())}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(out: Path, started: float, ended: float, sampler: GpuSampler) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl (train rows) and distributed_report.json."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    report = json.loads((out / "distributed_report.json").read_text())
    steps = report["steps"]
    # The first broadcast is the initial push (learner set-up overlaps it); keep the updates'.
    pushes = [b for b in report["broadcasts"] if b["version"] > 0] or report["broadcasts"]

    def metric(key: str) -> float:
        return _median([float(r[key]) for r in train if key in r])

    # Steady state: from the first logged update to the last (model loading and set-up excluded).
    first, last = train[0], train[-1]
    window = last["time"] - first["time"]
    updates_per_s = (last["step"] - first["step"]) / window if window > 0 else float("nan")
    # Tokens the learners consumed after the first logged update, over the same window: in steady
    # state this is what the rollout actors deliver (async per-update rates are bursty).
    consumed = sum(float(r.get("experience_tokens", 0.0)) for r in train[1:])
    seconds = [float(b["seconds"]) for b in pushes]
    megabytes = [float(b["bytes"]) / 1e6 for b in pushes]
    staleness = [row["learner_version"] - v for row in steps for v in row["experience_versions"]]
    return {
        "updates": len(steps),
        "wall_s": ended - started,
        "updates_per_s": updates_per_s,
        "tokens_per_s": consumed / window if window > 0 else float("nan"),
        "rollout_tokens_per_s": metric("rollout_tokens_per_s"),
        "learner_step_s": metric("learner_step_s"),
        "learner_samples_per_s": metric("learner_samples_per_s"),
        "broadcast_transport": pushes[0]["transport"] if pushes else "",
        "broadcast_s": _median(seconds),
        "broadcast_wall_s": _median([float(b["wall_seconds"]) for b in pushes]),
        "broadcast_mb": _median(megabytes),
        "broadcast_gb_per_s": _median([mb / 1e3 / s for mb, s in zip(megabytes, seconds) if s > 0]),
        "staleness_mean": statistics.fmean(staleness) if staleness else float("nan"),
        "staleness_max": max(staleness) if staleness else float("nan"),
        "dropped_stale": report["dropped_stale"],
        "tau": metric("tau"),
        "reward": metric("reward"),
        "gpu_busy": sampler.busy(first["time"], last["time"]),
        "checksums_equal": all(len(set(b["actor_sha256"] + [b["source_sha256"]])) == 1
                               for b in report["broadcasts"]),
    }


COLUMNS = [
    ("objective", "{}"), ("mode", "{}"), ("updates", "{}"), ("updates_per_s", "{:.2f}"),
    ("tokens_per_s", "{:.0f}"), ("rollout_tokens_per_s", "{:.0f}"), ("learner_step_s", "{:.3f}"), ("broadcast_transport", "{}"),
    ("broadcast_s", "{:.4f}"), ("broadcast_mb", "{:.1f}"), ("broadcast_gb_per_s", "{:.2f}"),
    ("staleness_mean", "{:.2f}"), ("staleness_max", "{}"), ("gpu_busy", "{}"),
]


def table(results: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if key == "gpu_busy":
            return " ".join(f"{k} {v:.0%}" for k, v in value.items()) or "n/a"
        try:
            return fmt.format(value)
        except (TypeError, ValueError):
            return str(value)

    lines = ["| " + " | ".join(k for k, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, f in COLUMNS) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="OBJECTIVE=CONFIG",
                        help="an objective and its experiment YAML (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="sync,async")
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per run")
    parser.add_argument("--steps", type=int, default=None, help="or learner updates per run")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray cluster")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--label", default="", help="layout name written into the results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if (args.minutes is None) == (args.steps is None):
        parser.error("give exactly one of --minutes and --steps")

    import ray

    from pipeline.driver import run_distributed

    args.out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_gpus=args.num_gpus, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True)
    sampler = GpuSampler().start()
    results = []
    try:
        for spec in args.run:
            objective, _, config_path = spec.partition("=")
            for mode in args.modes.split(","):
                run_dir = args.out / "runs" / f"{objective}_{mode}"
                shutil.rmtree(run_dir, ignore_errors=True)
                config = load_config(config_path, [
                    *args.overrides, f"training.objective={objective}", "distributed.enabled=true",
                    f"distributed.mode={mode}", f"output_dir={run_dir}",
                    f"training.max_steps={args.steps or 100000}", "training.log_every=1",
                    "training.eval_every=100000", "training.save_every=100000",
                ])
                print(f"[bench] {args.label} {objective} {mode}: {config.distributed.model_dump()}", flush=True)
                started = time.time()
                run_distributed(config, minutes_this_run=args.minutes)
                ended = time.time()
                row = {"layout": args.label, "objective": objective, "mode": mode,
                       **summarise(run_dir, started, ended, sampler)}
                results.append(row)
                print(table([row]), flush=True)
    finally:
        sampler.stop()
        ray.shutdown()
    text = table(results)
    print(text)
    (args.out / "pipeline_bench.md").write_text(f"{args.label}\n\n{text}\n")
    (args.out / "pipeline_bench.json").write_text(json.dumps(
        {"label": args.label, "argv": sys.argv, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
