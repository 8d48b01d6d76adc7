"""tau of several drafters of one target on the same benchmark prompts, in one process.

    python bench/compare_drafters.py --target smollm2 --out DIR --num-prompts 20 \
        start=runs/sft/drafter sft=runs/a/drafter gto=runs/b/drafter opd=runs/c/drafter

The target is loaded once; each drafter decodes every question of MT-Bench / HumanEval / GSM8K
(all turns; MT-Bench's second turn follows the model's own first answer) with the tree engine
(EAGLE-3's default tree, CUDA graphs on GPU). At T = 0 decoding is lossless, so every drafter is
scored on the same target text and only tau differs. Writes ``compare.json`` and
``compare.md`` (tau per bench and drafter, and the change relative to the first drafter).

``score_drafter`` is the per-drafter scoring, importable (``experiments/study.py`` runs this
script once per drafter and temperature, in subprocesses).
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

from pipeline.benchmark import (
    BenchQuestion,
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


def score_drafter(
    target: TargetModel, tokenizer: Any, drafter_dir: str | Path, benches: dict[str, list[BenchQuestion]], *,
    temperature: float, max_new_tokens: int, compile: str = "auto", label: str = "",
) -> Scores:
    """tau (1 + accepted drafts per verification forward) of one drafter on every bench.

    The drafter runs in the target's device and dtype; question ``i`` reseeds the sampler with
    ``i``, so drafters see the same random stream at T > 0.
    """
    device, dtype = target.embed_tokens.weight.device, target.embed_tokens.weight.dtype
    eos = eos_token_ids(tokenizer, target.model)
    budget = max(context_budget(tokenizer, qs, max_new_tokens) for qs in benches.values())
    drafter = load_drafter(drafter_dir, target.embed_tokens.weight, target.aux_layer_ids).to(device)
    for param in drafter.parameters():  # parameters only: RoPE's inv_freq stays fp32
        param.data = param.data.to(dtype)
    engine = SpeculativeGenerator(target, drafter.eval(), TreeConfig(), temperature,
                                  compile=compile, max_len=budget + 8)
    results: Scores = {}
    for bench, questions in benches.items():
        results[bench] = _score_bench(engine, tokenizer, questions, eos, max_new_tokens)
        print(f"{label:>8} {bench:>10}: tau {results[bench]['tau']:.3f} over "
              f"{results[bench]['verify_forwards']} forwards", flush=True)
    del engine, drafter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _score_bench(engine: SpeculativeGenerator, tokenizer: Any, questions: list[BenchQuestion],
                 eos: set[int], max_new_tokens: int) -> dict[str, float]:
    accepted, forwards, tokens, seconds = 0, 0, 0, 0.0
    for i, question in enumerate(questions):
        engine.reseed(i)

        def generate(ids, turn):
            return engine.generate(ids, max_new_tokens, eos)

        for turn in run_conversation(generate, tokenizer, question, eos):
            accepted += sum(turn.accept_lengths)
            forwards += len(turn.accept_lengths)
            tokens += len(turn.tokens)
            seconds += turn.wall_time
    return {"tau": 1.0 + accepted / max(forwards, 1), "tokens": tokens, "verify_forwards": forwards,
            "tokens_per_s": tokens / max(seconds, 1e-9)}


def write_outputs(out: Path, meta: dict[str, Any], results: dict[str, Scores], benches: list[str]) -> str:
    """``compare.json`` (written atomically: its presence means a finished scoring) and ``compare.md``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".compare.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"config": meta, "results": results}, indent=2))
    os.replace(tmp, out / "compare.json")
    names = list(results)
    base = names[0]
    title = (f"tau at T={meta['temperature']:g}, first {meta['num_prompts']} questions per bench, "
             f"{meta['max_new_tokens']} new tokens, {meta['device']}, {meta['dtype']}")
    lines = [title, "",
             "| drafter | " + " | ".join(benches) + " | mean | vs " + base + " |",
             "|---|" + "---|" * (len(benches) + 2)]
    base_mean = sum(results[base][b]["tau"] for b in benches) / len(benches)
    for name in names:
        taus = [results[name][b]["tau"] for b in benches]
        mean = sum(taus) / len(taus)
        lines.append(f"| {name} | " + " | ".join(f"{t:.3f}" for t in taus)
                     + f" | {mean:.3f} | {100 * (mean / base_mean - 1):+.1f}% |")
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drafters", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bench", default="mt_bench,humaneval,gsm8k")
    parser.add_argument("--bench-dir", type=Path, default=None)
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    named = [item.split("=", 1) for item in args.drafters]
    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    target, _, tokenizer = load_models(args.target, named[0][1], device, dtype)
    benches = load_benches(args.bench, args.bench_dir, args.num_prompts)
    results = {
        name: score_drafter(target, tokenizer, directory, benches, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens, compile=args.compile, label=name)
        for name, directory in named
    }
    meta = {"target": args.target, "temperature": args.temperature, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "tree": vars(TreeConfig()), "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "drafters": dict(named), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(write_outputs(args.out, meta, results, list(benches)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
