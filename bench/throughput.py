"""Issue 17's throughput figures on one GPU, in one run (one process tree), against one ceiling.

    PYTHONPATH=/tmp/kit/site:$PWD python bench/throughput.py --target /tmp/kit/smollm2.gguf \
        --data /tmp/sharegpt.jsonl [--out bench/results/throughput_h200] [--max-minutes 2.5]
    python bench/throughput.py --device cpu --out /tmp/throughput_cpu     # CPU smoke run, tiny sizes

Rollouts draft with a *trained* drafter, as in a real run (a random one grows shallow trees and
gets nothing accepted, which is not the work GTO and Draft-OPD do): ``--drafter DIR`` loads one,
otherwise ``--warm-drafter-steps`` EAGLE-3 steps on the target's own greedy answers train it first
(``bench.opd_throughput.train_drafter``). It is saved under ``OUT/warm_drafter`` and the trainers of
the ``single`` and ``ray`` parts start from it (``drafter.init_from``).

Parts (each under a ``--max-minutes`` guard; a part that fails or runs out of time leaves its
error string in ``errors`` and the others still run):

* ``prefill``: the target's prefill ceiling, tokens/s at its best batch (``bench.gto_throughput``);
* ``gto``: GTO tokens scored/s of the batched experience path (``bench.gto_throughput.measure_gto``);
* ``opd``: Draft-OPD tokens/s (generated + scored) of the batched engine (``bench.opd_throughput``);
  both also as a ratio to the ceiling;
* ``sft``: the learner alone: SFT samples/s and step time (forward, backward, AdamW) per micro-batch;
* ``single``: the single-process trainer (``pipeline.trainer``) on the GTO config, updates/s;
* ``ray``: the Ray pipeline (``pipeline.driver.run_distributed``) on the same GTO config, on a local
  Ray cluster of this one GPU (learner and rollout actors colocated on fractional GPUs), per mode:
  updates/s, learner step time, learner busy fraction, broadcast GB/s and share of step time, and
  where an update's time goes (``ray.<mode>.breakdown``: medians of ``pipeline.driver.BREAKDOWN``).

Writes ``OUT/summary.json`` after every part (keys ``prefill_ceiling_tok_s``, ``gto_tok_s``,
``opd_tok_s``, ``gto_ceiling_ratio``, ``opd_ceiling_ratio``, ``ray_updates_per_s_gto``,
``single_process_updates_per_s_gto``, ``learner_busy_async``, ``broadcast_gb_s``,
``broadcast_step_share``, ``gpu``, ``errors``, ...) and ``OUT/README.md`` (a table). Ray and
DeepSpeed come from the kit on the GPU machine (PYTHONPATH=/tmp/kit/site); without them the JSON
says so and the other parts still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import platform
import shutil
import signal
import statistics
import sys
import time
import traceback
from argparse import Namespace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

KEYS = ("prefill_ceiling_tok_s", "gto_tok_s", "opd_tok_s", "gto_ceiling_ratio", "opd_ceiling_ratio",
        "ray_updates_per_s_gto", "single_process_updates_per_s_gto", "learner_busy_async", "broadcast_gb_s",
        "broadcast_step_share", "gpu")
PARTS = ("prefill", "gto", "opd", "sft", "single", "ray")

# Sizes per device: the GPU ones are the paper's GTO settings and the batched engines' best
# chunking on the H200 (bench/results/batched_experience_h200); the CPU ones only exercise the code.
SIZES = {
    "cuda": dict(max_length=1024, max_records=600, draft_vocab=32000, ceiling_batches="8,16,32,64",
                 ceiling_length=2048, gto_batch=32, gto_chunk="32x64", pipeline_gto_chunk="32x16",
                 gto_precision="bf16", gto_batches=2,
                 gto_set=[], opd_batch=64, opd_new_tokens=256, opd_chain=7, opd_prompt_tokens=1024,
                 sft_batches="8,16,32", train_batch=32, grad_accum=1, actors=2, learner_gpu=0.4, actor_gpu=0.3,
                 warm_steps=300, warm_rows=64, warm_new_tokens=128),
    "cpu": dict(max_length=48, max_records=64, draft_vocab=256, ceiling_batches="2", ceiling_length=32,
                gto_batch=2, gto_chunk="2x2", pipeline_gto_chunk="2x2", gto_precision="fp32", gto_batches=1,
                gto_set=["gto.tree_depth=3", "gto.tree_top_k=2", "gto.tree_total_tokens=6",
                         "gto.groups_per_sequence=2", "gto.group_size=2"],
                opd_batch=2, opd_new_tokens=8, opd_chain=3, opd_prompt_tokens=48, sft_batches="2",
                train_batch=2, grad_accum=2, actors=1, learner_gpu=0.0, actor_gpu=0.0,
                warm_steps=2, warm_rows=2, warm_new_tokens=8),
}


class PartTimeout(Exception):
    """A part ran past ``--max-minutes``."""


@contextlib.contextmanager
def guard(summary: dict[str, Any], part: str, minutes: float, write):
    """Run one part: past ``minutes`` it is interrupted (SIGALRM); any error is recorded, not raised."""
    if minutes <= 0.1:
        summary["errors"][part] = "skipped: no time left of --total-minutes"
        write()
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"part {part} ran past --max-minutes {minutes}")

    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, 60.0 * minutes))
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the point is to keep the other parts
        summary["errors"][part] = f"{type(error).__name__}: {error}"[:2000]
        traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        summary["part_seconds"][part] = time.perf_counter() - started
        print(f"[throughput] {part}: {summary['part_seconds'][part]:.1f}s"
              f"{' ERROR ' + summary['errors'][part] if part in summary['errors'] else ''}", flush=True)
        write()


def gpu_tag(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' without a GPU."""
    for word in name.lower().replace("-", " ").split():
        if any(c.isdigit() for c in word) and any(c.isalpha() for c in word) and not word.endswith("gb"):
            return word
    return name.lower().split()[-1] if name else "cpu"


