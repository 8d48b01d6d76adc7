"""Where an SFT step's time goes: ``python bench/sft_profile.py --config CFG --steps N --out DIR``.

Builds what ``pipeline.trainer.Trainer.run`` builds for an SFT run (``Trainer.start``: target, data,
a fresh drafter or ``drafter.init_from``, AdamW + schedule, the batch order) and runs the trainer's
own step, ``Trainer.train_step`` (collate, ``TargetWorker.sft_experience``, ``objective_loss`` under
bf16 autocast on CUDA, the non-finite checks, backward, gradient clipping, optimizer and scheduler,
its metrics: the code and host synchronisations ``Trainer.run`` steps with):

1. ``--warmup`` steps, untimed (allocator growth, cuBLAS/kernel selection);
2. ``--steps`` *clean* steps: device synchronise, ``perf_counter``, the steps, synchronise;
3. ``--steps`` *profiled* steps under ``torch.profiler`` (CPU, plus CUDA on a GPU) with the
   ``speculative.profiling.SFT_PHASES`` ranges on, each ending with a device synchronise, so a
   phase's wall includes the device work it queued.

Writes ``sft_profile.json`` and ``sft_profile.md`` to ``--out`` (per phase: wall and device ms per
step and its share of the step; the clean step; peak device memory; the top 20 ops/kernels by
self device time, or CPU time off a GPU) and, with ``--trace``, ``sft_profile_trace.json.gz``.
Nothing is saved of the drafter; the run's ``output_dir`` is not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from speculative.profiling import (SFT_PHASES, PhaseRecorder, range_table, recording, top_ops, wall_table,
                                   write_gzipped_trace)


class SFTSession:
    """The trainer's SFT state, built by ``Trainer.start`` as ``Trainer.run`` builds it, stepped by
    ``sft_step`` (``Trainer.train_step``)."""

    def __init__(self, config):
        from pipeline.trainer import Trainer
        from speculative.runtime import seed_everything

        if config.training.objective != "sft":
            raise SystemExit(f"sft_profile profiles SFT steps; the config's objective is {config.training.objective!r}")
        if config.training.grad_accum != 1:
            print(f"[sft_profile] training.grad_accum = {config.training.grad_accum}: a step is that many "
                  "micro-batches", file=sys.stderr)
        self.config = config
        self.trainer = Trainer(config)
        self.device = self.trainer.device
        seed_everything(config.seed)
        target, tokenizer = self.trainer._load_target()
        train, _, _ = self.trainer._load_data(tokenizer)
        self.state = self.trainer.start(target, tokenizer, train)  # drafter.init_from applies
        self.drafter, self.optimizer = self.state.drafter, self.state.optimizer

    @property
    def tokens(self) -> int:
        """Real (attention-mask) tokens of the batches stepped."""
        return self.state.tokens

    def slots(self, start: int, stop: int) -> int:
        """Batch slots (B x T, padding included) of the batches at cursors ``start`` to ``stop``."""
        train, order = self.state.train, self.state.order
        return sum(len(rows) * max(len(train[i]["input_ids"]) for i in rows)
                   for rows in (order.indices(c) for c in range(start, stop)))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def sft_step(session: SFTSession) -> dict[str, float]:
    """One ``Trainer.train_step`` (no eval, logging or checkpoints); {} when non-finite values
    skipped the update (the trainer's ``NonFiniteGuard`` counts it, and stops past the limit)."""
    return session.trainer.train_step(session.state) or {}


def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)


