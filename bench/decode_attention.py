"""One token's attention over a KV-cache prefix: the Triton kernel's settings against SDPA (GPU).

The AR step (``BatchGenerator``, ``chain_length=0``) attends once a layer; this times what one
such call costs inside a CUDA graph, as the step runs: a graph of ``--layers`` calls, each on its
own layer's cache (SmolLM2-135M's shape by default: 9 query heads on 3 kv heads of 64), replayed.
SDPA is timed as ``FusedLlama`` calls it (the additive mask built once a step, outside the calls);
the kernel (``speculative.decode_attention_kernel``) per (slots a block, warps, splits). Each row
also gives the largest difference from SDPA's output.

    python bench/decode_attention.py --out OUT  # -> OUT/decode_attention.{md,json}
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from speculative.decode_attention_kernel import DEFAULT_SETTINGS, decode_attention


def time_graph(fn, replays: int) -> float:
    """Microseconds per replay of a CUDA graph of ``fn`` (warmed up first, on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays


def run(args) -> dict:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    groups = args.heads // args.kv_heads
    results = []
    for batch, span in itertools.product(args.batches, args.spans):
        storage = torch.randn(2, args.layers, batch, args.kv_heads, span, args.dim, generator=generator,
                              device=device).to(torch.bfloat16)
        q = torch.randn(batch, args.heads, args.dim, generator=generator, device=device).to(torch.bfloat16)
        visible = torch.full((batch,), max(1, span - args.unused), device=device)
        scale = args.dim ** -0.5
        allowed = torch.arange(span, device=device)[None, :] < visible[:, None]
        bias = torch.zeros(batch, 1, groups, span, dtype=torch.bfloat16, device=device)
        bias.masked_fill_(~allowed[:, None, None], float("-inf"))
        grouped = q.view(batch, args.kv_heads, groups, args.dim)

        def sdpa(layer: int) -> torch.Tensor:
            return F.scaled_dot_product_attention(grouped, storage[0, layer], storage[1, layer], attn_mask=bias,
                                                  scale=scale).reshape(batch, args.heads, args.dim)

        want = sdpa(0).float()
        sdpa_us = time_graph(lambda: [sdpa(layer) for layer in range(args.layers)], args.replays) / args.layers
        row = dict(batch=batch, span=span, visible=int(visible[0]), sdpa_us=sdpa_us, kernel={})
        for settings in itertools.product(args.blocks, args.warps, args.splits):
            try:
                got = decode_attention(q, storage[0, 0], storage[1, 0], visible, scale, settings).float()
                us = time_graph(lambda s=settings: [decode_attention(q, storage[0, layer], storage[1, layer], visible,
                                                                     scale, s) for layer in range(args.layers)],
                                args.replays) / args.layers
                row["kernel"]["x".join(map(str, settings))] = dict(us=us, max_diff=(got - want).abs().max().item())
            except Exception as error:  # noqa: BLE001 - a setting that does not compile is a row, not the end
                row["kernel"]["x".join(map(str, settings))] = dict(error=f"{type(error).__name__}: {error}"[:300])
        results.append(row)
        print(json.dumps(row), flush=True)
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, heads=args.heads, kv_heads=args.kv_heads,
                dim=args.dim, layers=args.layers, default_settings="x".join(map(str, DEFAULT_SETTINGS)), rows=results)


def markdown(report: dict) -> str:
    lines = [f"# Decode attention on one {report['gpu']} (torch {report['torch']})", "",
             f"{report['heads']} query heads on {report['kv_heads']} kv heads of {report['dim']}, bf16; us a call in a "
             f"CUDA graph of {report['layers']} calls. Settings: slots a block x warps x splits (default "
             f"{report['default_settings']}).", "",
             "| batch | span | visible | SDPA us | best kernel settings | kernel us | SDPA / kernel | default us | max diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        timed = {k: v for k, v in row["kernel"].items() if "us" in v}
        if not timed:
            lines.append(f"| {row['batch']} | {row['span']} | {row['visible']} | {row['sdpa_us']:.2f} | none ran | | | | |")
            continue
        best = min(timed, key=lambda k: timed[k]["us"])
        default = timed.get(report["default_settings"], {}).get("us")
        lines.append(f"| {row['batch']} | {row['span']} | {row['visible']} | {row['sdpa_us']:.2f} | {best} | "
                     f"{timed[best]['us']:.2f} | {row['sdpa_us'] / timed[best]['us']:.2f}x | "
                     f"{'-' if default is None else f'{default:.2f}'} | {timed[best]['max_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--spans", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024, 2048])
    p.add_argument("--unused", type=int, default=128, help="slots of the span past the visible prefix")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128, 256])
    p.add_argument("--warps", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    p.add_argument("--splits", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_attention.py times CUDA graphs: it needs a GPU")
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps(report, indent=1))
    (out / "decode_attention.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