def tiny_assets(root: Path) -> tuple[str, str]:
    """CPU smoke: a random 4-layer Llama with SmolLM2's tokenizer, and short chats."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from speculative.target import load_tokenizer

    target, data = root / "tiny_target", root / "chats.jsonl"
    if not (target / "config.json").is_file():
        tokenizer = load_tokenizer("smollm2")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False)
        LlamaForCausalLM(config).eval().save_pretrained(target)
        tokenizer.save_pretrained(target)
    topics = ("rivers", "stars", "bread", "chess", "trains", "owls", "tea", "glass")
    with open(data, "w") as handle:
        for i in range(64):
            topic = topics[i % len(topics)]
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"Tell me something about {topic}. ({i})"},
                {"role": "assistant", "content": f"Here is a short fact about {topic}: it is interesting."}]}) + "\n")
    return str(target), str(data)


def gto_overrides(args, sizes: dict[str, Any], out: Path) -> list[str]:
    """The GTO config the single-process trainer and the Ray pipeline both run. Their chunking is
    ``pipeline_gto_chunk``, smaller than the standalone GTO part's: on one GPU the Ray run holds
    two rollout actors and a learner at once, and at 32x64 its learner ran out of memory (H200)."""
    seqs, positions = (int(x) for x in sizes["pipeline_gto_chunk"].split("x"))
    return [
        f"target.model={args.target}", f"data.source={args.data}", f"data.max_length={sizes['max_length']}",
        f"data.max_records={sizes['max_records']}", "data.eval_fraction=0.05",
        f"drafter.draft_vocab_size={sizes['draft_vocab']}", "training.objective=gto",
        f"training.batch_size={sizes['train_batch']}", f"training.grad_accum={sizes['grad_accum']}",
        "training.max_steps=100000", "training.log_every=1", "training.eval_every=100000",
        "training.eval_batches=1", "training.save_every=100000", "training.warmup_steps=1",
        f"training.device={'cpu' if args.device == 'cpu' else 'cuda'}",
        f"gto.sequences_per_forward={seqs}", f"gto.positions_per_forward={positions}",
        f"gto.tree_precision={sizes['gto_precision']}", *sizes["gto_set"],
        f"output_dir={out}", *([f"cache_dir={args.cache_dir}"] if args.cache_dir else []),
        *(["training.threads=1"] if args.device == "cpu" else []), "seed=1", *args.set,
    ]


def steady_rate(run_dir: Path) -> dict[str, float]:
    """updates/s from the first logged update to the last (start-up and the first update excluded)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    if len(train) < 2:
        raise RuntimeError(f"{run_dir}: {len(train)} logged updates, at least 2 needed for a rate")
    window = train[-1]["time"] - train[0]["time"]
    return {"updates": train[-1]["step"], "updates_per_s": (train[-1]["step"] - train[0]["step"]) / window,
            "rows": train}


