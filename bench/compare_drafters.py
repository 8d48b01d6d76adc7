"""tau (and speed-up) of several drafters of one target on the same benchmark prompts, in one process.

    python bench/compare_drafters.py --target smollm2 --out DIR --num-prompts 20 --baseline \
        start=runs/sft/drafter sft=runs/a/drafter gto=runs/b/drafter opd=runs/c/drafter

The target is loaded once; each drafter decodes every question of MT-Bench / HumanEval / GSM8K
(all turns; MT-Bench's second turn follows the model's own first answer) with the tree engine
(EAGLE-3's default tree, CUDA graphs on GPU). At T = 0 decoding is lossless, so every drafter is
scored on the same target text and only tau differs. Writes ``compare.json`` and
``compare.md`` (tau per bench and drafter, and the change relative to the first drafter).

``--baseline`` also times the target's own autoregressive decoding on the same questions in this
process, alternating with each drafter question by question (``speculative.timing.measure_speedup``,
the repository's one timing path, which ``draftrl eval`` uses too); each drafter's bench scores then
carry ``speedup`` = its tokens/s over the AR tokens/s timed alongside it. The AR engine is
``--ar-engine`` (default ``batch``: ``BatchGenerator`` with ``chain_length=0``, the fastest batch-1
AR here). Drafters are scored one after another, never side by side: processes sharing a GPU
time-slice it and their tokens/s would mean nothing.

An ``--out`` holding ``{name}`` gives each drafter its own folder, written as soon as that
drafter is scored, so a run cut short keeps what it finished (``experiments/study.py`` runs this
script once per temperature that way, with ``--deadline`` set to the end of its GPU slot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.benchmark import (
    BenchQuestion,
    context_budget,
    default_bench_dir,
    eos_token_ids,
    first_turn_prompts,
    load_models,
    load_questions,
    resolve_bench,
    run_conversation,
    warm_prompt,
)
from speculative.checkpoint import load_drafter
from speculative.engine import SpeculativeGenerator
from speculative.runtime import pick_device, target_dtype
from speculative.target import TargetModel
from speculative.timing import (
    DEFAULT_AR_ENGINE,
    autoregressive_decoder,
    measure_speedup,
    parse_ar_engines,
    speculative_decoder,
    warm_up,
)
from speculative.tree import TreeConfig

Scores = dict[str, dict[str, float]]  # bench -> {tau, tokens, verify_forwards, tokens_per_s}


def load_benches(spec: str, bench_dir: Path | None, num_prompts: int) -> dict[str, list[BenchQuestion]]:
    """The first ``num_prompts`` questions of each comma-separated bench (name or .jsonl path)."""
    benches = {}
    for item in spec.split(","):
        name, path = resolve_bench(item, bench_dir or default_bench_dir())
        benches[name] = load_questions(path, num_prompts, name)
    return benches


def _spec_decoder(target: TargetModel, tokenizer: Any, drafter_dir: str | Path, budget: int, compile: str,
                  tree: TreeConfig | None = None):
    """The tree engine for one drafter, in the target's device and dtype."""
    device, dtype = target.embed_tokens.weight.device, target.embed_tokens.weight.dtype
    drafter = load_drafter(drafter_dir, target.embed_tokens.weight, target.aux_layer_ids).to(device)
    for param in drafter.parameters():  # parameters only: RoPE's inv_freq stays fp32
        param.data = param.data.to(dtype)
    return speculative_decoder(SpeculativeGenerator(target, drafter.eval(), tree or TreeConfig(), compile=compile,
                                                    max_len=budget))


