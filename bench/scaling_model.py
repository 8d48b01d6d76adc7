"""A scaling MODEL of the Ray pipeline on 1, 2, 4 and 8 GPUs of one host: projections, not measurements.

Built only from the one-GPU colocated measurements (``bench/pipeline_bench.py`` JSON files; by
default ``bench/results/pipeline_h100_colocated/pipeline_bench_{gto,opd}.json``). Every
quantity those files do not hold is a named assumption with a CLI flag and a (low, high) range,
low = the pessimistic end; the table is printed for both ends, plus how much each assumption
alone moves the 8-GPU projection.

    python bench/scaling_model.py [--inputs A.json B.json] [--out bench/results/scaling_model]

Layouts (one host). N = 1: colocated, exactly as measured (1 learner rank + 2 rollout actors
sharing the GPU, object-store broadcast). N >= 2: L learner ranks on a GPU each and the other
N - L GPUs for rollout actors, one actor per GPU (NCCL broadcast) or two per GPU (object-store
broadcast: NCCL refuses two ranks on one device; listed only where one actor per GPU leaves fewer
actors than experiences per update). L is 1, 2 or 4 (L < N). Each rank keeps the
measured per-rank batch (``grad_accum`` experiences), so an update consumes E = L x grad_accum
experiences.

Model, per update (times in seconds):
    t_exp      one experience on one actor: measured (two actors sharing a GPU, learner idle);
               divided by ROLLOUT_GPU_SPEEDUP for an actor alone on its GPU
    rollout    ceil(E / A) x t_exp: the actors work in parallel, one rollout each at a time; with
               max_staleness 1 the driver's admission gate lets at most one update's experiences
               be outstanding while the learner trains, so actors beyond E sit idle
    learner    the measured step (per-rank batch fixed) + ZeRO-1 gradient/parameter exchange,
               3 (L - 1) / L x drafter bytes / ALLREDUCE_GBPS
    broadcast  NCCL: drafter bytes / NCCL_BROADCAST_GBPS (issue to verified, checksums included);
               object store: the measured time x (actors / measured actors) ** OBJSTORE_EXPONENT
    sync       rollout + learner + broadcast (each stage waits for the previous one)
    async      max(rollout, learner + broadcast): the rollouts for update V+1 overlap training
               V; learner rank 0 sends each broadcast itself between steps (a Ray actor runs one
               call at a time); rollouts for update V+2 wait until version V+1 is on every actor
               (max_staleness 1; the driver counts a push done once every actor swapped it in,
               between rollouts). No queue builds up, so there is no queueing term.
The 1-GPU row uses each mode's own measured stage times (async's include the learner and the
actors contending for the GPU); N >= 2 uses the sync figures, where each stage ran alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEASURED_DIR = REPO / "bench" / "results" / "pipeline_h100_colocated"
DEFAULT_INPUTS = [MEASURED_DIR / "pipeline_bench_gto.json", MEASURED_DIR / "pipeline_bench_opd.json"]
BANNER = ("MODEL PROJECTION, NOT A MEASUREMENT: only the 1-GPU colocated inputs were measured "
          "(one H100); every other figure follows from them and the stated assumptions.")
GPU_COUNTS = (1, 2, 4, 8)
LEARNER_SPLITS = (1, 2, 4)
ACTORS_PER_GPU = (1, 2)
MODES = ("sync", "async")


@dataclass(frozen=True)
class Assumption:
    """A quantity the measurements do not hold: (low, high) = (pessimistic, optimistic)."""

    name: str
    flag: str
    low: float | str
    high: float | str
    unit: str
    meaning: str


ASSUMPTIONS = (
    Assumption("rollout_gpu_speedup", "--rollout-gpu-speedup", 1.0, 2.0, "x",
               "speed of a rollout actor alone on a GPU over one of the two measured actors that shared "
               "it (1: they did not contend, the GPU was mostly idle; 2: they time-shared it fully)"),
    Assumption("nccl_broadcast_gbps", "--nccl-broadcast-gbps", "measured", 1.0, "GB/s",
               "effective NCCL broadcast rate learner rank 0 -> actors, issue to verified: the link plus "
               "a sha256 of the drafter on CPU on every side, hence a modest high end; 'measured' = no "
               "better than the measured object-store rate"),
    Assumption("allreduce_gbps", "--allreduce-gbps", 5.0, 100.0, "GB/s",
               "bus bandwidth of the learners' ZeRO-1 gradient reduce + parameter gather (bf16, the "
               "drafter's broadcast bytes); unused with one learner rank"),
    Assumption("objstore_exponent", "--objstore-exponent", 1.0, 0.0, "",
               "object-store broadcast time ~ (actors / measured actors) ** this (1: grows with the "
               "actor count, 0: flat); two-actors-per-GPU layouts only"),
)


# -- measured inputs --------------------------------------------------------------------------
def _argv_settings(argv: list[str]) -> dict[str, str]:
    """The ``--set KEY=VALUE`` overrides of a pipeline_bench run, as a dict."""
    sets = {}
    for flag, value in itertools.pairwise(argv):
        if flag == "--set" and "=" in value:
            key, _, val = value.partition("=")
            sets[key] = val
    return sets


@dataclass
class Measured:
    """The figures one pipeline_bench JSON holds for one objective, and what follows directly."""

    objective: str
    source: str
    actors: int  # rollout actors of the measured run
    learners: int
    grad_accum: int
    max_staleness: int
    experiences: int  # per update: learners x grad_accum
    broadcast_mb: float
    samples_per_experience: float  # learner_samples_per_s x learner_step_s / experiences
    # per mode: measured updates/s, tokens per experience, rollout s per update, learner step s
    updates_per_s: dict[str, float]
    tokens_per_experience: dict[str, float]
    rollout_s: dict[str, float]
    learner_s: dict[str, float]
    broadcast_s: float  # the transfer: sync mode's figure (async's includes waiting for rollouts)
    broadcast_gbps: float
    broadcast_s_async_wall: float


def load_measured(path: Path) -> Measured:
    data = json.loads(Path(path).read_text())
    sets = _argv_settings(data["argv"])
    rows = {row["mode"]: row for row in data["results"]}
    if set(rows) != set(MODES):
        raise ValueError(f"{path}: need one sync and one async run, found {sorted(rows)}")
    if {row["layout"] for row in rows.values()} != {"colocated"}:
        raise ValueError(f"{path}: the model is anchored on the 1-GPU colocated layout")
    objective = rows["sync"]["objective"]
    actors = int(sets.get("distributed.num_rollout_actors", 1))
    learners = int(sets.get("distributed.num_learners", 1))
    grad_accum = int(sets.get("training.grad_accum", 1))
    experiences = learners * grad_accum
    tokens, rollout, learner, updates = {}, {}, {}, {}
    for mode, row in rows.items():
        updates[mode] = float(row["updates_per_s"])
        per_update = float(row["tokens_per_s"]) / updates[mode]  # tokens consumed per update
        tokens[mode] = per_update / experiences
        rollout[mode] = per_update / float(row["rollout_tokens_per_s"])
        learner[mode] = float(row["learner_step_s"])
    sync = rows["sync"]
    return Measured(
        objective=objective, source=str(path), actors=actors, learners=learners, grad_accum=grad_accum,
        max_staleness=int(sets.get("distributed.max_staleness", 1)), experiences=experiences,
        broadcast_mb=float(sync["broadcast_mb"]),
        samples_per_experience=float(sync["learner_samples_per_s"]) * float(sync["learner_step_s"]) / experiences,
        updates_per_s=updates, tokens_per_experience=tokens, rollout_s=rollout, learner_s=learner,
        broadcast_s=float(sync["broadcast_s"]), broadcast_gbps=float(sync["broadcast_gb_per_s"]),
        broadcast_s_async_wall=float(rows["async"]["broadcast_s"]),
    )


# -- layouts ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    gpus: int
    learners: int
    actors: int
    actors_per_gpu: int
    transport: str  # object_store | nccl

    @property
    def name(self) -> str:
        if self.gpus == 1:
            return f"1 GPU colocated: {self.learners}L + {self.actors}A"
        per = "" if self.actors_per_gpu == 1 else f" ({self.actors_per_gpu}/GPU)"
        return f"{self.learners}L + {self.actors}A{per}"


def layouts(measured: Measured, gpu_counts=GPU_COUNTS) -> list[Layout]:
    found = []
    for n in gpu_counts:
        if n == 1:
            found.append(Layout(1, measured.learners, measured.actors, measured.actors, "object_store"))
            continue
        for learners in LEARNER_SPLITS:
            if learners >= n:
                continue
            for per_gpu in ACTORS_PER_GPU:
                # Two actors per GPU can only help where one per GPU leaves fewer actors than
                # experiences per update (beyond that, extra actors idle: see ``project``).
                if per_gpu > 1 and n - learners >= learners * measured.grad_accum:
                    continue
                transport = "nccl" if per_gpu == 1 else "object_store"
                found.append(Layout(n, learners, (n - learners) * per_gpu, per_gpu, transport))
    return found


# -- the model --------------------------------------------------------------------------------
def assumption_values(args: argparse.Namespace | None, end: str) -> dict[str, float | str]:
    """The values at one end ('low' or 'high') of every assumption's range."""
    values = {}
    for a in ASSUMPTIONS:
        pair = getattr(args, a.name, None) if args is not None else None
        low, high = pair if pair else (a.low, a.high)
        values[a.name] = low if end == "low" else high
    return values


