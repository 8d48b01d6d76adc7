"""Draft-OPD experience throughput: the batched engine against the single-sequence path, one GPU.

Measures in one process, on the same device and prompts:

* the target's prefill ceiling (tokens/s of a plain forward at the best of a few batch shapes);
* Draft-OPD experience tokens/s (``opd_experience``: rollouts + the target's teacher-forced
  pass + assembly, then ``.to("cpu")`` as the rollout actor does; tokens = prompt + response
  tokens, the pipeline's ``rollout_tokens_per_s``) with the batched engine at several batch
  sizes, and with the single-sequence reference engine (``opd.rollout_batch_size: 0``);
* the engine alone (new tokens/s, tau) at each batch size;
* the target's autoregressive decoding at batch 1: the batched engine with ``chain_length=0``
  (the whole step one CUDA graph) against ``SpeculativeGenerator.generate_autoregressive``.

    python bench/opd_throughput.py --target /tmp/kit/smollm2.gguf --out OUT [--drafter DIR]
        [--batches 1,16,64,128] [--inductor] [--profile]
    python bench/opd_throughput.py --device cpu --tiny --threads 1 --out /tmp/opd_tiny --batches 1,4 \
        --max-new-tokens 16 --max-prompt-tokens 128 --num-prompts 16 --draft-vocab 2048 \
        --reference-prompts 2 --ar-tokens 16 --ceiling-shapes 2x64 --repeats 1   # a quick CPU check

Writes ``OUT/opd_throughput.json`` (after every section, so a run cut short keeps what it
measured) and ``OUT/opd_throughput.md``; with ``--profile`` also torch.profiler tables and
Chrome traces (``OUT/profile_*``). Prompts: the first user turn of the bench questions
(``--bench-dir``: mt_bench/humaneval/gsm8k JSONL, default ``$DRAFTRL_BENCH_DIR``, ``.kit/bench``,
``../shared/data/bench`` or ``shared/data/bench``) or of a ShareGPT/OpenAI chat file (``--data``).
Without ``--drafter`` the drafter is randomly initialised (acceptance then is low; the engine's
cost per step is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from actors.opd_rollout import opd_experience  # noqa: E402
from actors.target_worker import TargetWorker  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from speculative.batch_engine import BatchGenerator  # noqa: E402
from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights  # noqa: E402
from speculative.engine import SpeculativeGenerator  # noqa: E402
from speculative.target import TargetModel, load_tokenizer, stop_token_ids  # noqa: E402
from speculative.vocab import DraftVocab  # noqa: E402

BENCH_FILES = ("mt_bench.jsonl", "humaneval.jsonl", "gsm8k.jsonl")
SECTIONS = ("prefill", "reference", "batched", "ar")


# ------------------------------------------------------------------------------------------ setup


def find_bench_dir(explicit: str | None) -> Path | None:
    candidates = [explicit, os.environ.get("DRAFTRL_BENCH_DIR"), ".kit/bench", "../shared/data/bench",
                  "shared/data/bench", str(REPO / ".kit/bench"), str(REPO.parent / "shared/data/bench")]
    for candidate in candidates:
        if candidate and any((Path(candidate) / name).is_file() for name in BENCH_FILES):
            return Path(candidate)
    if explicit:
        raise FileNotFoundError(f"--bench-dir {explicit}: none of {BENCH_FILES} there")
    return None


def question_texts(bench_dir: Path | None, data: str | None, limit: int) -> tuple[list[str], str]:
    """First user turns: of a chat data file, or of the bench questions (interleaved by bench)."""
    if data:
        from speculative.data import read_conversations

        texts = []
        for conversation in read_conversations(Path(data), max_records=None, on_error="skip"):
            user = next((m["content"] for m in conversation.messages if m["role"] == "user"), None)
            if user:
                texts.append(user)
            if len(texts) >= limit:
                break
        return texts, str(data)
    if bench_dir is None:
        raise FileNotFoundError("no prompts: give --bench-dir (mt_bench/humaneval/gsm8k JSONL) or --data")
    per_bench = []
    for name in BENCH_FILES:
        path = bench_dir / name
        if not path.is_file():
            continue
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(str(json.loads(line)["turns"][0]))
            except (ValueError, KeyError, IndexError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: not a bench question ({error})") from error
        per_bench.append(rows)
    texts = [row[i] for i in range(max(map(len, per_bench))) for row in per_bench if i < len(row)]
    return texts[:limit], str(bench_dir)


def tiny_target(vocab_size: int, device: torch.device) -> TargetModel:
    """A random 4-layer Llama with the real tokenizer's vocabulary: the CPU check of this script."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    return TargetModel(LlamaForCausalLM(config).eval().to(device))


