"""One table of the same measurements at two checkouts: an older one ("old") and this tree ("new").

``bench/gpu_issue17.sh versions`` runs, on one machine and one warm drafter, the GTO learner step
(``bench/gto_learner_step.py``), the GTO experience (``bench/gto_throughput.py``) and the Ray
pipeline (``bench/throughput.py --parts ray``) at both checkouts; this lines them up as old, new
and their ratio, so a change's effect is read from runs made minutes apart on the same GPU.

    python bench/version_table.py OUT_DIR REPORT [REPORT ...]

A report's file name says what it is: ``{old,new}_learner.json``, ``{old,new}_gto.json`` or
``{old,new}_ray_summary.json``. Writes OUT_DIR/versions.md and OUT_DIR/versions.json.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

NAME = re.compile(r"^(old|new)_(learner|gto|ray_summary)\.json$")


def load(paths: list[Path]) -> dict[str, dict[str, dict]]:
    """{part: {version: report}} from report files named as the module docstring says."""
    reports: dict[str, dict[str, dict]] = {}
    for path in paths:
        match = NAME.match(path.name)
        if not match:
            raise ValueError(f"{path}: not a version report ({{old,new}}_{{learner,gto,ray_summary}}.json)")
        version, part = match.groups()
        reports.setdefault(part.removesuffix("_summary"), {})[version] = json.loads(path.read_text())
    return reports


def measures(part: str, report: dict) -> dict[str, float | None]:
    """The figures of one report, each named with the direction that is better."""
    if part == "learner":
        row = report["rows"][0]
        replay = row.get("replay_ms")
        return {"step ms (median)": row["step_ms"]["median"], "replay ms (median)": replay and replay["median"],
                "peak GiB": row["peak_gib"]}
    if part == "gto":
        best = max((r for r in report["rows"] if r["path"] == "batched"), key=lambda r: r["tok_s"])
        each = best.get("batch_seconds") or []
        return {"tok/s": best["tok_s"], "s / batch (mean)": best["seconds_per_batch"],
                "s / batch (median)": statistics.median(each) if each else None, "peak GiB": best["peak_gb"]}
    run = report.get("ray", {}).get("async")
    if not run or "error" in run:
        return {"updates/s": None}
    return {"updates/s": run["updates_per_s"], "learner busy": run["learner_busy"],
            "learner step s": run["learner_step_s"],
            "rollout build s": run.get("breakdown", {}).get("rollout_build_s"),
            "rollout peak GiB": run.get("rollout_peak_memory_gib")}


HIGHER_IS_BETTER = {"tok/s", "updates/s"}
NEUTRAL = {"learner busy"}  # a share of one saturated GPU: neither direction is better in itself


def rows(reports: dict[str, dict[str, dict]]) -> list[dict]:
    out = []
    for part in ("learner", "gto", "ray"):
        if part not in reports:
            continue
        old, new = (measures(part, reports[part][v]) if v in reports[part] else {} for v in ("old", "new"))
        for name in dict.fromkeys([*old, *new]):
            a, b = old.get(name), new.get(name)
            ratio = None
            if a and b and name not in NEUTRAL:
                ratio = b / a if name in HIGHER_IS_BETTER else a / b
            out.append({"part": part, "measure": name, "old": a, "new": b, "speed_up": ratio})
    return out


def render(table: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.4g}"

    lines = ["| part | measure | old | new | new vs old (>1: new better) |", "|---|---|---|---|---|"]
    for r in table:
        ratio = "-" if r["speed_up"] is None else f"{r['speed_up']:.3f}x"
        lines.append(f"| {r['part']} | {r['measure']} | {cell(r['old'])} | {cell(r['new'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out = Path(argv[0])
    table = rows(load([Path(p) for p in argv[1:]]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.md").write_text(render(table))
    (out / "versions.json").write_text(json.dumps(table, indent=1))
    print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
