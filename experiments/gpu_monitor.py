"""GPU utilisation samples while the study's runs share one GPU.

Several host-bound training runs share a GPU; whether they got equal shares of it is part of
the result. A thread polls ``nvidia-smi`` once a second (device utilisation, and per-process SM%
from ``nvidia-smi pmon``, attributed to a run through the process's parent chain) and appends a
JSON line per sample to a file the report reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUERY = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
PMON = ["nvidia-smi", "pmon", "-c", "1", "-s", "u"]


def available() -> bool:
    return shutil.which("nvidia-smi") is not None


def parse_query(text: str) -> list[dict[str, float]]:
    """Rows of ``QUERY``'s CSV output: index, utilization %, memory used (MiB)."""
    rows = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and all(_number(f) is not None for f in fields):
            rows.append({"index": int(fields[0]), "util": float(fields[1]), "memory_mib": float(fields[2])})
    return rows


def parse_pmon(text: str) -> dict[int, float]:
    """pid -> SM% from ``nvidia-smi pmon -s u`` (columns: gpu pid type sm mem ...; '-' is 0)."""
    usage: dict[int, float] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 4 or not fields[1].isdigit():
            continue
        usage[int(fields[1])] = usage.get(int(fields[1]), 0.0) + (_number(fields[3]) or 0.0)
    return usage


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc (None when gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def owner(pid: int, runs: dict[int, str], depth: int = 8) -> str | None:
    """The run whose process is ``pid`` or one of its ancestors (vLLM workers, compile helpers)."""
    for _ in range(depth):
        if pid in runs:
            return runs[pid]
        parent = parent_pid(pid)
        if parent is None or parent <= 1:
            return None
        pid = parent
    return None


def attribute(usage: dict[int, float], runs: dict[int, str]) -> dict[str, float]:
    """SM% per run name (processes of no run are left out)."""
    per_run: dict[str, float] = {}
    for pid, sm in usage.items():
        name = owner(pid, runs)
        if name is not None:
            per_run[name] = per_run.get(name, 0.0) + sm
    return per_run


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


class GpuMonitor:
    """Samples every ``interval`` seconds until ``stop()``; ``runs()`` gives the live pid -> run map."""

    def __init__(self, path: Path, runs: Callable[[], dict[int, str]], stage: str, interval: float = 1.0):
        self.path, self.runs, self.stage, self.interval = path, runs, stage, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gpu-monitor")

    def start(self) -> GpuMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def sample(self) -> dict[str, Any]:
        runs = dict(self.runs())
        gpus = parse_query(_run(QUERY))
        usage = parse_pmon(_run(PMON))
        return {"time": time.time(), "stage": self.stage, "gpus": gpus,
                "running": sorted(set(runs.values())), "runs": attribute(usage, runs)}

    def _loop(self) -> None:
        with open(self.path, "a") as handle:
            while not self._stop.is_set():
                began = time.time()
                handle.write(json.dumps(self.sample()) + "\n")
                handle.flush()
                self._stop.wait(max(0.0, self.interval - (time.time() - began)))
