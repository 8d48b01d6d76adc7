"""The study's report: tau per arm (mean and spread over seeds), curves, GPU shares, vLLM ranking.

Reads only what the stages left in the study directory, so it can be rerun at any point: a
run or a scoring not there yet is simply missing from the tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from experiments.study_spec import Study, checkpoint_step, eval_folder, read_state, study_runs, write_json

CURVES = (("eval", "accept_length_proxy"), ("eval", "top1/step1"), ("train", "gto/reward"),
          ("train", "rollout/tau"))


# ---------------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed process
            continue
    return rows


def metric_series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a step logged twice (a slice redone after a kill) keeps
    its last value."""
    by_step = {r["step"]: r[key] for r in rows if r.get("split") == split and key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _scores(out: Path, name: str, temperature: float, chain: int = 0) -> dict[str, Any] | None:
    path = eval_folder(out, name, temperature, chain) / "compare.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_taus(out: Path, name: str, temperature: float, chain: int = 0) -> dict[str, float] | None:
    """bench -> tau of drafter ``name`` at ``temperature``, EAGLE-3's tree or chains of ``chain``
    (None: not scored)."""
    record = _scores(out, name, temperature, chain)
    return None if record is None else {bench: s["tau"] for bench, s in record["results"][name].items()}


def read_speedups(out: Path, name: str, temperature: float) -> dict[str, float] | None:
    """bench -> tokens/s over the AR baseline timed in the same process (None: not timed)."""
    record = _scores(out, name, temperature)
    if record is None or not all("speedup" in s for s in record["results"][name].values()):
        return None
    return {bench: s["speedup"] for bench, s in record["results"][name].items()}


def read_baseline(out: Path, names: list[str], temperature: float) -> dict[str, list[float]]:
    """bench -> the AR tokens/s of every scoring that timed one at ``temperature``."""
    seen: dict[str, list[float]] = {}
    for name in names:
        record = _scores(out, name, temperature)
        for bench, scores in ((record or {}).get("baseline") or {}).items():
            if scores["tokens_per_s"] not in seen.setdefault(bench, []):
                seen[bench].append(scores["tokens_per_s"])
    return seen


def gpu_shares(out: Path) -> tuple[dict[str, float], float | None]:
    """Mean SM% per run over the samples taken while it ran, and the mean device utilisation."""
    samples = read_jsonl(out / "gpu_samples.jsonl")
    sums: dict[str, list[float]] = {}
    utils = []
    for sample in samples:
        if not sample.get("running"):
            continue
        for name in sample["running"]:
            sums.setdefault(name, []).append(sample.get("runs", {}).get(name, 0.0))
        if sample.get("gpus"):
            utils.append(sum(g["util"] for g in sample["gpus"]) / len(sample["gpus"]))
    shares = {name: sum(values) / len(values) for name, values in sums.items()}
    return shares, (sum(utils) / len(utils) if utils else None)


def collect(study: Study, out: Path) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict (results.json)."""
    shares, util = gpu_shares(out)
    runs = {}
    for run in study_runs(study, out):
        state = read_state(run)
        runs[run.name] = {
            "arm": run.arm, "seed": run.seed, "minutes": state["minutes"],
            # the step the last slice ended at (its export), else the latest checkpoint's
            "steps": state.get("step", checkpoint_step(run)),
            "slots": state["slots"], "gpu_sm_percent": shares.get(run.name),
            "tau": {f"{t:g}": read_taus(out, run.name, t) for t in study.eval.temperatures},
            "speedup": {f"{t:g}": read_speedups(out, run.name, t) for t in study.eval.temperatures},
        }
    start = {"tau": {f"{t:g}": read_taus(out, "start", t) for t in study.eval.temperatures},
             "speedup": {f"{t:g}": read_speedups(out, "start", t) for t in study.eval.temperatures}}
    summary = {f"{t:g}": summarise(study, runs, start, f"{t:g}") for t in study.eval.temperatures}
    for t in study.eval.temperatures:
        summary[f"{t:g}"]["ar_tokens_per_s"] = read_baseline(out, ["start", *runs], t)
    record = out / "study.json"  # what train recorded, e.g. the --start it was given
    begun_from = json.loads(record.read_text()).get("start_drafter") if record.is_file() else None
    return {"study": study.model_dump(mode="json"), "start_drafter": begun_from, "start": start, "runs": runs, "summary": summary,
            "gpu_mean_util_percent": util}


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def benches_of(runs: dict[str, Any], start: dict[str, Any], key: str) -> list[str]:
    """Bench names in first-seen order over every scoring at temperature ``key``."""
    names: list[str] = []
    for taus in [start["tau"][key]] + [r["tau"][key] for r in runs.values()]:
        for bench in taus or {}:
            if bench not in names:
                names.append(bench)
    return names


def summarise(study: Study, runs: dict[str, Any], start: dict[str, Any], key: str) -> dict[str, Any]:
    """Per row (start and each arm): tau per bench and its bench mean, over seeds (mean, min, max)."""
    benches = benches_of(runs, start, key)
    rows: dict[str, Any] = {}
    for row in ["start", *study.arms]:
        scored = [start["tau"][key]] if row == "start" else [r["tau"][key] for r in runs.values() if r["arm"] == row]
        scored = [taus for taus in scored if taus and all(b in taus for b in benches)]
        rows[row] = {bench: _spread([taus[bench] for taus in scored]) for bench in benches}
        rows[row]["mean"] = _spread([sum(taus[b] for b in benches) / len(benches) for taus in scored] if benches else [])
        timed = [start["speedup"][key]] if row == "start" else [
            r["speedup"][key] for r in runs.values() if r["arm"] == row]
        timed = [s for s in timed if s and all(b in s for b in benches)]
        rows[row]["speedup"] = _spread([sum(s[b] for b in benches) / len(benches) for s in timed] if benches else [])
    base = rows["start"]["mean"]
    for row in rows.values():
        mean = row["mean"]
        row["vs_start"] = mean["mean"] / base["mean"] - 1 if mean and base else None
    return {"benches": benches, "rows": rows}


# ---------------------------------------------------------------------------------- writing


def _cell(spread: dict[str, float] | None, digits: int = 3, unit: str = "") -> str:
    """``mean (min–max)`` over seeds; the mean alone for one seed; a dash for none."""
    if spread is None:
        return "—"
    mean = f"{spread['mean']:.{digits}f}{unit}"
    return mean if spread["n"] == 1 else f"{mean} ({spread['min']:.{digits}f}–{spread['max']:.{digits}f})"


def markdown(study: Study, data: dict[str, Any]) -> str:
    start = study.start_drafter or data.get("start_drafter")
    intro = (f"Every arm starts from `{start}` and trains {study.minutes_per_arm:g} minutes "
             f"(wall clock) per seed, seeds {study.seeds}, {study.parallel} runs at once. tau = mean tokens per "
             f"target verification forward (tree engine), first {study.eval.num_prompts} questions per bench, "
             f"{study.eval.max_new_tokens} new tokens; cells: mean over seeds (min–max). Scorings ran one at a "
             "time on the GPU.")
    lines = [f"# {study.name}", "", intro, ""]
    if data["gpu_mean_util_percent"] is not None:
        gpu = (f"Mean GPU utilisation while training: {data['gpu_mean_util_percent']:.0f}%; "
               "'GPU SM %' is a run's mean SM share (nvidia-smi pmon), averaged over seeds.")
        lines += [gpu, ""]
    for key, summary in data["summary"].items():
        scored = any(cells["mean"] is not None for cells in summary["rows"].values())
        body = table(study, data, summary) if scored else [f"Not scored at T = {key} (no eval results)."]
        lines += [f"## T = {key}", "", *body, ""]
    return "\n".join(lines)


def table(study: Study, data: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    benches = summary["benches"]
    head = ["arm", *benches, "mean", "vs start", "speed-up vs AR", "paper", "steps per seed", "GPU SM %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in summary["rows"].items():
        runs = [r for r in data["runs"].values() if r["arm"] == row]
        steps = ", ".join(f"s{r['seed']}: {r['steps']}" for r in runs) or "—"
        shares = [r["gpu_sm_percent"] for r in runs if r["gpu_sm_percent"] is not None]
        gain = "—" if row == "start" or cells["vs_start"] is None else f"{100 * cells['vs_start']:+.1f}%"
        paper = (study.arms[row].paper_gain if row in study.arms else None) or "—"
        share = f"{sum(shares) / len(shares):.0f}" if shares else "—"
        lines.append("| " + " | ".join([row, *(_cell(cells[b]) for b in benches), _cell(cells["mean"]), gain,
                                        _cell(cells.get("speedup"), 2, "x"), paper, steps, share]) + " |")
    baseline = summary.get("ar_tokens_per_s") or {}
    if baseline:
        lines += ["", "Speed-up: a drafter's tokens/s over the target's own autoregressive decoding, timed "
                  "alongside it in the same process (speculative.timing.measure_speedup: alternating per "
                  "question), mean over benches; AR tokens/s per scoring: " + "; ".join(
                      f"{b} " + ", ".join(f"{v:.1f}" for v in values) for b, values in baseline.items()) + "."]
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(study: Study, out: Path, png: Path) -> Path:
    """One panel per metric; colour = arm, line style = seed."""
    plt = _pyplot()
    series = {run.name: (run, read_jsonl(run.directory / "metrics.jsonl")) for run in study_runs(study, out)}
    panels = [(split, key) for split, key in CURVES
              if any(metric_series(rows, split, key)[0] for _, rows in series.values())]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.8), squeeze=False)
    colours = {arm: f"C{i}" for i, arm in enumerate(study.arms)}
    styles = ["-", "--", ":", "-."]
    for ax, (split, key) in zip(axes[0], panels):
        for run, rows in series.values():
            steps, values = metric_series(rows, split, key)
            if steps:
                ax.plot(steps, values, styles[study.seeds.index(run.seed) % len(styles)],
                        color=colours[run.arm], marker="o" if split == "eval" else None, ms=3, label=run.name)
        ax.set(xlabel="step", title=f"{split} {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def seed_taus(data: dict[str, Any], row: str, key: str) -> list[dict[str, float]]:
    """bench -> tau per scored seed of ``row`` at temperature ``key``, with the bench mean as 'mean'."""
    scored = [data["start"]["tau"][key]] if row == "start" else [
        r["tau"][key] for r in data["runs"].values() if r["arm"] == row]
    return [{**taus, "mean": sum(taus.values()) / len(taus)} for taus in scored if taus]


def plot_tau(study: Study, data: dict[str, Any], png: Path) -> Path:
    """Per temperature: bars = mean tau over seeds per bench (and the bench mean), dots = the seeds."""
    plt = _pyplot()
    keys = [k for k in data["summary"]  # temperatures with at least one scored drafter
            if any(cells["mean"] is not None for cells in data["summary"][k]["rows"].values())] or list(data["summary"])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    rows = ["start", *study.arms]
    width = 0.8 / len(rows)
    for ax, key in zip(axes[0], keys):
        groups, plotted = [*data["summary"][key]["benches"], "mean"], []
        for i, row in enumerate(rows):
            per_seed = seed_taus(data, row, key)
            for j, group in enumerate(groups):
                values = [taus[group] for taus in per_seed if group in taus]
                if not values:
                    continue
                x = j + (i - (len(rows) - 1) / 2) * width
                ax.bar(x, sum(values) / len(values), width, color=f"C{i}", label=row if j == 0 else None)
                ax.scatter([x] * len(values), values, color="k", s=8, zorder=3)
                plotted += values
        ax.set_xticks(range(len(groups)), groups)
        ax.set(ylabel="tau", title=f"tau at T = {key} (bars: mean over seeds, dots: seeds)")
        if plotted:  # tau >= 1: start the axis near the data, not at 0
            ax.set_ylim(max(0.0, min(plotted) - 0.3), max(plotted) + 0.1)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def summary_json(study: Study, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Issue 18's ``summary.json``: tau = the mean over the benches of one scoring, per seed.

    ``{"start": {"tau_t0", "tau_t1"}, "arms": {arm: {"tau_t0": [per seed], "tau_t1": [...],
    "updates": [...], "gpu_minutes": [...], "seeds": [...]}}}`` at EAGLE-3's tree; chain scorings
    (``eval.chain_lengths``) add ``tau_t0_chainN`` / ``tau_t1_chainN``. None where not scored.
    """
    def mean_tau(name: str, temperature: float, chain: int = 0) -> float | None:
        taus = read_taus(out, name, temperature, chain)
        return sum(taus.values()) / len(taus) if taus else None

    def keys() -> list[tuple[str, float, int]]:
        return [(f"tau_t{t:g}" + (f"_chain{c}" if c else ""), t, c)
                for c in [0, *study.eval.chain_lengths] for t in study.eval.temperatures]

    summary: dict[str, Any] = {"start": {key: mean_tau("start", t, c) for key, t, c in keys()}, "arms": {}}
    for arm in study.arms:
        runs = sorted((r for r in data["runs"].items() if r[1]["arm"] == arm), key=lambda item: item[1]["seed"])
        entry: dict[str, Any] = {key: [mean_tau(name, t, c) for name, _ in runs] for key, t, c in keys()}
        entry.update(updates=[r["steps"] for _, r in runs], gpu_minutes=[r["minutes"] for _, r in runs],
                     seeds=[r["seed"] for _, r in runs])
        summary["arms"][arm] = entry
    return summary


def write_report(study: Study, out: Path) -> list[Path]:
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    data = collect(study, out)
    write_json(folder / "results.json", data)
    write_json(folder / "summary.json", summary_json(study, out, data))
    (folder / "results.md").write_text(markdown(study, data))
    return [folder / "results.json", folder / "results.md",
            plot_curves(study, out, folder / "curves.png"), plot_tau(study, data, folder / "tau.png")]


# ---------------------------------------------------------------------------------- vLLM ranking


def ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda name: -scores[name])


