"""The rollout actor: a Ray actor hosting the frozen target and a replica of the current drafter.

It wraps ``TargetWorker`` (the same class the single-process trainer calls) plus the drafter
replica (GTO trees and OPD rollouts are drawn from it) and, for GTO, the frozen reference
drafter. Two concurrency groups keep weight sync off the rollout path: ``rollout`` makes
experiences, ``sync`` receives weights into a staging buffer while a rollout runs, then swaps
them in between rollouts under a lock, so a rollout never sees half-updated weights.

Ray restarts a killed actor (``max_restarts``); ``__init__`` runs again and the driver pushes
the current drafter to it before it gets work.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from typing import Any

import ray
import torch

from actors.target_worker import TargetWorker
from speculative.broadcast import (
    BroadcastGroup,
    BroadcastMismatch,
    drafter_checksum,
    load_named,
    named_tensors,
    receive_ipc,
    replica_dtype,
    unflatten_into,
)
from speculative.drafter_blueprint import DrafterBlueprint
from speculative.evaluation import evaluate_ttt
from speculative.experience import CombinedExperience, uses_reference
from speculative.runtime import peak_memory_gib

ROLLOUT, SYNC = "rollout", "sync"


class NoWeightsYet(RuntimeError):
    """Asked for work before the driver pushed a drafter (e.g. just restarted by Ray)."""


def worker_threads(config) -> int:
    return config.training.threads or 1


def experience_summary(experience) -> dict[str, float]:
    """Objective scalars worth a dashboard gauge, taken where the experience is made."""
    if isinstance(experience, CombinedExperience):  # GTO's reward, the OPD rollout's tau
        return {**experience_summary(experience.gto), **experience_summary(experience.opd)}
    summary: dict[str, float] = {}
    reward = getattr(experience, "reward", None)
    if isinstance(reward, torch.Tensor) and reward.numel():
        summary["reward"] = float(reward.float().mean())
    expected = getattr(experience, "expected_length", None)
    if isinstance(expected, torch.Tensor) and expected.numel():
        summary["tau"] = float(expected.float().mean())
    forwards = getattr(experience, "target_forwards", 0)
    if forwards:
        summary["tau"] = float(experience.response_tokens) / float(forwards)
    report = getattr(experience, "engine_report", None) or {}  # opd.engine: vllm
    for key in ("acceptance_gap", "probe_max_abs_diff", "cut_sequences"):
        if key in report:
            summary[f"vllm_{key}"] = float(report[key])
    return summary


def _synchronize(device: torch.device) -> None:
    """Wait for this process's queued device work (timing edges; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RolloutActor:
    """Target + drafter replica on one GPU share (or CPU); see the module docstring."""

    def __init__(self, config_json: str, blueprint: DrafterBlueprint, index: int, faults: dict | None = None):
        from speculative.config import ExperimentConfig
        from speculative.runtime import pick_device, target_dtype
        from speculative.target import TargetModel

        self.config = ExperimentConfig.model_validate_json(config_json)
        torch.set_num_threads(worker_threads(self.config))
        self.index = index
        self.faults = faults or {}
        self.device = pick_device(self.config.training.device)
        dtype = target_dtype(self.config.target.dtype, self.device)
        self.target = TargetModel.load(
            self.config.target.model, blueprint.config.aux_layer_ids, dtype, self.device, self.config.cache_dir
        )
        self.drafter = blueprint.build(self.target.embed_tokens.weight).to(self.device, replica_dtype(self.config))
        self.drafter.eval()
        self.drafter.requires_grad_(False)
        self.reference = None
        if uses_reference(self.config.training.objective):  # the frozen reference: the run's initial drafter
            self.reference = copy.deepcopy(self.drafter).requires_grad_(False)
        self.worker = TargetWorker(self.target, self.drafter.draft_to_target)
        self.version = -1  # no weights from the learners yet
        self.lock = threading.Lock()
        self.group: BroadcastGroup | None = None
        self._retired: list[BroadcastGroup] = []
        self.pid = os.getpid()

    # -- bookkeeping ----------------------------------------------------------------------
    @ray.method(concurrency_group=SYNC)
    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "version": self.version,
                "ip": ray.util.get_node_ip_address(), "gpus": ray.get_gpu_ids()}

    @ray.method(concurrency_group=SYNC)
    def checksum(self) -> tuple[int, str]:
        with self.lock:
            return self.version, drafter_checksum(self.drafter)

    # -- weights --------------------------------------------------------------------------
    @ray.method(concurrency_group=SYNC)
    def join_broadcast(self, address: str, port: int, rank: int, world_size: int, backend: str,
                       timeout_s: float) -> bool:
        if self.group is not None:
            self._retired.append(self.group)  # a peer died: the old group is dead too
        self.group = BroadcastGroup(address, port, rank, world_size, backend, timeout_s)
        return True

    @ray.method(concurrency_group=SYNC)
    def receive_broadcast(self, version: int) -> dict[str, Any]:
        """Receive ``version`` over the collective group, swap it in, return the new checksum."""
        start = time.perf_counter()
        if self.faults.get("fail_receive_at_version") == version and self.faults.get("actor", 0) == self.index:
            raise RuntimeError(f"injected fault: rollout actor {self.index} drops out of the version {version} sync")
        payload = self.group.receive(version)
        received = time.perf_counter() - start
        with self.lock:  # waits for the rollout in progress, if any
            unflatten_into(payload.to(self.device), named_tensors(self.drafter))
            return self._installed(version, received)

    @ray.method(concurrency_group=SYNC)
    def load_ipc(self, version: int, source: dict[str, Any]) -> dict[str, Any]:
        """The cuda_ipc path: copy rank 0's published GPU buffer (``source`` is its
        ``ipc_weights`` answer, resolved by Ray) into the replica."""
        if source["version"] != version:
            raise BroadcastMismatch(f"expected drafter version {version}, rank 0 published {source['version']}")
        with self.lock:  # waits for the rollout in progress, if any
            start = time.perf_counter()
            receive_ipc(source["handle"], named_tensors(self.drafter))
            return self._installed(version, time.perf_counter() - start)

    @ray.method(concurrency_group=SYNC)
    def load_weights(self, version: int, state) -> dict[str, Any]:
        """The object-store path (fallback transport, and the re-push after a restart)."""
        with self.lock:
            load_named(self.drafter, state)
            return self._installed(version, 0.0)

    def _installed(self, version: int, seconds: float) -> dict[str, Any]:
        self.version = version
        refresh = self.config.gto.reference_refresh_every
        if self.reference is not None and refresh and version % refresh == 0:
            self.reference.load_state_dict(self.drafter.state_dict())
        if self.faults.get("corrupt_at_version") == version and self.faults.get("actor", 0) == self.index:
            with torch.no_grad():  # injected fault: a transfer that went wrong
                self.drafter.fc.weight.view(-1)[0] += 1e-3
        return {"index": self.index, "version": version, "sha256": drafter_checksum(self.drafter),
                "seconds": seconds}

    # -- work -----------------------------------------------------------------------------
    @ray.method(concurrency_group=ROLLOUT, num_returns=2)
    def make_experience(self, batch: dict[str, torch.Tensor], batch_index: int, seed: int):
        """(metadata, experience): the driver reads the small metadata, the learner the rest.

        The metadata times its parts: ``build_s`` making the experience
        (device work, synchronized at its edges on CUDA), ``to_host_s`` copying it to the host, and
        ``finished_at`` (wall clock) when the body ends: Ray stores the return values after that,
        and the driver measures that part as the time until it sees them."""
        with self.lock:
            if self.version < 0:
                raise NoWeightsYet(f"rollout actor {self.index} has no drafter weights yet")
            _synchronize(self.device)
            start = time.perf_counter()
            experience = self.worker.make_experience(
                self.config, batch, self.drafter, self.reference, self.version, seed, shipping=True
            )
            _synchronize(self.device)
            built = time.perf_counter()
            # only the logit rows the losses read, then to the host: CUDA tensors do not travel
            # through the object store (the learner's concat_experiences restores the rows)
            experience = experience.packed().to_host()
            seconds = time.perf_counter() - start
        meta = {"actor": self.index, "batch_index": batch_index, "version": experience.drafter_version,
                "tokens": experience.num_tokens, "bytes": experience.nbytes(), "seconds": seconds,
                "build_s": built - start, "to_host_s": seconds - (built - start),
                "peak_memory_gib": peak_memory_gib(self.device),
                **experience_summary(experience)}
        meta["finished_at"] = time.time()
        return meta, experience

    @ray.method(concurrency_group=ROLLOUT)
    def evaluate(self, samples: list[dict[str, Any]], pad_id: int) -> dict[str, float]:
        """Held-out TTT metrics of the replica, exactly as the single-process trainer computes them."""
        with self.lock:
            metrics = evaluate_ttt(self.drafter, self.worker, samples, pad_id, self.config.training)
            return {**metrics, "drafter_version": float(self.version)}


def rollout_actor_class(max_restarts: int):
    """``RolloutActor`` as a Ray actor class: one thread per concurrency group, restartable."""
    return ray.remote(
        concurrency_groups={ROLLOUT: 1, SYNC: 1}, max_restarts=max_restarts, max_task_retries=0
    )(RolloutActor)

