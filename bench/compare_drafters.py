"""tau (and speed-up) of several drafters of one target on the same benchmark prompts, in one process.

    python bench/compare_drafters.py --target smollm2 --out DIR --num-prompts 20 --baseline \
        start=runs/sft/drafter sft=runs/a/drafter gto=runs/b/drafter opd=runs/c/drafter

The target is loaded once; each drafter decodes every question of MT-Bench / HumanEval / GSM8K
(all turns; MT-Bench's second turn follows the model's own first answer) with the tree engine
(EAGLE-3's default tree, CUDA graphs on GPU). At T = 0 decoding is lossless, so every drafter is
scored on the same target text and only tau differs. Writes ``compare.json`` and
``compare.md`` (tau per bench and drafter, and the change relative to the first drafter).

``--baseline`` first times the target's own autoregressive decoding on the same questions, with
the same static-cache engine, in this process; each drafter's bench scores then carry
``speedup`` = its tokens/s over that baseline's. Drafters are scored one after another, never
side by side: processes sharing a GPU time-slice it and their tokens/s would mean nothing.

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
    BUILTIN_PROMPTS,
    BenchQuestion,
    chat_prompt,
    context_budget,
    default_bench_dir,
    eos_token_ids,
    load_models,
    load_questions,
    pick_device,
    pick_dtype,
    resolve_bench,
    run_conversation,
)
from speculative.checkpoint import load_drafter
from speculative.engine import SpeculativeGenerator
from speculative.target import TargetModel
from speculative.tree import TreeConfig

Scores = dict[str, dict[str, float]]  # bench -> {tau, tokens, verify_forwards, tokens_per_s}


def load_benches(spec: str, bench_dir: Path | None, num_prompts: int) -> dict[str, list[BenchQuestion]]:
    """The first ``num_prompts`` questions of each comma-separated bench (name or .jsonl path)."""
    benches = {}
    for item in spec.split(","):
        name, path = resolve_bench(item, bench_dir or default_bench_dir())
        benches[name] = load_questions(path, num_prompts, name)
    return benches


def _engine(target: TargetModel, tokenizer: Any, drafter_dir: str | Path, benches: dict[str, list[BenchQuestion]],
            temperature: float, max_new_tokens: int, compile: str,
            tree: TreeConfig | None = None) -> SpeculativeGenerator:
    """The tree engine for one drafter (EAGLE-3's default tree unless ``tree``), in the target's
    device and dtype, warmed up (untimed)."""
    device, dtype = target.embed_tokens.weight.device, target.embed_tokens.weight.dtype
    budget = max(context_budget(tokenizer, qs, max_new_tokens) for qs in benches.values())
    drafter = load_drafter(drafter_dir, target.embed_tokens.weight, target.aux_layer_ids).to(device)
    for param in drafter.parameters():  # parameters only: RoPE's inv_freq stays fp32
        param.data = param.data.to(dtype)
    engine = SpeculativeGenerator(target, drafter.eval(), tree or TreeConfig(), temperature,
                                  compile=compile, max_len=budget + 8)
    warm_ids, _ = chat_prompt(tokenizer, [{"role": "user", "content": BUILTIN_PROMPTS[0]}])
    eos = eos_token_ids(tokenizer, target.model)
    engine.generate(warm_ids, min(max_new_tokens, 32), eos)  # allocator, cuBLAS, lazy inits
    engine.generate_autoregressive(warm_ids, min(max_new_tokens, 32), eos)
    return engine


def _free_cuda(device: torch.device) -> None:
    """Return the last engine's static cache and graphs to the GPU before the next is built."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_drafter(
    target: TargetModel, tokenizer: Any, drafter_dir: str | Path, benches: dict[str, list[BenchQuestion]], *,
    temperature: float, max_new_tokens: int, compile: str = "auto", label: str = "",
    baseline: Scores | None = None, tree: TreeConfig | None = None,
) -> Scores:
    """tau (1 + accepted drafts per verification forward) of one drafter on every bench.

    The drafter runs in the target's device and dtype; question ``i`` reseeds the sampler with
    ``i``, so drafters see the same random stream at T > 0. With ``baseline`` (the target's
    autoregressive scores from this process), each bench also gets ``speedup``.
    """
    eos = eos_token_ids(tokenizer, target.model)
    engine = _engine(target, tokenizer, drafter_dir, benches, temperature, max_new_tokens, compile, tree)
    results: Scores = {}
    for bench, questions in benches.items():
        results[bench] = _score_bench(engine, tokenizer, questions, eos, max_new_tokens)
        if baseline is not None and bench in baseline:
            results[bench]["speedup"] = results[bench]["tokens_per_s"] / baseline[bench]["tokens_per_s"]
        speed = f", speed-up {results[bench]['speedup']:.2f}x" if "speedup" in results[bench] else ""
        print(f"{label:>8} {bench:>10}: tau {results[bench]['tau']:.3f} over "
              f"{results[bench]['verify_forwards']} forwards{speed}", flush=True)
    device = engine.device
    del engine  # the caller's only reference: freed before empty_cache
    _free_cuda(device)
    return results


