"""The one speed-up benchmark: every question of MT-Bench, HumanEval and GSM8K, T = 0, three repeats,
speculation (tree engine) vs the fastest batch-1 AR, in ONE process, through
``speculative.timing.measure_speedup`` (the same function ``draftrl eval`` and the study use).

On the device machine (offline kit under /tmp/kit, as bench/gpu_sft.sh), from the repo root:

    PYTHONPATH=/tmp/kit/site:$PWD python3 bench/one_bench.py --name one_bench_h200 \\
        --train-steps 600 --train-minutes 3 --max-new-tokens 64 --data /tmp/sharegpt_6k.jsonl --max-minutes 9.5

or with a drafter at hand: ``--drafter DIR`` instead of ``--train-steps``. Inputs: the target
(``--target``, default /tmp/kit/smollm2.gguf); the benches shipped in speculative/data/bench (or
``--bench-dir``); for ``--train-steps``, a ShareGPT slice as JSONL (``--data``; default
/tmp/sharegpt_6k.jsonl, unpacked from .kit/data/sharegpt_6k.jsonl.gz when that is there, as
bench/gpu_sft.sh does). ``--train-steps N`` trains an EAGLE-3 SFT drafter first with the
repository's trainer (configs/sft_smollm2.yaml, N steps, capped by ``--train-minutes``) and
records how long that took.

Writes ``OUT/summary.json`` (configuration, GPU, training, per-bench tau / tokens/s / speed-up
with the mean, min and max over repeats, GPU clock samples) and ``OUT/summary.md`` after every
repeat, so a run cut short keeps what it finished. ``--max-minutes`` bounds the whole script:
no question starts after it and the summary says what was done (``stopped_early``).

Time (estimate, SmolLM2-135M on an H200): 80 questions x 3 benches are 320 generations per side
per repeat (MT-Bench has two turns), nearly all of which run to the token cap. At the default 96 new
tokens that is ~28 000 tokens a side; AR at ~600 tokens/s and speculation at ~300-370 tokens/s take
~2.1 minutes a repeat, so 3 repeats plus loading, engine build and warm-up take ~7.5 minutes
(128 tokens: ~9.5 minutes, and --max-minutes cuts the third repeat). Training 600 SFT steps first
takes ~2-3 minutes (the H100 made 1500 steps in 4.8 minutes, plus start-up): with --train-steps in
the same 10-minute call, use --max-new-tokens 64 or --repeats 2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.benchmark import (  # noqa: E402
    DEFAULT_BENCHES,
    _conversation,
    _environment,
    _seed_for,
    add_model_args,
    build_decoders,
    eos_token_ids,
    first_turn_prompts,
    load_models,
    load_questions,
    resolve_bench,
    warm_prompt,
)
from speculative.runtime import pick_device, target_dtype  # noqa: E402
from speculative.timing import Measurement, gpu_state, markdown_summary, measure_speedup, warm_up  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = REPO_ROOT / "configs" / "sft_smollm2.yaml"


def train_drafter(args, out: Path) -> tuple[Path, dict[str, Any]]:
    """An SFT drafter of ``--train-steps`` steps with the repository's trainer, in a child process."""
    data = Path(args.data)
    packed = REPO_ROOT / ".kit" / "data" / "sharegpt_6k.jsonl.gz"
    if not data.is_file() and packed.is_file():
        with gzip.open(packed, "rb") as source, open(data, "wb") as sink:
            shutil.copyfileobj(source, sink)
    if not data.is_file():
        raise SystemExit(f"one_bench: --train-steps needs a ShareGPT JSONL at --data ({data} is missing; "
                         "bench/make_sharegpt_slice.py makes one)")
    run_dir = Path(args.train_dir)
    if (run_dir / "drafter" / "config.json").is_file():  # a drafter trained by an earlier call: reuse it
        print(f"[one_bench] reusing the drafter trained earlier in {run_dir} (delete it to retrain)", flush=True)
        return run_dir / "drafter", {"reused": str(run_dir / "drafter"), "seconds": 0.0}
    argv = [sys.executable, "-m", "pipeline.train", "--config", str(SFT_CONFIG),
            "--minutes-this-run", f"{args.train_minutes:g}",
            "--set", f"target.model={args.target}", "--set", f"data.source={data}",
            "--set", f"output_dir={run_dir}", "--set", f"training.max_steps={args.train_steps}",
            "--set", f"training.save_every={args.train_steps}", "--set", f"training.eval_every={args.train_steps}"]
    print(f"[one_bench] training: {' '.join(argv)}", flush=True)
    started = time.time()
    with open(out / "train.log", "w") as log:
        code = subprocess.run(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.time() - started
    drafter = run_dir / "drafter"
    info: dict[str, Any] = {"steps_asked": args.train_steps, "seconds": round(seconds, 1), "exit_code": code,
                            "command": argv, "drafter": str(drafter)}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [r for r in rows if r.get("split") == "eval"]
        info["steps_done"] = max((r.get("step", 0) for r in rows), default=0)
        if evals:
            info["last_eval"] = {k: v for k, v in evals[-1].items() if k in ("step", "loss", "accept_length_proxy")
                                 or k.startswith("top1/")}
        shutil.copy(metrics, out / "train_metrics.jsonl")
    print(f"[one_bench] training: exit {code} after {seconds / 60:.2f} min, "
          f"{info.get('steps_done', '?')} steps; last eval {info.get('last_eval')}", flush=True)
    if code != 0 or not (drafter / "config.json").is_file():
        raise SystemExit(f"one_bench: training failed (exit {code}); see {out / 'train.log'}")
    return drafter, info


def write_summary(out: Path, record: dict[str, Any], measurement: Measurement | None) -> None:
    if measurement is not None:
        record["measurement"] = measurement.to_dict()
    tmp = out / f".summary.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    config = record["config"]
    head = (f"# One benchmark: {config['drafter']} on {config['target']}\n\n"
            f"{config.get('device_name')}, {config.get('dtype')}, tree engine `{config.get('compile')}` "
            f"(depth {config['tree']['depth']}, top-k {config['tree']['top_k']}, {config['tree']['total_tokens']} "
            f"draft tokens) vs AR `{config['ar_engine'][0]}`; T = {config['temperature']:g}, "
            f"{config['max_new_tokens']} new tokens, {config['num_prompts'] or 'all'} questions per bench, "
            f"{config['repeats']} repeats in one process (speculative.timing.measure_speedup: order "
            f"`{config.get('order', 'alternate')}`, benches round-robin, synchronize around each generation; "
            f"{config.get('prefill_lengths_warmed', 0)} first-turn prompt lengths pre-filled before timing). "
            "Cells: mean over finished repeats (min-max).")
    body = markdown_summary(measurement) if measurement is not None else "(nothing timed yet)\n"
    notes = []
    if measurement is not None and measurement.stopped_early:
        notes.append("Stopped early by --max-minutes: see `complete_repeats` and `questions`.")
    if record.get("training"):
        t = record["training"]
        notes.append(f"Drafter trained here: {t.get('steps_done', '?')} SFT steps in {t['seconds'] / 60:.1f} min "
                     f"(last eval {t.get('last_eval')}).")
    clocks = [g.get("clocks.sm") for g in (measurement.gpu if measurement else []) if g.get("clocks.sm")]
    if clocks:
        notes.append(f"SM clock samples (MHz, before/after each repeat): {', '.join(f'{c:g}' for c in clocks)}.")
    (out / "summary.md").write_text(head + "\n\n" + body + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n"
                                                            if notes else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, drafter_required=False)
    parser.set_defaults(target="/tmp/kit/smollm2.gguf", max_new_tokens=96)
    parser.add_argument("--name", default="one_bench", help="results go to bench/results/NAME (unless --out)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--bench", default=",".join(DEFAULT_BENCHES))
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ar-engine", default="batch",
                        help="batch (default: the faster batch-1 AR), static, or batch,static (both timed)")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="budget of the whole script (training included): no question starts after it")
    parser.add_argument("--order", default="alternate", choices=["alternate", "spec-first", "ar-first"],
                        help="who goes first per question (alternate: fair; the others reproduce the old paths)")
    parser.add_argument("--no-prefill-warmup", action="store_true",
                        help="skip pre-filling every first-turn prompt length before timing (as the old paths did)")
    parser.add_argument("--train-steps", type=int, default=None, metavar="N",
                        help="without --drafter: train an SFT drafter of N steps first (configs/sft_smollm2.yaml)")
    parser.add_argument("--train-minutes", type=float, default=4.0, help="cap on the training's wall clock")
    parser.add_argument("--data", default="/tmp/sharegpt_6k.jsonl", help="ShareGPT JSONL for --train-steps")
    parser.add_argument("--train-dir", default="/tmp/runs/one_bench_sft")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + 60 * args.max_minutes
    out = args.out or REPO_ROOT / "bench" / "results" / args.name
    out.mkdir(parents=True, exist_ok=True)
    if args.drafter is None and args.train_steps is None:
        parser.error("give --drafter DIR or --train-steps N")
    training = None
    if args.drafter is None:
        args.drafter, training = train_drafter(args, out)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, "--device")
    dtype = target_dtype(args.dtype, device)
    target, drafter, tokenizer = load_models(args.target, args.drafter, device, dtype, args.cache_dir)
    eos = eos_token_ids(tokenizer, target.model)
    questions = {name: load_questions(path, args.num_prompts, name)
                 for name, path in (resolve_bench(b.strip(), args.bench_dir) for b in args.bench.split(",") if b.strip())}
    built = time.perf_counter()
    spec, ars, budget = build_decoders(target, drafter, tokenizer, questions, args)
    config = {
        "target": args.target, "drafter": str(args.drafter), "benches": {k: len(v) for k, v in questions.items()},
        "num_prompts": args.num_prompts, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "ar_engine": list(ars), "max_minutes": args.max_minutes,
        "tree": {"depth": args.depth, "top_k": args.top_k, "total_tokens": args.total_tokens},
        **_environment(device, dtype, args), "compile": spec.compile,
        "ar_compile": {k: d.compile for k, d in ars.items()},
        "compile_errors": spec.engine.compile_errors + [e for d in ars.values() for e in d.engine.compile_errors],
        "cache_slots": budget, "engine_build_s": round(time.perf_counter() - built, 2),
        "command": " ".join(sys.argv),
    }
    record: dict[str, Any] = {"config": config, "training": training, "gpu_at_start": gpu_state(device)}
    write_summary(out, record, None)
    for decoder in (spec, *ars.values()):
        decoder.temperature = args.temperature
    warm = time.perf_counter()
    prompts = [] if args.no_prefill_warmup else first_turn_prompts(tokenizer, questions)
    config["prefill_lengths_warmed"] = warm_up([spec, *ars.values()], warm_prompt(tokenizer), args.max_new_tokens,
                                               eos, prompts=prompts)
    config["order"] = args.order
    config["warm_up_s"] = round(time.perf_counter() - warm, 2)
    print(f"[one_bench] engines built in {config['engine_build_s']}s, warm-up {config['warm_up_s']}s; "
          f"{sum(map(len, questions.values()))} questions x {args.repeats} repeats, "
          f"{(deadline - time.perf_counter()) / 60:.1f} min left", flush=True)

    measurement = measure_speedup(
        spec, ars, questions, _conversation(tokenizer, eos), max_new_tokens=args.max_new_tokens, eos=eos,
        temperature=args.temperature, repeats=args.repeats, deadline=deadline - 5,
        seed_for=lambda bench, q, turn: _seed_for(args.seed, bench, q, turn),
        log=lambda line: print(line, flush=True), on_repeat=lambda m: write_summary(out, record, m),
        order=args.order,
    )
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    write_summary(out, record, measurement)
    print((out / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
