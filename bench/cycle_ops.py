"""Kernel-launching ops per speculative cycle and per AR step, counted on CPU (no GPU needed).

A CUDA graph removes launch overhead, not kernels: on a GPU at batch 1 every kernel costs a few
microseconds however small, so the number of ops a step runs is a floor on its time. This counts
the top-level ATen ops (views and metadata excluded) that the tree engine's static path runs in
one draft+verify step (T = 0: with the acceptance on the device), one catch-up, one pipelined
cycle (``--greedy-verify pipelined``, the default: both in one graph) and one AR decode step (and
GTO's prefill and packed verification forwards, through either target forward), on a random target with the real
model's layer count and head layout (tiny widths: the count does not depend on them), with the
target as ``FusedLlama`` (the default) and as ``FastLlama``::

    python bench/cycle_ops.py                        # Qwen2.5-Coder-1.5B's layout: 28 layers, 12/2 heads
    python bench/cycle_ops.py --arch llama --layers 30 --heads 9 --kv-heads 3   # SmolLM2-135M's
    python bench/cycle_ops.py --json out.json

The counts are of ops, not of GPU time: a 60-token GEMM costs more than a 1-token one, and
Inductor (``--compile inductor``) fuses pointwise ops further. A GPU profile
(``draftrl eval --profile N``) gives the times.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights  # noqa: E402
from speculative.engine import SpeculativeGenerator  # noqa: E402
from speculative.target import TargetModel  # noqa: E402
from speculative.tree import TreeConfig  # noqa: E402
from speculative.vocab import DraftVocab  # noqa: E402

# Ops that launch no kernel (views, metadata, allocation without a fill).
NO_KERNEL = {
    "aten::view", "aten::slice", "aten::select", "aten::as_strided", "aten::unsqueeze", "aten::expand",
    "aten::reshape", "aten::t", "aten::transpose", "aten::permute", "aten::empty", "aten::_unsafe_view",
    "aten::alias", "aten::detach", "aten::squeeze", "aten::empty_strided", "aten::resolve_conj",
    "aten::resolve_neg", "aten::lift_fresh", "aten::_reshape_alias", "aten::unflatten", "aten::split",
    "aten::chunk", "aten::narrow", "aten::result_type", "aten::unbind", "aten::view_as", "aten::expand_as",
    "aten::flatten", "aten::empty_like", "aten::movedim", "aten::size", "aten::stride", "aten::dim",
}


def top_level_ops(prof) -> collections.Counter:
    """ATen ops called from Python (not from inside another ATen op), kernels only."""
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        nested = parent is not None and parent.name.startswith("aten::")
        if event.name.startswith("aten::") and not nested and event.name not in NO_KERNEL:
            counts[event.name] += 1
    return counts


# The pipelined cycle's phases, by the functions on an op's Python stack (innermost rule first).
# (file, function) pairs; the catch-up's drafter forward is told from drafting's by ``_catch_up_step``.
PHASES = (
    ("target forward", (("fused_llama.py", "forward"), ("llama.py", "forward"))),
    ("catch-up: drafter forward", (("graphs.py", "_catch_up_step"),), (("fused_drafter.py", "forward"),
                                                                        ("drafter.py", "forward"))),
    ("drafting: drafter forwards", (("fused_drafter.py", "forward"), ("drafter.py", "forward"))),
    ("drafting: mask per level (_feed)", (("graphs.py", "_feed"),)),
    ("tree: ancestor mask", (("tree.py", "ancestor_mask"),)),
    ("tree: selection", (("tree.py", "_select_tree"),)),
    ("tree: expansion (log q, top-k, frontier)", (("tree.py", "grow_draft_tree"),)),
    ("acceptance", (("graphs.py", "_accept_on_device"),)),
    ("catch-up: glue (compaction, fc, masks)", (("graphs.py", "_catch_up_step"),)),
    ("verification glue (chunk, mask)", (("graphs.py", "_draft_verify_step"),)),
    ("root advance", (("graphs.py", "_cycle_step"),)),
    ("outcome copy", (("graphs.py", "launch_cycle"),)),
)


def _frames(event) -> list[tuple[str, str]]:
    """(file name, function) of the Python frames above an op, innermost first."""
    frames, parent = [], event.cpu_parent
    while parent is not None:
        match = re.match(r"(.*)\((\d+)\): (\w+)$", parent.name)
        if match:
            frames.append((Path(match.group(1)).name, match.group(3)))
        parent = parent.cpu_parent
    return frames


def phase_of(frames: list[tuple[str, str]]) -> str:
    for rule in PHASES:
        name, needs = rule[0], rule[1:]
        if all(any(frame in frames for frame in need) for need in needs):
            return name
    return "other"


def phase_ops(prof) -> dict[str, collections.Counter]:
    """``top_level_ops`` of a ``profile(with_stack=True)`` run, per phase (``PHASES``)."""
    phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in prof.events():
        parent = event.cpu_parent
        nested = parent is not None and parent.name.startswith("aten::")
        if event.name.startswith("aten::") and not nested and event.name not in NO_KERNEL:
            phases[phase_of(_frames(event))][event.name] += 1
    return dict(phases)


def random_target(arch: str, layers: int, heads: int, kv_heads: int, vocab: int) -> TargetModel:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    fields = dict(vocab_size=vocab, hidden_size=16 * heads, intermediate_size=32 * heads,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, tie_word_embeddings=True)
    model = (Qwen2ForCausalLM(Qwen2Config(**fields)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**fields)))
    return TargetModel(model.eval(), (2, layers // 2, layers - 3))


def count(target: TargetModel, tree: TreeConfig, fused: bool) -> dict[str, object]:
    vocab = DraftVocab.full(target.vocab_size)
    drafter = Eagle3Drafter(DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids), vocab,
                            target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=0)
    prompt = list(range(5, 25))
    spec = SpeculativeGenerator(target, drafter, tree, compile="static", max_len=256, fused_target=fused,
                                pipelined=False)
    static = spec._static_for(len(prompt), 64)
    static.begin()
    ids, out = static.prefill(prompt)
    static.drafter_prefill(ids, out.aux_hidden, 7)
    # the T = 0 path: acceptance in the draft+verify step, the catch-up's inputs prepared there
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as draft_verify:
        static.draft_verify(7, len(prompt), greedy=True)
    step = static.greedy_step()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as catch_up:
        static.catch_up(step.tokens, step.accepted_nodes, len(prompt), prepared=True)
    # the pipelined T = 0 path (the default): the whole cycle is one graph, catch-up over depth + 1 columns
    piped = SpeculativeGenerator(target, drafter, tree, compile="static", max_len=256, fused_target=fused)
    whole = piped._static_for(len(prompt), 64)
    whole.begin()
    ids, out = whole.prefill(prompt)
    whole.drafter_prefill(ids, out.aux_hidden, 7)
    whole.start_cycles(7, len(prompt))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_stack=True) as pipelined:
        whole.launch_cycle(len(prompt))
    auto = SpeculativeGenerator(target, None, compile="static", max_len=256, fused_target=fused)
    decoder = auto._static_for(len(prompt), 64)
    decoder.prefill(prompt)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as decode:
        decoder.decode(7, len(prompt))
    ops = {name: top_level_ops(p) for name, p in (("draft_verify", draft_verify), ("catch_up", catch_up),
                                                   ("pipelined_cycle", pipelined), ("ar_decode", decode))}
    drafting = ops["draft_verify"] - ops["ar_decode"]  # the verification forward ~ one decode step
    totals = {name: sum(c.values()) for name, c in ops.items()}
    cycle = totals["draft_verify"] + totals["catch_up"]
    phases = {name: dict(total=sum(c.values()), top=c.most_common(6)) for name, c in phase_ops(pipelined).items()}
    return {"fused_target": fused, **totals, "pipelined_phases": phases, "cycle": cycle, "cycle_in_ar_steps": round(cycle / totals["ar_decode"], 2),
            "drafting_estimate": sum(drafting.values()), "top_drafting_ops": drafting.most_common(12)}


def gto_forward_ops(target: TargetModel, sequences: int = 4, length: int = 128, slots: int = 96) -> dict[str, dict]:
    """Ops of GTO's two target forwards (``speculative.batched_trees``): the prefill of
    [sequences, length] and one packed verification of ``slots`` tree slots per sequence behind
    it, through ``FastLlama`` and ``FusedLlama`` (``gto.target_forward``)."""
    from speculative.fused_llama import FusedLlama
    from speculative.llama import FastLlama, causal_slot_mask

    fast = FastLlama.from_target(target)
    vocab = target.vocab_size
    ids = torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(0))
    tree_ids = torch.randint(0, vocab, (sequences, slots), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(length).expand(sequences, length)
    tree_positions = (length + torch.arange(slots) % 6).expand(sequences, slots)
    mask = torch.ones(sequences, slots, length + slots, dtype=torch.bool)
    counts = {}
    for name, model in (("FastLlama", fast), ("FusedLlama", FusedLlama(fast))):
        cache = model.new_cache(sequences, length + slots)
        causal = None if isinstance(model, FusedLlama) else causal_slot_mask(0, length, length, sequences)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prefill:
            model(ids, positions, cache, 0, causal)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as verify:
            model(tree_ids, tree_positions, cache, length, mask, apply_lm_head=False, aux_hidden=False)
        counts[name] = {"prefill": sum(top_level_ops(prefill).values()),
                        "verify": sum(top_level_ops(verify).values())}
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--total-tokens", type=int, default=59)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target = random_target(args.arch, args.layers, args.heads, args.kv_heads, args.vocab)
    tree = TreeConfig(depth=args.depth, top_k=args.top_k, total_tokens=args.total_tokens)
    rows = [count(target, tree, fused) for fused in (True, False)]
    print(f"{args.arch}, {args.layers} layers, {args.heads}/{args.kv_heads} heads; tree depth {tree.depth}, "
          f"top-k {tree.top_k}, {tree.total_tokens} tokens; top-level ATen ops (kernels) per step")
    print("| target forward | draft+verify | catch-up | cycle | pipelined cycle (one graph) | AR step | cycle / AR step "
          "| drafting (est.) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'FusedLlama' if r['fused_target'] else 'FastLlama'} | {r['draft_verify']} | {r['catch_up']} | "
              f"{r['cycle']} | {r['pipelined_cycle']} | {r['ar_decode']} | {r['cycle_in_ar_steps']} | "
              f"{r['drafting_estimate']} |")
    print("drafting's most frequent ops:", rows[0]["top_drafting_ops"])
    print(f"the pipelined cycle (FusedLlama) by phase ({tree.depth - 1} drafting levels):")
    print("| phase | ops | most frequent |")
    print("|---|---|---|")
    phases = rows[0]["pipelined_phases"]
    for name in [rule[0] for rule in PHASES] + ["other"]:
        if name in phases:
            top = ", ".join(f"{op[6:]} {n}" for op, n in phases[name]["top"])
            print(f"| {name} | {phases[name]['total']} | {top} |")
    gto = gto_forward_ops(target)
    print("GTO's target forwards (gto.target_forward), ops:",
          "; ".join(f"{name}: prefill {c['prefill']}, verification {c['verify']}" for name, c in gto.items()))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows,
                                         "gto_forwards": gto}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
