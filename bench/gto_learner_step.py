"""The GTO learner's step on one real GTO experience: the path replay at the roots against the TTT replay.

    python bench/gto_learner_step.py --target /tmp/kit/smollm2.gguf --data /tmp/sharegpt_6k.jsonl \\
        --drafter /tmp/tp/warm_drafter --out OUT [--profile]

One GTO batch is built as ``bench/gto_verify_profile.py`` builds it (``--batch-size`` sequences,
``--chunk``, ``--precision``; ``actors.gto_rollout.gto_experience``). Then, for each ``--replays``
value of ``gto.path_replay``, each ``--vocab-losses`` value of ``training.vocab_loss`` (the token
loss's per-step KL: fused with the lm_head, or the dense reference) and each ``--attentions`` value of
``training.attention`` (TTT attention: the dense reference, sdpa or flex), a fresh copy of the drafter (fp32
weights, training mode) times, under bf16 autocast on CUDA as the single-process trainer runs it:

* **step**: ``learners.gto.gto_loss`` forward and backward (token loss, path replay, surrogate);
* **replay**: the path replay alone, forward and backward of a fixed weighting of log q(path).

``--warmup`` untimed, then ``--reps`` timed runs between device synchronisations; peak memory of the
step. Each replay's log q(path) and gradient, over every chain's full drafted path (accepted paths
can all be empty with an untrained drafter), are compared with the first replay's (max abs difference
of log q, relative norm of the gradient difference), and each whole step's loss and gradient with the
first row's: the rows compute the same function, so a difference beyond the dtype's rounding means a
bug, and the row says DIFFERENT. ``--profile`` adds a
torch.profiler table of one step per replay. Writes ``gto_learner_step.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench.gto_throughput import with_gto  # noqa: E402
from bench.gto_verify_profile import add_batch_arguments, experience, prepare, time_reps  # noqa: E402
from learners.gto import gto_loss  # noqa: E402
from speculative.batched_trees import rooted_path_logprob  # noqa: E402
from speculative.profiling import top_ops  # noqa: E402
from speculative.ttt import path_logprob, shift_left, unroll  # noqa: E402

# Same function, different summation order: log q(path) within this many nats, and the gradient's
# relative difference norm within this (fp32 on CPU; bf16 autocast on GPU rounds every product).
TOLERANCE = {"cpu": (1e-4, 1e-4), "cuda": (5e-2, 5e-2)}


def full_head_path_logprob(drafter, input_ids, attention_mask, aux_hidden, sequence, index, path_ids,
                           path_length) -> torch.Tensor:
    """The learner's replay before 2026-12-02: ``speculative.ttt.path_logprob`` with the lm_head over
    every index of every step, then the chains' rows read (the baseline of ``--replays ttt_full``)."""
    depth = int(path_length.max()) if path_length.numel() else 0
    if depth == 0:
        return torch.zeros(path_ids.shape[0], device=path_ids.device)
    root = input_ids[sequence, index + 1]
    fed = torch.cat([root[:, None], drafter.to_target_ids(path_ids[:, : depth - 1])], dim=1)
    inputs = []
    for k in range(1, depth + 1):
        tokens = shift_left(input_ids, k).clone()
        tokens[sequence, index] = fed[:, k - 1]
        inputs.append(tokens)
    steps = [torch.log_softmax(logits[sequence, index].float(), -1).gather(1, path_ids[:, k - 1 : k]).squeeze(1)
             for k, logits, _ in unroll(drafter, input_ids, attention_mask, aux_hidden, depth, inputs)]
    on_path = torch.arange(depth, device=path_ids.device)[None] < path_length[:, None]
    return (torch.stack(steps, dim=1) * on_path).sum(-1)


ROUNDING_SLACK = 1.5


def bf16_autocast(args) -> bool:
    """The step runs under bf16 autocast: always on CUDA (as the trainer), on CPU with --cpu-autocast."""
    return args.device.startswith("cuda") or args.cpu_autocast


def fp32_logprob(session, exp) -> torch.Tensor:
    """log q of every chain's full drafted path by the TTT replay in fp32 (no autocast): the exact
    value each replay's bf16 log q is measured against."""
    drafter = copy.deepcopy(session.models.drafter).float().eval()
    full = torch.full_like(exp.path_length, exp.path_ids.shape[1])
    with torch.no_grad():
        return replay_logprob(drafter, exp, "ttt", full).float()


def replay_logprob(drafter, exp, replay: str, path_length: torch.Tensor | None = None) -> torch.Tensor:
    sft = exp.sft
    chains = (exp.sequence, exp.index, exp.path_ids, exp.path_length if path_length is None else path_length)
    if replay == "rooted":
        return rooted_path_logprob(drafter, sft.input_ids, sft.aux_hidden, *chains)
    if replay == "ttt_full":
        return full_head_path_logprob(drafter, sft.input_ids, sft.attention_mask, sft.aux_hidden, *chains)
    return path_logprob(drafter, sft.input_ids, sft.attention_mask, sft.aux_hidden, *chains)


