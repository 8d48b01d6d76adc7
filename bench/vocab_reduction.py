"""The tree search's vocabulary reduction at one level's shape: two torch passes against one Triton read.

    python bench/vocab_reduction.py --out OUT                  # CUDA: [40 960, 32 000] bf16, top-10
    TRITON_INTERPRET=1 python bench/vocab_reduction.py --device cpu --rows 64 --vocab 4096 --out OUT

Each GTO tree level turns the drafter's [rows, Vd] logits into every row's top-k ids and their fp32
log-probabilities (``speculative.vocab_topk.top_k_logprobs``). Timed, on the same random logits:

* **torch**: block maxima (one pass), the log-normaliser (a compiled reduction, a second pass), the
  top-k of the best blocks' entries;
* **triton gG wW**: block maxima and normaliser from ``speculative.block_stats_kernel`` (one pass;
  ``G`` blocks a loop step, ``W`` warps), then the same top-k; one row per configuration of
  ``--groups`` x ``--warps``.

Also the reductions alone (without the top-k), the GB/s of one read of the logits, and the top-k
kernel alone on the best blocks (``--old-tree DIR``: also that of an older checkout's
``speculative/block_stats_kernel.py``, its ids checked equal to this one's). Every Triton row is
checked against the torch one (the same top-k values in order, ties aside, and log q within 1e-4):
a row that differs says so.
Writes ``vocab_reduction.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench.gto_verify_profile import time_reps  # noqa: E402
from speculative.block_stats_kernel import block_stats, top_k_in_blocks  # noqa: E402
from speculative.vocab_topk import _top_k_in_blocks, log_normaliser, top_k_ids, top_k_logprobs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=40960, help="rows of a level (32 x 128 roots x top-10)")
    parser.add_argument("--vocab", type=int, default=32000, help="the draft vocabulary")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--groups", default="4,8,16", help="blocks read per loop step, comma-separated")
    parser.add_argument("--warps", default="4,8", help="warps per program, comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--old-tree", type=Path, default=None,
                        help="an older checkout: also time its top_k_in_blocks kernel on the same blocks")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def _old_top_k(tree: Path):
    """``top_k_in_blocks`` of ``tree``'s ``speculative/block_stats_kernel.py``, loaded apart from ours."""
    import importlib.util

    path = tree / "speculative" / "block_stats_kernel.py"
    spec = importlib.util.spec_from_file_location("old_block_stats_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.top_k_in_blocks


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, device=device, generator=generator) * 3).to(dtype)
    read_gb = logits.numel() * logits.element_size() / 1e9
    k, block = args.top_k, args.block
    base_ms, (base_ids, base_logq) = time_reps(
        device, lambda: top_k_logprobs(logits, k, block, fused=False), args.warmup, args.reps)
    reduce_ms, _ = time_reps(
        device, lambda: (top_k_ids(logits, k, block), log_normaliser(logits)), args.warmup, args.reps)
    rows: list[dict[str, Any]] = [{
        "variant": "torch", "top_k_logprobs_ms": base_ms, "reductions_ms": None,
        "top_k_with_normaliser_ms": reduce_ms, "status": "baseline",
    }]
    for group in _ints(args.groups):
        for warps in _ints(args.warps):
            name = f"triton g{group} w{warps}"
            try:
                stats_ms, _ = time_reps(device, lambda: block_stats(logits, block, group, warps),
                                        args.warmup, args.reps)

                def fused():
                    maxima, lse = block_stats(logits, block, group, warps)
                    ids = _top_k_in_blocks(logits, maxima, k, block)
                    return ids, logits.gather(-1, ids).float() - lse

                whole_ms, (ids, logq) = time_reps(device, fused, args.warmup, args.reps)
            except Exception as error:  # noqa: BLE001 - a configuration that fails is a row, not the end
                rows.append({"variant": name, "status": f"failed: {type(error).__name__}: {error}"})
                continue
            # the same top-k values in the same order (equal values may swap ids: ties), same log q
            same = (torch.equal(logits.gather(-1, ids), logits.gather(-1, base_ids))
                    and bool((logq - base_logq).abs().max() <= 1e-4))
            rows.append({
                "variant": name, "group": group, "warps": warps, "top_k_logprobs_ms": whole_ms,
                "reductions_ms": stats_ms, "read_gb_s": read_gb / (stats_ms["median"] / 1e3),
                "max_abs_logq_diff": float((logq - base_logq).abs().max()),
                "status": "equal" if same else "DIFFERENT",
            })
    # as shipped: top_k_logprobs's fused path (its default group and warps, and the top k picked
    # by the second kernel where the candidates lie instead of _top_k_in_blocks's gather + topk)
    try:
        whole_ms, (ids, logq) = time_reps(device, lambda: top_k_logprobs(logits, k, block, fused=True),
                                          args.warmup, args.reps)
    except Exception as error:  # noqa: BLE001
        rows.append({"variant": "shipped (+ top-k kernel)", "status": f"failed: {type(error).__name__}: {error}"})
    else:
        same = (torch.equal(logits.gather(-1, ids), logits.gather(-1, base_ids))
                and bool((logq - base_logq).abs().max() <= 1e-4))
        rows.append({"variant": "shipped (+ top-k kernel)", "top_k_logprobs_ms": whole_ms, "reductions_ms": None,
                     "max_abs_logq_diff": float((logq - base_logq).abs().max()),
                     "status": "equal" if same else "DIFFERENT"})
    # the top-k kernel alone, on the blocks the shipped path picks (and an older checkout's kernel)
    maxima, _ = block_stats(logits, block)
    blocks = torch.topk(maxima, k, dim=-1).indices
    top_k_ms, ids = time_reps(device, lambda: top_k_in_blocks(logits, blocks, block), args.warmup, args.reps)
    rows.append({"variant": "top-k kernel alone", "top_k_in_blocks_ms": top_k_ms, "status": "this tree"})
    if args.old_tree is not None:
        old = _old_top_k(args.old_tree)
        old_ms, old_ids = time_reps(device, lambda: old(logits, blocks, block), args.warmup, args.reps)
        rows.append({"variant": "top-k kernel alone, old tree", "top_k_in_blocks_ms": old_ms,
                     "old_tree": str(args.old_tree),
                     "status": "same ids" if torch.equal(old_ids, ids) else "DIFFERENT"})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "rows": args.rows, "vocab": args.vocab, "top_k": k,
            "block": block, "dtype": args.dtype, "logits_gb": read_gb, "variants": rows}


