"""``summary.json`` of a Qwen2.5-Coder run (issue 21's keys) from the files a GPU session brings back.

    python bench/qwen_summary.py --eval RUN/eval_t0 RUN/eval_t1 --sft RUN/sft --regen RUN/regen/manifest.json \
        --out RUN/summary.json

Reads each eval folder's ``results.json`` (``draftrl eval``), and where present its ``profile.json``
(``--profile N``), the SFT ``metrics.jsonl`` and the regeneration manifest. The headline keys are
means over the benches at each temperature: ``tau_t0``, ``speedup_t0``, ``tau_t1``, ``speedup_t1``,
and ``ar_tok_s`` (the AR baseline's tokens/s at T = 0). Per bench it adds the cycle time
(``spec_time_s / verify_forwards``) and the AR time per token, and how many of the 80 questions
the time box covered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean
from typing import Any

TARGETS = {"tau_t0_humaneval_min": 3.5, "speedup_t0_min": 2.0}


def bench_rows(results: dict[str, Any]) -> dict[float, dict[str, dict[str, Any]]]:
    """Per temperature, per bench: the figures a reader compares across runs."""
    rows: dict[float, dict[str, dict[str, Any]]] = {}
    for r in results["results"]:
        rows.setdefault(float(r["temperature"]), {})[r["bench"]] = {
            "tau": r["tau"],
            "speedup": r["speedup"],
            "spec_tok_s": r["spec_tokens_per_s"],
            "ar_tok_s": r["baseline_tokens_per_s"],
            "questions": r["questions"],
            "generations": r["generations"],
            "cycle_ms": round(1000 * r["spec_time_s"] / r["verify_forwards"], 3),
            "ar_ms_per_token": round(1000 * r["baseline_time_s"] / r["baseline_tokens"], 3),
            "t0_mismatches": r.get("mismatches") if float(r["temperature"]) == 0 else None,
        }
    return rows


def profile_summary(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    spec = data["decoders"]["spec"]["per_cycle"]
    ar = next(d["per_step"] for d in data["decoders"].values() if d["kind"] == "ar")
    return {
        "bench": data["config"]["bench"], "questions": data["config"]["questions"],
        "cycles": spec["cycles"], "tau": spec["tau"],
        "clean_cycle_ms": spec["clean_cycle_wall_ms"], "clean_ar_step_ms": ar["clean_step_wall_ms"],
        "cycle_in_ar_steps": round(spec["clean_cycle_wall_ms"] / ar["clean_step_wall_ms"], 3),
        "phases_wall_ms": spec["phases_wall_ms"], "phases_gpu_busy_ms": spec["phases_window_ms"],
        "host_outside_phases_ms": spec["other_host_ms"],
    }


def sft_summary(folder: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("split") == "eval"]
    train = [r for r in records if r.get("split") == "train"]
    last_eval, last_train = evals[-1], train[-1]
    return {
        "steps": last_train["step"],
        "train_tok_s_last": round(last_train["tokens_per_s"], 1),
        "train_top1_step1_last": round(last_train["top1/step1"], 4),
        "heldout_top1_step1": round(last_eval["top1/step1"], 4),
        "heldout_accept_length_proxy": round(last_eval["accept_length_proxy"], 4),
        "heldout_accept_length_proxy_curve": {str(r["step"]): round(r["accept_length_proxy"], 4) for r in evals},
    }


def regen_summary(path: Path) -> dict[str, Any]:
    manifest = json.loads(path.read_text())
    shards = manifest["shards"].values()
    return {
        "shards_committed": len(manifest["shards"]),
        "conversations": sum(s["rows"] for s in shards),
        "generated_tokens": sum(s["generated_tokens"] for s in shards),
        "settings": {k: manifest["settings"][k] for k in ("shard_size", "max_model_len", "sampling", "max_turns")
                     if k in manifest["settings"]},
    }


def build(evals: list[Path], sft: Path | None, regen: Path | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"targets": TARGETS}
    per_t: dict[float, dict[str, dict[str, Any]]] = {}
    for folder in evals:
        results = json.loads((folder / "results.json").read_text())
        config = results["config"]
        summary.setdefault("gpu", config.get("device_name"))
        summary.setdefault("target", config.get("target"))
        for key in ("dtype", "compile", "tree", "max_new_tokens", "target_forward", "torch", "transformers"):
            summary.setdefault(key, config.get(key))
        for key in ("span_step", "greedy_verify", "sampled_verify"):  # the engine's paths, recorded since run 3
            if key in config:
                summary.setdefault(key, config[key])
        for temperature, rows in bench_rows(results).items():
            per_t.setdefault(temperature, {}).update(rows)
        if (folder / "profile.json").is_file():
            summary.setdefault("profile", profile_summary(folder / "profile.json"))
    for temperature, rows in sorted(per_t.items()):
        tag = f"t{temperature:g}"
        summary[f"tau_{tag}"] = round(mean(r["tau"] for r in rows.values()), 4)
        summary[f"speedup_{tag}"] = round(mean(r["speedup"] for r in rows.values()), 4)
        summary[f"ar_tok_s_{tag}"] = round(mean(r["ar_tok_s"] for r in rows.values()), 2)
        summary[f"per_bench_{tag}"] = rows
    if "ar_tok_s_t0" in summary:
        summary["ar_tok_s"] = summary["ar_tok_s_t0"]
        humaneval = summary["per_bench_t0"].get("humaneval")
        summary["targets_met"] = {
            "tau_t0_humaneval": bool(humaneval and humaneval["tau"] >= TARGETS["tau_t0_humaneval_min"]),
            "speedup_t0": summary["speedup_t0"] >= TARGETS["speedup_t0_min"],
        }
    if sft is not None:
        summary["sft"] = sft_summary(sft)
    if regen is not None:
        summary["regen"] = regen_summary(regen)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="draftrl eval output folders")
    parser.add_argument("--sft", type=Path, default=None, help="folder with the SFT run's metrics.jsonl")
    parser.add_argument("--regen", type=Path, default=None, help="the regeneration's manifest.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    summary = build(args.eval, args.sft, args.regen)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
