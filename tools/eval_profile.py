"""``draftrl eval --profile N``: where a speculative cycle's time goes, next to an AR step.

After the timed part, the first N questions of the first bench are decoded again, at the first
temperature, with the speculative decoder and with every AR baseline decoder: once untimed (graph
capture, one-off costs of new prompt shapes), then twice:

1. *clean*: timed exactly as ``speculative.timing.timed`` times the eval (synchronise,
   ``perf_counter``, the generation, synchronise), nothing else running: the reference wall;
2. *profiled*: the same under ``torch.profiler`` (CPU, plus CUDA on a GPU) with the phase ranges
   of ``speculative.profiling`` switched on. Speculative phases end with a device synchronise, so
   each phase's wall includes the GPU work it queued (a graph replay returns at once); AR steps
   do not (the batched engine checks the host only every few steps).

Writes ``profile.json`` and ``profile.md`` (per range: count, CPU and device ms; per cycle: each
phase's ms, the cycle's wall, the AR step's wall; the top 25 ops/kernels by self device time, or
CPU time off a GPU) and ``profile_trace.json.gz``, a chrome trace of one short generation per
decoder (open it in https://ui.perfetto.dev).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TRACE_TOKENS = 32  # new tokens of the traced generation (a handful of speculative cycles)
TRACE_LIMIT = 12 * 2**20  # bytes of the gzipped trace; a larger one is dropped


def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device is not None and device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)


def _run_questions(decoder, questions, conversation, max_new_tokens, eos, device, seed_for, offset, bench):
    """Every turn of ``questions`` through ``decoder``; [(question_id, turn, result, seconds)]."""
    from speculative.timing import timed

    out: list[tuple[Any, int, Any, float]] = []
    for index, question in enumerate(questions):
        def generate(ids, turn, index=index, question=question):
            decoder.reseed(seed_for(bench, index, turn) + offset)
            result, seconds = timed(decoder, ids, max_new_tokens, eos, device)
            out.append((question.question_id, turn, result, seconds))
            return result

        conversation(generate, question)
    return out


def _summarise(name: str, kind: str, clean, profiled, recorder, prof, on_device: bool) -> dict[str, Any]:
    from speculative.profiling import range_table, top_ops, wall_table

    ranges = range_table(prof, device=on_device)
    walls = wall_table(recorder)
    for key, row in walls.items():
        ranges.setdefault(key, {"count": row["count"]}).update(row)

    def total(key: str) -> float:
        return walls.get(key, {}).get("wall_total_ms", 0.0)

    profiled_ms = 1000 * sum(s for *_, s in profiled)
    clean_ms = 1000 * sum(s for *_, s in clean)
    generations = [{"question_id": q, "turn": t, "tokens": len(r.tokens),
                    "verifications": len(getattr(r, "accept_lengths", []) or []),
                    "wall_ms": round(1000 * s, 3), "clean_wall_ms": round(1000 * c[3], 3)}
                   for (q, t, r, s), c in zip(profiled, clean)]
    data: dict[str, Any] = {"decoder": name, "kind": kind, "generations": generations,
                            "tokens": sum(g["tokens"] for g in generations),
                            "wall_ms": round(profiled_ms, 3), "clean_wall_ms": round(clean_ms, 3),
                            "ranges": ranges, "top_ops": top_ops(prof, 25, device=on_device)}
    if kind == "spec":
        # cycles whose outcome was used (pipelined cycles launch one more per generation)
        cycles = sum(len(r.accept_lengths) for *_, r, _ in profiled)
        accepted = sum(sum(r.accept_lengths) for *_, r, _ in profiled)
        prefill = total("spec/prefill") + total("spec/drafter_prefill")
        per_cycle: dict[str, Any] = {"cycles": cycles, "tau": round(1 + accepted / cycles, 4) if cycles else None,
                                     "launched": ranges.get("spec/draft_verify", {}).get("count", 0)}
        if cycles:
            phases = {key: round(total(key) / cycles, 4)
                      for key in ("spec/draft_verify", "spec/verify_host", "spec/catch_up")}
            cycle = (profiled_ms - prefill) / cycles
            def device(field: str) -> dict[str, float | None]:
                return {key: (round(ranges[key][field] / cycles, 4) if on_device and key in ranges else None)
                        for key in phases}

            per_cycle.update(
                phases_wall_ms=phases, phases_device_ms=device("device_total_ms"),
                phases_window_ms=device("window_total_ms"),
                other_host_ms=round(cycle - sum(phases.values()), 4),
                cycle_wall_ms=round(cycle, 4),
                clean_cycle_wall_ms=round((clean_ms - prefill) / cycles, 4),
                prefill_wall_ms_per_generation=round(prefill / max(len(profiled), 1), 4),
            )
        data["per_cycle"] = per_cycle
    else:
        steps = ranges.get("ar/decode", {}).get("count", 0)
        prefill = total("ar/prefill")
        per_step: dict[str, Any] = {"steps": steps}
        if steps:
            per_step.update(
                step_wall_ms=round((profiled_ms - prefill) / steps, 4),
                clean_step_wall_ms=round((clean_ms - prefill) / steps, 4),
                step_device_ms=round(ranges["ar/decode"]["device_total_ms"] / steps, 4) if on_device else None,
                step_window_ms=round(ranges["ar/decode"]["window_total_ms"] / steps, 4) if on_device else None,
                prefill_wall_ms_per_generation=round(prefill / max(len(profiled), 1), 4),
            )
        data["per_step"] = per_step
    return data


def profile_decoders(spec, ars: Mapping[str, Any], bench: str, questions: Sequence[Any], conversation: Callable,
                     *, max_new_tokens: int, eos: set[int], temperature: float,
                     seed_for: Callable[[str, int, int], int], out_dir: Path, trace: bool = True,
                     config: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Profile ``spec`` and each of ``ars`` on ``questions`` (all turns); writes profile.json,
    profile.md and (``trace``) profile_trace.json.gz into ``out_dir``; returns the report."""
    from speculative.profiling import PhaseRecorder, recording

    device = spec.engine.device
    on_device = device.type == "cuda"
    report: dict[str, Any] = {
        "config": {**(config or {}), "bench": bench, "questions": [q.question_id for q in questions],
                   "temperature": temperature, "max_new_tokens": max_new_tokens, "device": str(device),
                   "device_times": on_device},
        "decoders": {},
    }
    started = time.perf_counter()
    for name, kind, decoder, offset in [("spec", "spec", spec, 0), *((n, "ar", d, 1) for n, d in ars.items())]:
        decoder.temperature = temperature
        # untimed first: graph capture after a temperature change, one-off costs of new prompt shapes
        _run_questions(decoder, questions, conversation, max_new_tokens, eos, device, seed_for, offset, bench)
        clean = _run_questions(decoder, questions, conversation, max_new_tokens, eos, device, seed_for, offset, bench)
        recorder = PhaseRecorder(device)
        context = _profiler(device)
        with context as prof, recording(recorder):
            profiled = _run_questions(decoder, questions, conversation, max_new_tokens, eos, device, seed_for,
                                      offset, bench)
        report["decoders"][name] = _summarise(name, kind, clean, profiled, recorder, prof, on_device)
        if log:
            log(f"[profile] {name}: {len(profiled)} generations profiled")
    if trace:
        report["trace"] = _write_trace(spec, ars, questions[0], conversation, eos, device, seed_for, bench, out_dir)
    report["seconds"] = round(time.perf_counter() - started, 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "profile.md").write_text(markdown(report))
    return report


