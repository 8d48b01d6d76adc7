"""Peak memory and time of training-time-test attention, dense fp32 reference vs FlexAttention (and
on CUDA, ``--backends``, torch's fused causal kernel: ``sdpa``), T = 512..4096.

The workload is TTT's attention alone (``speculative.ttt.TTTCache`` against
``speculative.flex_ttt.FlexTTTCache`` and ``speculative.sdpa_ttt.SdpaTTTCache``): K unrolled steps
over a batch of ``--batch`` sequences of length T, random queries/keys/values of ``--heads`` x
``--head-dim`` (32 x 128: an 8B-class drafter) in ``--dtype``.

* ``--device cuda``: forward *and* backward (as in training), flex compiled; peak from
  ``torch.cuda.max_memory_allocated``; also each backend's largest loss and gradient gap to dense.
* ``--device cpu``: forward only (torch has no FlexAttention backward on CPU), flex compiled by
  inductor; each (backend, T) runs in a fresh process and its peak is the growth of the process's
  maximum resident set (``ru_maxrss``) over the resident set just before the measured region.

Writes ``OUT/memory.json`` and ``OUT/memory.md``::

    python bench/ttt_attention_memory.py --device cpu --out bench/results/ttt_attention_memory_cpu
    python bench/ttt_attention_memory.py --device cuda --out bench/results/ttt_attention_memory_h200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speculative.flex_ttt import FlexTTTCache  # noqa: E402
from speculative.sdpa_ttt import SdpaTTTCache  # noqa: E402
from speculative.ttt import TTTCache  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(steps: int, heads: int, length: int, dim: int, device: str, grad: bool, seed: int = 0,
            batch: int = 1, dtype: torch.dtype = torch.float32):
    generator = torch.Generator(device=device).manual_seed(seed)
    return [[torch.randn(batch, heads, length, dim, device=device, generator=generator).to(dtype).requires_grad_(grad)
             for _ in range(3)] for _ in range(steps)]


_CPU_FLEX = None


def cpu_flex_kernel():
    """flex_attention compiled by inductor: eager flex on CPU materialises the full scores."""
    global _CPU_FLEX
    if _CPU_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _CPU_FLEX = torch.compile(flex_attention, dynamic=False)  # dynamic=True: inductor C++ codegen fails (torch 2.13)
    return _CPU_FLEX


def run_attention(backend: str, inputs, device: str) -> torch.Tensor:
    """Sum over steps of mean(out²): a scalar whose backward goes through every step's attention."""
    mask = torch.ones(inputs[0][0].shape[0], inputs[0][0].shape[2], dtype=torch.long, device=device)
    kernel = cpu_flex_kernel() if device == "cpu" and backend == "flex" else None
    caches = {"dense": TTTCache, "sdpa": SdpaTTTCache, "flex": lambda mask: FlexTTTCache(mask, kernel=kernel)}
    cache = caches[backend](mask)
    total = torch.zeros((), device=device)
    for q, k, v in inputs:
        total = total + cache.attend(q, k, v).float().square().mean()
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_cpu(backend: str, length: int, args) -> dict:
    """One (backend, T) in this process: warm (compile) at the same shape first, then measure."""
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        run_attention(backend, _inputs(args.steps, args.heads, length, args.head_dim, "cpu", False, 1), "cpu")
        inputs = _inputs(args.steps, args.heads, length, args.head_dim, "cpu", False)
        before = _rss_bytes()
        start = time.perf_counter()
        value = float(run_attention(backend, inputs, "cpu"))
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"backend": backend, "T": length, "peak_bytes": max(0, peak - before), "seconds": seconds, "value": value}


def measure_cuda(length: int, args) -> list[dict]:
    rows, results = [], {}
    shape = dict(batch=args.batch, dtype=DTYPES[args.dtype])
    for backend in args.backends:
        run_attention(backend, _inputs(args.steps, args.heads, length, args.head_dim, "cuda", True, 1, **shape),
                      "cuda").backward()
        inputs = _inputs(args.steps, args.heads, length, args.head_dim, "cuda", True, **shape)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        value = run_attention(backend, inputs, "cuda")
        value.backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
        results[backend] = (float(value), [t.grad.detach().clone() for step in inputs for t in step])
        rows.append({"backend": backend, "T": length, "peak_bytes": peak, "seconds": seconds, "value": float(value)})
        del inputs, value
    dense = results[args.backends[0]]
    for row in rows:
        other = results[row["backend"]]
        gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(dense[1], other[1]))
        row.update(loss_gap=abs(dense[0] - other[0]), max_grad_gap=gap)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=7, help="CPU: each step is a new shape to compile (~1 min)")
    parser.add_argument("--heads", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    parser.add_argument("--head-dim", type=int, default=None, help="default: 64 on CPU, 128 on CUDA")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="dense,flex",
                        help="CUDA: TTT attentions to measure, the first the reference of the gaps (dense, flex, sdpa)")
    parser.add_argument("--batch", type=int, default=1, help="CUDA: sequences per batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="CUDA: q/k/v dtype")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "T"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.heads = args.heads or (8 if cpu else 32)
    args.head_dim = args.head_dim or (64 if cpu else 128)
    args.backends = ["dense", "flex"] if cpu else args.backends.split(",")
    if args.one:
        print(json.dumps(measure_cpu(args.one[0], int(args.one[1]), args)))
        return 0
    rows = []
    for length in args.lengths:
        if cpu:
            for backend in ("dense", "flex"):
                command = [sys.executable, __file__, "--device", "cpu", "--out", str(args.out), "--one", backend,
                           str(length), "--steps", str(args.steps), "--heads", str(args.heads),
                           "--head-dim", str(args.head_dim), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            rows.extend(measure_cuda(length, args))
        print(json.dumps(rows[-len(args.backends):]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "torch": torch.__version__, "steps": args.steps, "heads": args.heads,
            "head_dim": args.head_dim, "batch": 1 if cpu else args.batch, "dtype": "fp32" if cpu else args.dtype,
            "backends": args.backends, "mode": "forward" if cpu else "forward+backward",
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if not cpu else None, "command": " ".join(sys.argv)}
    (args.out / "memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    by = {(r["backend"], r["T"]): r for r in rows}
    first, others = args.backends[0], args.backends[1:]
    header = ["T"] + [f"{b} MiB" for b in args.backends] + [f"{first} / {b} memory" for b in others]
    header += [f"{b} s" for b in args.backends] + ([f"{b} max grad gap" for b in others] if not cpu else [])
    lines = [f"TTT attention peak memory, {meta['mode']}, {args.steps} steps, {args.heads} heads x {args.head_dim}, "
             f"batch {meta['batch']}, {meta['dtype']}, {args.device} (torch {torch.__version__})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length in args.lengths:
        row = [by[(b, length)] for b in args.backends]
        cells = [str(length)] + [f"{r['peak_bytes'] / 2**20:.1f}" for r in row]
        cells += [f"{row[0]['peak_bytes'] / r['peak_bytes']:.1f}x" if r["peak_bytes"] else "inf" for r in row[1:]]
        cells += [f"{r['seconds']:.3f}" for r in row]
        if not cpu:
            cells += [f"{r['max_grad_gap']:.2e}" for r in row[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"command: `{meta['command']}`"]
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
