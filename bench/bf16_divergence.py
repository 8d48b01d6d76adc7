"""Why do bf16 speculative and autoregressive greedy outputs differ? Measure the tie at each split.

    python bench/bf16_divergence.py --target smollm2 --drafter DIR --out DIR [--num-prompts 20]

At T = 0 the engine is lossless in float32 (bench/results/tree_h100_fp32: 0 of 154 generations
differ), but in bfloat16 most long generations eventually differ from the target's own greedy
decoding. If that is rounding, every first difference must sit on a near-tie of the target:
the two candidate tokens (the one AR decoding chose and the one speculative decoding chose)
must be about as likely under the target computed in float32, within the bf16 rounding of
the logits. If instead the speculative path accepted a token the target clearly did not
prefer, that is a bug. For each first difference this script recomputes the shared prefix
with a float32 copy of the target and records the logit gap between the two tokens, next to
the spacing of bf16 numbers at that logit's magnitude and, as a control, the top-1/top-2 gap
of the float32 target at every position of the agreeing prefixes (how rare such ties are).
Writes ``divergence.json`` and ``divergence.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.benchmark import (
    chat_prompt,
    default_bench_dir,
    eos_token_ids,
    load_models,
    load_questions,
    resolve_bench,
)
from speculative.engine import SpeculativeGenerator
from speculative.runtime import pick_device
from speculative.target import TargetModel, resolve_target
from speculative.tree import TreeConfig


def bf16_spacing(value: float) -> float:
    """Distance between adjacent bfloat16 numbers around ``value`` (8 significant bits)."""
    if value == 0:
        return 0.0
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def last_logits(target: TargetModel, ids: list[int]) -> torch.Tensor:
    tensor = torch.tensor([ids], device=target.device)
    return target.features(tensor).logits[0, -1].float()


@torch.no_grad()
def top_gaps(target: TargetModel, ids: list[int], start: int) -> list[float]:
    """float32 top-1 minus top-2 logit at every position from ``start`` on (the control)."""
    logits = target.features(torch.tensor([ids], device=target.device)).logits[0, start:].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bench", default="mt_bench,humaneval,gsm8k")
    parser.add_argument("--bench-dir", type=Path, default=None)
    parser.add_argument("--num-prompts", type=int, default=20, help="first-turn questions per bench")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--compile", default="auto")
    args = parser.parse_args()

    device = pick_device("auto")
    dtype = getattr(torch, args.dtype)
    target, drafter, tokenizer = load_models(args.target, args.drafter, device, dtype)
    exact = TargetModel.load(resolve_target(args.target), target.aux_layer_ids, torch.float32, device)
    eos = eos_token_ids(tokenizer, target.model)
    prompts: list[tuple[str, list[int]]] = []
    for spec in args.bench.split(","):
        name, path = resolve_bench(spec, args.bench_dir or default_bench_dir())
        for question in load_questions(path, args.num_prompts, name):
            ids, _ = chat_prompt(tokenizer, [{"role": "user", "content": question.turns[0]}])
            prompts.append((name, ids))
    budget = max(len(ids) for _, ids in prompts) + args.max_new_tokens + 16
    engine = SpeculativeGenerator(target, drafter, TreeConfig(), 0.0, compile=args.compile, max_len=budget)

    records, control = [], []
    for index, (bench, ids) in enumerate(prompts):
        spec = list(engine.generate(ids, args.max_new_tokens, eos).tokens)
        base = list(engine.generate_autoregressive(ids, args.max_new_tokens, eos).tokens)
        split = first_difference(spec, base)
        agreed = base if split is None else base[:split]
        if len(agreed) > 1:
            control.extend(top_gaps(exact, ids + agreed, len(ids) - 1)[: len(agreed)])
        if split is None or split >= min(len(spec), len(base)):
            records.append({"bench": bench, "prompt": index, "split": split, "tokens": len(base)})
            continue
        prefix = ids + base[:split]
        low, high = last_logits(target, prefix), last_logits(exact, prefix)
        ar_token, spec_token = base[split], spec[split]
        top2 = high.topk(2)
        records.append({
            "bench": bench, "prompt": index, "split": split, "tokens": len(base),
            "ar_token": ar_token, "spec_token": spec_token,
            "fp32_gap": float(high[ar_token] - high[spec_token]),  # > 0: float32 prefers AR's token
            "low_gap": float(low[ar_token] - low[spec_token]),
            "fp32_argmax": int(top2.indices[0]),
            "fp32_top_gap": float(top2.values[0] - top2.values[1]),
            "logit": float(high[ar_token]),
            "bf16_spacing": bf16_spacing(float(high[ar_token])),
        })
        print(f"[{index}] {bench}: split at {split}, float32 gap {records[-1]['fp32_gap']:+.4f} "
              f"(bf16 spacing {records[-1]['bf16_spacing']:.4f})", flush=True)

    splits = [r for r in records if "fp32_gap" in r]
    gaps = sorted(abs(r["fp32_gap"]) for r in splits)
    control.sort()

    def quantile(values: list[float], q: float) -> float | None:
        return values[min(int(q * len(values)), len(values) - 1)] if values else None

    within = sum(abs(r["fp32_gap"]) <= 2 * r["bf16_spacing"] for r in splits)
    rate = {t: sum(g <= t for g in control) / max(len(control), 1) for t in (0.0625, 0.125, 0.25)}
    summary = {
        "target": args.target, "drafter": args.drafter, "dtype": args.dtype, "tree": vars(TreeConfig()),
        "generations": len(records), "differing": len(splits),
        "split_positions": [r["split"] for r in splits],
        "abs_fp32_gap_median": quantile(gaps, 0.5), "abs_fp32_gap_max": gaps[-1] if gaps else None,
        "within_two_bf16_spacings": within,
        "fp32_prefers_ar_token": sum(r["fp32_gap"] > 0 for r in splits),
        "control_positions": len(control), "control_top_gap_median": quantile(control, 0.5),
        "control_fraction_top_gap_at_most": rate,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "divergence.json").write_text(json.dumps({"summary": summary, "records": records}, indent=2))
    lines = [
        f"# bf16 T=0: where speculative and autoregressive greedy outputs split ({summary['device']})", "",
        (f"{summary['differing']} of {summary['generations']} generations differ ({args.max_new_tokens} new tokens, "
        f"first-turn prompts, {args.num_prompts} per bench)."), "",
        "| quantity | value |", "|---|---|",
        f"| median \\|float32 logit gap\\| between the two tokens at the split | {summary['abs_fp32_gap_median']} |",
        f"| largest \\|float32 logit gap\\| | {summary['abs_fp32_gap_max']} |",
        f"| splits within 2 bf16 spacings of the logit | {within} of {len(splits)} |",
        f"| splits where float32 prefers the AR token | {summary['fp32_prefers_ar_token']} of {len(splits)} |",
        (f"| control: median float32 top-1/top-2 gap over {len(control)} agreeing positions | "
        f"{summary['control_top_gap_median']} |"),
        *(f"| control: fraction of positions with top gap <= {t} | {v:.4f} |" for t, v in rate.items()),
    ]
    (args.out / "divergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