def markdown(result: dict[str, Any]) -> str:
    base = result["variants"][0]["top_k_logprobs_ms"]["median"]
    lines = [
        "# The tree search's vocabulary reduction (bench/vocab_reduction.py)", "",
        f"{result['device']} (torch {result['torch']}): [{result['rows']}, {result['vocab']}] {result['dtype']} "
        f"logits ({result['logits_gb']:.2f} GB), top-{result['top_k']}, blocks of {result['block']}. "
        "Median ms over the timed runs.", "",
        "| variant | top_k_logprobs ms | speed-up | block maxima + normaliser ms | one read GB/s | status |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["variants"]:
        if "top_k_in_blocks_ms" in row:
            lines.append(f"| {row['variant']} | - | - | - | - | {row['top_k_in_blocks_ms']['median']:.3f} ms, "
                         f"{row['status']} |")
            continue
        if "top_k_logprobs_ms" not in row:
            lines.append(f"| {row['variant']} | - | - | - | - | {row['status']} |")
            continue
        ms = row["top_k_logprobs_ms"]["median"]
        stats = f"{row['reductions_ms']['median']:.3f}" if row["reductions_ms"] else "-"
        rate = f"{row['read_gb_s']:.0f}" if "read_gb_s" in row else "-"
        lines.append(f"| {row['variant']} | {ms:.3f} | {base / ms:.2f}x | {stats} | {rate} | {row['status']} |")
    torch_pair = result["variants"][0]["top_k_with_normaliser_ms"]["median"]
    lines += ["", f"torch, block top-k ids and the normaliser as two calls: {torch_pair:.3f} ms."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab_reduction.json").write_text(json.dumps(result, indent=2))
    (args.out / "vocab_reduction.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