def _free_cuda(device: torch.device) -> None:
    """Return the last engine's static cache and graphs to the GPU before the next is built."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_drafter(
    target: TargetModel, tokenizer: Any, drafter_dir: str | Path, benches: dict[str, list[BenchQuestion]], *,
    temperature: float, max_new_tokens: int, compile: str = "auto", label: str = "",
    ar: dict[str, Any] | None = None, repeats: int = 1, budget: int | None = None, tree: TreeConfig | None = None,
) -> tuple[Scores, Scores | None]:
    """(scores, AR scores or None): tau of one drafter on every bench and, with ``ar`` (decoders from
    ``speculative.timing.autoregressive_decoder``), its speed-up over them, timed by
    ``speculative.timing.measure_speedup`` (spec and AR alternate per question in this process).

    The drafter runs in the target's device and dtype; question ``i`` reseeds the sampler with a
    seed of (i, turn), so drafters see the same random stream at T > 0.
    """
    eos = eos_token_ids(tokenizer, target.model)
    budget = budget or _budget(tokenizer, benches, max_new_tokens)
    spec = _spec_decoder(target, tokenizer, drafter_dir, budget, compile, tree)
    decoders = [spec, *(ar or {}).values()]
    for decoder in decoders:
        decoder.temperature = temperature
    warm_up(decoders, warm_prompt(tokenizer), max_new_tokens, eos, prompts=first_turn_prompts(tokenizer, benches))
    measurement = measure_speedup(
        spec, ar or None, benches, lambda generate, q: run_conversation(generate, tokenizer, q, eos),
        max_new_tokens=max_new_tokens, eos=eos, temperature=temperature, repeats=repeats,
        log=lambda line: print(f"{label:>8} {line}", flush=True),
    )
    results: Scores = {}
    baseline: Scores | None = {} if ar else None
    for bench, timing in measurement.benches.items():
        total, summary = timing.total(), timing.summary()  # total: unrounded rates
        results[bench] = {"tau": total.tau, "tokens": total.spec_tokens, "verify_forwards": total.verify_forwards,
                          "tokens_per_s": total.spec_tokens_per_s, "repeats": summary["repeats"],
                          "spread": summary["spread"]}
        if baseline is not None:
            results[bench]["speedup"] = total.speedup
            results[bench]["mismatches"] = total.mismatches
            baseline[bench] = {"tau": 1.0, "tokens": total.baseline_tokens, "verify_forwards": total.baseline_tokens,
                               "tokens_per_s": total.baseline_tokens_per_s, "engine": summary["ar_engine"],
                               "spread": summary["spread"]["baseline_tokens_per_s"]}
        speed = f", speed-up {results[bench]['speedup']:.2f}x" if baseline is not None else ""
        print(f"{label:>8} {bench:>10}: tau {results[bench]['tau']:.3f} over "
              f"{results[bench]['verify_forwards']} forwards{speed}", flush=True)
    device = spec.engine.device
    del spec, decoders  # the only references: freed before empty_cache
    _free_cuda(device)
    return results, baseline


def _budget(tokenizer: Any, benches: dict[str, list[BenchQuestion]], max_new_tokens: int) -> int:
    budget = max(context_budget(tokenizer, qs, max_new_tokens) for qs in benches.values())
    return max(budget, len(warm_prompt(tokenizer)) + max_new_tokens) + 8


def write_outputs(out: Path, meta: dict[str, Any], results: dict[str, Scores], benches: list[str],
                  baseline: Scores | None = None) -> str:
    """``compare.json`` (written atomically: its presence means a finished scoring) and ``compare.md``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".compare.json.{os.getpid()}.tmp"
    record = {"config": meta, "results": results}
    if baseline is not None:
        record["baseline"] = baseline
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "compare.json")
    names = list(results)
    base = names[0]
    title = (f"tau at T={meta['temperature']:g}, first {meta['num_prompts']} questions per bench, "
             f"{meta['max_new_tokens']} new tokens, {meta['device']}, {meta['dtype']}")
    speed = baseline is not None
    lines = [title, "",
             "| drafter | " + " | ".join(benches) + " | mean | vs " + base + " |"
             + (" speed-up (mean over benches) |" if speed else ""),
             "|---|" + "---|" * (len(benches) + 2 + speed)]
    base_mean = sum(results[base][b]["tau"] for b in benches) / len(benches)
    for name in names:
        taus = [results[name][b]["tau"] for b in benches]
        mean = sum(taus) / len(taus)
        row = (f"| {name} | " + " | ".join(f"{t:.3f}" for t in taus)
               + f" | {mean:.3f} | {100 * (mean / base_mean - 1):+.1f}% |")
        if speed:
            row += f" {sum(results[name][b]['speedup'] for b in benches) / len(benches):.2f}x |"
        lines.append(row)
    if speed:
        lines += ["", f"Autoregressive baseline (`{meta.get('ar_engine')}`, timed alternately with each drafter "
                  "by speculative.timing.measure_speedup, this process): "
                  + ", ".join(f"{b} {baseline[b]['tokens_per_s']:.1f}" for b in benches) + " tokens/s."]
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return text