def _float(value: float | str, measured: float) -> float:
    return measured if value == "measured" else float(value)


def project(m: Measured, layout: Layout, mode: str, values: dict[str, Any]) -> dict[str, Any]:
    """One configuration's projected figures (see the module docstring for the formulas)."""
    if m.max_staleness != 1:
        raise ValueError("the async formula models max_staleness 1 (the measured setting)")
    if layout.gpus == 1:  # as measured: each mode's own figures (async's include GPU contention)
        experiences = m.experiences
        tokens = m.tokens_per_experience[mode]
        rollout = m.rollout_s[mode]
        t_exp = rollout / math.ceil(experiences / layout.actors)
        learner = m.learner_s[mode]
        allreduce = 0.0
        broadcast = m.broadcast_s
    else:
        experiences = layout.learners * m.grad_accum
        tokens = m.tokens_per_experience["sync"]  # where t_exp comes from
        # Measured: in sync mode the learner idles while the actors roll out, so the rollout time
        # per update is ceil(E / A) experiences made one after another by actors that share a GPU.
        shared = m.rollout_s["sync"] / math.ceil(m.experiences / m.actors)
        t_exp = shared / float(values["rollout_gpu_speedup"]) if layout.actors_per_gpu == 1 else shared
        rollout = math.ceil(experiences / layout.actors) * t_exp
        # The learner's step was measured with the actors idle (sync): the GPU was its own.
        allreduce = (3 * (layout.learners - 1) / layout.learners * m.broadcast_mb / 1e3
                     / float(values["allreduce_gbps"]))
        learner = m.learner_s["sync"] + allreduce
        if layout.transport == "nccl":
            broadcast = m.broadcast_mb / 1e3 / _float(values["nccl_broadcast_gbps"], m.broadcast_gbps)
        else:
            broadcast = m.broadcast_s * (layout.actors / m.actors) ** float(values["objstore_exponent"])
    stages = {"rollout": rollout, "learner": learner, "broadcast": broadcast}
    if mode == "sync":
        period = rollout + learner + broadcast
        bound = max(stages, key=stages.get)
    else:
        period = max(rollout, learner + broadcast)
        bound = "rollout" if rollout >= learner + broadcast else ("broadcast" if broadcast > learner else "learner")
    samples = experiences * m.samples_per_experience
    return {
        "kind": "model projection (not measured)",
        "objective": m.objective, "mode": mode, "gpus": layout.gpus, "layout": layout.name,
        "learners": layout.learners, "actors": layout.actors, "actors_per_gpu": layout.actors_per_gpu,
        "broadcast_transport": layout.transport, "experiences_per_update": experiences,
        "update_s": period, "updates_per_s": 1.0 / period,
        "tokens_scored_per_s": experiences * tokens / period,
        "samples_trained_per_s": samples / period,
        "learner_samples_per_s_stepping": samples / learner,  # pipeline_bench's learner_samples_per_s
        "rollout_s": rollout, "learner_s": learner, "allreduce_s": allreduce, "broadcast_s": broadcast,
        "bound": bound,
        # Share of wall time a stage has work (model duty cycle, not nvidia-smi utilisation).
        "actor_duty": experiences * t_exp / (layout.actors * period),
        "learner_duty": learner / period,
    }


