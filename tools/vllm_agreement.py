"""Does vLLM accept as many of a drafter's tokens as draftrl's own engine says it should?

Both run greedy chain drafting with ``k`` speculative tokens over the same prompt ids, in the
same dtype: vLLM (its own EAGLE-3 proposer, acceptance read from its counters) and
``speculative.engine`` (acceptance counted per verification). If the exported drafter, its
feature layers or its vocabulary mapping were wrong, vLLM would accept far less than we
measure, so this pins "the drafter we train is the drafter vLLM serves".

    python -m tools.vllm_agreement --target smollm2 --drafter DIR [--prompts FILE] --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from actors.vllm_engine import Prompt
from speculative.checkpoint import load_drafter
from speculative.engine import generate
from speculative.target import TargetModel, resolve_target
from speculative.tree import TreeConfig
from tools.vllm_check import load_prompts, run_vllm_isolated

DEFAULT_PROMPTS: list[Prompt] = [
    [{"role": "user", "content": "Write a short poem about the ocean."}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."}],
    [{"role": "user", "content": "List three tips for staying productive when working from home."}],
    [{"role": "user", "content": "What is the capital of France, and what is it famous for?"}],
]


def _per_position(accept_lengths: Sequence[int], k: int) -> list[int]:
    return [sum(1 for a in accept_lengths if a > i) for i in range(k)]


def agreement(
    target: str,
    drafter_dir: str | Path,
    prompts: Sequence[Prompt] = DEFAULT_PROMPTS,
    *,
    num_speculative_tokens: int = 3,
    max_tokens: int = 64,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Acceptance of one drafter in vLLM and in draftrl's engine on the same prompt ids."""
    target_dir = resolve_target(target)
    vllm = run_vllm_isolated(
        target_dir, list(prompts), drafter_dir=str(drafter_dir),
        num_speculative_tokens=num_speculative_tokens, max_tokens=max_tokens,
        ignore_eos=True, dtype=dtype,
    )
    model = TargetModel.load(target_dir, dtype=getattr(torch, dtype))
    drafter = load_drafter(drafter_dir, model.embed_tokens.weight, model.aux_layer_ids).to(getattr(torch, dtype))
    prompt_ids = [out.prompt_token_ids for out in vllm.outputs]
    ours = generate(model, drafter, prompt_ids, max_tokens, tree=TreeConfig.chain(num_speculative_tokens))
    accept = [a for result in ours for a in result.accept_lengths]
    same_text = sum(
        list(result.tokens[:max_tokens]) == list(out.token_ids[:max_tokens])
        for result, out in zip(ours, vllm.outputs)
    )
    spec = vllm.spec
    return {
        "prompts": len(prompt_ids),
        "max_tokens": max_tokens,
        "num_speculative_tokens": num_speculative_tokens,
        "dtype": dtype,
        "outputs_identical": f"{same_text}/{len(prompt_ids)}",
        "vllm": {
            "mean_acceptance_length": spec.mean_acceptance_length,
            "num_drafts": spec.num_drafts,
            "accepted_per_position": list(spec.accepted_per_position),
            "per_position_rate": list(spec.per_position_rate),
        },
        "draftrl": {
            "mean_acceptance_length": 1.0 + sum(accept) / max(len(accept), 1),
            "num_drafts": len(accept),
            "accepted_per_position": _per_position(accept, num_speculative_tokens),
            "per_position_rate": [c / max(len(accept), 1) for c in _per_position(accept, num_speculative_tokens)],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--prompts", type=Path, help="JSONL of chats (default: four built-in chats)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the report here (atomically: its presence means a finished check)")
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    report = agreement(
        args.target, args.drafter, prompts, num_speculative_tokens=args.num_speculative_tokens,
        max_tokens=args.max_tokens, dtype=args.dtype,
    )
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