def peak_memory(train: list[dict]) -> dict[str, float]:
    """The largest ``pipeline.driver.PEAK_MEMORY`` over a Ray run's logged updates, GiB."""
    from pipeline.driver import PEAK_MEMORY

    peaks = {key: [float(r[key]) for r in train if r.get(key) is not None] for key in PEAK_MEMORY}
    return {key: max(values) for key, values in peaks.items() if values}


def breakdown(train: list[dict]) -> dict[str, float]:
    """Medians over the updates after the first of where each update's time went
    (``pipeline.driver.BREAKDOWN``: rollout side per experience, learner side per update)."""
    from pipeline.driver import BREAKDOWN

    rows = train[1:] or train
    medians = {}
    for key in BREAKDOWN:
        values = [float(r[key]) for r in rows if key in r and r[key] == r[key]]
        medians[key] = statistics.median(values) if values else None
    medians["updates"] = len(rows)
    return medians


# ------------------------------------------------------------------------------------------ parts
def load_models(args, sizes, device):
    from actors.target_worker import TargetWorker
    from speculative.config import load_config
    from speculative.data import build_dataset
    from speculative.drafter_blueprint import make_blueprint
    from speculative.runtime import auto_dtype
    from speculative.target import TargetModel, default_cache_dir, load_tokenizer, resolve_target

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    config = load_config(None, gto_overrides(args, sizes, Path(args.out) / "runs" / "unused"))
    dtype = auto_dtype(device)
    target = TargetModel.load(args.target, config.target.aux_layer_ids, dtype, device, cache_dir)
    tokenizer = load_tokenizer(args.target, cache_dir)
    dataset, _ = build_dataset(args.data, tokenizer, max_length=sizes["max_length"], max_records=sizes["max_records"],
                               on_error="skip", cache_dir=cache_dir / "data", progress=False)
    if args.drafter:
        from speculative.checkpoint import load_drafter

        drafter = load_drafter(args.drafter, target.embed_tokens.weight, target.aux_layer_ids)
    else:
        drafter = make_blueprint(config, resolve_target(args.target, cache_dir), dataset).build(target.embed_tokens.weight)
    drafter = drafter.to(device).float().eval()  # rollouts draft in fp32, as the trainer's drafter
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Namespace(config=config, target=target, tokenizer=tokenizer, dataset=dataset, drafter=drafter,
                     pad_id=pad_id, worker=TargetWorker(target, drafter.draft_to_target))


def chat_prompts(m, count: int, max_tokens: int) -> list[list[int]]:
    """The first user turns of the data, chat-templated, each cut to its last ``max_tokens``."""
    from bench.opd_throughput import question_texts

    texts, _ = question_texts(None, m.args.data, count)
    prompts = []
    for text in texts:
        ids = m.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        prompts.append(ids[-max_tokens:])
    return prompts


def part_warm(m, sizes, summary, out: Path) -> None:
    """Train the rollouts' drafter a little (unless ``--drafter`` gave one) and save it for the trainers."""
    from bench.opd_throughput import train_drafter
    from speculative.checkpoint import save_drafter

    steps = m.args.warm_drafter_steps
    if m.args.drafter:
        m.args.set = [*m.args.set, f"drafter.init_from={m.args.drafter}"]  # the trainers start there too
        summary["warm_drafter"] = {"loaded": m.args.drafter}
        return
    if steps <= 0:
        summary["warm_drafter"] = {"steps": 0, "note": "random init: shallow trees, nothing accepted"}
        return
    device = m.target.device
    result = train_drafter(m.target, m.drafter, chat_prompts(m, sizes["warm_rows"], 256), steps, device,
                           rows=sizes["warm_rows"], new_tokens=sizes["warm_new_tokens"])
    directory = save_drafter(m.drafter, out / "warm_drafter", dtype=torch.float32)
    m.args.set = [*m.args.set, f"drafter.init_from={directory}"]  # the single and Ray trainers start here
    summary["warm_drafter"] = {**result, "saved": str(directory)}