def _write_trace(spec, ars, question, conversation, eos, device, seed_for, bench, out_dir: Path) -> dict[str, Any]:
    """A chrome trace of the first turn of ``question``, TRACE_TOKENS new tokens per decoder."""
    from speculative.profiling import PhaseRecorder, recording, write_gzipped_trace

    first = type(question)(question.question_id, question.category, question.turns[:1], question.bench)
    context = _profiler(device)
    with context as prof, recording(PhaseRecorder(device)):
        for offset, decoder in [(0, spec), *((1, d) for d in ars.values())]:
            _run_questions(decoder, [first], conversation, TRACE_TOKENS, eos, device, seed_for, offset, bench)
    target = out_dir / "profile_trace.json.gz"
    out_dir.mkdir(parents=True, exist_ok=True)
    size = write_gzipped_trace(prof, target)
    if size > TRACE_LIMIT:
        target.unlink()
        return {"file": None, "bytes": size, "note": f"dropped: over {TRACE_LIMIT} bytes"}
    return {"file": target.name, "bytes": size, "new_tokens": TRACE_TOKENS}


# ---------------------------------------------------------------------------------- markdown


def _f(value, fmt: str = ".3f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    device_times = config["device_times"]
    lines = [
        "# draftrl eval --profile",
        "",
        f"Bench `{config['bench']}`, questions {config['questions']} (all turns), T={config['temperature']:g}, "
        f"{config['max_new_tokens']} new tokens max, device {config['device']}"
        + (f", compile `{config['compile']}`" if config.get("compile") else "")
        + (f", tree {config['tree']}" if config.get("tree") else "") + ".",
        "",
        "Each decoder ran twice: *clean* (timed like the eval: synchronise, generation, synchronise) and "
        "*profiled* (torch.profiler, phase ranges on, a device synchronise at the end of every speculative "
        "phase). The profiler's overhead inflates the CPU times and the profiled walls (compare them with "
        "the clean ones); the device times are kernel times and are not inflated.",
        "",
    ]
    spec = report["decoders"].get("spec")
    if spec and spec.get("per_cycle", {}).get("cycles"):
        c = spec["per_cycle"]
        lines += [
            "## Per speculative cycle (draft + verify + catch-up)",
            "",
            f"{c['cycles']} cycles, tau {c['tau']:.3f}. Means per cycle (catch-up: its total / cycles; the last "
            "cycle of a generation has none).",
            "",
            *([f"Pipelined cycles (`--greedy-verify pipelined` at T = 0, `--sampled-verify pipelined` at T > 0): "
               f"{c['launched']} cycles launched for {c['cycles']} "
               "read. `spec/draft_verify` is the launch of a whole cycle (draft, verify, acceptance, catch-up) and "
               "`spec/verify_host` the wait for the cycle before it; under the profiler the phases synchronise, so "
               "the pipelining shows in the clean cycle only.", ""]
              if c.get("launched", c["cycles"]) > c["cycles"] else []),
            "wall: host perf_counter, the phase's device work included (it synchronises at its end); device: "
            "kernels the profiler correlates with the phase; GPU busy: device time that started inside the "
            "phase's window (the two should agree; if device is 0, the profiler did not correlate graph kernels).",
            "",
            "| phase | wall ms / cycle | device ms / cycle | GPU busy ms / cycle |",
            "|---|---|---|---|",
        ]
        for key, wall in c["phases_wall_ms"].items():
            lines.append(f"| `{key}` | {wall:.3f} | {_f(c['phases_device_ms'][key])} | "
                         f"{_f(c['phases_window_ms'][key])} |")
        lines += [
            f"| host loop outside the phases | {c['other_host_ms']:.3f} | | |",
            f"| **cycle (profiled)** | **{c['cycle_wall_ms']:.3f}** | | |",
            f"| **cycle (clean)** | **{c['clean_cycle_wall_ms']:.3f}** | | |",
            "",
            f"Prefill + drafter prefill: {c['prefill_wall_ms_per_generation']:.3f} ms per generation (left out "
            "of the cycle's wall).",
            "",
        ]
    ar_rows = [(n, d) for n, d in report["decoders"].items() if d["kind"] == "ar"]
    if ar_rows:
        lines += ["## Per AR step (one token)", "",
                  "wall: (generation wall - prefill wall) / steps; device: kernels correlated with a step.", "",
                  "| AR engine | steps | step wall ms (profiled) | step wall ms (clean) | step device ms |",
                  "|---|---|---|---|---|"]
        for name, d in ar_rows:
            s = d["per_step"]
            lines.append(f"| `{name}` | {s['steps']} | {_f(s.get('step_wall_ms'))} | "
                         f"{_f(s.get('clean_step_wall_ms'))} | {_f(s.get('step_device_ms'))} |")
        if spec and spec.get("per_cycle", {}).get("cycles"):
            c, s = spec["per_cycle"], ar_rows[0][1]["per_step"]
            if s.get("clean_step_wall_ms"):
                lines += ["", f"A clean cycle costs {c['clean_cycle_wall_ms'] / s['clean_step_wall_ms']:.2f} clean "
                          f"`{ar_rows[0][0]}` AR steps and commits tau = {c['tau']:.2f} tokens: speculation wins "
                          "when tau is larger than that ratio."]
        lines.append("")
    lines += ["## Ranges", "",
              "count; CPU = the range's wall under the profiler; wall = host perf_counter (speculative phases "
              "synchronise at their end); device = kernels launched inside the range.", "",
              "| decoder | range | count | CPU total ms | CPU mean ms | wall total ms | wall mean ms | "
              "device total ms | device mean ms | GPU busy total ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in report["decoders"].items():
        for key, r in d["ranges"].items():
            lines.append(f"| {name} | `{key}` | {r['count']} | {_f(r.get('cpu_total_ms'))} | "
                         f"{_f(r.get('cpu_mean_ms'))} | {_f(r.get('wall_total_ms'))} | {_f(r.get('wall_mean_ms'))} | "
                         f"{_f(r.get('device_total_ms'))} | {_f(r.get('device_mean_ms'))} | "
                         f"{_f(r.get('window_total_ms'))} |")
    what = "self device (kernel) time" if device_times else "self CPU time (no device)"
    for name, d in report["decoders"].items():
        lines += ["", f"## Top {len(d['top_ops'])} ops/kernels of `{name}` by {what}", "",
                  "| # | op / kernel | count | total ms | mean us | share |", "|---|---|---|---|---|---|"]
        for i, op in enumerate(d["top_ops"], 1):
            label = op["name"] if len(op["name"]) <= 90 else op["name"][:87] + "..."
            label = label.replace("|", "\\|")
            lines.append(f"| {i} | `{label}` | {op['count']} | {op['self_total_ms']:.3f} | "
                         f"{op['self_mean_us']:.1f} | {100 * op['share']:.1f}% |")
    trace = report.get("trace")
    if trace:
        lines += ["", f"Trace: `{trace['file']}` ({trace['bytes']} bytes; one first turn of "
                  f"{trace.get('new_tokens', '?')} new tokens per decoder; open in https://ui.perfetto.dev)"
                  if trace.get("file") else f"Trace: {trace.get('note')}"]
    return "\n".join(lines) + "\n"