def project_all(measured: list[Measured], values: dict[str, Any], gpu_counts=GPU_COUNTS) -> list[dict[str, Any]]:
    return [project(m, layout, mode, values)
            for m in measured for layout in layouts(m, gpu_counts) for mode in MODES]


def best(rows: list[dict[str, Any]], objective: str, mode: str, gpus: int,
         key: str = "tokens_scored_per_s") -> dict[str, Any]:
    """The layout with the most ``key`` among N-GPU rows (ties: fewer learners)."""
    pool = [r for r in rows if (r["objective"], r["mode"], r["gpus"]) == (objective, mode, gpus)]
    return max(pool, key=lambda r: (r[key], -r["learners"]))


def one_gpu_check(measured: list[Measured], values: dict[str, Any]) -> list[dict[str, Any]]:
    """Projected vs measured updates/s of the measured configuration."""
    checks = []
    for m in measured:
        layout = layouts(m, (1,))[0]
        for mode in MODES:
            projected = project(m, layout, mode, values)["updates_per_s"]
            checks.append({"objective": m.objective, "mode": mode, "measured_updates_per_s": m.updates_per_s[mode],
                           "projected_updates_per_s": projected,
                           "relative_error": projected / m.updates_per_s[mode] - 1.0})
    return checks


def sensitivity(measured: list[Measured], args: argparse.Namespace | None, gpus: int = 8) -> list[dict[str, Any]]:
    """``gpus``-GPU tokens scored/s with every assumption low, then with one of them high: the best
    layout's, and the configuration that assumption moves most."""
    low = assumption_values(args, "low")
    high = assumption_values(args, "high")
    base_rows = project_all(measured, low, (gpus,))
    base = {(_row_key(r)): r for r in base_rows}
    out = []
    for a in ASSUMPTIONS:
        rows = project_all(measured, {**low, a.name: high[a.name]}, (gpus,))
        for m in measured:
            for mode in MODES:
                before, after = best(base_rows, m.objective, mode, gpus), best(rows, m.objective, mode, gpus)
                mine = [r for r in rows if (r["objective"], r["mode"]) == (m.objective, mode)]
                most = max(mine, key=lambda r: r["tokens_scored_per_s"] / base[_row_key(r)]["tokens_scored_per_s"])
                out.append({"assumption": a.name, "objective": m.objective, "mode": mode, "gpus": gpus,
                            "best_all_low": before["tokens_scored_per_s"], "best_layout_all_low": before["layout"],
                            "best_this_high": after["tokens_scored_per_s"], "best_layout_this_high": after["layout"],
                            "best_gain": after["tokens_scored_per_s"] / before["tokens_scored_per_s"],
                            "most_moved_layout": most["layout"],
                            "most_moved_gain": most["tokens_scored_per_s"]
                            / base[_row_key(most)]["tokens_scored_per_s"]})
    return out


