"""The Ray driver: rollout actors -> experiences -> DeepSpeed learner group -> drafter broadcast.

``sync`` mode runs rollout -> train -> broadcast in lock step (every experience is made by the
drafter it trains). ``async`` mode keeps rollout actors busy while the learners train, with
bounded staleness (``pipeline.staleness``). Both write the single-process trainer's outputs:
metrics.jsonl + TensorBoard, checkpoints/step_*/ (drafter, DeepSpeed engine state with the
optimizer, data cursor, RNG, version counters), the exported drafter, curves.png; plus
``distributed_report.json`` (every broadcast with its checksums, every step's staleness).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.rollout_actor import NoWeightsYet, rollout_actor_class
from learners.learner_group import LearnerGroup
from pipeline.checkpointing import STATE_FILE, commit_checkpoint, load_state, open_run, rng_state, set_rng_state
from pipeline.metrics_log import MetricsLog, plot_curves
from pipeline.placement import Layout, reserve
from pipeline.ray_metrics import PipelineMetrics
from pipeline.staleness import StalenessGate
from pipeline.trainer import RunResult, load_datasets
from pipeline.weight_sync import PendingPush, WeightSync
from speculative.broadcast import BroadcastFailed, BroadcastMismatch, SyncReport, choose_transport
from speculative.checkpoint import export_drafter
from speculative.config import ExperimentConfig, dump_config
from speculative.data import collate
from speculative.data.batches import BatchOrder
from speculative.target import verifier_architectures, verifier_id
from speculative.drafter_blueprint import (
    DrafterBlueprint,
    apply_ttt_settings,
    blueprint_from_directory,
    make_blueprint,
    read_target_config,
    target_aux_layer_ids,
)
from speculative.files import atomic_directory, write_manifest
from speculative.runtime import seed_everything
from speculative.target import default_cache_dir, load_tokenizer, resolve_target

# What rollout actors report per experience (actors.rollout_actor.experience_summary).
ROLLOUT_SCALARS = ("reward", "tau", "vllm_acceptance_gap", "vllm_probe_max_abs_diff", "vllm_cut_sequences")
# Where an update's time goes, measured per update (``_breakdown``): the rollout side per experience
# (mean over the update's experiences), the learner side per update (its busiest rank).
BREAKDOWN = (
    "rollout_build_s",  # making one experience on the rollout actor (device work, synchronized on CUDA)
    "rollout_to_host_s",  # copying it to the host
    "rollout_return_s",  # from the actor's method returning to the driver seeing it (Ray stores it)
    "rollout_latency_s",  # from submission to the driver seeing it (queueing on the actor included)
    "rollout_experience_mb",  # its tensor payload
    "learner_idle_s",  # the rest of the wall time: waiting for experiences (or the driver's checkpoints)
    "learner_fetch_s",  # inside train_step: ray.get of the experiences
    "learner_to_device_s",  # moving (and merging) them onto the learner's device
    "learner_compute_s",  # forward, backward, optimizer step
    "learner_other_s",  # the rest of train_step (checks, gradient norm, metrics)
    "learner_broadcast_s",  # the learner's time in weight-sync calls (publish/send, checksums)
    "update_interval_s",  # wall time between updates: the learner parts above add up to it
)
# Peak memory so far (speculative.runtime.peak_memory_gib: the CUDA allocator's peak on a GPU, the
# process's peak resident set on CPU), the largest over the learner ranks / the update's experiences.
PEAK_MEMORY = ("learner_peak_memory_gib", "rollout_peak_memory_gib")
ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
RESTART_ERRORS = (*ACTOR_ERRORS, NoWeightsYet)  # a restarted actor answers before it is re-synced


@dataclass
class DistributedResult(RunResult):
    broadcasts: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # per update: version, experience versions
    dropped_stale: int = 0
    actor_restarts: int = 0
    learner_busy: float = float("nan")  # learner step seconds / wall seconds over all updates


@dataclass
class Faults:
    """Injected faults (tests only): kill a rollout actor or a learner rank, corrupt a received
    drafter, make a learner's loss NaN."""

    kill_actor_at_step: int | None = None
    kill_actor: int = 0
    corrupt_at_version: int | None = None
    corrupt_actor: int = 0
    fail_receive_at_version: int | None = None  # the actor is ``corrupt_actor``
    kill_learner_at_step: int | None = None
    kill_learner: int = 0
    nan_loss_at_step: int | None = None
    nan_loss_rank: int = 0