def profile_sft(session: SFTSession, steps: int, warmup: int, trace: Path | None = None) -> dict[str, Any]:
    """Warm-up, clean and profiled steps (module docstring); the report ``markdown`` renders."""
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    on_device = session.device.type == "cuda"
    for _ in range(warmup):
        sft_step(session)
    if on_device:
        torch.cuda.reset_peak_memory_stats(session.device)
    session.synchronize()
    tokens, cursor = session.tokens, session.state.cursor
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    for _ in range(steps):
        metrics = sft_step(session) or metrics
    session.synchronize()
    clean_ms = 1000 * (time.perf_counter() - started) / steps
    clean_tokens, clean_slots = session.tokens - tokens, session.slots(cursor, session.state.cursor)

    recorder = PhaseRecorder(session.device)
    with _profiler(session.device) as prof, recording(recorder):
        session.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            sft_step(session)
        session.synchronize()
        profiled_ms = 1000 * (time.perf_counter() - started) / steps
    ranges = range_table(prof, SFT_PHASES, device=on_device)
    walls = wall_table(recorder)
    phases = {}
    for name in SFT_PHASES:
        if name not in walls:
            continue
        wall = walls[name]["wall_total_ms"] / steps
        dev = ranges.get(name, {}).get("device_total_ms") if on_device else None
        phases[name] = {"wall_ms_per_step": round(wall, 4),
                        "device_ms_per_step": round(dev / steps, 4) if dev is not None else None,
                        "share_of_step": round(wall / profiled_ms, 4),
                        "count_per_step": walls[name]["count"] / steps}
    inside = sum(p["wall_ms_per_step"] for p in phases.values())
    report: dict[str, Any] = {
        "config": {"name": session.config.name, "target": session.config.target.model, "device": str(session.device),
                   "torch": torch.__version__, "batch_size": session.config.training.batch_size,
                   "grad_accum": session.config.training.grad_accum,
                   "ttt_steps": session.config.training.ttt_steps,
                   "draft_vocab_size": session.drafter.config.draft_vocab_size,
                   "target_vocab_size": session.drafter.config.vocab_size,
                   "max_length": session.config.data.max_length, "attention": session.config.training.attention,
                   "group_by_length": session.config.training.group_by_length,
                   "optimizer": type(session.optimizer).__name__, "warmup_steps": warmup, "steps": steps,
                   "device_times": on_device},
        "clean": {"step_ms": round(clean_ms, 3), "steps_per_s": round(1000 / clean_ms, 3),
                  "samples_per_s": round(1000 * session.config.training.batch_size
                                         * session.config.training.grad_accum / clean_ms, 2),
                  "tokens_per_s": round(clean_tokens / (clean_ms * steps / 1000), 1),
                  "padding_share": round(1 - clean_tokens / max(clean_slots, 1), 4)},
        "profiled": {"step_ms": round(profiled_ms, 3), "outside_phases_ms": round(profiled_ms - inside, 4)},
        "phases": phases,
        "top_kernels": top_ops(prof, 20, device=on_device),
        "last_metrics": {k: round(v, 5) for k, v in metrics.items()
                         if k in ("loss", "top1/step1", "accept_length_proxy", "grad_norm")},
    }
    if on_device:
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(session.device) / 2**30, 3)
    if trace is not None:
        with _profiler(session.device) as prof, recording(PhaseRecorder(session.device)):
            sft_step(session)
        write_gzipped_trace(prof, trace)
        report["trace"] = trace.name
    return report


def _f(value, fmt: str = ".3f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def markdown(report: dict[str, Any]) -> str:
    c, clean, profiled = report["config"], report["clean"], report["profiled"]
    lines = [
        "# SFT step profile (bench/sft_profile.py)",
        "",
        f"`{c['name']}`: target {c['target']} on {c['device']} (torch {c['torch']}), batch {c['batch_size']} x "
        f"grad_accum {c['grad_accum']}, max_length {c['max_length']}, ttt_steps {c['ttt_steps']}, draft vocab "
        f"{c['draft_vocab_size']} of {c['target_vocab_size']}, TTT attention `{c['attention']}`, optimizer "
        f"{c['optimizer']} (plain torch); {c['warmup_steps']} warm-up steps, then {c['steps']} clean and "
        f"{c['steps']} profiled steps.",
        "",
        f"**Clean step: {clean['step_ms']:.2f} ms** ({clean['steps_per_s']:.2f} steps/s, {clean['samples_per_s']:.1f} "
        f"samples/s, {clean['tokens_per_s']:.0f} real tokens/s, padding {100 * clean['padding_share']:.1f} % of "
        f"the batch slots). Profiled step: {profiled['step_ms']:.2f} ms"
        + (f"; peak device memory {report['peak_memory_gib']:.2f} GiB." if "peak_memory_gib" in report else "."),
        "",
        "wall: host perf_counter per step, each phase ending with a device synchronise (so it includes the "
        "device work it queued); device: kernel time the profiler correlates with the phase; share: of the "
        "profiled step's wall.",
        "",
        "| phase | wall ms / step | device ms / step | share |",
        "|---|---|---|---|",
    ]
    for name, p in report["phases"].items():
        lines.append(f"| `{name}` | {p['wall_ms_per_step']:.3f} | {_f(p['device_ms_per_step'])} | "
                     f"{100 * p['share_of_step']:.1f} % |")
    lines += [f"| host outside the phases | {profiled['outside_phases_ms']:.3f} | | "
              f"{100 * profiled['outside_phases_ms'] / profiled['step_ms']:.1f} % |",
              f"| **step (profiled)** | **{profiled['step_ms']:.3f}** | | |", "",
              "## Top 20 " + ("kernels by self device time" if c["device_times"] else "ops by self CPU time"), "",
              "| op / kernel | calls | self ms (all profiled steps) | mean us | share |", "|---|---|---|---|---|"]
    for row in report["top_kernels"]:
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(f"| `{name.replace('|', '/')}` | {row['count']} | {row['self_total_ms']:.3f} | "
                     f"{row['self_mean_us']:.1f} | {100 * row['share']:.1f} % |")
    lines += ["", f"Last step: {report['last_metrics']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from speculative.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=10, help="clean steps, then as many profiled ones")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--trace", action="store_true", help="also a chrome trace of one step")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    session = SFTSession(config)
    report = profile_sft(session, args.steps, args.warmup,
                         args.out / "sft_profile_trace.json.gz" if args.trace else None)
    (args.out / "sft_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "sft_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
