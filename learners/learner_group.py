"""The learner group: N Ray actors forming one torch.distributed group, each a DeepSpeed engine.

Rank 0 picks the rendezvous address (its node's IP and a free port) inside the placement group
and the driver hands it to the others. Each rank trains the drafter on its own shard of
experiences through ``learners.objectives.objective_loss`` (the same step function the
single-process trainer uses), ``engine.backward`` and ``engine.step``; DeepSpeed averages the
gradients (ZeRO stage from the config; bf16 on GPU, fp32 on CPU over gloo).

Rank 0 is also the source of every drafter broadcast to the rollout actors (``speculative.broadcast``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import ray
import torch

from speculative.broadcast import (
    BroadcastGroup,
    IpcSource,
    drafter_checksum,
    flat_array,
    free_port,
    named_tensors,
)
from speculative.drafter_blueprint import DrafterBlueprint, load_target_embedding
from speculative.experience import concat_experiences
from speculative.runtime import peak_memory_gib

CHECKPOINT_TAG = "state"


class LearnerDied(RuntimeError):
    """A learner rank's process is gone: the group's collectives cannot go on without it."""


class StaleExperience(RuntimeError):
    """An experience older than ``max_staleness`` versions reached a learner (the driver drops them)."""


def deepspeed_config(config, on_gpu: bool) -> dict[str, Any]:
    training = config.training
    return {
        # One micro-batch = experiences_per_micro_batch experiences merged (training.micro_batch_size).
        "train_micro_batch_size_per_gpu": training.micro_batch_size or training.batch_size,
        "gradient_accumulation_steps": training.micro_batches,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": config.distributed.zero_stage},
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    """One rank of the learner group (a Ray actor)."""

    def __init__(self, config_json: str, faults: dict | None = None):
        from speculative.config import ExperimentConfig
        from speculative.runtime import pick_device

        self.config = ExperimentConfig.model_validate_json(config_json)
        torch.set_num_threads(self.config.training.threads or 1)
        self.device = pick_device(self.config.training.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
        self.rank = -1
        self.version = 0
        self.engine = None
        self.faults = faults or {}  # injected faults (tests): {"nan_loss_at_version": v, "rank": r}
        self.group: BroadcastGroup | None = None
        self._retired: list[BroadcastGroup] = []
        self._ipc: IpcSource | None = None
        self._sync_seconds = 0.0  # in weight-sync calls since the last train_step (rank 0)
        self._prefetch_lock = threading.Lock()
        self._prefetched: _Prefetch | None = None  # the latest prefetch call's slot
        self._prefetch_stream = None  # the prefetch thread's CUDA stream, made at its first call

    # -- set-up ---------------------------------------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: where the others meet it (this node's IP, a port free on it now)."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, rank: int, world_size: int, address: str, port: int, blueprint: DrafterBlueprint,
              target_path: str, target_dtype: str, resume_dir: str | None) -> dict[str, Any]:
        import deepspeed

        from speculative.runtime import DTYPES, adamw_with_schedule

        self.rank = rank
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=address, MASTER_PORT=str(port))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "gloo":
            _skip_deepspeed_shm_comm()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size)
        embed = load_target_embedding(target_path, DTYPES[target_dtype])
        source = os.path.join(resume_dir, "..", "drafter") if resume_dir else None
        drafter = blueprint.build(embed, source=source).to(self.device)
        training = self.config.training
        params = drafter.trainable_parameters()
        optimizer, scheduler = adamw_with_schedule(params, training)
        self.engine, _, _, _ = deepspeed.initialize(
            model=drafter, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=params,
            config=deepspeed_config(self.config, self.device.type == "cuda"),
        )
        if resume_dir:
            path, client = self.engine.load_checkpoint(resume_dir, tag=CHECKPOINT_TAG)
            if path is None:
                raise FileNotFoundError(f"{resume_dir}: no DeepSpeed checkpoint '{CHECKPOINT_TAG}'")
            self.version = int(client["version"])
            torch.set_rng_state(client["rng"][rank]["torch"])
        return {"rank": rank, "version": self.version, "ip": ray.util.get_node_ip_address(),
                "gpus": ray.get_gpu_ids(), "zero_stage": self.engine.zero_optimization_stage()}

    @property
    def drafter(self):
        return self.engine.module

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss for this micro-batch is finite (one all-reduce of a flag)."""
        import torch.distributed as dist

        flag = torch.tensor([float(bool(torch.isfinite(loss)))], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    # -- training -------------------------------------------------------------------------
    def train_step(self, experience_refs: list[ray.ObjectRef], max_staleness: int) -> dict[str, Any]:
        """One optimizer step over this rank's ``grad_accum`` experiences (refs, fetched here)."""
        from learners.objectives import objective_loss

        start = time.perf_counter()
        prefetch = self._take_prefetch(experience_refs)
        experiences = prefetch.experiences if prefetch else ray.get(list(experience_refs))
        if len(experiences) != self.config.training.grad_accum:
            raise ValueError(f"rank {self.rank}: {len(experiences)} experiences for "
                             f"grad_accum {self.config.training.grad_accum}")
        versions = [int(e.drafter_version) for e in experiences]
        stale = [v for v in versions if self.version - v > max_staleness]
        if stale:
            raise StaleExperience(f"rank {self.rank} at version {self.version} got experiences of "
                                  f"versions {stale} (max_staleness {max_staleness})")
        self.drafter.train()
        rows: list[dict[str, float]] = []
        tokens = 0
        skipped = 0
        fetched = time.perf_counter() - start
        to_device = compute = 0.0  # seconds, synchronized at the edges on CUDA
        on_gpu = self.device.type == "cuda"
        micro_batches = self._micro_batches(experiences)
        for index, group in enumerate(micro_batches):
            mark = time.perf_counter()
            if prefetch:  # already on the device, made on the prefetch thread's stream
                experience = prefetch.batches[index]
                if on_gpu:
                    for tensor in _tensors(experience):  # the allocator: in use on this stream too
                        if tensor.is_cuda:
                            tensor.record_stream(torch.cuda.current_stream(self.device))
            else:
                # Merged on the device: each experience's tensors go from the object store straight
                # into their slice of the micro-batch (no per-experience device copy, pad and cat).
                experience = concat_experiences(group, self.device, non_blocking=on_gpu)
                if on_gpu:
                    torch.cuda.synchronize(self.device)
            moved = time.perf_counter()
            to_device += moved - mark
            loss, metrics = objective_loss(self.drafter, experience, self.config)
            if self.faults.get("nan_loss_at_version") == self.version and self.faults.get("rank", 0) == self.rank:
                loss = loss * float("nan")  # injected fault
            if not self._all_finite(loss):
                # Every rank drops this micro-batch together (a lone rank skipping its backward would
                # desynchronise the gradient collectives): a zero-gradient backward keeps them aligned.
                skipped += 1
                loss = sum((p * 0.0).sum() for p in self.drafter.trainable_parameters())
            else:
                rows.append(metrics)
                tokens += experience.num_tokens
            self.engine.backward(loss)
            self.engine.step()
            if on_gpu:
                torch.cuda.synchronize(self.device)
            compute += time.perf_counter() - moved
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"rank {self.rank} version {self.version}: gradient norm {grad_norm}")
        self.version += 1
        metrics = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows else {}
        metrics.update(grad_norm=grad_norm, lr=float(self.engine.get_lr()[0]))
        return {"rank": self.rank, "version": self.version, "experience_versions": versions,
                "skipped_nonfinite": skipped,
                "metrics": metrics, "tokens": tokens, "samples": sum(_rows(e) for e in experiences),
                "micro_batches": len(micro_batches), "fetch_seconds": fetched, "to_device_seconds": to_device,
                "prefetched": prefetch is not None,
                "compute_seconds": compute, "sync_seconds": self.take_sync_seconds(),
                "peak_memory_gib": peak_memory_gib(self.device), "seconds": time.perf_counter() - start}

    def _micro_batches(self, experiences: list) -> list[list]:
        per = self.config.training.experiences_per_micro_batch
        return [experiences[i:i + per] for i in range(0, len(experiences), per)]

    @ray.method(concurrency_group="prefetch")
    def prefetch(self, experience_refs: list[ray.ObjectRef]) -> float:
        """Fetch the next update's experiences and merge them onto the device while this rank
        trains the current one: this runs on the actor's "prefetch" thread, its copies on a CUDA
        stream of their own. A ``train_step`` given the same refs takes them instead of fetching
        (waiting for this call if it is still running); a later prefetch or a ``train_step`` of
        other refs drops them. Nothing here can fail a step: on an error ``train_step`` fetches."""
        slot = _Prefetch(_refs_key(experience_refs))
        with self._prefetch_lock:
            self._prefetched = slot
        start = time.perf_counter()
        on_gpu = self.device.type == "cuda"
        try:
            experiences = ray.get(list(experience_refs))
            if on_gpu and self._prefetch_stream is None:
                self._prefetch_stream = torch.cuda.Stream(self.device)
            stream = self._prefetch_stream
            with torch.cuda.stream(stream) if on_gpu else nullcontext():
                batches = [concat_experiences(group, self.device, non_blocking=on_gpu)
                           for group in self._micro_batches(experiences)]
            if on_gpu:
                stream.synchronize()  # complete before train_step reads them (and the host parts may go)
            slot.experiences, slot.batches = experiences, batches
        except Exception as error:  # noqa: BLE001 - the step fetches for itself
            slot.error = f"{type(error).__name__}: {error}"
        finally:
            slot.done.set()
        return time.perf_counter() - start

    def _take_prefetch(self, experience_refs: list[ray.ObjectRef]) -> _Prefetch | None:
        """The prefetched slot of exactly these refs (waiting for it to finish), else None; any
        other slot is dropped either way."""
        with self._prefetch_lock:
            slot, self._prefetched = self._prefetched, None
        if slot is None or slot.key != _refs_key(experience_refs):
            return None
        slot.done.wait()
        return None if slot.error else slot

    def take_sync_seconds(self) -> float:
        """Seconds this rank spent in weight-sync calls (broadcast, weights, ipc_weights, checksum)
        since the last ``train_step`` or the last call of this; the counter starts again at 0."""
        seconds, self._sync_seconds = self._sync_seconds, 0.0
        return seconds

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, directory: str, rng_states: list[dict]) -> int:
        """Every rank writes its ZeRO shard; ``rng_states`` are all ranks' (gathered by the driver)."""
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG,
                                    client_state={"version": self.version, "rng": rng_states})
        return self.version

    def rng(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def save_drafter(self, directory: str, dtype_name: str, metadata: dict[str, Any]) -> str:
        """Rank 0: the drafter in the EAGLE-3 layout vLLM/SGLang load."""
        from speculative.checkpoint import save_drafter

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        module = self.drafter
        if next(module.parameters()).dtype != torch.float32:  # bf16 engine: export fp32 masters' view
            module = _float_copy(module)
        return str(save_drafter(module, directory, dtype=dtype, metadata=metadata))

    # -- broadcast (rank 0) ---------------------------------------------------------------
    def broadcast_rendezvous(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def join_broadcast(self, address: str, port: int, world_size: int, backend: str, timeout_s: float) -> bool:
        if self.group is not None:
            self._retired.append(self.group)
        self.group = BroadcastGroup(address, port, 0, world_size, backend, timeout_s)
        return True

    def broadcast(self, version: int) -> dict[str, Any]:
        """Send the current drafter as ``version`` over the broadcast group."""
        if version != self.version:
            raise ValueError(f"asked to broadcast version {version}, rank 0 is at {self.version}")
        start = time.perf_counter()
        sent = self.group.send(named_tensors(self.drafter), version)
        seconds = time.perf_counter() - start
        digest = drafter_checksum(self.drafter)
        self._sync_seconds += time.perf_counter() - start
        return {"version": version, "bytes": sent, "seconds": seconds, "sha256": digest}

    @ray.method(num_returns=2)
    def weights(self) -> tuple[dict[str, Any], Any]:
        """(version/checksum/bytes, one flat numpy buffer): the object-store transport's payload."""
        start = time.perf_counter()
        payload = flat_array(named_tensors(self.drafter))
        seconds = time.perf_counter() - start
        digest = drafter_checksum(self.drafter)
        self._sync_seconds += time.perf_counter() - start  # Ray stores the payload after this
        return {"version": self.version, "sha256": digest, "bytes": int(payload.nbytes),
                "seconds": seconds}, payload

    def ipc_weights(self, version: int) -> dict[str, Any]:
        """The cuda_ipc transport: the drafter in a GPU buffer of this process and its IPC handle."""
        if version != self.version:
            raise ValueError(f"asked to publish version {version}, rank 0 is at {self.version}")
        start = time.perf_counter()
        if self._ipc is None:
            self._ipc = IpcSource()
        handle, size = self._ipc.publish(named_tensors(self.drafter))
        seconds = time.perf_counter() - start
        self._sync_seconds += seconds
        # The sha256 comes from a separate ``checksum`` call, hashed while the actors copy.
        return {"version": version, "bytes": size, "seconds": seconds, "handle": handle}

    def checksum(self) -> tuple[int, str]:
        start = time.perf_counter()
        digest = drafter_checksum(self.drafter)
        self._sync_seconds += time.perf_counter() - start
        return self.version, digest


@dataclasses.dataclass
class _Prefetch:
    """One prefetch call: which refs, and once ``done`` is set their experiences and device batches."""

    key: tuple[str, ...]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    experiences: list | None = None
    batches: list | None = None
    error: str | None = None


def _refs_key(refs: list[ray.ObjectRef]) -> tuple[str, ...]:
    return tuple(ref.hex() for ref in refs)


def _tensors(value):
    """Every tensor inside an experience (dataclasses, lists and tuples of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _rows(experience) -> int:
    """Sequences in an experience (its SFT part: itself, GTO's ``sft``, OPD's ``rollout``)."""
    if hasattr(experience, "gto"):  # gto_opd: the data batch both parts came from
        experience = experience.gto
    base = getattr(experience, "sft", None) or getattr(experience, "rollout", None) or experience
    return int(base.input_ids.shape[0])


def _float_copy(module):
    import copy

    return copy.deepcopy(module).float()


def learner_actor_class():
    return ray.remote(max_restarts=0, concurrency_groups={"prefetch": 1})(LearnerWorker)


class LearnerGroup:
    """Driver-side handle: creates the ranks in their bundles, wires the group, fans calls out."""

    def __init__(self, config, blueprint: DrafterBlueprint, target_path: str, target_dtype: str,
                 strategies: list, resume_dir: str | None, faults: dict | None = None):
        distributed = config.distributed
        cls = learner_actor_class()
        self.actors = [
            cls.options(num_cpus=distributed.cpus_per_actor, num_gpus=distributed.gpus_per_learner,
                        scheduling_strategy=strategy, name=None).remote(config.model_dump_json(), faults)
            for strategy in strategies
        ]
        address, port = ray.get(self.actors[0].rendezvous.remote())
        self.info = ray.get([
            actor.setup.remote(rank, len(self.actors), address, port, blueprint, target_path, target_dtype,
                               resume_dir)
            for rank, actor in enumerate(self.actors)
        ])
        self.version = self.info[0]["version"]

    @property
    def rank0(self):
        return self.actors[0]

    def train_step(self, shards: list[list[ray.ObjectRef]], max_staleness: int) -> list[ray.ObjectRef]:
        return [actor.train_step.remote(shard, max_staleness) for actor, shard in zip(self.actors, shards)]

    def prefetch(self, shards: list[list[ray.ObjectRef]]) -> list[ray.ObjectRef]:
        """``LearnerWorker.prefetch`` of the next update's shards on every rank (their results are
        the seconds each took; nobody needs to wait for them)."""
        return [actor.prefetch.remote(shard) for actor, shard in zip(self.actors, shards)]

    def gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """Results of one call per rank, failing at the first dead rank instead of waiting for the
        survivors, who would sit in a collective with it until ``collective_timeout_s``."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(done[0])
            results[rank] = self.result(rank, done[0])
        return [results[rank] for rank in range(len(refs))]

    def result(self, rank: int, ref: ray.ObjectRef) -> Any:
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            raise LearnerDied(
                f"learner rank {rank} died ({type(error).__name__}); the learner group cannot continue "
                "without it. Restart the job with --resume: it continues from the last checkpoint."
            ) from error

    def save(self, directory: str) -> None:
        rngs = ray.get([actor.rng.remote() for actor in self.actors])
        ray.get([actor.save.remote(directory, rngs) for actor in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def _skip_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce out of our gloo learners.

    DeepSpeed JIT-compiles that op on first use under a file lock in ~/.cache/torch_extensions: a
    learner killed mid-build (the fault tests kill learners) leaves the lock behind and every later
    learner waits on it forever, and its kernels depend on the CPU's vector ISA. Plain gloo is all
    the CPU path needs; marking the op incompatible makes DeepSpeed fall back to it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