class _FullHeadReplay:
    """``gto_loss`` with the pre-2026-12-02 replay: ``learners.gto.path_logprob`` swapped for the
    full-lm_head one while the ``ttt_full`` row is timed (gto.path_replay=ttt selects that name)."""

    def __enter__(self):
        import learners.gto as module

        self.module, self.saved = module, module.path_logprob
        module.path_logprob = full_head_path_logprob

    def __exit__(self, *exc):
        self.module.path_logprob = self.saved


def measure(args, session, exp, replay: str, vocab_loss: str, attention: str
            ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Times of one replay, and its log q and gradient over every chain's full drafted path (the
    equality check: the accepted paths alone can be empty, with an untrained drafter)."""
    device = torch.device(args.device)
    config = with_gto(session.config, path_replay="ttt" if replay == "ttt_full" else replay)
    drafter = copy.deepcopy(session.models.drafter).float().train()
    drafter.ttt_vocab_loss, drafter.ttt_attention = vocab_loss, attention
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(args))
    weights = torch.linspace(-1.0, 1.0, exp.index.numel(), device=device)
    full = torch.full_like(exp.path_length, exp.path_ids.shape[1])

    def step():
        drafter.zero_grad(set_to_none=True)
        with autocast, (_FullHeadReplay() if replay == "ttt_full" else contextlib.nullcontext()):
            loss, _ = gto_loss(drafter, exp, config)
        loss.backward()
        return loss.detach()

    def replay_only(path_length=None):
        drafter.zero_grad(set_to_none=True)
        with autocast:
            logprob = replay_logprob(drafter, exp, replay, path_length)
        (logprob.float() * weights).sum().backward()
        return logprob.detach().float()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms, loss = time_reps(device, step, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step()
    step_grad = _gradient(drafter)
    accepted = int(exp.path_length.max()) if exp.path_length.numel() else 0
    replay_ms = time_reps(device, replay_only, args.warmup, args.reps)[0] if accepted else None
    logprob = replay_only(full)
    grad = _gradient(drafter)
    row = {"replay": replay, "vocab_loss": vocab_loss, "attention": attention, "step_ms": step_ms,
           "replay_ms": replay_ms, "peak_gib": peak, "loss": float(loss), "chains": exp.index.numel(),
           "mean_path_length": float(exp.path_length.float().mean()),
           "check_path_length": int(exp.path_ids.shape[1])}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
        row["profile_top_ops"] = top_ops(prof, 15, device=device.type == "cuda")
    return row, logprob, grad, step_grad


def _gradient(drafter) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in drafter.trainable_parameters() if p.grad is not None])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = prepare(args)
    exp = experience(session)
    if args.full_paths:  # every chain's whole drafted path counts as accepted (the replay's worst case)
        exp = dataclasses.replace(exp, path_length=torch.full_like(exp.path_length, exp.path_ids.shape[1]))
    atol, rtol = TOLERANCE["cuda" if bf16_autocast(args) else "cpu"]
    exact = fp32_logprob(session, exp)
    rows, base = [], None
    combinations = [(replay, vocab_loss, attention) for attention in args.attentions.split(",")
                    for vocab_loss in args.vocab_losses.split(",") for replay in args.replays.split(",")]
    for replay, vocab_loss, attention in combinations:
        row, logprob, grad, step_grad = measure(args, session, exp, replay, vocab_loss, attention)
        row["logprob_vs_fp32"] = float((logprob - exact).abs().max())
        if base is None:
            base = (logprob, grad, row, step_grad)
            row["status"] = "baseline"
        else:
            row["logprob_max_abs_diff"] = float((logprob - base[0]).abs().max())
            row["grad_rel_diff"] = _relative(grad, base[1])
            row["step_loss_rel_diff"] = abs(row["loss"] - base[2]["loss"]) / max(abs(base[2]["loss"]), 1e-30)
            row["step_grad_rel_diff"] = _relative(step_grad, base[3])
            step_same = row["step_loss_rel_diff"] <= rtol and row["step_grad_rel_diff"] <= rtol
            same = row["logprob_max_abs_diff"] <= atol and row["grad_rel_diff"] <= rtol and step_same
            # Two bf16 computations of one function differ by their rounding; a replay that is no
            # further from the fp32 one than ROUNDING_SLACK x the baseline's distance is as exact.
            rounding = (row["grad_rel_diff"] <= rtol and step_same
                        and row["logprob_vs_fp32"] <= ROUNDING_SLACK * max(base[2]["logprob_vs_fp32"], atol))
            row["status"] = "equal" if same else "equal (bf16 rounding)" if rounding else "DIFFERENT"
            row["step_speedup"] = base[2]["step_ms"]["median"] / row["step_ms"]["median"]
            if row["replay_ms"] and base[2]["replay_ms"]:
                row["replay_speedup"] = base[2]["replay_ms"]["median"] / row["replay_ms"]["median"]
        rows.append(row)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "argv": sys.argv, "batch_size": args.batch_size, "chunk": args.chunk,
              "precision": args.precision, "sequence_length": int(exp.sft.input_ids.shape[1]),
              "full_paths": args.full_paths, "bf16_autocast": bf16_autocast(args),
              "tolerance": {"logprob_abs": atol, "grad_rel": rtol}, "rows": rows}
    (out / "gto_learner_step.json").write_text(json.dumps(result, indent=1))
    (out / "gto_learner_step.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# The GTO learner step ({result['device']}, torch {result['torch']})", "",
             f"One GTO experience: {result['batch_size']} sequences of up to {result['sequence_length']} tokens, "
             f"chunk {result['chunk']}, trees {result['precision']}, learner step "
             f"{'under bf16 autocast' if result['bf16_autocast'] else 'in fp32'}; {result['rows'][0]['chains']} chains, mean "
             f"accepted path {result['rows'][0]['mean_path_length']:.2f}"
             f"{' (--full-paths: every drafted path counted whole)' if result['full_paths'] else ''}. ms: median (min-max) of the timed runs. "
             f"The check: log q and gradient over every chain's full drafted path "
             f"({result['rows'][0]['check_path_length']} steps) and the whole step's loss and gradient "
             f"against the first row, and each row's log q "
             f"against the TTT replay's in fp32 (vs fp32): a row beyond the tolerance is still \"equal (bf16 "
             f"rounding)\" when it is no further from fp32 than {ROUNDING_SLACK}x the first row.", "",
             "| gto.path_replay | training.vocab_loss | training.attention | step ms (gto_loss fwd + bwd) "
             "| replay ms (fwd + bwd) | step speed-up | peak GiB | log q max abs diff | grad rel diff "
             "| step loss / grad rel diff | log q vs fp32 | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        step, replay = row["step_ms"], row["replay_ms"]
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        replay_cell = ("no accepted path" if replay is None
                       else f"{replay['median']:.1f} ({replay['min']:.1f}-{replay['max']:.1f})")
        lines.append(
            f"| {row['replay']} | {row['vocab_loss']} | {row['attention']} "
            f"| {step['median']:.1f} ({step['min']:.1f}-{step['max']:.1f}) "
            f"| {replay_cell} "
            f"| {row.get('step_speedup', 1.0):.2f}x | {peak} "
            f"| {row.get('logprob_max_abs_diff', 0.0):.2e} | {row.get('grad_rel_diff', 0.0):.2e} "
            f"| {row.get('step_loss_rel_diff', 0.0):.1e} / {row.get('step_grad_rel_diff', 0.0):.1e} "
            f"| {row['logprob_vs_fp32']:.2e} | {row['status']} |")
    for row in result["rows"]:
        if "profile_top_ops" in row:
            lines += ["", f"Top ops of one step, {row['replay']} / {row['vocab_loss']} / {row['attention']} "
                      "(self time):", "",
                      "| op / kernel | calls | self ms | share |", "|---|---|---|---|"]
            lines += [f"| `{op['name'][:90]}` | {op['count']} | {op['self_total_ms']:.2f} | {op['share']:.1%} |"
                      for op in row["profile_top_ops"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_batch_arguments(parser, chunk="32x64")  # the experience's batch, as bench/gto_verify_profile.py builds it
    parser.add_argument("--replays", default="ttt_full,ttt,rooted",
                        help="gto.path_replay values (ttt_full: the replay before 2026-12-02); the first is the baseline")
    parser.add_argument("--vocab-losses", default="fused",
                        help="training.vocab_loss values (fused, dense), each with every --replays value")
    parser.add_argument("--attentions", default="sdpa",
                        help="training.attention values (dense, sdpa, flex), each with every other combination")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="a torch.profiler table of one step per replay")
    parser.add_argument("--cpu-autocast", action="store_true",
                        help="bf16 autocast on CPU too (the GPU's rounding, checked against the fp32 replay)")
    parser.add_argument("--full-paths", action="store_true",
                        help="time every chain's full drafted path as if accepted (an untrained drafter accepts none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    return 0 if all(row["status"] != "DIFFERENT" for row in result["rows"]) else 1  # rounding passes


if __name__ == "__main__":
    sys.exit(main())