def parse_drafters(items: list[str]) -> list[tuple[str, str]]:
    named = []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise SystemExit(f"compare_drafters: expected NAME=DIR, got {item!r}")
        named.append((name, directory))
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise SystemExit(f"compare_drafters: a drafter name is given twice in {names}")
    return named


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drafters", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--out", required=True,
                        help="output folder; with {name} in it, one folder per drafter, written as it finishes")
    parser.add_argument("--bench", default="mt_bench,humaneval,gsm8k")
    parser.add_argument("--bench-dir", type=Path, default=None)
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chain", type=int, default=0,
                        help="draft chains of this many tokens instead of EAGLE-3's default tree (0)")
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--baseline", action="store_true",
                        help="time the target's autoregressive decoding alongside each drafter (alternating per "
                             "question); record each drafter's speed-up")
    parser.add_argument("--ar-engine", default=DEFAULT_AR_ENGINE,
                        help="AR baseline engine(s): batch (default, the faster at batch 1), static, or batch,static")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per drafter in this process")
    parser.add_argument("--deadline", type=float, default=None, metavar="UNIX_TIME",
                        help="start no drafter that would not finish by then (judged by the slowest so far)")
    args = parser.parse_args()

    named = parse_drafters(args.drafters)
    per_drafter = "{name}" in args.out
    device = pick_device("auto")
    dtype = target_dtype(args.dtype, device)
    target, _, tokenizer = load_models(args.target, named[0][1], device, dtype)
    benches = load_benches(args.bench, args.bench_dir, args.num_prompts)
    budget = _budget(tokenizer, benches, args.max_new_tokens)
    tree = TreeConfig.chain(args.chain) if args.chain > 0 else TreeConfig()
    meta = {"target": args.target, "temperature": args.temperature, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "tree": vars(tree), "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "repeats": args.repeats, "ar_engine": args.ar_engine if args.baseline else None,
            "timing": "speculative.timing.measure_speedup"}
    ar = None
    if args.baseline:  # target-only engines: built once, shared by every drafter's timing
        ar = {kind: autoregressive_decoder(target, kind, compile=args.compile, max_len=budget)
              for kind in parse_ar_engines(args.ar_engine)}
    options = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "compile": args.compile,
               "ar": ar, "repeats": args.repeats, "budget": budget, "tree": tree}
    results: dict[str, Scores] = {}
    baselines: dict[str, Scores] = {}
    slowest = 0.0
    for position, (name, directory) in enumerate(named):
        if args.deadline is not None and time.time() + 1.1 * slowest > args.deadline:
            left = [n for n, _ in named[position:]]
            print(f"[compare] deadline: not enough time left for another drafter; unscored: {left}", flush=True)
            break
        started = time.time()
        results[name], baseline = score_drafter(target, tokenizer, directory, benches, label=name, **options)
        if baseline is not None:
            baselines[name] = baseline
        slowest = max(slowest, time.time() - started)
        if per_drafter:
            write_outputs(Path(args.out.format(name=name)), {**meta, "drafters": {name: directory},
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}, {name: results[name]}, list(benches),
                          baseline)
    if results and not per_drafter:
        meta.update(drafters=dict(named), time=time.strftime("%Y-%m-%d %H:%M:%S"))
        baseline = None
        if baselines:  # each drafter was timed against its own AR runs: their mean per bench
            baseline = {b: {"tau": 1.0, "tokens_per_s": sum(x[b]["tokens_per_s"] for x in baselines.values())
                            / len(baselines), "per_drafter": {n: x[b]["tokens_per_s"] for n, x in baselines.items()}}
                        for b in benches}
        print(write_outputs(Path(args.out), meta, results, list(benches), baseline), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