def score_autoregressive(
    target: TargetModel, tokenizer: Any, drafter_dir: str | Path, benches: dict[str, list[BenchQuestion]], *,
    temperature: float, max_new_tokens: int, compile: str = "auto", tree: TreeConfig | None = None,
) -> Scores:
    """The target's own decoding, one token per forward, on the same engine (static cache and
    CUDA graphs) the drafters use: the speed-up baseline. ``drafter_dir`` only sizes the engine."""
    eos = eos_token_ids(tokenizer, target.model)
    engine = _engine(target, tokenizer, drafter_dir, benches, temperature, max_new_tokens, compile, tree)
    results = {bench: _score_bench(engine, tokenizer, questions, eos, max_new_tokens, autoregressive=True)
               for bench, questions in benches.items()}
    for bench, scores in results.items():
        print(f"{'AR':>8} {bench:>10}: {scores['tokens_per_s']:.1f} tokens/s", flush=True)
    device = engine.device
    del engine  # the caller's only reference: freed before empty_cache
    _free_cuda(device)
    return results


def _score_bench(engine: SpeculativeGenerator, tokenizer: Any, questions: list[BenchQuestion],
                 eos: set[int], max_new_tokens: int, autoregressive: bool = False) -> dict[str, float]:
    """Totals over the questions; autoregressive decoding makes one forward per token (tau 1)."""
    decode = engine.generate_autoregressive if autoregressive else engine.generate
    accepted, forwards, tokens, seconds = 0, 0, 0, 0.0
    for i, question in enumerate(questions):
        engine.reseed(i)

        def generate(ids, turn):
            return decode(ids, max_new_tokens, eos)

        for turn in run_conversation(generate, tokenizer, question, eos):
            accepted += sum(turn.accept_lengths)
            forwards += len(turn.tokens) if autoregressive else len(turn.accept_lengths)
            tokens += len(turn.tokens)
            seconds += turn.wall_time
    return {"tau": 1.0 + accepted / max(forwards, 1), "tokens": tokens, "verify_forwards": forwards,
            "tokens_per_s": tokens / max(seconds, 1e-9)}


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
        lines += ["", "Autoregressive baseline (same engine, this process): "
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


def baseline_key(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """What an AR timing depends on: the machine (host and GPU), the target, the questions and
    the decoding settings. The draft tree does not enter AR decoding."""
    import socket

    return {"host": socket.gethostname(), "device": meta["device"], "dtype": meta["dtype"],
            "target": args.target, "bench": args.bench, "bench_dir": str(args.bench_dir),
            "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "compile": args.compile}


def read_baseline_cache(path: Path | None, key: dict[str, Any]) -> Scores | None:
    if path is None or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["baseline"] if record.get("key") == key else None


def write_baseline_cache(path: Path, key: dict[str, Any], baseline: Scores) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "baseline": baseline, "time": time.strftime("%Y-%m-%d %H:%M:%S")}))
    tmp.replace(path)


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
                        help="time the target's autoregressive decoding first; record each drafter's speed-up")
    parser.add_argument("--baseline-cache", type=Path, default=None, metavar="FILE",
                        help="with --baseline: reuse the AR timing in FILE when it was measured on this "
                        "host and GPU with the same settings (a later call on the same machine), else "
                        "time it and write FILE")
    parser.add_argument("--deadline", type=float, default=None, metavar="UNIX_TIME",
                        help="start no drafter that would not finish by then (judged by the slowest so far)")
    args = parser.parse_args()

    named = parse_drafters(args.drafters)
    per_drafter = "{name}" in args.out
    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    target, _, tokenizer = load_models(args.target, named[0][1], device, dtype)
    benches = load_benches(args.bench, args.bench_dir, args.num_prompts)
    tree = TreeConfig.chain(args.chain) if args.chain > 0 else TreeConfig()
    meta = {"target": args.target, "temperature": args.temperature, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "tree": vars(tree), "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    options = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "compile": args.compile,
               "tree": tree}
    baseline = None
    if args.baseline:
        key = baseline_key(args, meta)
        baseline = read_baseline_cache(args.baseline_cache, key)
        if baseline is None:
            baseline = score_autoregressive(target, tokenizer, named[0][1], benches, **options)
            if args.baseline_cache is not None:
                write_baseline_cache(args.baseline_cache, key, baseline)
        else:
            print(f"[compare] AR baseline reused from {args.baseline_cache} (same host, GPU and settings)", flush=True)
    results: dict[str, Scores] = {}
    slowest = 0.0
    for position, (name, directory) in enumerate(named):
        if args.deadline is not None and time.time() + 1.1 * slowest > args.deadline:
            left = [n for n, _ in named[position:]]
            print(f"[compare] deadline: not enough time left for another drafter; unscored: {left}", flush=True)
            break
        started = time.time()
        results[name] = score_drafter(target, tokenizer, directory, benches, label=name, baseline=baseline, **options)
        slowest = max(slowest, time.time() - started)
        if per_drafter:
            write_outputs(Path(args.out.format(name=name)), {**meta, "drafters": {name: directory},
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}, {name: results[name]}, list(benches), baseline)
    if results and not per_drafter:
        meta.update(drafters=dict(named), time=time.strftime("%Y-%m-%d %H:%M:%S"))
        print(write_outputs(Path(args.out), meta, results, list(benches), baseline), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