def part_prefill(m, sizes, summary) -> None:
    from bench.gto_throughput import prefill_ceiling

    rates = prefill_ceiling(m.worker.fast, [int(b) for b in sizes["ceiling_batches"].split(",")],
                            sizes["ceiling_length"])
    summary["prefill_by_batch"] = {str(b): r for b, r in rates.items()}
    best = max((b for b, r in rates.items() if r == r), key=lambda b: rates[b])
    summary.update(prefill_ceiling_tok_s=rates[best], prefill_best_batch=best,
                   prefill_length=sizes["ceiling_length"])


def part_gto(m, sizes, summary) -> None:
    import copy

    from actors.gto_rollout import gto_experience
    from bench.gto_throughput import measure_gto, sample_batches, with_gto

    seqs, positions = (int(x) for x in sizes["gto_chunk"].split("x"))
    cfg = with_gto(m.config, sequences_per_forward=seqs, positions_per_forward=positions,
                   tree_precision=sizes["gto_precision"])
    batches = sample_batches(m.dataset, m.pad_id, sizes["gto_batch"], sizes["gto_batches"] + 1, seed=0)
    row = measure_gto(m.worker, cfg, batches, m.drafter, copy.deepcopy(m.drafter), gto_experience)
    summary["gto"] = {**row, "batch_size": sizes["gto_batch"], "chunk": sizes["gto_chunk"],
                      "precision": sizes["gto_precision"]}
    summary["gto_tok_s"] = row["tok_s"]


def part_opd(m, sizes, summary, device) -> None:
    from bench.opd_throughput import opd_batched

    prompts = chat_prompts(m, max(2 * sizes["opd_batch"], 8), sizes["opd_prompt_tokens"])
    args = Namespace(chain_length=sizes["opd_chain"], max_new_tokens=sizes["opd_new_tokens"],
                     max_prompt_tokens=sizes["opd_prompt_tokens"], repeats=1)
    row = opd_batched(args, m.worker, m.drafter, prompts, sizes["opd_batch"], "auto", device)
    m.worker._batch_engine = None  # free its caches
    summary["opd"] = {k: v for k, v in row.items() if k != "runs"}
    summary["opd_tok_s"] = row["tok_s"]
    summary["opd_tok_s_on_device"] = row["tok_s_on_device"]


def part_sft(m, sizes, summary, device) -> None:
    """The learner alone on SFT experiences: one forward/backward/AdamW step per micro-batch size."""
    from bench.gto_throughput import sample_batches
    from learners.objectives import objective_loss
    from speculative.config import load_config

    cfg = load_config(None, [*gto_overrides(m.args, sizes, Path(m.args.out) / "runs" / "unused"),
                             "training.objective=sft"])
    drafter = m.drafter
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for size in (int(b) for b in sizes["sft_batches"].split(",")):
        try:
            batch = sample_batches(m.dataset, m.pad_id, size, 1, seed=7)[0]
            with torch.no_grad():
                experience = m.worker.make_experience(cfg, batch, drafter, None, 0, 0)
            times = []
            drafter.train()
            for _ in range(3):  # the first is a warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss, _ = objective_loss(drafter, experience, cfg)
                loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            step = statistics.median(times[1:])
            rows.append({"micro_batch": size, "step_s": step, "samples_per_s": size / step,
                         "tokens_per_s": experience.num_tokens / step})
        except torch.OutOfMemoryError as error:
            rows.append({"micro_batch": size, "error": f"out of memory: {str(error)[:120]}"})
        finally:
            drafter.eval()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary["sft"] = rows
    best = max((r for r in rows if "samples_per_s" in r), key=lambda r: r["samples_per_s"])
    summary.update(sft_samples_per_s=best["samples_per_s"], sft_learner_step_s=best["step_s"],
                   sft_best_micro_batch=best["micro_batch"])


