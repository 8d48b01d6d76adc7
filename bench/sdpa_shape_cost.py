"""What a masked SDPA call costs the first time it meets a shape, against a repeat (GPU).

GTO's packed verification (``speculative.packed_verification``) runs one target forward per
position chunk whose query count (the packed width) and key span (prefix + width) change from
forward to forward. cuDNN's attention builds an execution graph per new shape; if that build is
tens of milliseconds of host time, every verification forward pays it and the GPU waits. This
times, per backend, the first call at each of several new shapes (synchronized) and the median of
repeats at the same shape, for attention shaped as ``FusedLlama``'s masked path lays it out
([B, kv heads, groups x queries, d] against [B, kv heads, span, d] under a [B, 1, groups x
queries, span] additive mask).

    python bench/sdpa_shape_cost.py --out /tmp/sdpa_shapes [--backends cudnn,efficient]

Writes sdpa_shape_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.opd_throughput import SDPA_BACKENDS  # noqa: E402


def timed_call(q, k, v, bias) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(backend: str, shapes: list[tuple[int, int]], batch: int, kv_heads: int, groups: int, dim: int,
            repeats: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend])):
        for queries, span in shapes:
            q = torch.randn(batch, kv_heads, groups * queries, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, kv_heads, span, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            visible = torch.rand(batch, 1, groups * queries, span, device="cuda") < 0.7
            visible[..., 0] = True  # every row sees a key
            bias = torch.zeros(visible.shape, device="cuda", dtype=torch.bfloat16).masked_fill_(~visible, float("-inf"))
            first = timed_call(q, k, v, bias)
            again = statistics.median(timed_call(q, k, v, bias) for _ in range(repeats))
            rows.append({"backend": backend, "queries": queries, "span": span, "first_ms": 1e3 * first,
                         "repeat_ms": 1e3 * again})
            print(f"[sdpa] {backend} {queries}x{span}: first {1e3 * first:.2f} ms, repeat {1e3 * again:.3f} ms",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--backends", default="cudnn,efficient", help=f"of {sorted(SDPA_BACKENDS)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=3, help="SmolLM2-135M: 3 kv heads of 3 query heads each, d 64")
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--widths", default="1632,1648,1664,1680", help="packed widths (queries) to meet, in order")
    p.add_argument("--prefixes", default="896,960,1024", help="prefix slots in front of each width")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_shape_cost.py times CUDA attention; no GPU here")
    unknown = set(args.backends.split(",")) - set(SDPA_BACKENDS)
    if unknown:
        raise SystemExit(f"--backends: {sorted(unknown)} not among {sorted(SDPA_BACKENDS)}")
    widths, prefixes = [int(w) for w in args.widths.split(",")], [int(x) for x in args.prefixes.split(",")]
    shapes = [(w, prefix + w) for prefix in prefixes for w in widths]
    rows = []
    for backend in args.backends.split(","):
        rows += measure(backend, shapes, args.batch, args.kv_heads, args.groups, args.dim, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "argv": sys.argv, "rows": rows}
    (out / "sdpa_shape_cost.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Masked SDPA: first call at a new shape vs a repeat ({report['gpu']}, torch {report['torch']}, "
             f"cuDNN {report['cudnn']})", "",
             f"B {args.batch}, {args.kv_heads} kv heads x {args.groups} queries each, d {args.dim}, bf16, "
             "additive mask. ms, synchronized; repeat: median of the repeats.", "",
             "| backend | queries | span | first ms | repeat ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['queries']} | {r['span']} | {r['first_ms']:.2f} | {r['repeat_ms']:.3f} |"
              for r in rows]
    for backend in args.backends.split(","):
        mine = [r for r in rows if r["backend"] == backend]
        lines.append(f"\n{backend}: first call median {statistics.median(r['first_ms'] for r in mine):.2f} ms, "
                     f"repeat median {statistics.median(r['repeat_ms'] for r in mine):.3f} ms.")
    (out / "sdpa_shape_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