def pairs_ordered_alike(a: dict[str, float], b: dict[str, float]) -> tuple[int, int]:
    """(pairs of drafters that ``a`` and ``b`` order the same way, ties included, and all pairs):
    with ties, equal sorted lists alone would depend on the order the names came in."""
    names = sorted(a)
    pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]

    def sign(v: float) -> int:
        return (v > 0) - (v < 0)

    alike = sum(sign(a[x] - a[y]) == sign(b[x] - b[y]) for x, y in pairs)
    return alike, len(pairs)


def write_vllm_ranking(study: Study, out: Path, names: list[str]) -> dict[str, Any]:
    """vLLM's and draftrl's acceptance per drafter, and the arms ranked by vLLM vs by tree tau at T=0."""
    rows = {}
    for name in names:
        path = out / "vllm" / f"{name}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        theirs, ours = report["vllm"]["mean_acceptance_length"], report["draftrl"]["mean_acceptance_length"]
        taus = read_taus(out, name, 0.0)
        rows[name] = {"vllm": theirs, "draftrl": ours, "agree": abs(theirs - ours) <= study.vllm.tolerance,
                      "tree_tau_t0": sum(taus.values()) / len(taus) if taus else None,
                      "outputs_identical": report.get("outputs_identical")}
    theirs = {n: r["vllm"] for n, r in rows.items()}
    tree = {n: r["tree_tau_t0"] for n, r in rows.items() if r["tree_tau_t0"] is not None}
    complete = len(tree) == len(rows)
    alike = pairs_ordered_alike(theirs, tree) if complete else None
    data = {"seed": study.vllm.seed, "num_speculative_tokens": study.vllm.num_speculative_tokens,
            "tolerance": study.vllm.tolerance, "drafters": rows, "ranking_vllm": ranking(theirs),
            "ranking_tree_tau_t0": ranking(tree) if complete else None,
            "pairs_ordered_alike": None if alike is None else f"{alike[0]}/{alike[1]}",
            "rankings_equal": None if alike is None else alike[0] == alike[1]}
    folder = out / "report"
    write_json(folder / "vllm_ranking.json", data)
    (folder / "vllm_ranking.md").write_text(vllm_markdown(data))
    return data


def vllm_markdown(data: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    lines = [f"# vLLM check (seed {data['seed']}, chain of {data['num_speculative_tokens']})", "",
             "| drafter | vLLM accept length | draftrl accept length | agree (±{:g}) | tree tau T=0 |".format(
                 data["tolerance"]), "|---|---|---|---|---|"]
    for name, row in data["drafters"].items():
        lines.append(f"| {name} | {number(row['vllm'])} | {number(row['draftrl'])} | "
                     f"{'yes' if row['agree'] else 'NO'} | {number(row['tree_tau_t0'])} |")
    equal = (f"Rankings equal: {data['rankings_equal']} (drafter pairs ordered alike, ties included: "
             f"{data['pairs_ordered_alike'] or '—'})")
    lines += ["", f"Ranking by vLLM: {', '.join(data['ranking_vllm']) or '—'}",
              f"Ranking by tree tau at T=0: {', '.join(data['ranking_tree_tau_t0'] or []) or '— (not scored)'}",
              equal]
    return "\n".join(lines) + "\n"
