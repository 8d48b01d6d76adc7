"""The ``draftrl`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speculative.config import ConfigError, dump_config, load_config


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set training.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftrl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a drafter (single process, or on Ray if distributed.enabled)")
    _config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument(
        "--steps-this-run", type=int, default=None, metavar="N",
        help="stop after N steps with a checkpoint (continue later with --resume)",
    )
    train.add_argument(
        "--minutes-this-run", type=float, default=None, metavar="M",
        help="stop after M minutes of training with a checkpoint (continue later with --resume)",
    )

    evaluate = commands.add_parser("evaluate", help="held-out TTT metrics of a drafter directory")
    _config_args(evaluate)
    evaluate.add_argument("--drafter", type=Path, required=True)

    export = commands.add_parser(
        "export", help="rewrite a drafter directory for vLLM, speculators or SpecForge/SGLang",
    )
    export.add_argument("--drafter", type=Path, required=True, help="a drafter directory (any layout)")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--format", required=True, choices=["vllm", "speculators", "specforge", "sglang"],
                        help="sglang = specforge: LlamaForCausalLMEagle3 with output-numbered aux ids")
    export.add_argument("--verifier", default=None,
                        help="the target's model id for speculators_config.verifier (default: the one the "
                             "drafter recorded; built-in aliases such as smollm2 become their hub id)")
    export.add_argument("--speculative-tokens", type=int, default=3, help="speculators' proposal length")
    export.add_argument("--layout", default="auto", choices=["auto", "draftrl", "vllm", "specforge", "speculators"],
                        help="how to read --drafter's config.json (default: from its keys)")

    show = commands.add_parser("config", help="print the validated config (defaults filled in)")
    _config_args(show)

    from tools.benchmark import add_model_args, check_dtypes, parse_trees  # light: no model code imported

    generate = commands.add_parser(
        "generate", help="decode a prompt (or a question JSONL) with the target, speculatively with --drafter",
    )
    generate.add_argument("prompt", nargs="?", default=None, help="user message (chat template applied)")
    generate.add_argument("--input", default=None, metavar="JSONL",
                          help="questions in EAGLE's format (a path, or a bench name in --bench-dir)")
    generate.add_argument("--out", type=Path, default=None, help="answers JSONL (default: stdout)")
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    add_model_args(generate, drafter_required=False)

    bench = commands.add_parser(
        "eval", help="tau and speed-up of a drafter on MT-Bench/HumanEval/GSM8K vs autoregressive decoding",
    )
    bench.add_argument("--bench", default="mt_bench,humaneval,gsm8k",
                       help="comma-separated bench names (in --bench-dir) or .jsonl paths")
    bench.add_argument("--temperature", default="0,1", help="comma-separated temperatures")
    bench.add_argument("--out", type=Path, default=None,
                       help="output folder (default runs/eval/<drafter name>)")
    bench.add_argument("--max-minutes", type=float, default=None, metavar="M",
                       help="time budget for the timed part: each temperature gets an equal share; benches are "
                            "visited round-robin and no question starts after it (the report says how many ran)")
    bench.add_argument("--repeats", type=int, default=1, metavar="R",
                       help="time every question R times in this process; the report gives the spread")
    bench.add_argument("--ar-engine", default="batch", metavar="NAME[,NAME]",
                       help="AR baseline: batch (BatchGenerator chain_length=0, the faster at batch 1; default) "
                            "or static (the tree engine's generate_autoregressive); 'batch,static' times both, "
                            "the first is the speed-up's baseline")
    bench.add_argument("--profile", type=int, default=0, metavar="N",
                       help="after the timed part, decode the first N questions of the first bench (all turns, "
                            "first temperature) again with the speculative and the AR decoders, clean and under "
                            "torch.profiler with per-phase ranges (spec/prefill, spec/drafter_prefill, "
                            "spec/draft_verify, spec/verify_host, spec/catch_up, ar/prefill, ar/decode): writes "
                            "profile.md, profile.json, profile_trace.json.gz to --out. With --max-minutes 0 the "
                            "timed part is skipped (profile only)")
    bench.add_argument("--check", action="store_true",
                       help="GPU self-check: static/graph paths vs eager greedy (2 prompts x 32 tokens); a path "
                            "that fell back (e.g. a failed graph capture) fails it")
    bench.add_argument("--check-dtypes", type=check_dtypes, default=None, metavar="DTYPE[,DTYPE]",
                       help="the check's dtypes, in this order (default float32, then bfloat16 on CUDA; "
                            "equality is asserted in float32 only), e.g. bfloat16,float32")
    bench.add_argument("--trees", type=parse_trees, default=None, metavar="DxKxN[,DxKxN...]",
                       help="a tree sweep: time these tree shapes (depth x top-k x draft tokens, e.g. "
                            "6x10x59,4x8x24; replaces --depth/--top-k/--total-tokens) in one process, one tree "
                            "engine each, all against the same AR generations of the same questions; results.md "
                            "gets a row per tree and the best tree by speed-up")
    add_model_args(bench, drafter_required=True)

    from tools.regenerate import add_arguments as add_regenerate_args  # light: no vLLM import

    regenerate = commands.add_parser(
        "regenerate", help="rewrite a chat dataset's assistant turns with the target through vLLM (resumable)",
    )
    add_regenerate_args(regenerate)

    from tools.code_prompts import add_arguments as add_code_prompt_args

    code_prompts = commands.add_parser(
        "code-prompts", help="ShareGPT + HumanEval prompts (minus the 80 benchmark questions) for a coding target",
    )
    add_code_prompt_args(code_prompts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "code-prompts":
        from tools.code_prompts import run_cli as run_code_prompts

        return run_code_prompts(args)
    if args.command == "regenerate":  # flags only; vLLM is imported when it starts
        from tools.regenerate import run_cli

        return run_cli(args)
    if args.command == "export":  # file level: no target, no experiment config
        from speculative.checkpoint import export_drafter
        from speculative.target import verifier_architectures, verifier_id

        try:
            out = export_drafter(args.drafter, args.out, args.format, layout=args.layout,
                                 verifier=verifier_id(args.verifier) if args.verifier else None,
                                 verifier_architectures=verifier_architectures(args.verifier) if args.verifier else None,
                                 speculative_tokens=args.speculative_tokens)
        except (ValueError, FileNotFoundError) as error:
            print(f"draftrl: {error}", file=sys.stderr)
            return 2
        print(f"[draftrl] {args.format} drafter: {out}")
        return 0
    if args.command in ("generate", "eval"):  # no experiment config: flags only
        from tools.benchmark import BenchmarkError, run_eval, run_generate

        try:
            return run_generate(args) if args.command == "generate" else run_eval(args)
        except BenchmarkError as error:
            print(f"draftrl: {error}", file=sys.stderr)
            return 2
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"draftrl: {error}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(config), end="")
        return 0
    from pipeline.trainer import Trainer  # heavy imports only when needed

    if args.command == "train":
        if config.distributed.enabled:  # the Ray pipeline: rollout actors + DeepSpeed learners
            from pipeline.driver import DistributedTrainer as Trainer
        result = Trainer(
            config, resume=args.resume, steps_this_run=args.steps_this_run,
            minutes_this_run=args.minutes_this_run,
        ).run()
        print(f"[draftrl] drafter (EAGLE-3, loads in vLLM; draftrl export for SGLang/speculators): {result.drafter_dir}")
        print(f"[draftrl] checkpoints: {result.output_dir / 'checkpoints'}")
        print(f"[draftrl] TensorBoard: tensorboard --logdir {result.output_dir / 'tensorboard'}")
        print(f"[draftrl] curves: {result.output_dir / 'curves.png'}")
        print(f"[draftrl] final eval: {json.dumps(result.eval_metrics, indent=None)}")
        return 0
    if args.command == "evaluate":
        metrics = Trainer(config).evaluate_directory(args.drafter)
        print(json.dumps(metrics, indent=2))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