def _row_key(row: dict[str, Any]) -> tuple:
    return row["objective"], row["mode"], row["gpus"], row["layout"]


# -- reports ----------------------------------------------------------------------------------
def _range(lo: float, hi: float, fmt: str) -> str:
    a, b = fmt.format(lo), fmt.format(hi)
    return a if a == b else f"{a}-{b}"


def table(low_rows: list[dict[str, Any]], high_rows: list[dict[str, Any]]) -> str:
    """Every configuration, each cell 'low end-high end'."""
    head = ["objective", "GPUs", "layout", "mode", "updates/s", "tokens scored/s", "samples trained/s",
            "learner samples/s (stepping)", "broadcast s", "bound (low/high)", "actor duty", "learner duty"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lo, hi in zip(low_rows, high_rows):
        bound = lo["bound"] if lo["bound"] == hi["bound"] else f"{lo['bound']}/{hi['bound']}"
        lines.append("| " + " | ".join([
            lo["objective"].upper(), str(lo["gpus"]), lo["layout"], lo["mode"],
            _range(lo["updates_per_s"], hi["updates_per_s"], "{:.3f}"),
            _range(lo["tokens_scored_per_s"], hi["tokens_scored_per_s"], "{:.0f}"),
            _range(lo["samples_trained_per_s"], hi["samples_trained_per_s"], "{:.2f}"),
            _range(lo["learner_samples_per_s_stepping"], hi["learner_samples_per_s_stepping"], "{:.1f}"),
            _range(lo["broadcast_s"], hi["broadcast_s"], "{:.3f}"), bound,
            _range(lo["actor_duty"], hi["actor_duty"], "{:.0%}"),
            _range(lo["learner_duty"], hi["learner_duty"], "{:.0%}"),
        ]) + " |")
    return "\n".join(lines)


def headline(low_rows: list[dict[str, Any]], high_rows: list[dict[str, Any]], measured: list[Measured]) -> str:
    """Per objective, mode and GPU count: the layout with the most tokens scored/s at each end."""
    head = ["objective", "mode", "GPUs", "best layout (low / high end)", "updates/s", "tokens scored/s",
            "x 1 GPU (tokens)", "bound (low / high)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in measured:
        for mode in MODES:
            base_lo = best(low_rows, m.objective, mode, 1)["tokens_scored_per_s"]
            base_hi = best(high_rows, m.objective, mode, 1)["tokens_scored_per_s"]
            for n in GPU_COUNTS:
                lo, hi = best(low_rows, m.objective, mode, n), best(high_rows, m.objective, mode, n)
                where = lo["layout"] if lo["layout"] == hi["layout"] else f"{lo['layout']} / {hi['layout']}"
                lines.append("| " + " | ".join([
                    m.objective.upper(), mode, str(n), where,
                    _range(lo["updates_per_s"], hi["updates_per_s"], "{:.3f}"),
                    _range(lo["tokens_scored_per_s"], hi["tokens_scored_per_s"], "{:.0f}"),
                    _range(lo["tokens_scored_per_s"] / base_lo, hi["tokens_scored_per_s"] / base_hi, "{:.1f}"),
                    lo["bound"] if lo["bound"] == hi["bound"] else f"{lo['bound']} / {hi['bound']}",
                ]) + " |")
    return "\n".join(lines)


def assumptions_text(low: dict[str, Any], high: dict[str, Any]) -> str:
    lines = ["| assumption | flag | low (pessimistic) | high (optimistic) | meaning |", "|---|---|---|---|---|"]
    for a in ASSUMPTIONS:
        lines.append(f"| {a.name} | `{a.flag} LOW HIGH` | {low[a.name]} {a.unit} | {high[a.name]} {a.unit} "
                     f"| {a.meaning} |")
    return "\n".join(lines)


def sensitivity_text(rows: list[dict[str, Any]]) -> str:
    lines = [("| assumption raised alone | objective | mode | best 8-GPU tokens scored/s: all low -> this one high "
              "| gain | 8-GPU layout it moves most | its gain |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['assumption']} | {r['objective'].upper()} | {r['mode']} | {r['best_all_low']:.0f} "
                     f"({r['best_layout_all_low']}) -> {r['best_this_high']:.0f} ({r['best_layout_this_high']}) | "
                     f"{r['best_gain']:.2f}x | {r['most_moved_layout']} | {r['most_moved_gain']:.2f}x |")
    return "\n".join(lines)


def inputs_text(measured: list[Measured]) -> str:
    """The measured figures the model uses, and the per-update stage times derived from them."""
    lines = [("| objective | mode | updates/s | tokens scored/s | tokens per experience | rollout tokens/s "
              "| rollout s per update | learner step s | broadcast s (sync: the transfer) | broadcast MB |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in measured:
        for mode in MODES:
            tokens = m.tokens_per_experience[mode] * m.experiences
            lines.append(f"| {m.objective.upper()} | {mode} | {m.updates_per_s[mode]:.3f} "
                         f"| {tokens * m.updates_per_s[mode]:.0f} | {m.tokens_per_experience[mode]:.0f} "
                         f"| {tokens / m.rollout_s[mode]:.0f} | {m.rollout_s[mode]:.2f} | {m.learner_s[mode]:.3f} "
                         f"| {m.broadcast_s if mode == 'sync' else m.broadcast_s_async_wall:.3f} "
                         f"| {m.broadcast_mb:.1f} |")
    return "\n".join(lines) + (
        f"\n\nMeasured layout: {m.learners} learner rank, {m.actors} rollout actors, grad_accum {m.grad_accum} "
        f"({m.experiences} experiences of {m.samples_per_experience:.0f} samples per update), max_staleness "
        f"{m.max_staleness}. Derived: tokens per experience = tokens scored/s / updates/s / experiences; rollout s "
        "per update = tokens per update / rollout tokens/s. The async broadcast figure includes waiting for "
        "the rollout in progress; the model uses the sync transfer for both modes.")


def checks_text(checks: list[dict[str, Any]]) -> str:
    lines = ["| objective | mode | measured updates/s | model at 1 GPU | error |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['objective'].upper()} | {c['mode']} | {c['measured_updates_per_s']:.3f} | "
                     f"{c['projected_updates_per_s']:.3f} | {c['relative_error']:+.1%} |")
    return "\n".join(lines)


def plot(low_rows, high_rows, measured: list[Measured], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(measured), 2, figsize=(11, 4.2 * len(measured)), squeeze=False)
    colours = {"sync": "tab:blue", "async": "tab:orange"}
    for row, m in enumerate(measured):
        for col, (key, label, family) in enumerate([
            ("updates_per_s", "updates/s (1 learner rank: same update size as measured)", 1),
            ("tokens_scored_per_s", "rollout tokens scored/s (best layout per N)", None),
        ]):
            ax = axes[row][col]
            for mode in MODES:
                lo, hi = [], []
                for n in GPU_COUNTS:
                    if family is None:
                        lo.append(best(low_rows, m.objective, mode, n)[key])
                        hi.append(best(high_rows, m.objective, mode, n)[key])
                    else:
                        pick = [r for r in low_rows if (r["objective"], r["mode"], r["gpus"]) == (m.objective, mode, n)
                                and r["learners"] == family]
                        pick_hi = [r for r in high_rows if (r["objective"], r["mode"], r["gpus"]) == (m.objective, mode, n)
                                   and r["learners"] == family]
                        lo.append(max(r[key] for r in pick))
                        hi.append(max(r[key] for r in pick_hi))
                ax.fill_between(GPU_COUNTS, lo, hi, color=colours[mode], alpha=0.2)
                ax.plot(GPU_COUNTS, lo, "--", color=colours[mode], label=f"{mode}: model, low end")
                ax.plot(GPU_COUNTS, hi, "-", color=colours[mode], label=f"{mode}: model, high end")
                measured_value = (m.updates_per_s[mode] if key == "updates_per_s"
                                  else m.tokens_per_experience[mode] * m.experiences * m.updates_per_s[mode])
                ax.plot([1], [measured_value], "o", color=colours[mode], markeredgecolor="black", markersize=8,
                        label=f"{mode}: MEASURED (1 H100, colocated)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(GPU_COUNTS, [str(n) for n in GPU_COUNTS])
            ax.set_xlabel("GPUs (one host)")
            ax.set_ylabel(label.split(" (")[0])
            ax.set_title(f"{m.objective.upper()}: {label}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if row == col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("MODEL PROJECTION, not measured (only the 1-GPU points are measurements)", color="darkred")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- CLI --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", type=Path, default=DEFAULT_INPUTS,
                        help="pipeline_bench JSON files of the 1-GPU colocated runs, one per objective")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scaling_model",
                        help="folder for scaling_model.{json,md,png}")
    parser.add_argument("--no-plot", action="store_true")
    for a in ASSUMPTIONS:
        parser.add_argument(a.flag, dest=a.name, nargs=2, metavar=("LOW", "HIGH"), default=None,
                            type=lambda s: s if s == "measured" else float(s),
                            help=f"{a.meaning} [default: {a.low} {a.high}]")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    measured = [load_measured(path) for path in args.inputs]
    low, high = assumption_values(args, "low"), assumption_values(args, "high")
    low_rows, high_rows = project_all(measured, low), project_all(measured, high)
    return {
        "note": BANNER,
        "inputs": [str(Path(p).resolve().relative_to(REPO)) if Path(p).resolve().is_relative_to(REPO) else str(p)
                   for p in args.inputs],
        "measured": [asdict(m) | {"source": Path(m.source).name} for m in measured],
        "assumptions": {a.name: {"flag": a.flag, "low": low[a.name], "high": high[a.name], "unit": a.unit,
                                 "meaning": a.meaning} for a in ASSUMPTIONS},
        "one_gpu_check": one_gpu_check(measured, low),
        "low": low_rows, "high": high_rows,
        "sensitivity": sensitivity(measured, args),
        "_measured_objects": measured,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    measured = result.pop("_measured_objects")
    low, high = result["low"], result["high"]
    lows = {k: v["low"] for k, v in result["assumptions"].items()}
    highs = {k: v["high"] for k, v in result["assumptions"].items()}
    text = "\n\n".join([
        f"# Scaling model of the Ray pipeline\n\n**{BANNER}**",
        "Inputs: " + ", ".join(f"`{p}`" for p in result["inputs"]),
        "## Inputs (measured on one H100, and derived from the measurements)\n\n" + inputs_text(measured),
        "## Assumptions (not measured)\n\n" + assumptions_text(lows, highs),
        "## Check: the model on the measured 1-GPU configuration\n\n" + checks_text(result["one_gpu_check"]),
        "## Headline: best layout per GPU count by tokens scored/s (PROJECTED, low-high end)\n\n"
        + headline(low, high, measured),
        "## Every configuration (PROJECTED, each cell low end-high end)\n\n" + table(low, high),
        "## Sensitivity: each assumption raised alone from the all-low end (PROJECTED)\n\n"
        + sensitivity_text(result["sensitivity"]),
    ]) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling_model.md").write_text(text)
    (args.out / "scaling_model.json").write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(low, high, measured, args.out / "scaling_model.png")
    print(f"wrote {args.out}/scaling_model.{{md,json{'' if args.no_plot else ',png'}}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