def load_drafter_for(target: TargetModel, directory: str | None, draft_vocab: int, device: torch.device) -> Eagle3Drafter:
    if directory:
        from speculative.checkpoint import load_drafter

        drafter = load_drafter(directory, target.embed_tokens.weight, target.aux_layer_ids)
    else:
        vocab = DraftVocab(torch.arange(min(draft_vocab, target.vocab_size)), target.vocab_size)
        config = DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids)
        drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
        init_drafter_weights(drafter, seed=0)
    return drafter.to(device=device, dtype=torch.float32).eval()  # rollouts draft in fp32, as the trainer's drafter


def prompt_batch(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Each prompt followed by one supervised filler token: ``prompts_from_batch`` reads the prompts back."""
    width = max(len(p) for p in prompts) + 1
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention, loss = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        attention[row, : len(prompt) + 1] = 1
        loss[row, len(prompt)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


class Report:
    """Rows written to JSON after every section."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out, self.meta, self.sections = out, meta, {}

    def add(self, section: str, value: Any) -> None:
        self.sections[section] = value
        (self.out / "opd_throughput.json").write_text(json.dumps({**self.meta, **self.sections}, indent=1, default=str))
        print(f"[opd_throughput] {section}: {json.dumps(value, default=str)[:600]}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ sections


@torch.no_grad()
def prefill_ceiling(target: TargetModel, shapes: list[tuple[int, int]], repeats: int = 3) -> dict[str, Any]:
    """Tokens/s of the target's own teacher-forced forward (the pass ``sft_experience`` makes)."""
    device, rows = target.device, []
    for batch, length in shapes:
        ids = torch.randint(0, target.vocab_size, (batch, length), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
        try:
            target.model(input_ids=ids, use_cache=False)  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                target.model(input_ids=ids, use_cache=False)
            sync(device)
            seconds = (time.perf_counter() - start) / repeats
            rows.append({"batch": batch, "length": length, "tok_s": batch * length / seconds})
        except torch.OutOfMemoryError:
            rows.append({"batch": batch, "length": length, "tok_s": None, "error": "out of memory"})
            torch.cuda.empty_cache()
    best = max((r["tok_s"] for r in rows if r["tok_s"]), default=None)
    return {"prefill_ceiling_tok_s": best, "shapes": rows}


def opd_config(args, batch_size: int, compile: str):
    return load_config(None, [
        "training.objective=opd", f"opd.chain_length={args.chain_length}",
        f"opd.max_new_tokens={args.max_new_tokens}", f"data.max_length={args.max_prompt_tokens}",
        f"opd.rollout_batch_size={batch_size}", f"opd.compile={compile}", "opd.rollout_temperature=0.0",
    ])


def time_experience(worker, config, prompts: list[list[int]], drafter, device) -> dict[str, Any]:
    batch = prompt_batch(prompts)
    sync(device)
    start = time.perf_counter()
    experience = opd_experience(worker, config, batch, drafter, drafter_version=1, seed=0)
    sync(device)
    made = time.perf_counter() - start
    experience = experience.to("cpu")  # what the rollout actor ships
    total = time.perf_counter() - start
    cycles = int(experience.accepted.numel())
    return {
        "prompts": len(prompts), "tokens": experience.num_tokens, "response_tokens": experience.response_tokens,
        "cycles": cycles, "tokens_per_cycle": experience.response_tokens / max(cycles, 1),
        "seconds_on_device": made, "seconds_with_cpu_copy": total,
        "tok_s_on_device": experience.num_tokens / made, "tok_s": experience.num_tokens / total,
        "experience_mb": experience.nbytes() / 1e6,
    }


def opd_batched(args, worker, drafter, prompts, batch: int, compile: str, device) -> dict[str, Any]:
    config = opd_config(args, batch, compile)
    time_experience(worker, config, prompts[:batch], drafter, device)  # builds caches, captures graphs
    engine = worker.batch_rollout_engine(drafter, args.chain_length, 0.0, compile=compile, max_batch=batch,
                                         max_len=args.max_prompt_tokens + args.max_new_tokens)
    runs = []
    for r in range(args.repeats):
        chunk = [prompts[(r * batch + i) % len(prompts)] for i in range(batch)]
        runs.append(time_experience(worker, config, chunk, drafter, device))
    chunk = [prompts[i % len(prompts)] for i in range(batch)]
    eos = stop_token_ids(worker.target.model)
    generated = engine.generate(chunk, args.max_new_tokens, eos)
    return {
        "batch": batch, "requested_compile": compile, "compile": engine.compile,
        "compile_errors": engine.compile_errors,
        "tok_s": statistics.median(r["tok_s"] for r in runs),
        "tok_s_on_device": statistics.median(r["tok_s_on_device"] for r in runs),
        "engine_new_tok_s": generated.tokens_per_second, "engine_tau": generated.tau,
        "engine_steps": generated.steps, "engine_seconds": generated.wall_time,
        "graph_setup_seconds": generated.setup_time, "runs": runs,
    }


def opd_reference(args, worker, drafter, prompts, device) -> dict[str, Any]:
    compile = "auto"  # CUDA graphs on a GPU, the eager path on CPU: what the pipeline runs
    config = opd_config(args, 0, compile)
    time_experience(worker, config, prompts[:1], drafter, device)  # captures graphs
    run = time_experience(worker, config, prompts[: args.reference_prompts], drafter, device)
    return {"compile": compile, **run}


def autoregressive(args, target, prompts, device, compile: str) -> dict[str, Any]:
    """Batch-1 greedy decoding of ``max_new_tokens`` (no EOS: pure decode speed), each engine."""
    budget = args.max_prompt_tokens + args.ar_tokens
    chosen = prompts[: args.ar_prompts]
    batched = BatchGenerator(target, None, 0, compile=compile, max_batch=1, max_len=budget,
                             sync_every=args.ar_sync_every)
    batched.generate(chosen[:1], 8)  # capture
    rows = {"batched": [], "reference": []}
    outputs = {"batched": [], "reference": []}
    for prompt in chosen:
        result = batched.generate([prompt], args.ar_tokens)
        rows["batched"].append(result.num_new_tokens / result.wall_time)
        outputs["batched"].append(result.tokens[0])
    reference = None
    if compile != "inductor":
        ref_compile = "graph" if device.type == "cuda" else "off"
        reference = SpeculativeGenerator(target, None, compile=ref_compile, max_len=budget)
        reference.generate_autoregressive(chosen[0], 8)
        for prompt in chosen:
            result = reference.generate_autoregressive(prompt, args.ar_tokens)
            rows["reference"].append(len(result.tokens) / result.wall_time)
            outputs["reference"].append(result.tokens)
    same = [a == b for a, b in zip(outputs["batched"], outputs["reference"])]
    return {
        "compile": batched.compile, "compile_errors": batched.compile_errors, "tokens": args.ar_tokens,
        "batched_tok_s": statistics.median(rows["batched"]),
        "reference_tok_s": statistics.median(rows["reference"]) if rows["reference"] else None,
        "batched_ms_per_token": 1e3 / statistics.median(rows["batched"]),
        "same_tokens_as_reference": sum(same) / len(same) if same else None,
    }


def profile(args, out: Path, worker, drafter, target, prompts, device) -> dict[str, Any]:
    """Where the time goes: per-op tables and Chrome traces of a short AR run and a short OPD
    rollout, each eager (``static``: every kernel visible) and as CUDA graphs."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    modes = ["static"] + (["graph"] if device.type == "cuda" else [])
    tokens = args.profile_tokens
    found = {}
    for mode in modes:
        for name, make in (
            ("ar_b1", lambda: BatchGenerator(target, None, 0, compile=mode, max_batch=1,
                                             max_len=args.max_prompt_tokens + tokens)),
            (f"opd_b{args.profile_batch}", lambda: BatchGenerator(
                target, drafter, args.chain_length, record_cycles=True, compile=mode,
                max_batch=args.profile_batch, max_len=args.max_prompt_tokens + tokens)),
        ):
            engine = make()
            batch = [prompts[i % len(prompts)] for i in range(engine.max_batch)]
            engine.generate(batch, tokens)  # capture, warm up
            with torch_profile(activities=activities) as prof:
                result = engine.generate(batch, tokens)
                sync(device)
            stem = out / f"profile_{name}_{mode}"
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
            stem.with_suffix(".txt").write_text(table)
            prof.export_chrome_trace(str(stem.with_suffix(".json")))
            kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            found[f"{name}_{mode}"] = {"steps": result.steps, "seconds": result.wall_time,
                                       "ms_per_step": 1e3 * result.wall_time / max(result.steps, 1),
                                       "gpu_kernels": kernels, "kernels_per_step": kernels / max(result.steps, 1),
                                       "table": stem.with_suffix(".txt").name}
            del engine
    return found


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# Draft-OPD throughput ({data.get('gpu') or data.get('device')})", "",
             f"target {data['target']} ({data['dtype']}), drafter {data['drafter']}, chain {data['chain_length']}, "
             f"max_new_tokens {data['max_new_tokens']}, prompts: {data['prompt_source']} "
             f"(mean {data['prompt_tokens_mean']:.0f} tokens)", ""]
    ceiling = (data.get("prefill") or {}).get("prefill_ceiling_tok_s")
    if ceiling:
        lines += [f"Prefill ceiling: {ceiling:,.0f} tokens/s", ""]
    lines += ["Experience tok/s: prompt + response tokens of `opd_experience` per second, its copy to the CPU "
              "included (the pipeline's rollout_tokens_per_s); on device: without that copy.", "",
              "| engine | batch | experience tok/s | ratio to ceiling | on device tok/s | ratio | "
              "engine new tok/s | engine tau | tokens/cycle | cycles | MB shipped |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(value):
        return f"{value / ceiling:.2%}" if ceiling else "n/a"

    def row(label, batch, r, engine_tok_s, tau):
        lines.append(f"| {label} | {batch} | {r['tok_s']:,.0f} | {ratio(r['tok_s'])} | {r['tok_s_on_device']:,.0f} | "
                     f"{ratio(r['tok_s_on_device'])} | {engine_tok_s} | {tau} | {r['tokens_per_cycle']:.2f} | "
                     f"{r['cycles']} | {r['experience_mb']:,.0f} |")

    if data.get("opd_reference"):
        r = data["opd_reference"]
        row(f"single-sequence ({r['compile']})", 1, r, "", "")
    for key, r in sorted((k, v) for k, v in data.items() if k.startswith("opd_batched")):
        last = r["runs"][-1]
        mode = r["compile"] if r["compile"] == r["requested_compile"] else f"{r['requested_compile']} -> {r['compile']}"
        row(f"batched ({mode})", r["batch"], {**last, "tok_s": r["tok_s"], "tok_s_on_device": r["tok_s_on_device"]},
            f"{r['engine_new_tok_s']:,.0f}", f"{r['engine_tau']:.2f}")
    for key in sorted(k for k in data if k.startswith("autoregressive")):
        a = data[key]
        reference = f"{a['reference_tok_s']:,.0f}" if a["reference_tok_s"] else "n/a"
        lines += ["", f"Autoregressive batch 1 ({a['compile']}): batched engine {a['batched_tok_s']:,.0f} tok/s "
                      f"({a['batched_ms_per_token']:.2f} ms/token), generate_autoregressive {reference} tok/s, "
                      f"same tokens {a['same_tokens_as_reference']}"]
    if data.get("profile"):
        lines += ["", "| profile | steps | ms/step | GPU kernels/step |", "|---|---|---|---|"]
        for name, p in data["profile"].items():
            lines.append(f"| {name} | {p['steps']} | {p['ms_per_step']:.2f} | {p['kernels_per_step']:.0f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def run(args) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.target, args.cache_dir and Path(args.cache_dir))
    if args.tiny:
        target = tiny_target(len(tokenizer), device)
    else:
        target = TargetModel.load(args.target, dtype=dtype, device=device,
                                  cache_dir=args.cache_dir and Path(args.cache_dir))
    target.model.to(dtype)
    drafter = load_drafter_for(target, args.drafter, args.draft_vocab, device)
    texts, source = question_texts(find_bench_dir(args.bench_dir), args.data, args.num_prompts)
    prompts = []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        prompts.append(ids[-args.max_prompt_tokens:])
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    meta = {
        "argv": sys.argv, "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dtype),
        "target": "tiny random Llama (--tiny)" if args.tiny else args.target,
        "drafter": args.drafter or "random init", "draft_vocab": drafter.config.draft_vocab_size,
        "chain_length": args.chain_length, "max_new_tokens": args.max_new_tokens, "prompt_source": source,
        "prompts": len(prompts), "prompt_tokens_mean": statistics.fmean(map(len, prompts)),
        "load_seconds": time.perf_counter() - started,
    }
    report = Report(out, meta)
    worker = TargetWorker(target, drafter.draft_to_target)
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        raise ValueError(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    if "prefill" in sections:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.ceiling_shapes.split(",")]
        report.add("prefill", prefill_ceiling(target, shapes))
    if "reference" in sections:
        report.add("opd_reference", opd_reference(args, worker, drafter, prompts, device))
    compile = args.compile
    for batch in [int(b) for b in args.batches.split(",")] if "batched" in sections else []:
        report.add(f"opd_batched_b{batch:04d}", opd_batched(args, worker, drafter, prompts, batch, compile, device))
        worker._batch_engine = None  # free its caches before the next size
    if "ar" in sections:
        report.add("autoregressive_b1", autoregressive(args, target, prompts, device, compile))
    if args.inductor:
        report.add("autoregressive_b1_inductor", autoregressive(args, target, prompts, device, "inductor"))
        batch = args.inductor_batch
        report.add(f"opd_batched_b{batch:04d}_inductor",
                   opd_batched(args, worker, drafter, prompts, batch, "inductor", device))
        worker._batch_engine = None
    if args.profile:
        report.add("profile", profile(args, out, worker, drafter, target, prompts, device))
    data = {**report.meta, **report.sections, "total_seconds": time.perf_counter() - started}
    (out / "opd_throughput.json").write_text(json.dumps(data, indent=1, default=str))
    text = markdown(data)
    (out / "opd_throughput.md").write_text(text)
    print(text, flush=True)
    return data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2", help="built-in name, .gguf, HF directory or hub id")
    p.add_argument("--drafter", default=None, help="EAGLE-3 drafter directory (default: random init)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared CPU box: 1)")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer target with the tokenizer's vocabulary")
    p.add_argument("--cache-dir", default=None, help="where converted targets go (default $DRAFTRL_CACHE)")
    p.add_argument("--bench-dir", default=None)
    p.add_argument("--data", default=None, help="a ShareGPT/OpenAI chat file instead of the bench questions")
    p.add_argument("--num-prompts", type=int, default=240)
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="data.max_length (prompts cut to it)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--chain-length", type=int, default=7)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"which of {SECTIONS} to run")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--repeats", type=int, default=2, help="timed experiences per batch size (median)")
    p.add_argument("--reference-prompts", type=int, default=4, help="prompts through the single-sequence path")
    p.add_argument("--compile", default="auto", choices=["auto", "static", "graph", "inductor"])
    p.add_argument("--ar-tokens", type=int, default=256)
    p.add_argument("--ar-prompts", type=int, default=3)
    p.add_argument("--ar-sync-every", type=int, default=32)
    p.add_argument("--ceiling-shapes", default="16x2048,64x2048", help="BxT shapes of the prefill ceiling")
    p.add_argument("--inductor", action="store_true", help="also AR batch 1 and OPD at --inductor-batch "
                   "compiled by Inductor (minutes of compiling)")
    p.add_argument("--inductor-batch", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="torch.profiler tables and Chrome traces")
    p.add_argument("--profile-tokens", type=int, default=32)
    p.add_argument("--profile-batch", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