class RolloutPool:
    """The rollout actors, their confirmed drafter versions, and restart recovery."""

    def __init__(self, config: ExperimentConfig, blueprint: DrafterBlueprint, strategies: list, faults: Faults):
        dist = config.distributed
        cls = rollout_actor_class(dist.max_actor_restarts)
        actor_faults = {"corrupt_at_version": faults.corrupt_at_version, "actor": faults.corrupt_actor,
                        "fail_receive_at_version": faults.fail_receive_at_version}
        self.actors = [
            cls.options(num_cpus=dist.cpus_per_actor, num_gpus=dist.gpus_per_rollout_actor,
                        scheduling_strategy=strategy).remote(config.model_dump_json(), blueprint, i, actor_faults)
            for i, strategy in enumerate(strategies)
        ]
        self.info: list[dict[str, Any]] = []
        self.versions = [-1] * len(self.actors)  # what the driver knows each actor runs
        self.restarts = 0

    def wait_ready(self) -> None:
        """Block until every actor has loaded its target (constructors run while learners set up)."""
        self.info = ray.get([actor.ready.remote() for actor in self.actors])

    def wait_alive(self, index: int, report_s: float) -> dict[str, Any]:
        """Block until actor ``index`` answers (Ray is restarting it), with progress messages."""
        started = time.time()
        while True:
            try:
                return ray.get(self.actors[index].ready.remote(), timeout=report_s)
            except ray.exceptions.GetTimeoutError:
                print(f"[draftrl] waiting {time.time() - started:.0f}s for rollout actor {index} to restart",
                      flush=True)
            except ACTOR_ERRORS:
                time.sleep(0.5)

    def restarted(self) -> list[int]:
        """Actors whose process changed since we last synced them (a silent restart)."""
        found = []
        refs = [actor.ready.remote() for actor in self.actors]  # one round trip for all actors
        for index, ref in enumerate(refs):
            try:
                info = ray.get(ref)
            except ACTOR_ERRORS:
                found.append(index)
                continue
            if info["pid"] != self.info[index]["pid"] or info["version"] != self.versions[index]:
                found.append(index)
        return found


