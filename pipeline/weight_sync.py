"""Driver side of the drafter broadcast: forms the group, pushes versions, verifies, re-syncs.

A push is issued without blocking (``start``) and completed later (``finish``), so the async
pipeline keeps rolling out while weights move; the sync pipeline calls ``push`` (both at once).
A restarted rollout actor gets the current drafter through the object store (it is always
there), and the collective group is formed again before its next use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from speculative.broadcast import BroadcastFailed, SyncReport, verify


@dataclass
class PendingPush:
    version: int
    transport: str
    started: float
    source: ray.ObjectRef
    actors: list[ray.ObjectRef]
    indices: list[int] = field(default_factory=list)
    source_checksum: ray.ObjectRef | None = None  # cuda_ipc: rank 0's (version, sha256), hashed meanwhile


class WeightSync:
    def __init__(self, rank0, actors: list, transport: str, timeout_s: float):
        self.rank0 = rank0
        self.actors = actors  # live list, shared with the rollout pool (restarts keep handles)
        self.transport = transport
        self.timeout_s = timeout_s
        self.group_formed = False
        self.reports: list[SyncReport] = []

    def form_group(self) -> None:
        """(Re)build the collective group: rank 0 of it is learner rank 0, then each actor."""
        if self.transport == "object_store":
            return
        address, port = ray.get(self.rank0.broadcast_rendezvous.remote())
        world = len(self.actors) + 1
        calls = [self.rank0.join_broadcast.remote(address, port, world, self.transport, self.timeout_s)]
        calls += [actor.join_broadcast.remote(address, port, i + 1, world, self.transport, self.timeout_s)
                  for i, actor in enumerate(self.actors)]
        ray.get(calls)
        self.group_formed = True

    def invalidate(self) -> None:
        """A member died: the next collective push forms a new group first."""
        self.group_formed = False

    def start(self, version: int, indices: list[int] | None = None, transport: str | None = None) -> PendingPush:
        transport = transport or self.transport
        indices = list(range(len(self.actors))) if indices is None else indices
        started = time.perf_counter()
        if transport == "object_store":
            info, tensors = self.rank0.weights.remote()
            calls = [self.actors[i].load_weights.remote(version, tensors) for i in indices]
            return PendingPush(version, transport, started, info, calls, indices)
        if transport == "cuda_ipc":  # each actor's call starts once rank 0 has published the handle
            source = self.rank0.ipc_weights.remote(version)
            digest = self.rank0.checksum.remote()  # runs on rank 0 after the publish, while actors copy
            calls = [self.actors[i].load_ipc.remote(version, source) for i in indices]
            return PendingPush(version, transport, started, source, calls, indices, digest)
        if not self.group_formed:
            self.form_group()
        source = self.rank0.broadcast.remote(version)
        calls = [self.actors[i].receive_broadcast.remote(version) for i in indices]
        return PendingPush(version, transport, started, source, calls, indices)

    def refs(self, pending: PendingPush) -> list[ray.ObjectRef]:
        extra = [pending.source_checksum] if pending.source_checksum is not None else []
        return [pending.source, *pending.actors, *extra]

    def finish(self, pending: PendingPush) -> SyncReport:
        """Wait for the push, then raise ``BroadcastMismatch`` unless every actor matches rank 0.

        A member whose call fails (an error, a collective timeout) raises ``BroadcastFailed`` at
        once, naming it: an actor must never be left running old weights without anyone knowing.
        """
        pending_refs = {ref: index for index, ref in zip(pending.indices, pending.actors)}
        pending_refs[pending.source] = -1
        if pending.source_checksum is not None:
            pending_refs[pending.source_checksum] = -2
        results: dict[int, dict] = {}
        while pending_refs:
            [ref], _ = ray.wait(list(pending_refs), num_returns=1)
            index = pending_refs.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                who = "learner rank 0 (sending)" if index < 0 else f"rollout actor {index} (receiving)"
                self.invalidate()
                raise BroadcastFailed(
                    f"drafter version {pending.version} over {pending.transport}: {who} failed: "
                    f"{error.cause!r}. The rollout actors may still hold an older drafter, so the run "
                    "stops; resume from the last checkpoint with --resume") from error
        source = results.pop(-1)
        if pending.source_checksum is not None:
            version, digest = results.pop(-2)
            if int(version) != pending.version:
                raise BroadcastFailed(f"drafter version {pending.version}: rank 0 hashed version {version}")
            source = {**source, "sha256": digest}
        results = [results[i] for i in pending.indices]
        wall = time.perf_counter() - pending.started
        if pending.transport == "object_store":
            seconds = wall
        elif pending.transport == "cuda_ipc":  # rank 0 fills its buffer, then the actors copy (in parallel)
            seconds = float(source["seconds"]) + max((float(r.get("seconds", 0.0)) for r in results), default=0.0)
        else:
            seconds = source.get("seconds", wall)
        report = SyncReport(pending.version, pending.transport, seconds, wall, int(source["bytes"]),
                            source["sha256"], [r["sha256"] for r in results])
        self.reports.append(report)
        return verify(report)

    def push(self, version: int, indices: list[int] | None = None, transport: str | None = None) -> SyncReport:
        return self.finish(self.start(version, indices, transport))
