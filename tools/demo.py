"""``make demo`` (``python -m tools.demo``): draftrl's main job on one CPU box, through its ordinary
entry points, each stage being a ``draftrl`` command with ``--set`` overrides.

1. SFT warm-up: ``draftrl train --config configs/demo.yaml`` (single process, the real
   SmolLM2-135M-Instruct target, a slice of ShareGPT).
2. Ray: a local cluster started in this process, with its dashboard.
3. GTO, then Draft-OPD: ``draftrl train --config configs/gto_smollm2.yaml`` (``opd_smollm2.yaml``)
   with overrides that shrink them and switch the Ray pipeline on: 2 rollout actors hosting the
   target, a 2-rank DeepSpeed learner group over gloo, a checksum-checked broadcast after every
   update. Both start from the SFT drafter (``drafter.init_from``).
4. τ: ``draftrl eval`` (the tree engine at T=0, its output compared with the target's own greedy
   decoding) on the first questions of the shipped MT-Bench, HumanEval and GSM8K, for the SFT
   drafter and both RL drafters; one plot of τ per benchmark.

The last lines printed are the result. Everything goes under ``--out`` (default ``runs/demo``,
cleared first so the demo can be run again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from tools.benchmark import DEFAULT_BENCHES, TREE_DEFAULTS

SFT_CONFIG = "configs/demo.yaml"
GTO_CONFIG = "configs/gto_smollm2.yaml"
OPD_CONFIG = "configs/opd_smollm2.yaml"
RL_UPDATES = 3

# The SFT stage's data slice (configs/demo.yaml): tokenised once, then read from the cache.
DEMO_DATA = ["data.max_records=400", "data.max_length=160", "data.eval_fraction=0.05"]

# The shipped RL configs made small: a few updates of 2 sequences, on the Ray pipeline on CPU.
RL_COMMON = [
    *DEMO_DATA,
    "training.ttt_steps=4",
    "training.batch_size=2",
    f"training.max_steps={RL_UPDATES}",
    "training.warmup_steps=1",
    "training.log_every=1",
    "training.eval_every=1000",  # held-out metrics at the start and at the end only
    "training.eval_batches=1",
    "training.save_every=1000",  # one checkpoint, at the end
    "training.device=cpu",
    "training.threads=1",
    "distributed.enabled=true",
    "distributed.num_learners=2",
    "distributed.num_rollout_actors=2",
    "distributed.mode=sync",
]
GTO_SMALL = ["gto.tree_depth=4", "gto.tree_top_k=4", "gto.tree_total_tokens=16",
             "gto.groups_per_sequence=2", "gto.group_size=4"]
OPD_SMALL = ["opd.chain_length=4", "opd.max_new_tokens=32"]


def sft_overrides(out: Path, threads: int = 1) -> list[str]:
    # One torch thread by default: on a busy 2-core box two threads spin against each other and
    # a step takes a minute instead of seconds (--threads 2 on an idle box).
    return [f"output_dir={out}", f"training.threads={threads}"]


def gto_overrides(out: Path, sft_drafter: Path) -> list[str]:
    return [f"output_dir={out / 'gto'}", f"drafter.init_from={sft_drafter}", *RL_COMMON, *GTO_SMALL]


def opd_overrides(out: Path, sft_drafter: Path) -> list[str]:
    return [f"output_dir={out / 'opd'}", f"drafter.init_from={sft_drafter}", *RL_COMMON, *OPD_SMALL]


def stages(out: Path, threads: int = 1) -> list[tuple[str, str, list[str]]]:
    """(name, config file, overrides) of the three training stages, in order."""
    sft_drafter = out / "drafter"
    return [("SFT", SFT_CONFIG, sft_overrides(out, threads)),
            ("GTO", GTO_CONFIG, gto_overrides(out, sft_drafter)),
            ("Draft-OPD", OPD_CONFIG, opd_overrides(out, sft_drafter))]


def _banner(text: str) -> None:
    print(f"\n[demo] ===== {text} =====", flush=True)


def train(config: str, overrides: list[str]) -> None:
    """``draftrl train --config CONFIG --set ...``."""
    from tools.cli import main

    argv = ["train", "--config", config]
    for item in overrides:
        argv += ["--set", item]
    print("[demo] $ draftrl " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise SystemExit(f"[demo] draftrl train --config {config} failed")


def start_ray(num_cpus: int, dashboard: bool) -> str | None:
    """A local Ray cluster in this process; returns the dashboard URL (None without one)."""
    import ray

    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                       dashboard_host="127.0.0.1", log_to_driver=False)
    url = getattr(context, "dashboard_url", None) if dashboard else None
    return f"http://{url}" if url and not str(url).startswith("http") else url


# ---------------------------------------------------------------------------------- τ stage


def tau_stage(drafters: dict[str, Path], target: str, out: Path, benches=DEFAULT_BENCHES,
              num_prompts: int = 2, max_new_tokens: int = 48, tree: dict[str, int] | None = None,
              threads: int | None = 1) -> dict[str, list[dict]]:
    """``draftrl eval`` at T=0 for every drafter, then ``out/tau.png``; {name: result blocks}."""
    from tools.cli import main

    tree = tree or TREE_DEFAULTS
    results: dict[str, list[dict]] = {}
    for name, drafter in drafters.items():
        folder = out / "tau" / _slug(name)
        argv = ["eval", "--drafter", str(drafter), "--target", target, "--bench", ",".join(benches),
                "--temperature", "0", "--num-prompts", str(num_prompts), "--max-new-tokens", str(max_new_tokens),
                "--depth", str(tree["depth"]), "--top-k", str(tree["top_k"]),
                "--total-tokens", str(tree["total_tokens"]), "--out", str(folder)]
        if threads:
            argv += ["--threads", str(threads)]
        print(f"[demo] $ draftrl {' '.join(argv)}", flush=True)
        if main(argv) != 0:
            raise SystemExit(f"[demo] draftrl eval failed for {name}")
        results[name] = json.loads((folder / "results.json").read_text())["results"]
    plot_tau(results, out / "tau.png")
    return results


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def mean_tau(blocks: list[dict]) -> float:
    """τ over all verification forwards of all benches (not a mean of the per-bench τ)."""
    forwards = sum(b["verify_forwards"] for b in blocks)
    return 1.0 + sum(b["accepted_tokens"] for b in blocks) / forwards if forwards else 1.0


def tau_table(results: dict[str, list[dict]]) -> list[str]:
    benches = list(dict.fromkeys(b["bench"] for blocks in results.values() for b in blocks))
    width = max(len(n) for n in results) + 2
    lines = [f"{'drafter':<{width}}" + "".join(f"{b:>11}" for b in benches) + f"{'all':>8}   output = target greedy"]
    for name, blocks in results.items():
        by_bench = {b["bench"]: b for b in blocks}
        same = sum(b["generations"] - (b["mismatches"] or 0) for b in blocks)
        total = sum(b["generations"] for b in blocks)
        lines.append(f"{name:<{width}}" + "".join(f"{by_bench[b]['tau']:>11.3f}" for b in benches)
                     + f"{mean_tau(blocks):>8.3f}   {same}/{total}")
    return lines


def plot_tau(results: dict[str, list[dict]], out_png: Path) -> Path:
    """Grouped bars: τ per benchmark (and over all), one bar per drafter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(b["bench"] for blocks in results.values() for b in blocks)) + ["all"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(results), 1)
    for j, (name, blocks) in enumerate(results.items()):
        by_bench = {b["bench"]: b["tau"] for b in blocks}
        values = [by_bench.get(b, mean_tau(blocks)) if b != "all" else mean_tau(blocks) for b in benches]
        xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(benches))]
        ax.bar_label(ax.bar(xs, values, width, label=name), fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(benches)), benches)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(ylabel="τ (tokens per target forward)", title="acceptance length τ at T=0 (CPU demo)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--num-prompts", type=int, default=2, help="questions per benchmark in the τ stage")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ray-cpus", type=int, default=6, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the SFT and τ stages (2 on an idle 2-core box; the Ray stages use 1)")
    parser.add_argument("--skip-sft", action="store_true",
                        help="keep the SFT drafter of a previous demo (OUT/drafter) and run the later stages")
    args = parser.parse_args(argv)
    started = time.time()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    out = args.out
    plan = stages(out, args.threads)
    if args.skip_sft and not (out / "drafter" / "config.json").is_file():
        parser.error(f"--skip-sft: no SFT drafter in {out / 'drafter'}")
    for folder in [out / "gto", out / "opd", out / "tau"] if args.skip_sft else [out]:
        if folder.exists():
            print(f"[demo] clearing the previous demo run in {folder}", flush=True)
            shutil.rmtree(folder)

    _banner("1/5 SFT warm-up (single process, SmolLM2-135M-Instruct target, CPU)")
    if args.skip_sft:
        print(f"[demo] --skip-sft: using {out / 'drafter'}", flush=True)
    else:
        name, config, overrides = plan[0]
        train(config, overrides)
    sft_s = time.time() - started

    _banner("2/5 a local Ray cluster in this process")
    dashboard = None
    try:
        dashboard = start_ray(args.ray_cpus, not args.no_dashboard)
    except Exception as error:  # the dashboard is a nicety: fall back to a cluster without it
        print(f"[demo] Ray dashboard did not start ({error}); starting Ray without it", flush=True)
        import ray

        ray.shutdown()
        start_ray(args.ray_cpus, False)
    print(f"[demo] Ray dashboard: {dashboard or 'off'} (actors, their logs, and the draftrl_* metrics)",
          flush=True)

    rl_s = {}
    for index, (name, config, overrides) in enumerate(plan[1:], 3):
        _banner(f"{index}/5 {name}: {RL_UPDATES} updates on the Ray pipeline from the SFT drafter "
                "(2 rollout actors, 2 DeepSpeed learners over gloo, checked broadcast)")
        t0 = time.time()
        train(config, overrides)
        rl_s[name] = time.time() - t0

    import ray

    ray.shutdown()
    _banner("5/5 τ on the shipped benchmarks: SFT vs the RL drafters (tree engine, T=0, CPU)")
    t0 = time.time()
    target = _target_of(plan[0][1], plan[0][2])
    drafters = {"SFT": out / "drafter", f"GTO (+{RL_UPDATES})": out / "gto" / "drafter",
                f"Draft-OPD (+{RL_UPDATES})": out / "opd" / "drafter"}
    results = tau_stage(drafters, target, out, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                        threads=args.threads)
    tau_s = time.time() - t0
    total = time.time() - started

    tree = TREE_DEFAULTS
    print("\n[demo] ===== result =====")
    print(f"[demo] stages: SFT {sft_s / 60:.1f} min, GTO {rl_s['GTO'] / 60:.1f} min, Draft-OPD "
          f"{rl_s['Draft-OPD'] / 60:.1f} min, τ {tau_s / 60:.1f} min; total {total / 60:.1f} min")
    print(f"[demo] training curves: {out / 'curves.png'}, {out / 'gto' / 'curves.png'}, {out / 'opd' / 'curves.png'}")
    print(f"[demo] τ = tokens per target forward (1 + accepted draft tokens); first {args.num_prompts} questions "
          f"per bench, {args.max_new_tokens} new tokens, tree depth {tree['depth']} / top-k {tree['top_k']} / "
          f"{tree['total_tokens']} tokens:")
    for line in tau_table(results):
        print("[demo]   " + line)
    print(f"[demo] τ plot: {out / 'tau.png'}")
    print("[demo] next: on a GPU, train on your target (draftrl train --config configs/sft_smollm2.yaml --set "
          "target.model=...), evaluate (draftrl eval --drafter DIR), serve with vLLM (draftrl export --format vllm; "
          "speculative_config method eagle3): README, 'From a GPU and a target to a drafter served by vLLM'")
    return 0


def _target_of(config: str, overrides: list[str]) -> str:
    from speculative.config import load_config

    return str(load_config(Path(config), overrides).target.model)


if __name__ == "__main__":
    sys.exit(main())