def part_single(args, sizes, summary, out: Path) -> None:
    from bench.pipeline_bench import GpuSampler
    from pipeline.trainer import Trainer
    from speculative.config import load_config
    from speculative.runtime import peak_memory_gib, pick_device

    run_dir = out / "runs" / "single_gto"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, gto_overrides(args, sizes, run_dir))
    steps = args.train_steps
    device = pick_device(config.training.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this part's peak, not the earlier parts'
    sampler = GpuSampler().start()  # its GPU's busy time, over the steady window as the Ray part's
    try:
        Trainer(config, steps_this_run=steps, minutes_this_run=None if steps else args.train_minutes).run()
    finally:
        sampler.stop()
    rate = steady_rate(run_dir)
    summary["single"] = {"updates": rate["updates"], "updates_per_s": rate["updates_per_s"],
                         "tokens_per_s": rate["rows"][-1].get("tokens_per_s"),
                         "gpu_busy": sampler.busy(rate["rows"][0]["time"], rate["rows"][-1]["time"])}
    if summary["single"]["gpu_busy"]:  # nvidia-smi's share of time a kernel ran, mean over GPUs
        summary["single_process_gpu_busy"] = statistics.fmean(summary["single"]["gpu_busy"].values())
    if device.type == "cuda":  # the trainer's target, drafter, optimizer and GTO experience together
        summary["single_process_peak_memory_gib"] = peak_memory_gib(device)
    summary["single_process_updates_per_s_gto"] = rate["updates_per_s"]


def part_ray(args, sizes, summary, out: Path, device) -> None:
    missing = [name for name in ("ray", "deepspeed") if importlib.util.find_spec(name) is None]
    summary["ray_available"] = importlib.util.find_spec("ray") is not None
    summary["deepspeed_available"] = importlib.util.find_spec("deepspeed") is not None
    if missing:
        raise ModuleNotFoundError(f"{' and '.join(missing)} not importable (on the GPU machine: "
                                  "PYTHONPATH=/tmp/kit/site); the Ray part is skipped")
    import ray

    from bench.pipeline_bench import GpuSampler, summarise
    from pipeline.driver import run_distributed
    from speculative.config import load_config

    gpus = 1 if device.type == "cuda" else 0
    ray.init(address="local", num_gpus=gpus, num_cpus=args.ray_cpus, include_dashboard=False,
             log_to_driver=True)
    sampler = GpuSampler().start()
    summary["ray"] = {}
    try:
        for mode in args.ray_modes.split(","):
            run_dir = out / "runs" / f"ray_gto_{mode}"
            shutil.rmtree(run_dir, ignore_errors=True)
            per_update = sizes["train_batch"] * sizes["grad_accum"]
            config = load_config(None, [
                *gto_overrides(args, sizes, run_dir), "distributed.enabled=true", f"distributed.mode={mode}",
                "distributed.placement=colocated", "distributed.num_learners=1",
                f"distributed.num_rollout_actors={sizes['actors']}",
                f"distributed.gpus_per_learner={sizes['learner_gpu']}",
                f"distributed.gpus_per_rollout_actor={sizes['actor_gpu']}", "distributed.cpus_per_actor=1",
                f"training.micro_batch_size={args.micro_batch_size or per_update}",
                *args.ray_set,
            ])
            started = time.time()
            try:
                steps = args.train_steps
                run_distributed(config, steps_this_run=steps, minutes_this_run=None if steps else args.train_minutes)
                row = summarise(run_dir, started, time.time(), sampler)
                report = json.loads((run_dir / "distributed_report.json").read_text())
                train = steady_rate(run_dir)["rows"]
                busy = sum(r["learner_step_s"] for r in train[1:]) / max(train[-1]["time"] - train[0]["time"], 1e-9)
                shares = [r["broadcast_step_share"] for r in train[1:] if "broadcast_step_share" in r]
                prefetched = [r["learner_prefetched"] for r in train[1:] if "learner_prefetched" in r]
                row.update(learner_busy=busy, learner_busy_whole_run=report.get("learner_busy"),
                           learner_prefetched=statistics.fmean(prefetched) if prefetched else None,
                           broadcast_step_share=statistics.median(shares) if shares else None,
                           micro_batch_size=config.training.micro_batch_size, breakdown=breakdown(train),
                           max_staleness=config.distributed.max_staleness, **peak_memory(train))
                summary["ray"][mode] = row
            except Exception as error:  # noqa: BLE001 - the other mode may still run
                summary["ray"][mode] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                summary["errors"][f"ray_{mode}"] = summary["ray"][mode]["error"]
                traceback.print_exc()
    finally:
        sampler.stop()
        ray.shutdown()
    best_mode = "async" if "updates_per_s" in summary["ray"].get("async", {}) else "sync"
    best = summary["ray"].get(best_mode, {})
    if "updates_per_s" in best:
        summary["ray_updates_per_s_gto"] = best["updates_per_s"]
        summary["ray_mode_reported"] = best_mode
    asynchronous = summary["ray"].get("async", {})
    if "learner_busy" in asynchronous:
        summary["learner_busy_async"] = asynchronous["learner_busy"]
        summary["learner_step_s"] = asynchronous.get("learner_step_s")
    for key in ("learner_peak_memory_gib", "rollout_peak_memory_gib"):
        if key in best:
            summary[key] = best[key]
    if best.get("gpu_busy"):
        summary["ray_gpu_busy"] = statistics.fmean(best["gpu_busy"].values())
    source = asynchronous if "broadcast_gb_per_s" in asynchronous else summary["ray"].get("sync", {})
    if "broadcast_gb_per_s" in source:
        summary.update(broadcast_gb_s=source["broadcast_gb_per_s"], broadcast_step_share=source["broadcast_step_share"],
                       broadcast_transport=source["broadcast_transport"], broadcast_mb=source["broadcast_mb"])


# ------------------------------------------------------------------------------------------ output
def warm_line(warm: dict[str, Any] | None) -> str:
    if not warm:
        return "n/a (the warm-up part did not run)"
    if "loaded" in warm:
        return f"loaded from {warm['loaded']}."
    if not warm.get("steps"):
        return "random init (shallow trees, nothing accepted: not a real run's work)."
    return (f"random init, then {warm['steps']} EAGLE-3 steps on the target's own answers "
            f"({warm['seconds']:.0f} s; TTT loss {warm['loss_first']:.2f} -> {warm['loss_last']:.2f}, "
            f"accept-length proxy {warm['accept_length_proxy_last']:.2f}); the trainers start from it.")


def readme(summary: dict[str, Any]) -> str:
    def f(key, fmt="{:.3g}"):
        value = summary.get(key)
        if value is None:
            return "n/a"
        try:
            return fmt.format(value)
        except (TypeError, ValueError):
            return "n/a" if value is None else str(value)

    ray = summary.get("ray", {})
    sizes = summary.get("sizes", {})
    per_update = (f"{sizes['train_batch']} x {sizes['grad_accum']}" if "train_batch" in sizes else "n/a")
    if "pipeline_gto_chunk" in sizes:
        per_update += f", S x C {sizes['pipeline_gto_chunk']}"
    lines = [
        f"# Throughput on one {summary['gpu_name']} ({summary['date']})", "",
        f"`{' '.join(summary['argv'])}` — {summary['total_seconds']:.0f} s in all. Target {summary['target']}.", "",
        f"Rollout drafter: {warm_line(summary.get('warm_drafter'))}", "",
        "| figure | value | ratio to the prefill ceiling |", "|---|---|---|",
        f"| prefill ceiling, tok/s (best batch {f('prefill_best_batch', '{}')} x {f('prefill_length', '{}')}) "
        f"| {f('prefill_ceiling_tok_s', '{:,.0f}')} | 1 |",
        f"| GTO tokens scored/s (batched, {summary.get('gto', {}).get('batch_size', 'n/a')} seqs) "
        f"| {f('gto_tok_s', '{:,.0f}')} | {f('gto_ceiling_ratio', '{:.2%}')} |",
        f"| Draft-OPD tokens/s (batched, {summary.get('opd', {}).get('batch', 'n/a')} seqs, incl. the shipped copy to CPU) "
        f"| {f('opd_tok_s', '{:,.0f}')} | {f('opd_ceiling_ratio', '{:.2%}')} |",
        f"| SFT learner samples/s (micro-batch {f('sft_best_micro_batch', '{}')}) | {f('sft_samples_per_s', '{:.1f}')} | |",
        f"| SFT learner step, s | {f('sft_learner_step_s', '{:.3f}')} | |",
        f"| GTO updates/s, single-process trainer ({per_update} sequences per update) "
        f"| {f('single_process_updates_per_s_gto', '{:.3f}')} | |",
        f"| GTO updates/s, Ray pipeline ({f('ray_mode_reported', '{}')}) | {f('ray_updates_per_s_gto', '{:.3f}')} | |",
        f"| learner busy fraction, async | {f('learner_busy_async', '{:.0%}')} | |",
        f"| GPU busy (nvidia-smi): single-process trainer / Ray pipeline "
        f"| {f('single_process_gpu_busy', '{:.0%}')} / {f('ray_gpu_busy', '{:.0%}')} | |",
        f"| learner step (Ray, async), s | {f('learner_step_s', '{:.3f}')} | |",
        f"| broadcast GB/s ({f('broadcast_transport', '{}')}, {f('broadcast_mb', '{:.1f}')} MB) "
        f"| {f('broadcast_gb_s', '{:.2f}')} | |",
        f"| broadcast share of step time | {f('broadcast_step_share', '{:.1%}')} | |",
        f"| peak memory, GiB: learner / rollout actor (Ray) / single-process trainer "
        f"| {f('learner_peak_memory_gib', '{:.1f}')} / {f('rollout_peak_memory_gib', '{:.1f}')} / "
        f"{f('single_process_peak_memory_gib', '{:.1f}')} | |",
        "",
    ]
    if ray:
        lines += ["| Ray mode | updates/s | learner step s | learner busy | broadcast s | GB/s | staleness max "
                  "| updates prefetched |", "|---|---|---|---|---|---|---|---|"]
        for mode, row in ray.items():
            if "error" in row:
                lines.append(f"| {mode} | error: {row['error'][:120]} | | | | | | |")
                continue
            prefetched = row.get("learner_prefetched")
            lines.append(f"| {mode} | {row['updates_per_s']:.3f} | {row['learner_step_s']:.3f} | "
                         f"{row['learner_busy']:.0%} | {row['broadcast_s']:.4f} | {row['broadcast_gb_per_s']:.2f} | "
                         f"{row['staleness_max']} | {'n/a' if prefetched is None else f'{prefetched:.0%}'} |")
        lines.append("")
        lines += ["Where an update's time goes (medians; `ray.<mode>.breakdown`). Learner parts add up to the "
                  "update interval; rollout parts are per experience.", "",
                  "| Ray mode | update interval s | learner idle s | fetch s | to device s | compute s | other s "
                  "| broadcast s | rollout build s | to host s | return s | latency s | MB/experience |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, row in ray.items():
            parts = row.get("breakdown")
            if not parts:
                continue
            keys = ("update_interval_s", "learner_idle_s", "learner_fetch_s", "learner_to_device_s",
                    "learner_compute_s", "learner_other_s", "learner_broadcast_s", "rollout_build_s",
                    "rollout_to_host_s", "rollout_return_s", "rollout_latency_s")
            cells = ["n/a" if parts.get(k) is None else f"{parts[k]:.3f}" for k in keys]
            mb = parts.get("rollout_experience_mb")
            lines.append(f"| {mode} | {' | '.join(cells)} | {'n/a' if mb is None else f'{mb:.1f}'} |")
        lines.append("")
    if summary["errors"]:
        lines += ["Errors (the parts that did not finish):", ""]
        lines += [f"- `{part}`: {error[:300]}" for part, error in summary["errors"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help=".gguf, HF directory or built-in name (CPU: a tiny random one)")
    parser.add_argument("--data", default=None, help="ShareGPT/OpenAI chat JSONL (CPU: generated chats)")
    parser.add_argument("--out", default=None, help="default bench/results/throughput_<gpu>")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--drafter", default=None, help="trained drafter directory for the rollouts and trainers")
    parser.add_argument("--warm-drafter-steps", type=int, default=None,
                        help="without --drafter: EAGLE-3 steps on the target's own answers first (GPU 300, CPU 2)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which of {PARTS}")
    parser.add_argument("--max-minutes", type=float, default=None, help="guard per part (default 2.5 GPU, 1 CPU)")
    parser.add_argument("--total-minutes", type=float, default=8.5,
                        help="the whole run: a part gets at most what is left (default 8.5)")
    parser.add_argument("--train-minutes", type=float, default=1.0, help="training minutes per trainer/Ray run")
    parser.add_argument("--train-steps", type=int, default=None, help="or updates per run (CPU default 3)")
    parser.add_argument("--ray-modes", default="async,sync")
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="Ray learners' training.micro_batch_size (default: a whole update)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="sequences per rollout experience (training.batch_size) for both trainers")
    parser.add_argument("--grad-accum", type=int, default=None, help="experiences per update (training.grad_accum)")
    parser.add_argument("--set", action="append", default=[], help="config override for both trainers")
    parser.add_argument("--ray-set", action="append", default=[], help="config override for the Ray runs")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (use --device cpu for the smoke run)")
    sizes = dict(SIZES[device.type])
    for key, value in (("train_batch", args.train_batch), ("grad_accum", args.grad_accum)):
        if value is not None:
            sizes[key] = value
    # the trainers' chunking as --set leaves it (their config lists --set last), so the tables name it
    overrides = dict(item.split("=", 1) for item in args.set if "=" in item)
    seqs, positions = sizes["pipeline_gto_chunk"].split("x")
    sizes["pipeline_gto_chunk"] = (f"{overrides.get('gto.sequences_per_forward', seqs)}x"
                                   f"{overrides.get('gto.positions_per_forward', positions)}")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"throughput_{gpu_tag(gpu_name)}"
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(1)
        args.train_steps = args.train_steps or 3
        args.ray_modes = args.ray_modes if "--ray-modes" in (argv or sys.argv) else "async"
        args.ray_cpus = args.ray_cpus or 3
        if args.target is None or args.data is None:
            target, data = tiny_assets(out)
            args.target, args.data = args.target or target, args.data or data
    if args.target is None or args.data is None:
        parser.error("--target and --data are needed on a GPU")
    minutes = args.max_minutes or (2.5 if device.type == "cuda" else 1.0)
    started = time.perf_counter()
    summary: dict[str, Any] = {key: None for key in KEYS}
    summary.update(gpu=gpu_tag(gpu_name), gpu_name=gpu_name, device=str(device), argv=sys.argv,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), target=args.target, data=args.data,
                   torch=torch.__version__, python=platform.python_version(), sizes=sizes, errors={},
                   part_seconds={}, max_minutes_per_part=minutes,
                   ray_available=importlib.util.find_spec("ray") is not None,
                   deepspeed_available=importlib.util.find_spec("deepspeed") is not None)

    def budget(per_part: float) -> float:
        left = args.total_minutes - (time.perf_counter() - started) / 60.0
        return min(per_part, left)

    def write() -> None:
        ceiling = summary.get("prefill_ceiling_tok_s")
        for key, rate in (("gto_ceiling_ratio", "gto_tok_s"), ("opd_ceiling_ratio", "opd_tok_s")):
            if ceiling and summary.get(rate):
                summary[key] = summary[rate] / ceiling
        summary["total_seconds"] = time.perf_counter() - started
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "README.md").write_text(readme(summary))

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}")
    models = None
    if args.warm_drafter_steps is None:
        args.warm_drafter_steps = sizes["warm_steps"]
    if set(parts) & {"prefill", "gto", "opd", "sft", "single", "ray"}:
        with guard(summary, "load", budget(minutes), write):
            if "load" not in summary["errors"]:
                models = load_models(args, sizes, device)
                models.args = args
    if models is not None:
        with guard(summary, "warm", budget(minutes), write):
            if "warm" not in summary["errors"]:
                part_warm(models, sizes, summary, out)
    for part in ("prefill", "gto", "opd", "sft"):
        if part in parts and models is not None:
            with guard(summary, part, budget(minutes), write):
                if part in summary["errors"]:
                    continue
                {"prefill": lambda: part_prefill(models, sizes, summary),
                 "gto": lambda: part_gto(models, sizes, summary),
                 "opd": lambda: part_opd(models, sizes, summary, device),
                 "sft": lambda: part_sft(models, sizes, summary, device)}[part]()
    models = None  # the trainers load their own target: free this one's memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "single" in parts:
        with guard(summary, "single", budget(minutes), write):
            if "single" not in summary["errors"]:
                part_single(args, sizes, summary, out)
        gc.collect()  # the trainer's target and drafter: the Ray actors need the GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "ray" in parts:
        modes = len(args.ray_modes.split(","))
        with guard(summary, "ray", budget(minutes * modes), write):
            if "ray" not in summary["errors"]:
                left = budget(minutes * modes)
                # each mode's training gets what is left after start-ups (about a minute per run)
                args.train_minutes = max(0.25, min(args.train_minutes, (left - 1.0 * modes) / modes))
                part_ray(args, sizes, summary, out, device)
    write()
    print(readme(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
