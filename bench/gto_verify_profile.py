"""GTO's verification forwards alone, at the exact shapes of one real GTO batch.

    python bench/gto_verify_profile.py --target /tmp/kit/smollm2.gguf --data /tmp/sharegpt_6k.jsonl \\
        --drafter /tmp/tp/warm_drafter --out OUT [--profile] [--self-check]

1. **One real GTO batch.** The models, data and config load as ``bench/gto_throughput.py`` loads them
   (``load_models``: ``training.objective=gto``, ``--set``, ``--drafter`` or a random init, the reference a
   copy of it); ``--chunk SxC`` and ``--precision`` set ``gto.sequences_per_forward`` x
   ``gto.positions_per_forward`` and ``gto.tree_precision``. ``actors.gto_rollout.gto_experience`` (the GTO
   experience path itself) runs on the same batch: a warm-up, a timed run (the batch time the
   shares below refer to), and a run under ``speculative.batched_trees.observing_verification``, which hands
   over each sequence chunk's verification inputs (trees, roots, the roots' logits, the KV cache, copied
   right after its prefill) and every verification forward's packed inputs and results (and, with
   ``--profile``, once more under torch.profiler).
2. **Each verification forward replayed alone**, from the cache that forward saw (the prefill copy put
   back), ``--warmup`` untimed then ``--reps`` timed runs, each between two device synchronisations
   (``perf_counter``; plain ``perf_counter`` on CPU): the target forward (hidden states: what
   ``verify_packed`` runs the target for), ``verify_packed`` (that forward, the lm_head on the rows scoring
   reads, the reductions to what scoring reads) and ``pack_tree_pairs`` (layout and masks). Per forward:
   shapes (rows S, packed length Q, real slots, KV prefix and span, the bool mask [S, Q, span] and the
   additive bias the forward makes of it), ms (median, min, max), slots/s, estimated FLOPs and bytes (the
   target's GEMMs, attention dense over the mask and over its visible cells only, the mask, the KV cache,
   approximate activations), achieved TFLOP/s and GB/s, and the share of the batch.
3. **Variants**, each run at the same shapes and checked equal to the baseline (``TOLERANCE``): SDPA
   backends (``torch.nn.attention.sdpa_kernel``: a backend that cannot take the mask is reported
   unsupported), the other target forward (``FusedLlama`` <-> ``FastLlama``), a CUDA graph of the forward
   (CUDA only), and other chunkings of the whole verification (``--chunkings``: C positions per forward,
   fewer and larger or more and smaller forwards, via ``verify_position_chunks``). A variant whose outputs
   differ is reported DIFFERENT; ``--self-check`` adds one that must be (one key slot hidden from every
   node), to show the check can fail. Mask dtype is not a variant: both forwards build the additive bias
   inside the forward, in the target's dtype, from the bool mask.

``--profile``: torch.profiler over one more run of the batch (its ``gto/*`` ranges: the verification
forwards' ms inside the batch, next to their replays alone) and over one replay of every forward (ms
per forward, top kernels by self device time; CPU time off a GPU). Writes ``gto_verify.json`` and ``gto_verify.md`` under
``--out`` (and ``gto_verify_trace.json.gz`` with ``--trace``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from actors.gto_rollout import gto_experience  # noqa: E402
from bench.gto_throughput import (  # noqa: E402
    Models,
    add_model_arguments,
    load_models,
    sample_batches,
    sync,
    with_gto,
)
from speculative.batched_trees import observing_verification, verify_position_chunks  # noqa: E402
from speculative.fused_llama import FusedLlama  # noqa: E402
from speculative.packed_verification import TargetAtTrees, pack_tree_pairs, packed_width, verify_packed  # noqa: E402
from speculative.profiling import range_table, top_ops, write_gzipped_trace  # noqa: E402

# Equal within the dtype: relative error norm |variant - baseline| / |baseline| at most this, over the
# hidden states of the rows scoring reads (one forward) or the logits scoring reads (a whole
# verification); and argmax agreement at least ``ARGMAX_AGREEMENT`` (low precision: near-ties flip).
# SmolLM2-135M in bf16 on CPU (4 forwards of 2 x 48 slots): SDPA math vs flash 1.3-1.5e-2, FastLlama
# vs FusedLlama 1.5-1.6e-2, chunkings 8 and 16 vs 4 at most 8.4e-4; slot 0 hidden (--self-check) 0.61-0.69.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
ARGMAX_AGREEMENT = {torch.float32: 1.0, torch.float16: 0.99, torch.bfloat16: 0.98}
BACKENDS = ("efficient", "flash", "cudnn", "math")


# ---------------------------------------------------------------------------------- the batch


class VerificationRecorder:
    """The observer of ``observing_verification``: every sequence chunk's verification inputs, with
    a copy of its KV cache's prefill slots taken before the first forward, and every forward's."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []

    def begin(self, **chunk: Any) -> None:
        chunk["snapshot"] = _prefill_slots(chunk["cache"], chunk["padded"]).clone()
        chunk["forwards"] = []
        self.chunks.append(chunk)

    def forward(self, **one: Any) -> None:
        self.chunks[-1]["forwards"].append(one)

    def forwards(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(chunk, forward) in the order the batch ran them."""
        return [(chunk, one) for chunk in self.chunks for one in chunk["forwards"]]


def _prefill_slots(cache, count: int) -> torch.Tensor:
    """The first ``count`` slots of a ``StaticKVCache``/``BatchKVCache`` ([2, layers, B, kv_heads, slots, d])."""
    return cache.storage[:, :, :, :, :count]


def restore(chunk: dict[str, Any], cache=None) -> None:
    """Put the chunk's prefill back into ``cache`` (default: the chunk's own). A forward reads only
    slots below its prefix (the prefill's, which no later forward of the batch had overwritten) and
    the slots it writes itself: with the prefill back, it sees what it saw in the batch."""
    _prefill_slots(cache if cache is not None else chunk["cache"], chunk["padded"]).copy_(chunk["snapshot"])


@dataclasses.dataclass
class Session:
    models: Models
    config: Any  # the GTO config of the batch (chunking, tree precision applied)
    batch: dict[str, torch.Tensor]


def prepare(args: argparse.Namespace) -> Session:
    """The models, the batch's config and the batch (``--batch-size`` samples drawn with ``--seed``)."""
    models = load_models(args)
    seqs, positions = (int(x) for x in args.chunk.split("x"))
    config = with_gto(models.config, sequences_per_forward=seqs, positions_per_forward=positions,
                      tree_precision=args.precision)
    batch = sample_batches(models.dataset, models.pad_id, args.batch_size, 1, seed=args.seed)[0]
    return Session(models, config, batch)


def experience(session: Session, observer=None):
    """``gto_experience`` on the session's batch (windows drawn with seed 0), optionally observed."""
    m = session.models
    with observing_verification(observer) if observer is not None else nullcontext():
        return gto_experience(m.worker, session.config, session.batch, m.drafter, m.reference, seed=0)


# ---------------------------------------------------------------------------------- timing


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = [1000.0 * s for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "reps": len(ms)}


def time_reps(device: torch.device, fn: Callable[[], Any], warmup: int, reps: int,
              before: Callable[[], None] | None = None) -> tuple[dict[str, float], Any]:
    """``warmup`` untimed calls, then ``reps`` timed ones between device synchronisations; ``before``
    runs ahead of every call, untimed. Returns (ms stats, the last call's result)."""
    result = None
    for _ in range(warmup):
        if before is not None:
            before()
        result = fn()
    seconds = []
    for _ in range(max(reps, 1)):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return stats_ms(seconds), result


def forward_hidden(fast, cache, prefix: int, packed, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The verification's target forward, as ``verify_packed`` runs it: final-norm hidden [S, Q, H]."""
    return fast(packed.tokens, packed.positions, cache, prefix, packed.mask if mask is None else mask,
                apply_lm_head=False, aux_hidden=False).hidden


# ---------------------------------------------------------------------------------- shapes and cost


def _base(fast):
    return fast.fast if isinstance(fast, FusedLlama) else fast


def default_sdpa_backend(fast, cache, prefix: int, packed) -> str:
    """The backend SDPA picks by default for this forward's attention call (``torch._fused_sdp_choice``
    on tensors of its shapes, strides and dtypes), or why it could not be asked."""
    try:
        from torch.nn.attention import SDPBackend

        names = {int(getattr(SDPBackend, n)): n.lower() for n in dir(SDPBackend) if n.isupper()}
        base = _base(fast)
        rows, width = packed.tokens.shape
        span = prefix + width
        heads, kv_heads, dim = base.num_heads, base.num_kv_heads, base.head_dim
        keys = cache.storage[0, 0, :, :, :span]
        dtype = cache.storage.dtype
        if isinstance(fast, FusedLlama):  # grouped-query heads folded into the query rows
            q = torch.zeros(rows, kv_heads, heads // kv_heads * width, dim, dtype=dtype, device=keys.device)
            gqa = False
        else:
            q = torch.zeros(rows, heads, width, dim, dtype=dtype, device=keys.device)
            gqa = heads != kv_heads
        bias = torch.zeros(rows, 1, q.shape[2], span, dtype=dtype, device=keys.device)
        choice = torch._fused_sdp_choice(q, keys, keys, attn_mask=bias, dropout_p=0.0, is_causal=False,
                                         scale=base.scaling, enable_gqa=gqa)
        return names.get(int(choice), str(choice))
    except Exception as error:  # noqa: BLE001 - a private API: report, do not fail
        return f"unknown ({type(error).__name__})"


def forward_shapes(fast, prefix: int, packed) -> dict[str, Any]:
    base = _base(fast)
    rows, width = packed.tokens.shape
    span = prefix + width
    groups = base.num_heads // base.num_kv_heads
    fused = isinstance(fast, FusedLlama)
    bias_rows = groups * width if fused else width
    return {
        "rows": rows, "packed_length": width, "slots": rows * width, "real_slots": int(packed.has_logits.sum()),
        "prefix": prefix, "kv_length": span, "dtype": str(base.dtype).replace("torch.", ""),
        "forward": "FusedLlama" if fused else "FastLlama",
        "mask": {"kind": "bool", "shape": list(packed.mask.shape), "visible": int(packed.mask.sum()),
                 "density": float(packed.mask.float().mean())},
        "bias": {"kind": "additive 0/-inf, materialised once per forward, read by every layer's SDPA",
                 "shape": [rows, 1, bias_rows, span], "dtype": str(base.dtype).replace("torch.", "")},
    }


def forward_cost(fast, shapes: dict[str, Any]) -> dict[str, float]:
    """Estimated FLOPs and bytes of one verification forward (+ lm_head at the real slots)."""
    base = _base(fast)
    cfg = base.config
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, base.num_layers
    heads, kv_heads, dim = base.num_heads, base.num_kv_heads, base.head_dim
    vocab = base.lm_head.weight.shape[0]
    size = torch.empty((), dtype=base.dtype).element_size()
    rows, width, span, real = shapes["rows"], shapes["packed_length"], shapes["kv_length"], shapes["real_slots"]
    tokens = rows * width
    qkv = (heads + 2 * kv_heads) * dim
    layer_weights = hidden * qkv + heads * dim * hidden + 3 * hidden * inter  # q/k/v, o, gate/up, down
    # every eager kernel's input and output once, per token and layer (norms, GEMMs, RoPE, cache
    # write, attention in/out, residual adds, SiLU and product): a rough count, not a measurement
    act_elems = 10 * hidden + 10 * qkv + 4 * kv_heads * dim + 5 * heads * dim + 8 * inter
    mb = 1e-6
    return {
        "gemm_gflop": 2 * tokens * layers * layer_weights * 1e-9,
        "lm_head_gflop": 2 * (real + 1) * hidden * vocab * 1e-9,
        "attention_gflop_dense": 4 * rows * heads * width * span * dim * layers * 1e-9,
        "attention_gflop_visible": 4 * heads * dim * layers * shapes["mask"]["visible"] * 1e-9,
        "weights_mb": layers * layer_weights * size * mb,  # the layers' GEMM weights, read once
        "lm_head_weights_mb": vocab * hidden * size * mb,
        "kv_read_mb": 2 * layers * rows * kv_heads * span * dim * size * mb,
        "kv_write_mb": 2 * layers * rows * kv_heads * width * dim * size * mb,
        "bool_mask_mb": rows * width * span * mb,
        "bias_mb": rows * shapes["bias"]["shape"][2] * span * size * mb,
        "bias_read_mb": layers * rows * heads * width * span * size * mb,  # each query row its bias row
        "activations_mb": tokens * layers * act_elems * size * mb,
        "logits_mb": (real + 1) * vocab * (size + 4) * mb,  # [M, V] logits + the fp32 copy for logsumexp
    }


def forward_bytes_mb(cost: dict[str, float]) -> float:
    """The forward's estimated traffic (weights, KV, mask and bias, activations; lm_head excluded)."""
    return sum(cost[k] for k in ("weights_mb", "kv_read_mb", "kv_write_mb", "bool_mask_mb", "bias_mb",
                                 "bias_read_mb", "activations_mb"))


# ---------------------------------------------------------------------------------- equality


def compare_tensors(base: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    a, b = other.detach().float(), base.detach().float()
    diff = a - b
    norm = float(b.norm())
    return {"rel_err": float(diff.norm()) / norm if norm > 0 else float(diff.norm()),
            "max_abs": float(diff.abs().max()) if diff.numel() else 0.0}


def compare_target_at(base: tuple[TargetAtTrees, TargetAtTrees], other: tuple[TargetAtTrees, TargetAtTrees],
                      dtype: torch.dtype) -> dict[str, Any]:
    """What scoring reads of both trees: token logits and log-normalisers (relative error norm),
    argmax (share equal)."""
    cat = lambda parts, name: torch.cat([getattr(p, name).reshape(-1).float() for p in parts])  # noqa: E731
    check = {"token_logit": compare_tensors(cat(base, "token_logit"), cat(other, "token_logit"))}
    if base[0].log_norm is not None:
        check["log_norm"] = compare_tensors(cat(base, "log_norm"), cat(other, "log_norm"))
    same = cat(base, "argmax") == cat(other, "argmax")
    check["argmax_agreement"] = float(same.float().mean()) if same.numel() else 1.0
    check["rel_err"] = max(v["rel_err"] for k, v in check.items() if isinstance(v, dict))
    check["equal"] = bool(check["rel_err"] <= TOLERANCE[dtype] and check["argmax_agreement"] >= ARGMAX_AGREEMENT[dtype])
    return check


def compare_hidden(base: torch.Tensor, other: torch.Tensor, real: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    check = compare_tensors(base[real], other[real])
    check["equal"] = bool(check["rel_err"] <= TOLERANCE[dtype])
    return check


# ---------------------------------------------------------------------------------- variants


def forward_variants(args: argparse.Namespace, session: Session) -> list[tuple[str, str, Callable]]:
    """(name, what it changes, make) for the one-forward variants; ``make(chunk, one)`` returns a
    callable giving the forward's hidden states (setup done, untimed) and a cleanup."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = session.models.device
    variants: list[tuple[str, str, Callable]] = []
    kinds = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    for name in [b for b in args.backends.split(",") if b]:
        if name not in kinds:
            raise SystemExit(f"--backends: unknown {name!r}; one of {BACKENDS}")

        def make(chunk, one, backend=kinds[name]):
            def run():
                with sdpa_kernel([backend]):
                    return forward_hidden(chunk["fast"], chunk["cache"], one["prefix"], one["packed"])
            return run, None
        variants.append((f"sdpa={name}", f"SDPA restricted to its {name} backend", make))

    if not args.no_other_forward:
        worker = session.models.worker

        def make_other(chunk, one):
            other = worker.fast if isinstance(chunk["fast"], FusedLlama) else worker.fused
            cache = other.new_cache(chunk["cache"].batch_size, chunk["cache"].max_len)
            restore(chunk, cache)
            return (lambda: forward_hidden(other, cache, one["prefix"], one["packed"])), None
        other_name = "fast" if session.config.gto.target_forward == "fused" else "fused"
        variants.append((f"forward={other_name}", "the other target forward (gto.target_forward), "
                         "its own cache holding the same prefill", make_other))

    if device.type == "cuda" and not args.no_graph:
        def make_graph(chunk, one):
            run = lambda: forward_hidden(chunk["fast"], chunk["cache"], one["prefix"], one["packed"])  # noqa: E731
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()

            def replay():
                graph.replay()
                return out
            return replay, graph
        variants.append(("cuda_graph", "the forward captured once and replayed (launch overhead)", make_graph))

    if args.self_check:
        def make_wrong(chunk, one):
            mask = one["packed"].mask.clone()
            mask[:, :, 0] = False  # slot 0 hidden from every node (padding rows never saw it): wrong on purpose
            return (lambda: forward_hidden(chunk["fast"], chunk["cache"], one["prefix"], one["packed"], mask)), None
        variants.append(("self-check: slot 0 hidden", "a deliberately wrong mask: must be reported DIFFERENT",
                         make_wrong))
    return variants


# what torch says when no SDPA backend allowed by ``sdpa_kernel`` can take the inputs (CPU, CUDA)
NO_BACKEND = ("No viable backend", "No available kernel")


def _failure(error: BaseException, backend_variant: bool = False) -> tuple[str, str]:
    """(status, message) of a variant that raised. Restricted to one SDPA backend, a forward that
    ran unrestricted can only fail because that backend refuses its inputs: unsupported."""
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory", text
    if isinstance(error, RuntimeError) and (backend_variant or any(words in text for words in NO_BACKEND)):
        return "unsupported", text
    return "error", text


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- the run


def replay_forwards(args, session: Session, recorder: VerificationRecorder, batch_ms: float) -> tuple[list, list]:
    """Every recorded forward alone (baseline rows), then the one-forward variants on it."""
    device = session.models.device
    dtype = session.models.dtype
    variants = forward_variants(args, session)
    rows, results = [], {name: [] for name, _, _ in variants}
    for k, (chunk, one) in enumerate(recorder.forwards()):
        fast, cache, prefix, packed = chunk["fast"], chunk["cache"], one["prefix"], one["packed"]
        options = chunk["options"]
        restore(chunk)
        shapes = forward_shapes(fast, prefix, packed)
        cost = forward_cost(fast, shapes)
        forward_ms, hidden = time_reps(device, lambda: forward_hidden(fast, cache, prefix, packed),
                                       args.warmup, args.reps)
        hidden = hidden.clone()  # (a CUDA graph's output buffer is reused; a plain forward's is not)
        verify_ms, found = time_reps(device, lambda: verify_packed(fast, cache, prefix, packed, one["pair"],
                                                                   one["root_logits"], options.reward_temperature),
                                     args.warmup, args.reps)
        pack_ms, _ = time_reps(device, lambda: pack_tree_pairs(
            *one["pair"], one["roots"], prefix, dedupe=options.share_nodes, max_depth=options.tree.depth,
            feed_leaves=options.verify_leaves), args.warmup, args.reps)
        seconds = forward_ms["median"] / 1000.0
        flops = (cost["gemm_gflop"] + cost["attention_gflop_dense"]) * 1e9
        per_position = shapes["slots"] / (shapes["rows"] * options.positions_per_forward)
        row = {
            "index": k, "chunk": recorder.chunks.index(chunk), "first_position": one["first"], **shapes,
            "slots_per_position": per_position, "padding_share": 1.0 - shapes["real_slots"] / shapes["slots"],
            "sdpa_default": default_sdpa_backend(fast, cache, prefix, packed),
            "cost": cost, "forward_ms": forward_ms, "verify_ms": verify_ms, "pack_ms": pack_ms,
            "slots_per_s": shapes["slots"] / seconds, "real_slots_per_s": shapes["real_slots"] / seconds,
            "tflop_s": flops / seconds * 1e-12, "gb_s": forward_bytes_mb(cost) * 1e6 / seconds * 1e-9,
            "verify_tflop_s": (flops + cost["lm_head_gflop"] * 1e9) / (verify_ms["median"] / 1000.0) * 1e-12,
            "share_of_batch": {"forward": forward_ms["median"] / batch_ms, "verify": verify_ms["median"] / batch_ms,
                               "pack": pack_ms["median"] / batch_ms},
            # the replay against what the batch itself computed in this forward
            "replay_matches_batch": compare_target_at(one["found"], found, dtype),
        }
        rows.append(row)
        print(f"[verify] forward {k}: S={shapes['rows']} Q={shapes['packed_length']} span={shapes['kv_length']} "
              f"forward {forward_ms['median']:.2f} ms, verify {verify_ms['median']:.2f} ms, "
              f"pack {pack_ms['median']:.2f} ms, SDPA default {row['sdpa_default']}", flush=True)
        real = packed.has_logits
        for name, _, make in variants:
            entry: dict[str, Any] = {"index": k}
            run = handle = out = None
            try:
                run, handle = make(chunk, one)
                ms, out = time_reps(device, run, args.warmup, args.reps)
                entry.update(forward_ms=ms, check=compare_hidden(hidden, out, real, dtype))
                entry["status"] = "equal" if entry["check"]["equal"] else "DIFFERENT"
            except Exception as error:  # noqa: BLE001 - a variant's failure is a finding, not a crash
                entry["status"], entry["error"] = _failure(error, name.startswith("sdpa="))
            finally:
                run = handle = out = None  # the variant's cache or graph goes now
                restore(chunk)  # (its writes past the prefix are rewritten by the next forward anyway)
            results[name].append(entry)
            _free(device)
        del hidden, found
    summary = []
    base_total = sum(r["forward_ms"]["median"] for r in rows)
    for name, what, _ in variants:
        entries = results[name]
        summary.append(_summarise(name, what, "one forward", entries, base_total, "forward_ms",
                                  expected_different=name.startswith("self-check")))
    return rows, summary


def _summarise(name: str, what: str, scope: str, entries: list[dict], base_total: float, key: str,
               expected_different: bool = False) -> dict[str, Any]:
    statuses = [e["status"] for e in entries]
    for bad in ("error", "out of memory", "unsupported", "DIFFERENT"):
        if bad in statuses:
            status = bad
            break
    else:
        status = "equal" if entries else "not run"
    timed = [e for e in entries if key in e]
    total = sum(e[key]["median"] for e in timed) if len(timed) == len(entries) and entries else None
    worst = max((e["check"]["rel_err"] for e in entries if "check" in e), default=None)
    out = {"name": name, "what": what, "scope": scope, "status": status, "total_ms": total,
           "baseline_total_ms": base_total, "speedup": base_total / total if total else None,
           "worst_rel_err": worst, "per_part": entries}
    errors = [e["error"] for e in entries if "error" in e]
    if errors:
        out["error"] = errors[0]
    if expected_different:
        out["expected"] = "DIFFERENT"
        out["self_check_caught"] = status == "DIFFERENT"
    return out


def chunking_variants(args, session: Session, recorder: VerificationRecorder) -> list[dict[str, Any]]:
    """The whole verification of every sequence chunk (pack + verify, all forwards, as
    ``score_trees_at_positions`` runs it) at the batch's C and at each C of ``--chunkings``."""
    device, dtype = session.models.device, session.models.dtype
    base_c = session.config.gto.positions_per_forward
    wanted = [int(c) for c in args.chunkings.split(",") if c]
    runs: dict[int, list[dict]] = {}
    base_outputs = []
    for c in [base_c] + [c for c in wanted if c != base_c]:
        entries = []
        for i, chunk in enumerate(recorder.chunks):
            span = chunk["idx"].shape[1]
            entry: dict[str, Any] = {"chunk": i, "positions_per_forward": c, "span": span,
                                     "forwards": span // c if span % c == 0 else None}
            if span % c:
                entry.update(status="not applicable", error=f"C = {c} does not divide the {span} position slots")
                entries.append(entry)
                continue
            cache = run = None
            try:
                options = dataclasses.replace(chunk["options"], positions_per_forward=c)
                if c == base_c:
                    cache = chunk["cache"]
                else:  # the room this chunking's forwards need, as score_trees_at_positions sizes it
                    fast = chunk["fast"]
                    cache = fast.new_cache(chunk["cache"].batch_size,
                                           chunk["padded"] + packed_width(c, chunk["current"].num_nodes,
                                                                           options.verify_width_multiple))
                run = lambda cache=cache, options=options, chunk=chunk: verify_position_chunks(  # noqa: E731
                    chunk["fast"], cache, chunk["current"], chunk["ref"], chunk["idx"], chunk["host_idx"],
                    chunk["root_logits"], chunk["padded"], chunk["positions_per_seq"], options)
                ms, (at_current, at_ref, fed, _) = time_reps(device, run, args.warmup, args.reps,
                                                             before=lambda cache=cache, chunk=chunk: restore(chunk, cache))
                entry.update(verification_ms=ms, slots_fed=fed)
                if c == base_c:
                    base_outputs.append((at_current, at_ref))
                    entry["status"] = "baseline"
                else:
                    entry["check"] = compare_target_at(base_outputs[i], (at_current, at_ref), dtype)
                    entry["status"] = "equal" if entry["check"]["equal"] else "DIFFERENT"
            except Exception as error:  # noqa: BLE001
                entry["status"], entry["error"] = _failure(error)
                if c == base_c:
                    base_outputs.append(None)
            finally:
                cache = run = None  # a variant's cache goes now
                restore(chunk)
                _free(device)
            entries.append(entry)
        runs[c] = entries
        print(f"[verify] chunking C={c}: {[e.get('verification_ms', {}).get('median') for e in entries]} ms, "
              f"{[e['status'] for e in entries]}", flush=True)
    base_entries = runs[base_c]
    base_total = (sum(e["verification_ms"]["median"] for e in base_entries)
                  if all("verification_ms" in e for e in base_entries) else None)
    out = [{"name": f"C={base_c} (the batch's)", "what": "the whole verification as the batch ran it",
            "scope": "whole verification", "status": "baseline", "total_ms": base_total,
            "baseline_total_ms": base_total, "speedup": 1.0 if base_total else None, "worst_rel_err": None,
            "forwards": sum(e["forwards"] or 0 for e in base_entries), "per_part": base_entries}]
    for c, entries in runs.items():
        if c == base_c:
            continue
        row = _summarise(f"C={c}", f"{c} positions of every sequence per forward", "whole verification",
                         entries, base_total or 0.0, "verification_ms")
        if row["status"] == "equal" and any(e["status"] == "not applicable" for e in entries):
            row["status"] = "not applicable"
        row["forwards"] = sum(e["forwards"] or 0 for e in entries)
        out.append(row)
    return out


GTO_RANGES = ("gto/prefill", "gto/trees", "gto/pack", "gto/verify", "gto/reference_path_logprob")


def profile_batch(session: Session) -> dict[str, Any]:
    """torch.profiler over one more run of the batch: the ``gto/*`` ranges' ms inside the batch (the
    verification forwards among the batch's other work), to set against their replays alone."""
    from torch.profiler import ProfilerActivity, profile

    device = session.models.device
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        experience(session)
        sync(device)
        wall_ms = 1000.0 * (time.perf_counter() - start)
    return {"times": "device" if on_device else "cpu", "wall_ms": wall_ms,
            "ranges": range_table(prof, GTO_RANGES, device=on_device)}


def profile_forwards(session: Session, recorder: VerificationRecorder, out: Path, trace: bool) -> dict[str, Any]:
    """torch.profiler over one replay of every forward (``verify_packed``), each in its own range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = session.models.device
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    names = []
    with profile(activities=activities, record_shapes=True) as prof:
        for k, (chunk, one) in enumerate(recorder.forwards()):
            restore(chunk)
            sync(device)
            names.append(f"verify/forward_{k}")
            with record_function(names[-1]):
                verify_packed(chunk["fast"], chunk["cache"], one["prefix"], one["packed"], one["pair"],
                              one["root_logits"], chunk["options"].reward_temperature)
                sync(device)
    report: dict[str, Any] = {
        "times": "device" if on_device else "cpu",
        "forwards": range_table(prof, tuple(names), device=on_device),
        "top_kernels": [r for r in top_ops(prof, 40, device=on_device) if not r["name"].startswith("verify/")][:25],
    }
    if trace:
        write_gzipped_trace(prof, out / "gto_verify_trace.json.gz")
        report["trace"] = "gto_verify_trace.json.gz"
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = prepare(args)
    m = session.models
    device = m.device
    experience(session)  # warm-up: allocator, kernels
    sync(device)
    start = time.perf_counter()
    exp = experience(session)
    sync(device)
    batch_ms = 1000.0 * (time.perf_counter() - start)
    recorder = VerificationRecorder()
    experience(session, recorder)
    sync(device)
    gto = session.config.gto
    forwards = recorder.forwards()
    print(f"[verify] batch {args.batch_size} ({args.chunk}, {args.precision}): {batch_ms:.1f} ms, "
          f"{len(forwards)} verification forwards in {len(recorder.chunks)} sequence chunk(s)", flush=True)

    result: dict[str, Any] = {
        "setup": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "target": args.target, "dtype": str(m.dtype).replace("torch.", ""),
            "drafter": args.drafter or "random init", "drafter_dtype": args.drafter_dtype, "data": str(args.data),
            "max_length": args.max_length, "batch_size": args.batch_size, "chunk": args.chunk,
            "precision": args.precision, "target_forward": gto.target_forward, "seed": args.seed,
            "warmup": args.warmup, "reps": args.reps, "gto": gto.model_dump(),
            "tree_nodes": recorder.chunks[0]["current"].num_nodes if recorder.chunks else None,
            "tolerance": {str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()},
            "argmax_agreement": {str(k).replace("torch.", ""): v for k, v in ARGMAX_AGREEMENT.items()},
        },
        "batch": {"ms": batch_ms, "num_tokens": exp.num_tokens, "positions": int(exp.index.numel()),
                  "sequence_chunks": len(recorder.chunks), "forwards": len(forwards)},
        "variants": [],
    }
    if args.ceiling:
        result["batch"]["prefill_ceiling_tok_s"] = args.ceiling
        result["batch"]["gto_ceiling_ratio"] = exp.num_tokens / (batch_ms / 1000.0) / args.ceiling
    del exp

    def write() -> None:  # after every stage: a run cut short keeps what it measured
        (out / "gto_verify.json").write_text(json.dumps(result, indent=1, default=str))

    if args.profile:
        result["in_batch"] = profile_batch(session)
        write()
    rows, variants = replay_forwards(args, session, recorder, batch_ms)
    result["forwards"] = rows
    batch = result["batch"]
    for key in ("forward_ms", "verify_ms", "pack_ms"):
        batch[f"sum_{key}"] = sum(r[key]["median"] for r in rows)
    batch["verify_share"] = (batch["sum_verify_ms"] + batch["sum_pack_ms"]) / batch_ms
    batch["slots"] = sum(r["slots"] for r in rows)
    batch["real_slots"] = sum(r["real_slots"] for r in rows)
    batch["replay_matches_batch"] = all(r["replay_matches_batch"]["equal"] for r in rows)
    result["variants"] = variants
    write()
    if args.chunkings:
        result["variants"] = variants = variants + chunking_variants(args, session, recorder)
        write()
    real = [v for v in variants if "expected" not in v and v["status"] != "baseline"]
    result["different"] = [v["name"] for v in real if v["status"] == "DIFFERENT"]
    result["not_run"] = {v["name"]: v["status"] for v in real if v["status"] not in ("equal", "DIFFERENT")}
    result["all_variants_equal"] = not result["different"]
    checks = [v for v in variants if "expected" in v]
    result["self_check_caught"] = all(v["self_check_caught"] for v in checks) if checks else None
    if args.profile:
        result["profile"] = profile_forwards(session, recorder, out, args.trace)
    write()
    text = markdown(result)
    (out / "gto_verify.md").write_text(text)
    print(text, flush=True)
    return result


# ---------------------------------------------------------------------------------- report


def _ms(stats: dict[str, float] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def markdown(result: dict[str, Any]) -> str:
    s, b = result["setup"], result["batch"]
    lines = [
        "# GTO verification forwards alone (bench/gto_verify_profile.py)",
        "",
        f"{s['device']} (torch {s['torch']}), target {s['target']} ({s['dtype']}, {s['target_forward']} forward), "
        f"drafter {s['drafter']} ({s['drafter_dtype']}), batch {s['batch_size']} of {s['data']} (max_length "
        f"{s['max_length']}, seed {s['seed']}), S x C {s['chunk']}, trees {s['precision']} "
        f"({s['tree_nodes']} nodes, depth {s['gto']['tree_depth']}, top-{s['gto']['tree_top_k']}, "
        f"{s['gto']['groups_per_sequence']} x {s['gto']['group_size']} positions per sequence). "
        f"{s['warmup']} warm-up + {s['reps']} timed runs per measurement; ms as median (min–max).",
        "",
        f"**The batch: {b['ms']:.1f} ms** ({b['num_tokens']} tokens, {b['positions']} positions, "
        f"{b['forwards']} verification forwards in {b['sequence_chunks']} sequence chunk(s))"
        + (f", {b['gto_ceiling_ratio']:.2%} of the prefill ceiling ({b['prefill_ceiling_tok_s']:.0f} tok/s)"
           if "gto_ceiling_ratio" in b else "")
        + f". Its forwards replayed alone: target forwards {b['sum_forward_ms']:.1f} ms, verify_packed "
        f"{b['sum_verify_ms']:.1f} ms, packing {b['sum_pack_ms']:.1f} ms; verification + packing = "
        f"{b['verify_share']:.1%} of the batch. Replays equal to the batch's own results: "
        f"{'yes' if b['replay_matches_batch'] else 'NO'}.",
        "",
        "## Shapes and estimated cost per forward",
        "",
        "S rows x Q packed slots (real: slots scoring reads); slots / position: S x Q over the S x C "
        "positions of the forward (padding: the share of slots not real); KV: prefix + Q slots attended; mask: the bool "
        "[S, Q, KV] mask and the share of its cells visible; bias: the additive mask the forward builds from "
        "it once and every layer's SDPA reads (MB made / MB read over all layers). GEMMs: q/k/v, o, gate/up, "
        "down (MB: weights + activations, a rough count of every eager kernel's inputs and outputs); "
        "attention: dense over [Q, KV] (the visible cells only), MB: KV read and written + bias read; "
        "lm_head at the real slots. Estimates, not measurements.",
        "",
        "| # | S x Q (real) | slots / position (padding) | KV (prefix) | mask density | bias MB made / read | GEMMs GFLOP / MB "
        "| attention GFLOP dense (visible) / MB | lm_head GFLOP | SDPA default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["forwards"]:
        c = r["cost"]
        lines.append(
            f"| {r['index']} | {r['rows']} x {r['packed_length']} ({r['real_slots']}) | "
            f"{r['slots_per_position']:.1f} ({r['padding_share']:.0%}) | {r['kv_length']} "
            f"({r['prefix']}) | {r['mask']['density']:.3f} | {c['bias_mb']:.3g} / {c['bias_read_mb']:.3g} | "
            f"{c['gemm_gflop']:.3g} / {c['weights_mb'] + c['activations_mb']:.3g} | "
            f"{c['attention_gflop_dense']:.3g} ({c['attention_gflop_visible']:.3g}) / "
            f"{c['kv_read_mb'] + c['kv_write_mb'] + c['bias_read_mb']:.3g} | {c['lm_head_gflop']:.3g} | "
            f"{r['sdpa_default']} |")
    lines += [
        "",
        "## Time per forward",
        "",
        "forward: the target forward alone (hidden states); verify: verify_packed (forward + lm_head at the "
        "real slots + reductions); pack: pack_tree_pairs. slots/s: S x Q (real) per second of the forward; "
        "TFLOP/s and GB/s: the estimates above over the forward's median; share: of the batch's time.",
        "",
        "| # | forward ms | verify ms | pack ms | slots/s (real) | TFLOP/s | GB/s | share of batch (verify) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["forwards"]:
        lines.append(
            f"| {r['index']} | {_ms(r['forward_ms'])} | {_ms(r['verify_ms'])} | {_ms(r['pack_ms'])} | "
            f"{r['slots_per_s']:.0f} ({r['real_slots_per_s']:.0f}) | {r['tflop_s']:.2f} | {r['gb_s']:.0f} | "
            f"{r['share_of_batch']['verify']:.1%} |")
    lines += [
        "",
        "## Variants (each checked equal to the baseline)",
        "",
        "Equal: relative error norm at most "
        + ", ".join(f"{k} {v:g}" for k, v in s["tolerance"].items())
        + " (one forward: hidden states at the real slots; whole verification: the token logits and "
        "log-normalisers scoring reads) and argmax agreement at least "
        + ", ".join(f"{k} {v:g}" for k, v in s["argmax_agreement"].items()) + ". ms: the sum over "
        "forwards (one forward) or sequence chunks (whole verification) of the medians.",
        "",
        "| variant | scope | status | ms (baseline ms) | speed-up | worst rel. error | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        note = v.get("error", v["what"])
        if "expected" in v:
            note = f"{v['what']}; {'caught' if v['self_check_caught'] else 'NOT CAUGHT: the check is broken'}"
        forwards = f", {v['forwards']} forwards" if v.get("forwards") else ""
        lines.append(
            f"| {v['name']} | {v['scope']}{forwards} | {v['status']} | {_num(v['total_ms'])} "
            f"({_num(v['baseline_total_ms'])}) | {_num(v['speedup'])}x | {_num(v['worst_rel_err'], '.2e')} | "
            f"{note.replace('|', '/')} |")
    lines += ["", "Every variant that ran gave the baseline's outputs (the self-check aside): "
              + ("**yes**." if result["all_variants_equal"] else f"**NO: {', '.join(result['different'])}**.")]
    if result["not_run"]:
        lines.append("Not run: " + ", ".join(f"{k} ({v})" for k, v in result["not_run"].items()) + ".")
    if result.get("self_check_caught") is not None:
        lines.append(f"Self-check (a wrong mask) reported DIFFERENT: {'yes' if result['self_check_caught'] else 'NO'}.")
    if "in_batch" in result:
        p = result["in_batch"]
        lines += ["", f"## Inside the batch (torch.profiler over one more run, {p['wall_ms']:.1f} ms wall; "
                  f"{p['times']} ms)", "",
                  "The batch's own ranges, to set against the replays alone above (verify: the "
                  f"{b['forwards']} verify_packed calls; pack: their packing).", "",
                  "| range | count | wall ms (CPU) | device ms (kernels of the range) | device ms (busy in its window) |",
                  "|---|---|---|---|---|"]
        for name, row in p["ranges"].items():
            lines.append(f"| `{name}` | {row['count']} | {row['cpu_total_ms']:.2f} | {_num(row['device_total_ms'])} "
                         f"| {_num(row['window_total_ms'])} |")
    if "profile" in result:
        p = result["profile"]
        lines += ["", f"## torch.profiler: one replay of every forward ({p['times']} times)", "",
                  "| forward | wall ms (CPU) | device ms |", "|---|---|---|"]
        for name, row in p["forwards"].items():
            lines.append(f"| {name} | {row['cpu_total_ms']:.2f} | {_num(row['device_total_ms'])} |")
        lines += ["", f"Top kernels by self {p['times']} time:", "", "| op / kernel | calls | self ms | mean us | share |",
                  "|---|---|---|---|---|"]
        for row in p["top_kernels"]:
            name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
            lines.append(f"| `{name.replace('|', '/')}` | {row['count']} | {row['self_total_ms']:.3f} | "
                         f"{row['self_mean_us']:.1f} | {100 * row['share']:.1f} % |")
    return "\n".join(lines) + "\n"


def add_batch_arguments(parser: argparse.ArgumentParser, chunk: str) -> None:
    """The flags ``prepare`` reads besides ``add_model_arguments``' (shared with bench/gto_learner_step.py)."""
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences in the GTO batch")
    parser.add_argument("--chunk", default=chunk, help="S x C: gto.sequences_per_forward x gto.positions_per_forward")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="gto.tree_precision")
    parser.add_argument("--seed", type=int, default=999, help="which samples make the batch")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. gto.tree_depth=6")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_batch_arguments(parser, chunk="32x16")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"SDPA backends to try, of {BACKENDS} ('' none)")
    parser.add_argument("--chunkings", default="8,32,64,128",
                        help="positions per forward of the whole-verification variants ('' none)")
    parser.add_argument("--no-other-forward", action="store_true", help="skip the FusedLlama <-> FastLlama variant")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph variant")
    parser.add_argument("--self-check", action="store_true",
                        help="add a deliberately wrong variant (one key slot hidden): it must be reported DIFFERENT")
    parser.add_argument("--ceiling", type=float, default=None, help="the target's prefill ceiling, tok/s (for the ratio)")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler: the batch's gto/* ranges, and one replay of every forward (top kernels)")
    parser.add_argument("--trace", action="store_true", help="with --profile: also gto_verify_trace.json.gz")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
