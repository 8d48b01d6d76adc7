"""GTO experience throughput on one device, against the target's prefill ceiling, in one run.

    python bench/gto_throughput.py --target /tmp/kit/smollm2.gguf --data /tmp/sharegpt_6k.jsonl --out OUT
    python bench/gto_throughput.py --device cpu --tiny --out OUT      # CPU smoke run, small sizes

Measures, with the target in the experience's own code path (``FastLlama``, bf16 on GPU):

* the **prefill ceiling**: tokens/s of one target forward (logits included) over [B, L] random
  tokens, at its best B among ``--ceiling-batches``;
* **GTO tokens scored/s** of ``actors.gto_rollout.gto_experience`` (the batched path) at each
  batch size and chunking (``S x C`` = ``gto.sequences_per_forward`` x
  ``gto.positions_per_forward``), and of ``per_sequence_gto_experience`` (the old path) in the
  same process. "Tokens" is the pipeline's metric (``rollout_tokens_per_s``): the experience's
  ``num_tokens``, the real tokens of the batch's sequences. The whole experience is timed
  (prefill, both drafters' trees, verification, scoring, the reference path replay);
* the ratio of each to the ceiling, and the **target work** behind it: the tree nodes verified
  per second (2 trees x N nodes per position) and (sequence + tree tokens)/s, which is what the
  ceiling bounds. GTO verifies 2 * K * m * N tree tokens per sequence (15 104 with the paper's
  K = 16, m = 8, N = 59), so tokens scored/s can reach at most about
  L / (L + 15 104) of the ceiling for sequences of L tokens, whatever the implementation;
* optionally (``--graphs``, CUDA) whether a CUDA graph pays for one verification forward of the
  best chunking (eager vs replay), and (``--profile``) a torch.profiler table of one batch.

Writes ``gto_throughput.json`` and ``gto_throughput.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from actors.gto_rollout import (  # noqa: E402
    batch_windows,
    batched_tree_options,
    gto_experience,
    per_sequence_gto_experience,
    position_slots,
    tree_config,
)
from actors.target_worker import TargetWorker  # noqa: E402
from bench.opd_throughput import SDPA_BACKENDS  # noqa: E402
from speculative.config import load_config  # noqa: E402
from speculative.drafter_blueprint import make_blueprint  # noqa: E402
from speculative.batched_trees import score_trees_at_positions  # noqa: E402
from speculative.data import build_dataset, collate  # noqa: E402
from speculative.llama import FastLlama, causal_slot_mask  # noqa: E402
from speculative.target import TargetModel, default_cache_dir, load_tokenizer, resolve_target  # noqa: E402
from speculative.tree import tree_size  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# --tiny: sizes for a CPU smoke run of the very same code (the real target, small everything).
TINY = {
    "max_length": 64, "max_records": 48, "batch_sizes": "2", "chunks": "2x2", "precisions": "fp32,bf16",
    "batches": 1, "old_batch_size": 2, "old_positions_per_forward": 4, "ceiling_batches": "2",
    "ceiling_length": 32, "draft_vocab_size": 256,
    "set": ["gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8", "gto.group_size=3",
            "gto.groups_per_sequence=2"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return result, time.perf_counter() - start


@torch.no_grad()
def prefill_ceiling(fast: FastLlama, batch_sizes: list[int], length: int, repeats: int = 3) -> dict[int, float]:
    """Target forward tokens/s (logits included) over [B, length] random tokens, per B."""
    device = fast.device
    vocab = fast.config.vocab_size
    rates = {}
    for batch in batch_sizes:
        try:
            ids = torch.randint(0, vocab, (batch, length), device=device)
            positions = torch.arange(length, device=device).expand(batch, length)
            mask = causal_slot_mask(0, length, length, batch, device=device)
            cache = fast.new_cache(batch, length)
            fast(ids, positions, cache, 0, mask)  # warm-up
            seconds = min(timed(device, fast, ids, positions, cache, 0, mask)[1] for _ in range(repeats))
            rates[batch] = batch * length / seconds
            del ids, cache
        except torch.OutOfMemoryError:
            rates[batch] = float("nan")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rates


def sample_batches(dataset, pad_id: int, batch_size: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of distinct random samples (seeded), collated as the trainer does."""
    order = random.Random(seed).sample(range(len(dataset)), min(len(dataset), batch_size * count))
    if len(order) < batch_size * count:
        raise ValueError(f"the data has {len(dataset)} samples, {batch_size * count} needed")
    return [collate([dataset[i] for i in order[k * batch_size : (k + 1) * batch_size]], pad_id)
            for k in range(count)]


