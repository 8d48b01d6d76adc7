"""Named phases of a decoding step, for ``torch.profiler`` (``draftrl eval --profile N``).

The engines mark their phases with :func:`phase`::

    with phase("spec/draft_verify"):
        tree, logits = backend.draft_verify(root_token, root_pos)

When nothing records (always, outside ``draftrl eval --profile``), :func:`phase` returns one
shared ``contextlib.nullcontext``: about 0.2 us per use on a CPU, against about 7 us for a bare
``torch.profiler.record_function`` without any profiler running (measured on this repository's
2-core CPU box, torch 2.13), which is why the ranges are not always on.

Under :func:`recording` every phase is a ``record_function`` range (so the profiler attributes
the CPU ops and the CUDA kernels launched inside it) and a host wall time. ``sync=True`` phases
end with ``torch.cuda.synchronize``, so their wall time includes the GPU work they queued: a CUDA
graph replay returns at once, its cost shows where the host next waits, and without the sync a
draft+verify replay would be billed to the verification on the host. Phases that must not sync
(one step of the batched engine, whose host checks come every few steps) pass ``sync=False``.

Phase names: ``spec/prefill`` (target prefill and the first sampled token),
``spec/drafter_prefill``, ``spec/draft_verify`` (tree drafting + verification forward: one graph
replay or eager), ``spec/verify_host`` (``speculative.verify.verify_tree``), ``spec/catch_up``
(cache compaction + drafter re-prefill); ``ar/prefill`` and ``ar/decode`` (one AR token);
``SFT_PHASES`` for a supervised training step; ``OPD_PHASES`` for a Draft-OPD experience of the
batched engine (its rollouts, the target's forward over prompt + response, the assembly).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SPEC_PHASES = ("spec/prefill", "spec/drafter_prefill", "spec/draft_verify", "spec/verify_host", "spec/catch_up")
AR_PHASES = ("ar/prefill", "ar/decode")
# One SFT step (``bench/sft_profile.py``): the batch built on the host, the batch to the device, the
# target's forward, the draft-vocab restriction of its logits, the TTT forward (loss), backward,
# gradient clipping + optimizer + scheduler.
SFT_PHASES = ("sft/collate", "sft/batch_to_device", "sft/target_forward", "sft/restrict_vocab",
              "sft/ttt_forward", "sft/backward", "sft/optimizer")
OPD_PHASES = ("opd/rollouts", "opd/target_forward", "opd/assemble")
PHASES = SPEC_PHASES + AR_PHASES + SFT_PHASES + OPD_PHASES

_NULL = contextlib.nullcontext()
_ACTIVE: PhaseRecorder | None = None


def phase(name: str, sync: bool = True):
    """A context manager around one phase: a no-op unless a :class:`PhaseRecorder` records."""
    recorder = _ACTIVE
    if recorder is None:
        return _NULL
    return _Phase(recorder, name, sync)


def active() -> bool:
    return _ACTIVE is not None


class _Phase:
    __slots__ = ("recorder", "name", "sync", "range", "start")

    def __init__(self, recorder: PhaseRecorder, name: str, sync: bool):
        self.recorder, self.name, self.sync = recorder, name, sync

    def __enter__(self):
        self.range = torch.profiler.record_function(self.name)
        self.range.__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.sync:
            self.recorder.synchronize()
        self.recorder.walls[self.name].append(time.perf_counter() - self.start)
        self.range.__exit__(*exc)
        return False


class PhaseRecorder:
    """Host wall seconds of every phase instance, by name (``walls[name]``)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.walls: dict[str, list[float]] = defaultdict(list)

    def synchronize(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def recording(recorder: PhaseRecorder) -> Iterator[PhaseRecorder]:
    """Make :func:`phase` record into ``recorder`` inside the block."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, recorder
    try:
        yield recorder
    finally:
        _ACTIVE = previous


# ---------------------------------------------------------------------------------- summaries


def _attr(event, name: str, old_name: str) -> float:
    """``name``, or ``old_name`` in torch releases from before the device-neutral names."""
    value = getattr(event, name, None)
    return float(getattr(event, old_name, 0.0) if value is None else value)


def _ms(us: float) -> float:
    return round(us / 1000.0, 4)


def range_table(prof, names: tuple[str, ...] = PHASES, device: bool = False) -> dict[str, dict[str, Any]]:
    """Per named range seen by ``prof`` (a finished ``torch.profiler.profile``): count, total and
    mean CPU ms (the range's wall under the profiler) and, with ``device``, device ms twice:

    * ``device_*``: the kernels the profiler correlates with launches inside the range (children
      included);
    * ``window_*``: the device busy time (kernels, copies, memsets) that *started* between the
      range's start and end on the profiler's clock. Exact for ranges that synchronise at their end
      (the speculative phases), and a cross-check if the profiler does not correlate the kernels
      of a CUDA-graph replay with its launch. Ranges that do not synchronise (``ar/decode``) are
      billed here for whatever their predecessors left running on the device.

    None without a device."""
    from bisect import bisect_left, bisect_right

    from torch.autograd import DeviceType

    events = list(prof.events())
    kernels: list[tuple[float, float]] = []
    if device:
        kernels = sorted((e.time_range.start, e.time_range.end - e.time_range.start) for e in events
                         if e.device_type != DeviceType.CPU and e.name not in names)
    starts = [k[0] for k in kernels]
    busy = [0.0]
    for _, duration in kernels:
        busy.append(busy[-1] + duration)
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.name not in names or event.device_type != DeviceType.CPU:
            continue  # (a range also has a device-side mirror on CUDA: not counted twice)
        row = rows.setdefault(event.name, {"count": 0, "cpu_us": 0.0, "device_us": 0.0, "window_us": 0.0})
        row["count"] += 1
        row["cpu_us"] += event.cpu_time_total
        if device:
            row["device_us"] += _attr(event, "device_time_total", "cuda_time_total")
            lo = bisect_left(starts, event.time_range.start)
            hi = bisect_right(starts, event.time_range.end)
            row["window_us"] += busy[hi] - busy[lo]
    out = {}
    for name in names:
        if name not in rows:
            continue
        row = rows[name]
        n = row["count"]
        out[name] = {
            "count": n,
            "cpu_total_ms": _ms(row["cpu_us"]), "cpu_mean_ms": _ms(row["cpu_us"] / n),
            "device_total_ms": _ms(row["device_us"]) if device else None,
            "device_mean_ms": _ms(row["device_us"] / n) if device else None,
            "window_total_ms": _ms(row["window_us"]) if device else None,
            "window_mean_ms": _ms(row["window_us"] / n) if device else None,
        }
    return out


def wall_table(recorder: PhaseRecorder) -> dict[str, dict[str, Any]]:
    """Per phase: count, total and mean host wall ms (synchronised at the end of ``sync`` phases)."""
    return {name: {"count": len(v), "wall_total_ms": round(1000 * sum(v), 4),
                   "wall_mean_ms": round(1000 * sum(v) / len(v), 4)}
            for name, v in recorder.walls.items() if v}


def top_ops(prof, limit: int = 25, device: bool = False) -> list[dict[str, Any]]:
    """The ``limit`` ops/kernels with the most self time: device time on a device, else CPU."""
    rows = []
    for avg in prof.key_averages():
        if avg.key in PHASES:
            continue
        self_us = _attr(avg, "self_device_time_total", "self_cuda_time_total") if device else avg.self_cpu_time_total
        if self_us <= 0:
            continue
        rows.append({"name": avg.key, "count": avg.count, "self_total_ms": _ms(self_us),
                     "self_mean_us": round(self_us / max(avg.count, 1), 2)})
    rows.sort(key=lambda r: -r["self_total_ms"])
    total = sum(r["self_total_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = round(r["self_total_ms"] / total, 4)
    return rows[:limit]


def write_gzipped_trace(prof, path: Path) -> int:
    """``prof``'s chrome trace gzipped to ``path`` (torch writes only plain JSON: through a temporary
    file). Returns the gzipped size in bytes."""
    handle, raw = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as source, gzip.open(path, "wb", compresslevel=6) as sink:
            shutil.copyfileobj(source, sink)
    finally:
        os.unlink(raw)
    return Path(path).stat().st_size