class DistributedTrainer:
    """Runs the Ray pipeline for one ``ExperimentConfig`` with ``distributed.enabled``."""

    def __init__(self, config: ExperimentConfig, resume: bool = False, steps_this_run: int | None = None,
                 minutes_this_run: float | None = None, faults: Faults | None = None):
        self.config = config
        self.dist = config.distributed
        self.resume = resume
        self.steps_this_run = steps_this_run
        self.minutes_this_run = minutes_this_run
        self.faults = faults or Faults()
        self.out = Path(config.output_dir).resolve()  # actors run in other working directories
        self.cache_dir = (Path(config.cache_dir) if config.cache_dir else default_cache_dir()).resolve()
        self.config = config.model_copy(update={"output_dir": str(self.out), "cache_dir": str(self.cache_dir)})
        self.per_step = self.dist.num_learners * config.training.grad_accum
        self._submitted: dict[int, float] = {}  # batch index -> when its rollout was submitted (wall clock)

    # -- set-up ---------------------------------------------------------------------------
    def _target_dtype(self) -> str:
        choice = self.config.target.dtype
        if choice != "auto":
            return choice
        on_gpu = self.config.training.device == "cuda" or (
            self.config.training.device == "auto" and self.dist.gpus_per_rollout_actor > 0)
        return "bfloat16" if on_gpu else "float32"

    def _blueprint(self, target_path: str, train, checkpoint: Path | None) -> DrafterBlueprint:
        if checkpoint is None:
            return make_blueprint(self.config, target_path, train)
        blueprint = blueprint_from_directory(str(checkpoint / "drafter"))
        blueprint.config.aux_layer_ids = target_aux_layer_ids(self.config, read_target_config(target_path))
        # The GTO reference stays the run's initial drafter, not the checkpoint's.
        blueprint.init_from = self.config.drafter.init_from
        blueprint.init_seed = self.config.drafter.init_seed
        blueprint.init_layout = self.config.drafter.init_layout
        apply_ttt_settings(blueprint, self.config.training)
        return blueprint

    def _connect(self) -> bool:
        """Join the job's cluster (or ``distributed.address``); True if we started Ray here."""
        if ray.is_initialized():
            return False
        ray.init(address=self.dist.address, log_to_driver=True)
        return True

    # -- the run --------------------------------------------------------------------------
    def run(self) -> DistributedResult:
        cfg, train_cfg = self.config, self.config.training
        seed_everything(cfg.seed)
        checkpoint = open_run(self.out, self.resume, dump_config(cfg))
        started_ray = self._connect()
        target_path = resolve_target(cfg.target.model, self.cache_dir)
        tokenizer = load_tokenizer(cfg.target.model, self.cache_dir)
        train, evaluation, stats = load_datasets(self.config, tokenizer, self.cache_dir)
        (self.out / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
        print(f"[draftrl] data: {len(train)} train / {len(evaluation)} eval samples", flush=True)
        self.train_data, self.order = train, BatchOrder(
            len(train), train_cfg.batch_size, cfg.seed, lengths=train.lengths if train_cfg.group_by_length else None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        blueprint = self._blueprint(target_path, train, checkpoint)

        state: dict[str, Any] = {"step": 0, "cursor": 0}
        if checkpoint is not None:
            state = load_state(checkpoint)
            set_rng_state(state["rng"])
        self.version, self.cursor = int(state["step"]), int(state["cursor"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        # Sync mode: weights lag by at most the updates between broadcasts.
        bound = self.dist.max_staleness if self.dist.mode == "async" else self.dist.broadcast_every - 1
        if bound < self.dist.broadcast_every - 1:
            raise ValueError(f"distributed.max_staleness {bound} < broadcast_every - 1: actors would "
                             "never be admitted between broadcasts")
        self.gate = StalenessGate(bound, self.per_step)
        self.gate.dropped = int(state.get("dropped_stale", 0))
        transport = choose_transport(self.dist)
        print(f"[draftrl] Ray pipeline: {self.dist.num_learners} learner ranks (ZeRO-{self.dist.zero_stage}), "
              f"{self.dist.num_rollout_actors} rollout actors, {self.dist.placement} placement, "
              f"{self.dist.mode} mode, broadcast over {transport}", flush=True)
        layout: Layout = reserve(self.dist)
        self.learners: LearnerGroup | None = None
        self.pool: RolloutPool | None = None
        try:
            resume_dir = str(checkpoint / "deepspeed") if checkpoint is not None else None
            self.pool = RolloutPool(cfg, blueprint, layout.rollouts, self.faults)  # loads targets meanwhile
            learner_faults = {"nan_loss_at_version": self.faults.nan_loss_at_step, "rank": self.faults.nan_loss_rank}
            self.learners = LearnerGroup(cfg, blueprint, target_path, self._target_dtype(), layout.learners,
                                         resume_dir, learner_faults)
            if self.learners.version != self.version:
                raise RuntimeError(f"checkpoint says step {self.version}, DeepSpeed state says "
                                   f"{self.learners.version}")
            self.pool.wait_ready()
            transport = self._check_ipc(transport)
            self.sync = WeightSync(self.learners.rank0, self.pool.actors, transport, self.dist.collective_timeout_s)
            self.pool.restarts = int(state.get("actor_restarts", 0))
            self._record_push(self._first_push())
            result = self._loop(checkpoint is not None, evaluation)
        finally:
            for group in (self.learners, self.pool):
                for actor in getattr(group, "actors", []):
                    ray.kill(actor, no_restart=True)
            layout.release()
            if started_ray:
                ray.shutdown()
        return result

    def _check_ipc(self, transport: str) -> str:
        """cuda_ipc needs every rollout actor on learner rank 0's GPU; ``auto`` falls back."""
        if transport != "cuda_ipc":
            return transport
        mine = sorted(str(g) for g in self.learners.info[0]["gpus"])
        others = [sorted(str(g) for g in info["gpus"]) for info in self.pool.info]
        if mine and all(gpus == mine for gpus in others):
            return transport
        if self.dist.broadcast_backend == "cuda_ipc":
            raise ValueError(f"distributed.broadcast_backend cuda_ipc: learner rank 0 holds GPUs {mine}, the "
                             f"rollout actors {others}; CUDA IPC needs them on one GPU")
        print(f"[draftrl] rollout actors on GPUs {others}, learner rank 0 on {mine}: broadcast over the object "
              "store instead of CUDA IPC", flush=True)
        return "object_store"

    def _first_push(self) -> SyncReport:
        """The initial push; under ``broadcast_backend: auto`` a CUDA IPC failure falls back to the
        object store (said once, in the log and in the report's transport)."""
        try:
            return self.sync.push(self.version)
        except (BroadcastFailed, BroadcastMismatch, *ACTOR_ERRORS) as error:
            if self.sync.transport != "cuda_ipc" or self.dist.broadcast_backend == "cuda_ipc":
                raise
            print(f"[draftrl] CUDA IPC broadcast failed ({error!r}); using the object store", flush=True)
            self.sync.transport = "object_store"
            for index in self.pool.restarted():  # an actor that crashed opening the handle
                self.pool.info[index] = self.pool.wait_alive(index, self.dist.resource_wait_report_s)
            return self.sync.push(self.version)

    def _record_push(self, report: SyncReport) -> None:
        for index in range(len(self.pool.versions)):
            self.pool.versions[index] = report.version
        self._last_broadcast = report

    # -- rollouts -------------------------------------------------------------------------
    def _batch(self, index: int) -> dict[str, torch.Tensor]:
        return collate([self.train_data[i] for i in self.order.indices(index)], self.pad_id)

    def _submit(self, actor: int, batch_index: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        seed = self.config.seed * 1_000_003 + batch_index
        batch = self._batch(batch_index)
        self._submitted[batch_index] = time.time()
        return self.pool.actors[actor].make_experience.remote(batch, batch_index, seed)

    def _seen(self, meta: dict[str, Any], seen: float) -> dict[str, Any]:
        """Driver-side timing of an experience whose metadata the driver saw at ``seen`` (wall clock):
        the part after the actor's method returned (Ray storing the return values, telling the
        driver) and the whole latency from submission."""
        submitted = self._submitted.pop(meta["batch_index"], seen)
        if "finished_at" in meta:  # another node's clock may be a little off: never below 0
            meta["return_s"] = max(0.0, seen - float(meta["finished_at"]))
        meta["latency_s"] = max(0.0, seen - submitted)
        return meta

    def _recover(self, index: int) -> None:
        """A rollout actor died: wait for Ray to restart it, push it the current drafter, verify."""
        info = self.pool.wait_alive(index, self.dist.resource_wait_report_s)
        self.pool.info[index] = info
        self.pool.restarts += 1
        self.metrics.add("actor_restarts", 1)
        self.sync.invalidate()
        report = self.sync.push(self.version_on_rank0(), [index], transport="object_store")
        self.pool.versions[index] = report.version
        print(f"[draftrl] rollout actor {index} restarted (pid {info['pid']}); drafter version "
              f"{report.version} pushed and verified", flush=True)

    def version_on_rank0(self) -> int:
        return int(ray.get(self.learners.rank0.checksum.remote())[0])

    def _maybe_inject_kill(self) -> None:
        if self.faults.kill_learner_at_step == self.version and not getattr(self, "_killed_learner", False):
            self._killed_learner = True
            print(f"[draftrl] fault injection: killing learner rank {self.faults.kill_learner}", flush=True)
            ray.kill(self.learners.actors[self.faults.kill_learner], no_restart=True)
        if self.faults.kill_actor_at_step == self.version and not getattr(self, "_killed", False):
            self._killed = True
            print(f"[draftrl] fault injection: killing rollout actor {self.faults.kill_actor}", flush=True)
            ray.kill(self.pool.actors[self.faults.kill_actor], no_restart=False)

    # -- the loop -------------------------------------------------------------------------
    def _loop(self, resumed: bool, evaluation) -> DistributedResult:
        cfg, train_cfg = self.config, self.config.training
        self.log = MetricsLog(self.out, self.config.tracking, self.config.name, self.config.model_dump(mode="json"))
        self.metrics = PipelineMetrics(cfg.name)
        self.eval_samples = [evaluation[i] for i in range(min(len(evaluation), train_cfg.eval_batches
                                                              * min(train_cfg.batch_size, len(evaluation))))]
        self.stop_at = train_cfg.max_steps
        if self.steps_this_run is not None:
            self.stop_at = min(self.stop_at, self.version + self.steps_this_run)
        self.started, self.window, self.steps = time.time(), [], []
        # Learner busy fraction: time inside train_step over the wall time between updates.
        ray.get([actor.take_sync_seconds.remote() for actor in self.learners.actors])  # the first push's
        self._last_update = time.perf_counter()
        self.learner_busy_s, self.learner_wall_s = 0.0, 0.0
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.tokens_trained = 0
        if not resumed and self.version == 0:
            self._evaluate()
        if self.dist.mode == "sync":
            self._run_sync()
        else:
            self._run_async()
        self.log.close()
        drafter_dir = self.out / "drafter"
        ray.get(self.learners.rank0.save_drafter.remote(
            str(drafter_dir), "bfloat16",
            {"step": self.version, "target": cfg.target.model, "objective": train_cfg.objective,
             "verifier": verifier_id(cfg.target.model),
             "verifier_architectures": verifier_architectures(cfg.target.model)}))
        for fmt in cfg.drafter.export_formats:  # the same weights in other tools' layouts
            export_drafter(drafter_dir, self.out / f"drafter_{fmt}", fmt, speculative_tokens=train_cfg.ttt_steps)
        plot_curves(self.log.path, self.out / "curves.png", train_cfg.ttt_steps)
        result = DistributedResult(
            self.out, drafter_dir, self.version, self.train_metrics, self.eval_metrics,
            broadcasts=[asdict(r) for r in self.sync.reports], steps=self.steps,
            dropped_stale=self.gate.dropped, actor_restarts=self.pool.restarts,
            learner_busy=self.learner_busy_s / self.learner_wall_s if self.learner_wall_s else float("nan"))
        report = {k: v for k, v in asdict(result).items() if k not in ("output_dir", "drafter_dir")}
        (self.out / "distributed_report.json").write_text(json.dumps(report, indent=1, default=str))
        return result

    def _out_of_time(self) -> bool:
        return self.minutes_this_run is not None and time.time() - self.started > 60 * self.minutes_this_run

    def _run_sync(self) -> None:
        """Rollout -> train -> broadcast, each step's experiences made by the version it trains."""
        while self.version < self.stop_at:
            self._maybe_inject_kill()
            t0 = time.perf_counter()
            indices = list(range(self.cursor, self.cursor + self.per_step))
            ready = self._collect(indices)
            rate = sum(m["tokens"] for m, _ in ready) / max(time.perf_counter() - t0, 1e-9)
            self.cursor += self.per_step
            self._train(ready, rate, queue_depth=0)
            if self.version % self.dist.broadcast_every == 0 or self.version == self.stop_at:
                restarted = self.pool.restarted()
                for index in restarted:
                    self._recover(index)
                self._record_push(self.sync.push(self.version))
            self._after_step()

    def _collect(self, indices: list[int]) -> list[tuple[dict, ray.ObjectRef]]:
        """Experiences for ``indices`` (round robin over actors), re-submitting after a restart."""
        jobs: dict[ray.ObjectRef, tuple[int, int, ray.ObjectRef]] = {}
        for n, batch_index in enumerate(indices):
            actor = n % len(self.pool.actors)
            meta_ref, exp_ref = self._submit(actor, batch_index)
            jobs[meta_ref] = (actor, batch_index, exp_ref)
        done: dict[int, tuple[dict, ray.ObjectRef]] = {}
        while jobs:
            [ref], _ = ray.wait(list(jobs), num_returns=1)
            seen = time.time()
            actor, batch_index, exp_ref = jobs.pop(ref)
            try:
                done[batch_index] = (self._seen(ray.get(ref), seen), exp_ref)
            except RESTART_ERRORS:
                self._recover(actor)
                meta_ref, exp_ref = self._submit(actor, batch_index)
                jobs[meta_ref] = (actor, batch_index, exp_ref)
        return [done[i] for i in indices]

    def _train(self, ready: list[tuple[dict, ray.ObjectRef]], rollout_rate: float, queue_depth: int) -> None:
        """One learner update on ``per_step`` experiences; shard i goes to rank i."""
        metas = [meta for meta, _ in ready]
        results = self.learners.gather(self.learners.train_step(self._shards(ready), self.gate.max_staleness))
        self._finish_step(results, metas, rollout_rate, queue_depth)

    def _finish_step(self, results: list[dict], metas: list[dict], rollout_rate: float, queue_depth: int) -> None:
        """Book-keeping of one update: staleness record, metrics window, dashboard gauges."""
        trained_at = self.version
        self.version = results[0]["version"]
        # Ranks skip non-finite micro-batches together, so any rank's count is the group's.
        skipped = max(int(r.get("skipped_nonfinite", 0)) for r in results)
        if skipped:
            self.skipped_nonfinite += skipped
            limit = self.config.training.max_nonfinite
            print(f"[draftrl] update {self.version}: skipped {skipped} micro-batches with a non-finite loss "
                  f"({self.skipped_nonfinite} so far, at most training.max_nonfinite = {limit})", flush=True)
            if self.skipped_nonfinite > limit:
                raise FloatingPointError(
                    f"{self.skipped_nonfinite} non-finite losses, more than training.max_nonfinite = {limit}; "
                    "the run stops (resume from the last checkpoint after fixing the data or lowering training.lr)")
        versions = [v for r in results for v in r["experience_versions"]]
        self.gate.record(trained_at, versions)
        staleness = [trained_at - v for v in versions]
        self.steps.append({"learner_version": trained_at, "experience_versions": versions,
                           "batch_indices": [m["batch_index"] for m in metas]})
        keys = dict.fromkeys(key for r in results for key in r["metrics"])  # a rank that skipped all has none
        merged = {key: float(np.mean([r["metrics"][key] for r in results if key in r["metrics"]])) for key in keys}
        self.tokens_trained += sum(r["tokens"] for r in results)
        samples = sum(r["samples"] for r in results)
        step_s = max(r["seconds"] for r in results)
        now = time.perf_counter()
        interval, self._last_update = max(now - self._last_update, 1e-9), now
        self.learner_busy_s += step_s
        self.learner_wall_s += interval
        rollout_metrics = {k: float(np.mean([m[k] for m in metas if k in m]))
                           for k in ROLLOUT_SCALARS if any(k in m for m in metas)}
        last = self._last_broadcast
        merged.update(_breakdown(results, metas, interval))
        merged.update(
            staleness_mean=float(np.mean(staleness)), staleness_max=float(max(staleness)),
            dropped_stale=float(self.gate.dropped), queue_depth=float(queue_depth),
            rollout_tokens_per_s=rollout_rate, learner_samples_per_s=samples / max(step_s, 1e-9),
            learner_step_s=step_s,
            learner_busy=min(step_s / interval, 1.0), update_interval_s=interval,
            # the share of learner ranks that found this update's experiences prefetched
            learner_prefetched=float(np.mean([bool(r.get("prefetched")) for r in results])),
            broadcast_s=last.seconds, broadcast_bytes=float(last.bytes),
            broadcast_gb_s=last.bytes / 1e9 / max(last.seconds, 1e-9),
            broadcast_step_share=last.seconds / interval,
            experience_bytes=float(sum(m["bytes"] for m in metas)),
            experience_tokens=float(sum(m["tokens"] for m in metas)),
            skipped_nonfinite=float(self.skipped_nonfinite), **rollout_metrics,
            **_peak_memory(results, metas),
        )
        self.window.append(merged)
        self.metrics.set({
            "loss": merged.get("loss"), "tau": merged.get("tau", merged.get("accept_length_proxy")),
            "reward": merged.get("reward"), "top1_step1": merged.get("top1/step1"),
            "staleness_mean": merged["staleness_mean"], "staleness_max": merged["staleness_max"],
            "rollout_tokens_per_s": merged["rollout_tokens_per_s"],
            "learner_samples_per_s": merged["learner_samples_per_s"], "broadcast_seconds": last.seconds,
            "queue_depth": queue_depth, "drafter_version": self.version,
            "learner_busy": merged["learner_busy"], "broadcast_gb_s": merged["broadcast_gb_s"],
            **{key: merged[key] for key in BREAKDOWN},
            **{key: merged.get(key) for key in PEAK_MEMORY},
        })
        self.metrics.add("experiences", len(metas))

    def _evaluate(self) -> None:
        if not self.eval_samples:
            return
        self.eval_metrics = ray.get(self.pool.actors[0].evaluate.remote(self.eval_samples, self.pad_id))
        self.log.log(self.version, "eval", self.eval_metrics)

    def _after_step(self, in_flight: list[int] | None = None) -> None:
        """Logging, progress line, evaluation and checkpoints after update ``self.version``."""
        train_cfg, step = self.config.training, self.version
        if self._out_of_time():
            self.stop_at = step
        if step % train_cfg.log_every == 0 or step == self.stop_at:
            self.train_metrics = {k: float(np.mean([row[k] for row in self.window if k in row]))
                                  for k in dict.fromkeys(k for row in self.window for k in row)}
            self.train_metrics["tokens_per_s"] = self.tokens_trained / max(1e-9, time.time() - self.started)
            self.log.log(step, "train", self.train_metrics)
            self.window = []
            self._progress(self.train_metrics)
        if step % train_cfg.eval_every == 0 or step == self.stop_at:
            self._evaluate()
        if step % train_cfg.save_every == 0 or step == self.stop_at:
            self._save(in_flight or [])

    def _progress(self, m: dict[str, float]) -> None:
        tau = m.get("tau", m.get("accept_length_proxy", float("nan")))
        reward = f"reward {m['reward']:.3f} " if "reward" in m else ""  # GTO's tree reward
        print(
            f"[draftrl] step {self.version}/{self.config.training.max_steps} loss {m.get('loss', float('nan')):.4f} "
            f"{reward}tau {tau:.3f} staleness {m['staleness_mean']:.2f} (max {m['staleness_max']:.0f}) "
            f"dropped {self.gate.dropped} queue {m['queue_depth']:.0f} rollout {m['rollout_tokens_per_s']:.0f} tok/s "
            f"learner {m['learner_samples_per_s']:.1f} samples/s broadcast {m['broadcast_s'] * 1e3:.1f} ms "
            f"({m['broadcast_bytes'] / 1e6:.2f} MB) restarts {self.pool.restarts}",
            flush=True,
        )

    def _save(self, in_flight: list[int]) -> Path:
        """checkpoints/step_N: DeepSpeed state (all ranks), the drafter (fp32), the driver's state."""
        root = self.out / "checkpoints"
        final = root / f"step_{self.version:06d}"
        # Async: batches made but not trained yet are made again after a resume.
        cursor = min([self.cursor, *in_flight])
        with atomic_directory(final) as staging:
            self.learners.save(str(staging / "deepspeed"))
            ray.get(self.learners.rank0.save_drafter.remote(str(staging / "drafter"), "float32",
                                                            {"step": self.version}))
            torch.save({"step": self.version, "cursor": cursor, "rng": rng_state(),
                        "dropped_stale": self.gate.dropped, "actor_restarts": self.pool.restarts,
                        "skipped_nonfinite": self.skipped_nonfinite,
                        "drafter_version": self.version}, staging / STATE_FILE)
            write_manifest(staging)
        commit_checkpoint(root, final, self.config.training.keep_checkpoints)
        return final

    # -- async ----------------------------------------------------------------------------
    def _run_async(self) -> None:
        """Actors roll out continuously; admission keeps every experience within max_staleness."""
        ready: list[tuple[dict, ray.ObjectRef]] = []
        in_flight: dict[ray.ObjectRef, tuple[int, int, ray.ObjectRef]] = {}
        per_actor = [0] * len(self.pool.actors)
        redo: deque[int] = deque()
        training: tuple[list[ray.ObjectRef], list[dict]] | None = None
        prefetch_sent = False  # the next update's experiences were handed to the learners early
        push: PendingPush | None = None
        window_start, window_tokens = time.perf_counter(), 0

        def needed() -> int:  # experiences still to make for the remaining updates
            pending = len(ready) + len(in_flight) + (self.per_step if training else 0)
            return (self.stop_at - self.version) * self.per_step - pending

        while self.version < self.stop_at or training or push:
            if self.version < self.stop_at:
                self._maybe_inject_kill()
            for actor in range(len(self.pool.actors)):
                while (per_actor[actor] < self.dist.rollouts_in_flight_per_actor and needed() > 0
                       and self.gate.may_admit(self.version, training is not None,
                                               len(ready) + len(in_flight), self.pool.versions[actor])):
                    batch_index = redo.popleft() if redo else self._next_cursor()
                    meta_ref, exp_ref = self._submit(actor, batch_index)
                    in_flight[meta_ref] = (actor, batch_index, exp_ref)
                    per_actor[actor] += 1
            if training is None and self.version < self.stop_at:
                kept, dropped = self.gate.select(self.version, [m for m, _ in ready])
                if dropped:
                    self.metrics.add("dropped_stale", len(dropped))
                    stale = {id(m) for m in dropped}
                    ready = [(m, r) for m, r in ready if id(m) not in stale]
                if len(ready) >= self.per_step:
                    batch, ready = ready[: self.per_step], ready[self.per_step:]
                    refs = self.learners.train_step(self._shards(batch), self.gate.max_staleness)
                    training = (refs, [m for m, _ in batch])
                    prefetch_sent = False
            if training is not None and not prefetch_sent and self.dist.prefetch_experiences:
                # The batch the next update will take (the oldest still fresh at the next version):
                # the learners fetch and move it while this update trains.
                fresh = [(m, r) for m, r in ready if self.gate.fresh_enough(self.version + 1, m["version"])]
                if len(fresh) >= self.per_step:
                    self.learners.prefetch(self._shards(fresh[: self.per_step]))
                    prefetch_sent = True
            waiting = list(in_flight) + (training[0] if training else []) + (self.sync.refs(push) if push else [])
            if not waiting:
                raise RuntimeError(f"async pipeline stalled at version {self.version}: nothing in flight "
                                   f"(actor versions {self.pool.versions}, {len(ready)} ready)")
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            seen = time.time()
            done_set = set(done)
            for ref in [r for r in in_flight if r in done_set]:
                actor, batch_index, exp_ref = in_flight.pop(ref)
                per_actor[actor] -= 1
                try:
                    meta = self._seen(ray.get(ref), seen)
                except RESTART_ERRORS:
                    self._recover(actor)
                    redo.append(batch_index)
                    continue
                window_tokens += meta["tokens"]
                ready.append((meta, exp_ref))
            if training:
                for rank, ref in enumerate(training[0]):
                    if ref in done_set or _ready(ref):
                        self.learners.result(rank, ref)  # raises LearnerDied at once for a dead rank
            if training and all(r in done_set or _ready(r) for r in training[0]):
                refs, metas = training
                training = None
                # Rollout throughput: tokens made since the previous update over its wall time.
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_tokens = time.perf_counter(), 0
                self._finish_step(self.learners.gather(refs), metas, rate, len(ready))
                if self.version % self.dist.broadcast_every == 0 or self.version == self.stop_at:
                    if push is not None:
                        self._complete_push(push)
                    push = self.sync.start(self.version)
                self._after_step([b for _, b, _ in in_flight.values()] + [m["batch_index"] for m, _ in ready]
                                 + list(redo))
                if self.version >= self.stop_at:
                    in_flight.clear()  # experiences nobody will train on; the actors are killed at the end
            if push is not None and all(_ready(r) for r in self.sync.refs(push)):
                self._complete_push(push)
                push = None

    def _shards(self, batch: list[tuple[dict, ray.ObjectRef]]) -> list[list[ray.ObjectRef]]:
        """One update's experience refs split over the learner ranks, ``grad_accum`` each."""
        accum = self.config.training.grad_accum
        return [[ref for _, ref in batch[r * accum:(r + 1) * accum]] for r in range(self.dist.num_learners)]

    def _complete_push(self, push: PendingPush) -> None:
        try:
            report = self.sync.finish(push)
        except ACTOR_ERRORS:
            for index in self.pool.restarted():
                self._recover(index)
            report = self.sync.push(self.version)
        self._record_push(report)

    def _next_cursor(self) -> int:
        index = self.cursor
        self.cursor += 1
        return index


def _breakdown(results: list[dict], metas: list[dict], interval: float) -> dict[str, float]:
    """``BREAKDOWN`` of one update from the learner ranks' results, the experiences' metadata and
    the wall time since the previous update. The learner parts are the busiest rank's (train_step
    plus weight sync), so they add up to ``interval`` with ``learner_idle_s``."""
    busiest = max(results, key=lambda r: r["seconds"] + r.get("sync_seconds", 0.0))
    fetch, to_device = busiest.get("fetch_seconds", 0.0), busiest.get("to_device_seconds", 0.0)
    compute, sync = busiest.get("compute_seconds", 0.0), busiest.get("sync_seconds", 0.0)

    def mean(key: str, scale: float = 1.0) -> float:
        values = [float(m[key]) * scale for m in metas if key in m]
        return float(np.mean(values)) if values else float("nan")

    return {
        "rollout_build_s": mean("build_s"), "rollout_to_host_s": mean("to_host_s"),
        "rollout_return_s": mean("return_s"), "rollout_latency_s": mean("latency_s"),
        "rollout_experience_mb": mean("bytes", 1e-6),
        "learner_idle_s": interval - busiest["seconds"] - sync, "learner_fetch_s": fetch,
        "learner_to_device_s": to_device, "learner_compute_s": compute,
        "learner_other_s": busiest["seconds"] - fetch - to_device - compute, "learner_broadcast_s": sync,
        "update_interval_s": interval,
    }


def _peak_memory(results: list[dict], metas: list[dict]) -> dict[str, float]:
    """``PEAK_MEMORY`` of one update (keys absent where no process reported one)."""
    peaks = {"learner_peak_memory_gib": [r["peak_memory_gib"] for r in results if "peak_memory_gib" in r],
             "rollout_peak_memory_gib": [m["peak_memory_gib"] for m in metas if "peak_memory_gib" in m]}
    return {key: float(max(values)) for key, values in peaks.items() if values}


def _ready(ref: ray.ObjectRef) -> bool:
    done, _ = ray.wait([ref], timeout=0)
    return bool(done)


def run_distributed(config: ExperimentConfig, resume: bool = False, steps_this_run: int | None = None,
                    minutes_this_run: float | None = None, faults: Faults | None = None) -> DistributedResult:
    """Entry point of ``draftrl train`` when ``distributed.enabled``."""
    return DistributedTrainer(config, resume, steps_this_run, minutes_this_run, faults).run()
