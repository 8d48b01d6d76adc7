"""One table of ``bench/throughput.py --parts ray`` runs that differ in their rollout side.

``bench/gpu_issue17.sh actors`` runs the async GTO pipeline once per variant (rollout actors,
``max_staleness``) in one call on one GPU; this lines the runs up so the balance between the
learner and the actors feeding it reads at a glance: updates/s (what the user gets), learner busy
(the issue's target), and where an update's time went.

    python bench/actor_table.py OUT_DIR RUN/summary.json [RUN/summary.json ...]

writes OUT_DIR/actors.md and OUT_DIR/actors.json; the run's folder name is its row's name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("variant", "actors", "max staleness", "updates", "updates/s", "vs first row", "learner busy",
           "learner step s", "learner compute s", "learner idle s", "rollout build s", "staleness mean",
           "GPU busy", "peak GiB learner / actor")


def ray_settings(argv: list[str]) -> dict[str, str]:
    """The ``--ray-set key=value`` overrides a run was given."""
    return dict(argv[i + 1].split("=", 1) for i, flag in enumerate(argv[:-1]) if flag == "--ray-set")


def row(name: str, summary: dict) -> dict:
    run = summary.get("ray", {}).get("async")
    if not run:
        raise ValueError(f"{name}: summary has no ray.async run (errors: {summary.get('errors')})")
    sets = ray_settings(summary.get("argv", []))
    if "error" in run:
        return {"variant": name, "error": run["error"], "ray_set": sets}
    parts = run.get("breakdown", {})
    return {
        "variant": name, "ray_set": sets,
        "actors": int(sets.get("distributed.num_rollout_actors", summary["sizes"]["actors"])),
        "max_staleness": run.get("max_staleness"), "updates": run["updates"],
        "updates_per_s": run["updates_per_s"], "learner_busy": run["learner_busy"],
        "learner_step_s": run["learner_step_s"], "learner_compute_s": parts.get("learner_compute_s"),
        "learner_idle_s": parts.get("learner_idle_s"), "rollout_build_s": parts.get("rollout_build_s"),
        "staleness_mean": run.get("staleness_mean"),
        "gpu_busy": sum(run["gpu_busy"].values()) / len(run["gpu_busy"]) if run.get("gpu_busy") else None,
        "learner_peak_gib": run.get("learner_peak_memory_gib"), "rollout_peak_gib": run.get("rollout_peak_memory_gib"),
    }


def render(rows: list[dict]) -> str:
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    base = next((r["updates_per_s"] for r in rows if "error" not in r), None)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = [r["variant"], str(r["actors"]), num(r["max_staleness"], "d"), str(r["updates"]),
                 num(r["updates_per_s"], ".3f"), f"{r['updates_per_s'] / base:.3f}x",
                 num(100 * r["learner_busy"], ".1f") + " %", num(r["learner_step_s"], ".3f"),
                 num(r["learner_compute_s"], ".3f"), num(r["learner_idle_s"], ".3f"), num(r["rollout_build_s"], ".3f"),
                 num(r["staleness_mean"], ".2f"), "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f} %",
                 f"{num(r['learner_peak_gib'], '.1f')} / {num(r['rollout_peak_gib'], '.1f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, paths = Path(argv[0]), [Path(p) for p in argv[1:]]
    rows = [row(p.parent.name, json.loads(p.read_text())) for p in paths]
    table = render(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "actors.md").write_text(table)
    (out / "actors.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
