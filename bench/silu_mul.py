"""The target MLP's ``silu(gate) * up``: the eager torch pair against the one-pass Triton kernel.

    python bench/silu_mul.py --out OUT                    # CUDA, the shapes of an H200 GTO batch
    TRITON_INTERPRET=1 python bench/silu_mul.py --device cpu --shapes 64x256 --out OUT

For each ``TOKENSxWIDTH`` (the merged gate/up projection's output, bf16; defaults: a 32-sequence
GTO batch's verification forward, 32 x 384 tokens, and its prefill, 32 x 1 024, for SmolLM2's
intermediate size 1 536), times ``speculative.silu_mul_kernel.torch_silu_mul`` and ``silu_mul`` on
the same random input and counts the outputs that differ (bf16: at most a rounding apart).
Writes ``silu_mul.json`` and ``.md`` under ``--out``.
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
from speculative.silu_mul_kernel import silu_mul, torch_silu_mul  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="12288x3072,32768x3072", help="TOKENSxWIDTH, comma-separated")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        tokens, width = (int(x) for x in shape.split("x"))
        gate_up = (torch.randn(tokens, width, device=device, generator=generator) * 3).to(dtype)
        torch_ms, want = time_reps(device, lambda: torch_silu_mul(gate_up), args.warmup, args.reps)
        kernel_ms, got = time_reps(device, lambda: silu_mul(gate_up), args.warmup, args.reps)
        moved_gb = (gate_up.numel() + want.numel()) * gate_up.element_size() / 1e9  # one read, one write
        diff = (got.float() - want.float()).abs()
        rows.append({
            "tokens": tokens, "width": width, "torch_ms": torch_ms, "kernel_ms": kernel_ms,
            "speed_up": torch_ms["median"] / kernel_ms["median"],
            "kernel_gb_s": moved_gb / (kernel_ms["median"] / 1e3),
            "differing": int((diff > 0).sum()),
            "max_relative_diff": float((diff / want.float().abs().clamp_min(1e-30)).max()),
        })
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "dtype": args.dtype, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# silu(gate) * up: torch pair against one Triton pass (bench/silu_mul.py)", "",
        f"{result['device']} (torch {result['torch']}), {result['dtype']}. Median ms over the timed runs.", "",
        "| tokens x width (gate/up) | torch ms | kernel ms | speed-up | kernel GB/s (one read, one write) "
        "| outputs differing | max relative diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['tokens']} x {row['width']} | {row['torch_ms']['median']:.4f} | "
                     f"{row['kernel_ms']['median']:.4f} | {row['speed_up']:.2f}x | {row['kernel_gb_s']:.0f} | "
                     f"{row['differing']} | {row['max_relative_diff']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "silu_mul.json").write_text(json.dumps(result, indent=2))
    (args.out / "silu_mul.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
