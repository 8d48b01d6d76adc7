"""tau of several drafters of one target on the same benchmark prompts, in one process.

    python bench/compare_drafters.py --target smollm2 --out DIR --num-prompts 20 \
        start=runs/sft/drafter sft=runs/a/drafter gto=runs/b/drafter opd=runs/c/drafter

The target is loaded once; each drafter decodes every question of MT-Bench / HumanEval / GSM8K
(all turns; MT-Bench's second turn follows the model's own first answer) with the tree engine
(EAGLE-3's default tree, CUDA graphs on GPU). At T = 0 decoding is lossless, so every drafter is
scored on the same target text and only tau differs. Writes ``compare.json`` and
``compare.md`` (tau per bench and drafter, and the change relative to the first drafter).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.benchmark import (  # noqa: E402
    context_budget, default_bench_dir, eos_token_ids, load_models, load_questions, pick_device,
    pick_dtype, resolve_bench, run_conversation,
)
from speculative.checkpoint import load_drafter  # noqa: E402
from speculative.engine import SpeculativeGenerator  # noqa: E402
from speculative.tree import TreeConfig  # noqa: E402


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
    target, first, tokenizer = load_models(args.target, named[0][1], device, dtype)
    eos = eos_token_ids(tokenizer, target.model)
    benches = {}
    for spec in args.bench.split(","):
        name, path = resolve_bench(spec, args.bench_dir or default_bench_dir())
        benches[name] = load_questions(path, args.num_prompts, name)
    budget = max(context_budget(tokenizer, qs, args.max_new_tokens) for qs in benches.values())

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, directory in named:
        drafter = load_drafter(directory, target.embed_tokens.weight, target.aux_layer_ids).to(device)
        for param in drafter.parameters():
            param.data = param.data.to(dtype)
        engine = SpeculativeGenerator(target, drafter.eval(), TreeConfig(), args.temperature,
                                      compile=args.compile, max_len=budget + 8)
        results[name] = {}
        for bench, questions in benches.items():
            accepted, forwards, tokens, seconds = 0, 0, 0, 0.0
            for i, question in enumerate(questions):
                engine.reseed(i)

                def generate(ids, turn):
                    return engine.generate(ids, args.max_new_tokens, eos)

                for turn in run_conversation(generate, tokenizer, question, eos):
                    accepted += sum(turn.accept_lengths)
                    forwards += len(turn.accept_lengths)
                    tokens += len(turn.tokens)
                    seconds += turn.wall_time
            tau = 1.0 + accepted / max(forwards, 1)
            results[name][bench] = {"tau": tau, "tokens": tokens, "verify_forwards": forwards,
                                    "tokens_per_s": tokens / max(seconds, 1e-9)}
            print(f"{name:>8} {bench:>10}: tau {tau:.3f} over {forwards} forwards", flush=True)
        del engine, drafter
        if device.type == "cuda":
            torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"target": args.target, "temperature": args.temperature, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "tree": vars(TreeConfig()), "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "drafters": dict(named), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.out / "compare.json").write_text(json.dumps({"config": meta, "results": results}, indent=2))
    base = named[0][0]
    lines = [f"tau at T={args.temperature:g}, first {args.num_prompts} questions per bench, "
             f"{args.max_new_tokens} new tokens, {meta['device']}, {dtype}", "",
             "| drafter | " + " | ".join(benches) + " | mean | vs " + base + " |",
             "|---|" + "---|" * (len(benches) + 2)]
    base_mean = sum(results[base][b]["tau"] for b in benches) / len(benches)
    for name, _ in named:
        taus = [results[name][b]["tau"] for b in benches]
        mean = sum(taus) / len(taus)
        lines.append(f"| {name} | " + " | ".join(f"{t:.3f}" for t in taus)
                     + f" | {mean:.3f} | {100 * (mean / base_mean - 1):+.1f}% |")
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