def measure_gto(worker, config, batches, drafter, reference, make, passes: int = 1) -> dict[str, float]:
    """Time ``make`` (an experience function) over ``batches[1:]``; ``batches[0]`` warms up
    (allocator, kernels) untimed. ``passes`` > 1: the same batches again, timed apart
    (``repeat_batch_seconds``): what a batch costs once every shape it meets was seen before
    (cuDNN builds an attention graph per new shape), against the first pass's new data."""
    device = worker.target.device
    make(worker, config, batches[0], drafter, reference, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = positions = 0
    took_each: list[float] = []
    batches = batches[1:]
    for i, batch in enumerate(batches):
        exp, took = timed(device, make, worker, config, batch, drafter, reference, seed=i + 1)
        tokens += exp.num_tokens
        positions += exp.index.numel()
        took_each.append(took)
    seconds = sum(took_each)
    repeats = [timed(device, make, worker, config, batch, drafter, reference, seed=i + 1)[1]
               for _ in range(passes - 1) for i, batch in enumerate(batches)]
    nodes, _ = tree_size(tree_config(config.gto), drafter.config.draft_vocab_size)
    tree_tokens = 2 * nodes * positions
    return {
        "batches": len(batches), "seconds": seconds, "tokens": tokens, "positions": positions,
        "tok_s": tokens / seconds, "tree_tokens_per_s": tree_tokens / seconds,
        "target_tokens_per_s": (tokens + tree_tokens) / seconds,
        "seconds_per_batch": seconds / len(batches), "batch_seconds": took_each,
        **({"repeat_batch_seconds": repeats} if repeats else {}),
        "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }


@torch.no_grad()
def verification_graph_gain(fast: FastLlama, seqs: int, width: int, nodes: int, repeats: int = 10) -> dict[str, float]:
    """Eager vs CUDA-graph replay of one verification-shaped forward ([S, nodes] behind a
    ``width``-slot prefix, static shapes): whether graphs pay at this size."""
    device = fast.device
    ids = torch.randint(0, fast.config.vocab_size, (seqs, nodes), device=device)
    positions = (width + torch.arange(nodes, device=device) % 8).expand(seqs, nodes).contiguous()
    mask = torch.ones(seqs, nodes, width + nodes, dtype=torch.bool, device=device)
    cache = fast.new_cache(seqs, width + nodes)

    def step():
        return fast(ids, positions, cache, width, mask).logits

    step()
    eager = min(timed(device, step)[1] for _ in range(repeats))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    replay = min(timed(device, graph.replay)[1] for _ in range(repeats))
    return {"seqs": seqs, "width": width, "nodes_per_seq": nodes, "eager_s": eager, "graph_s": replay,
            "graph_speedup": eager / replay}


@torch.no_grad()
def sharing_stats(worker, config, batch, drafter, reference) -> dict[str, float]:
    """How many reference-tree nodes the packed verification read from the current trees."""
    gto = config.gto
    lengths = [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
    indices, counts, _ = position_slots(batch_windows(batch["loss_mask"], lengths, gto, 0),
                                        gto.groups_per_sequence * gto.group_size)
    trees = score_trees_at_positions(worker.fast, drafter, reference, batch["input_ids"].to(worker.target.device),
                                     lengths, indices, counts, worker.draft_to_target, batched_tree_options(gto))
    nodes = tree_size(tree_config(gto), drafter.config.draft_vocab_size)[0]
    return {"shared_fraction": trees.shared_nodes / max(1, sum(counts) * nodes),
            "verified_slots": trees.verified_nodes, "tree_nodes": 2 * sum(counts) * nodes,
            # target slots fed per position (padding included) against the 2 x N nodes of its trees
            "fed_per_position": trees.verified_nodes / max(1, sum(counts))}


def perturbed(drafter, noise: float, seed: int = 0):
    """A copy of ``drafter`` with every trainable weight moved by ``noise`` x its mean |w|."""
    copy_ = copy.deepcopy(drafter)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.trainable_parameters():
            p.add_((noise * p.abs().mean()) * torch.randn(p.shape, generator=generator).to(p))
    return copy_


def profile_batch(worker, config, batch, drafter, reference, out: Path) -> Path:
    """torch.profiler over one batched experience; the top ops and the gto/* stages."""
    from torch.profiler import ProfilerActivity, profile

    device = worker.target.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        gto_experience(worker, config, batch, drafter, reference, seed=0)
        sync(device)
    prefix = "device" if device.type == "cuda" else "cpu"
    parts = []
    for key, by_shape in ((f"{prefix}_time_total", False), (f"self_{prefix}_time_total", False),
                          (f"self_{prefix}_time_total", True)):
        try:
            table = prof.key_averages(group_by_input_shape=by_shape).table(
                sort_by=key, row_limit=40 if not by_shape else 60, max_shapes_column_width=90)
            parts.append(f"sorted by {key}{', per input shape' if by_shape else ''}\n" + table)
        except (AttributeError, KeyError, RuntimeError, TypeError) as error:  # older torch names
            parts.append(f"sorted by {key}: {error!r}")
    path = out / "gto_profile.txt"
    path.write_text("\n\n".join(parts))
    return path


def with_gto(config, **gto):
    """``config`` with ``gto.*`` fields replaced (validated)."""
    section = type(config.gto).model_validate({**config.gto.model_dump(), **gto})
    return config.model_copy(update={"gto": section})


@dataclass
class Models:
    """What a GTO bench runs on: the config, the target (in its worker), the data, both drafters."""

    config: Any
    worker: TargetWorker
    dataset: Any
    pad_id: int
    drafter: Any
    reference: Any
    device: torch.device
    dtype: torch.dtype


def load_models(args: argparse.Namespace) -> Models:
    """The config (``training.objective=gto`` and ``--set``), the target, the data and the drafter
    (``--drafter`` or a random init; weights in ``--drafter-dtype``) with its reference copy
    (M = M0, as at the start of GTO's phase II): ``add_model_arguments``' flags."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    overrides = ["training.objective=gto", f"target.model={args.target}", f"data.max_length={args.max_length}",
                 f"drafter.draft_vocab_size={args.draft_vocab_size}", *args.set]
    if args.drafter:
        overrides.append(f"drafter.init_from={args.drafter}")
    config = load_config(None, overrides)

    target = TargetModel.load(args.target, config.target.aux_layer_ids, dtype, device, cache_dir)
    tokenizer = load_tokenizer(args.target, cache_dir)
    dataset, _ = build_dataset(args.data, tokenizer, max_length=args.max_length, max_records=args.max_records,
                               on_error="skip", cache_dir=cache_dir / "data", progress=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    target_path = resolve_target(args.target, cache_dir)
    drafter = make_blueprint(config, target_path, dataset).build(target.embed_tokens.weight)
    drafter = drafter.to(device).eval()
    for param in drafter.parameters():  # parameters only: RoPE's inv_freq stays fp32
        param.data = param.data.to(DTYPES[args.drafter_dtype])
    reference = copy.deepcopy(drafter)  # M = M0, as at the start of GTO's phase II
    worker = TargetWorker(target, drafter.draft_to_target)
    print(f"[bench] target {args.target} ({dtype}) on {device}; {len(dataset)} samples; "
          f"drafter {'from ' + args.drafter if args.drafter else 'random init'} ({args.drafter_dtype})", flush=True)
    return Models(config, worker, dataset, pad_id, drafter, reference, device, dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = load_models(args)
    config, worker, dataset, pad_id = models.config, models.worker, models.dataset, models.pad_id
    drafter, reference, device, dtype = models.drafter, models.reference, models.device, models.dtype
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "target": args.target, "dtype": str(dtype), "drafter_dtype": args.drafter_dtype,
        "drafter": args.drafter or "random init", "data": str(args.data), "max_length": args.max_length,
        "gto": config.gto.model_dump(), "tree_nodes": tree_size(tree_config(config.gto), drafter.config.draft_vocab_size)[0],
        "sdpa_backends": args.sdpa_backends or "all",
    }
    ceiling = prefill_ceiling(worker.fast, [int(b) for b in args.ceiling_batches.split(",")], args.ceiling_length)
    result["prefill_ceiling_by_batch"] = {str(b): r for b, r in ceiling.items()}
    result["prefill_ceiling_tok_s"] = max((r for r in ceiling.values() if r == r), default=float("nan"))
    result["prefill_ceiling_length"] = args.ceiling_length
    print(f"[bench] prefill ceiling {result['prefill_ceiling_tok_s']:.0f} tok/s ({ceiling})", flush=True)

    PARTIAL.append((out / "gto_throughput.partial.json", dict(result)))
    rows = []
    old_batches = sample_batches(dataset, pad_id, args.old_batch_size or 1, args.batches + 1, seed=1000)
    batches_of: dict[int, list] = {}
    for seed, size in enumerate(int(b) for b in args.batch_sizes.split(",")):
        batches = batches_of[size] = sample_batches(dataset, pad_id, size, args.batches + 1, seed=seed)
        for precision in args.precisions.split(","):
            for chunk in args.chunks.split(","):
                seqs, positions = (int(x) for x in chunk.split("x"))
                cfg = with_gto(config, sequences_per_forward=seqs, positions_per_forward=positions,
                               tree_precision=precision)
                rows.append(measured("batched", size, chunk, precision,
                                     lambda: measure_gto(worker, cfg, batches, drafter, reference, gto_experience,
                                                         args.passes)))
    best = _best(rows)
    if best is not None and args.reference_noise > 0:
        # The worst case for node sharing: a reference that has drifted from the drafter.
        size, chunk, precision = best["batch_size"], best["chunk"], best["precision"]
        seqs, positions = (int(x) for x in chunk.split("x"))
        cfg = with_gto(config, sequences_per_forward=seqs, positions_per_forward=positions, tree_precision=precision)
        batches = batches_of[size]  # the best row's own batches
        drifted = perturbed(reference, args.reference_noise).eval()
        row = measured("batched, reference drifted", size, chunk, precision,
                       lambda: measure_gto(worker, cfg, batches, drafter, drifted, gto_experience))
        row["reference_noise"] = args.reference_noise
        rows.append(row)
        result["sharing"] = {"reference = drafter": sharing_stats(worker, cfg, batches[0], drafter, reference),
                             f"reference noise {args.reference_noise}": sharing_stats(worker, cfg, batches[0], drafter, drifted)}
        print(f"[bench] sharing {result['sharing']}", flush=True)
        del drifted
    if args.old_batch_size:
        # Old path vs the batched path on the very same batches (the config's batch size).
        old_cfg = with_gto(config, sequences_per_forward=1, positions_per_forward=args.old_positions_per_forward,
                           tree_precision="fp32")
        rows.append(measured("per_sequence", args.old_batch_size, f"1x{args.old_positions_per_forward}", "fp32",
                             lambda: measure_gto(worker, old_cfg, old_batches, drafter, reference,
                                                 per_sequence_gto_experience), same_batches=True))
        for precision in sorted({"fp32", best["precision"] if best else "fp32"}):
            chunk = best["chunk"] if best else "16x8"
            seqs, positions = (int(x) for x in chunk.split("x"))
            cfg = with_gto(config, sequences_per_forward=seqs, positions_per_forward=positions, tree_precision=precision)
            rows.append(measured("batched", args.old_batch_size, chunk, precision,
                                 lambda: measure_gto(worker, cfg, old_batches, drafter, reference, gto_experience),
                                 same_batches=True))
    ceiling_rate = result["prefill_ceiling_tok_s"]
    for row in rows:
        if "tok_s" in row:
            row["ceiling_ratio"] = row["tok_s"] / ceiling_rate
            row["target_work_ratio"] = row["target_tokens_per_s"] / ceiling_rate
    result["rows"] = rows
    best = _best(rows)
    result["gto_tok_s"] = best["tok_s"]
    result["gto_ceiling_ratio"] = best["ceiling_ratio"]
    result["gto_best"] = {k: best[k] for k in ("batch_size", "chunk", "precision")}
    same = [r for r in rows if r.get("same_batches") and "tok_s" in r]
    old = [r for r in same if r["path"] == "per_sequence"]
    new = [r for r in same if r["path"] == "batched"]
    if old and new:
        result["batched_over_per_sequence"] = {r["precision"]: r["tok_s"] / old[0]["tok_s"] for r in new}
    timed_rows = [r for r in rows if "tokens" in r]
    mean_len = sum(r["tokens"] for r in timed_rows) / max(1, sum(r["batches"] * r["batch_size"] for r in timed_rows))
    per_seq_tree = 2 * result["tree_nodes"] * config.gto.groups_per_sequence * config.gto.group_size
    result["mean_sequence_tokens"] = mean_len
    result["work_bound_ratio"] = mean_len / (mean_len + per_seq_tree)  # if tree tokens cost a prefill token
    result["work_bound_ratio_shared"] = mean_len / (mean_len + per_seq_tree / 2)  # reference fully shared

    if args.graphs and device.type == "cuda":
        seqs, positions = (int(x) for x in best["chunk"].split("x"))
        try:
            result["verification_graph"] = verification_graph_gain(
                worker.fast, min(seqs, best["batch_size"]), args.max_length, 2 * positions * result["tree_nodes"])
        except Exception as error:  # report, do not lose the run
            result["verification_graph"] = {"error": repr(error)}
        print(f"[bench] graphs: {result['verification_graph']}", flush=True)
    if args.profile:
        seqs, positions = (int(x) for x in best["chunk"].split("x"))
        batch = sample_batches(dataset, pad_id, best["batch_size"], 1, seed=999)[0]
        cfg = with_gto(config, sequences_per_forward=seqs, positions_per_forward=positions,
                       tree_precision=best["precision"])
        result["profile"] = str(profile_batch(worker, cfg, batch, drafter, reference, out))

    (out / "gto_throughput.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gto_throughput.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


def _best(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["path"] == "batched" and "tok_s" in r and not r.get("same_batches")]
    return max(done, key=lambda r: r["tok_s"]) if done else None


PARTIAL: list[tuple[Path, dict]] = []  # (file, result) rewritten after every row: a run cut short keeps its rows


def measured(path: str, size: int, chunk: str, precision: str, measure, **extra) -> dict[str, Any]:
    """One table row: ``measure()``'s figures, or the out-of-memory error that stopped it."""
    try:
        row = measure()
    except torch.OutOfMemoryError as error:
        row = {"error": f"out of memory: {str(error).splitlines()[0][:120]}"}
        torch.cuda.empty_cache()
    row.update(path=path, batch_size=size, chunk=chunk, precision=precision, **extra)
    print(f"[bench] {row}", flush=True)
    for file, result in PARTIAL:
        result.setdefault("rows", []).append(row)
        file.write_text(json.dumps(result, indent=2, default=str))
    return row


def markdown(result: dict[str, Any]) -> str:
    gto = result["gto"]
    lines = [
        f"# GTO experience throughput ({result['device']}, target {result['dtype']}, drafter weights "
        f"{result['drafter_dtype']})",
        "",
        f"Prefill ceiling: **{result['prefill_ceiling_tok_s']:.0f} tok/s** (best B of "
        f"{list(result['prefill_ceiling_by_batch'])} x {result['prefill_ceiling_length']} tokens; per B: "
        + ", ".join(f"{b}: {r:.0f}" for b, r in result["prefill_ceiling_by_batch"].items()) + "). "
        f"GTO: {result['tree_nodes']}-node trees (depth {gto['tree_depth']}, top-{gto['tree_top_k']}), "
        f"{gto['groups_per_sequence']} x {gto['group_size']} positions per sequence, 2 trees each; "
        f"data max_length {result['max_length']}, drafter {result['drafter']}.",
        "",
        "S x C = sequences x positions per forward; precision = gto.tree_precision; GTO tok/s = the "
        "pipeline's rollout_tokens_per_s (real sequence tokens); tree tok/s = 2 x N x positions per "
        "second; work / ceiling = (sequence + tree tokens)/s over the ceiling.",
        "",
        "| path | batch | S x C | precision | GTO tok/s | / ceiling | tree tok/s | work / ceiling | s / batch | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = r["path"] + (" (same batches)" if r.get("same_batches") else "")
        head = f"| {name} | {r['batch_size']} | {r['chunk']} | {r['precision']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        lines.append(
            f"{head} {r['tok_s']:.0f} | {r['ceiling_ratio']:.2%} | {r['tree_tokens_per_s']:.0f} | "
            f"{r['target_work_ratio']:.1%} | {r['seconds_per_batch']:.3f} | {r['peak_gb']:.1f} |"
        )
    repeated = [r for r in result["rows"] if r.get("repeat_batch_seconds")]
    if repeated:
        lines += ["", "Each timed batch (s), then the same batches again (every shape seen before):", ""]
        lines += [f"- {r['path']} {r['chunk']} {r['precision']}: "
                  + ", ".join(f"{t:.3f}" for t in r["batch_seconds"]) + " | again: "
                  + ", ".join(f"{t:.3f}" for t in r["repeat_batch_seconds"]) for r in repeated]
    best = result["gto_best"]
    lines += ["", f"Best GTO: **{result['gto_tok_s']:.0f} tok/s = {result['gto_ceiling_ratio']:.2%} of the "
              f"ceiling** (batch {best['batch_size']}, S x C {best['chunk']}, {best['precision']})."]
    if "batched_over_per_sequence" in result:
        ratios = ", ".join(f"{p}: {x:.1f}x" for p, x in result["batched_over_per_sequence"].items())
        lines.append(f"Batched over per-sequence on the same batches: {ratios}.")
    lines.append(
        f"Work bound: sequences average {result['mean_sequence_tokens']:.0f} tokens; if a tree token cost "
        f"what a prefill token costs, GTO could reach {result['work_bound_ratio']:.1%} of the ceiling "
        f"({result['work_bound_ratio_shared']:.1%} with the reference tree fully shared).")
    if "sharing" in result:
        lines.append("Reference nodes read from the current tree: " + ", ".join(
            f"{k}: {v['shared_fraction']:.0%}" for k, v in result["sharing"].items()) + ".")
        lines.append(f"Target slots fed per position (padding included; 2 trees x {result['tree_nodes']} nodes = "
                     f"{2 * result['tree_nodes']}; leaves are not fed unless gto.verify_leaves): " + ", ".join(
                         f"{k}: {v['fed_per_position']:.1f}" for k, v in result["sharing"].items()) + ".")
    if "verification_graph" in result:
        lines.append(f"CUDA graph of one verification-sized forward: {result['verification_graph']}")
    return "\n".join(lines) + "\n"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``load_models`` reads (shared by the GTO benches)."""
    parser.add_argument("--target", default="smollm2", help="built-in name, .gguf file or HF directory")
    parser.add_argument("--drafter", default=None, help="EAGLE-3 drafter directory (default: random init)")
    parser.add_argument("--data", default="sharegpt", help="'sharegpt' or a conversations file (JSONL/JSON/parquet)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="target dtype (default bf16 on GPU)")
    parser.add_argument("--drafter-dtype", default="float32", choices=sorted(DTYPES),
                        help="the trainer's rollouts run the drafter in fp32")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-records", type=int, default=2000)
    parser.add_argument("--draft-vocab-size", type=int, default=32000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="8,32,64", help="GTO batch sizes of the batched path")
    parser.add_argument("--chunks", default="16x8,32x8,64x4", help="S x C settings (sequences x positions per forward)")
    parser.add_argument("--precisions", default="fp32,bf16", help="gto.tree_precision values to measure")
    parser.add_argument("--reference-noise", type=float, default=0.05,
                        help="also time the best setting against a reference moved by this x mean|w| (0: skip)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per setting (after one warm-up)")
    parser.add_argument("--passes", type=int, default=1, help="time the batched path's batches this many times "
                        "(the later passes apart: repeat_batch_seconds, every shape seen before)")
    parser.add_argument("--old-batch-size", type=int, default=4, help="batch size of the old-vs-new comparison (0: skip)")
    parser.add_argument("--old-positions-per-forward", type=int, default=32,
                        help="the old path's positions per forward (its default before the batched path)")
    parser.add_argument("--ceiling-batches", default="8,16,32,64")
    parser.add_argument("--ceiling-length", type=int, default=2048)
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. gto.tree_depth=6")
    parser.add_argument("--graphs", action="store_true", help="eager vs CUDA-graph replay of one verification forward")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one batch")
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--sdpa-backends", default="", help=f"run under only these SDPA backends, of "
                        f"{sorted(SDPA_BACKENDS)} (e.g. flash,efficient,math: no cuDNN, whose calls cost "
                        "0.84 ms of CPU each in an H200 GTO batch), for an A/B; the ceiling too")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value if key != "set" else value + args.set)
    with only_sdpa_backends(args.sdpa_backends):
        run(args)
    return 0


def only_sdpa_backends(names: str) -> contextlib.AbstractContextManager:
    """``sdpa_kernel`` limited to the comma-separated backends (none: no limit)."""
    chosen = [name for name in names.split(",") if name]
    unknown = set(chosen) - set(SDPA_BACKENDS)
    if unknown:
        raise SystemExit(f"--sdpa-backends: {sorted(unknown)} not among {sorted(SDPA_BACKENDS)}")
    if not chosen:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name]) for name in chosen])


if __name__ == "__main__":
    sys.exit(main())
