"""Drafter parameters from learner rank 0 to every rollout actor, version-stamped and verified.

Transport by placement (``choose_transport``): a torch.distributed broadcast group of rank 0
plus the rollout actors (NCCL when both sides own GPUs of their own, gloo on CPU); CUDA IPC
where learner and actor share one GPU (NCCL refuses two ranks on one device): rank 0 flattens
the drafter into a persistent GPU buffer and hands out an IPC handle of it, and each actor
copies device-to-device from it; or the Ray object store (one flat numpy buffer, zero-copy in
the store), the fallback and the re-sync path of a restarted actor. The group is built stateless (its own TCPStore and ProcessGroup), so
it lives beside the learners' default DeepSpeed group instead of replacing it.

Every sync ends with a check: each actor hashes the weights it now runs (sha256 over the bytes
of every broadcast tensor, in name order) and the driver compares that with rank 0's hash.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import struct
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from speculative.distributed_config import DistributedConfig
from speculative.drafter import Eagle3Drafter, learned_parameters


class BroadcastMismatch(RuntimeError):
    """A rollout actor's drafter differs from learner rank 0's after a sync: never train on."""


class BroadcastFailed(RuntimeError):
    """A member of a drafter sync raised or timed out: some actor may still run old weights."""


def choose_transport(dist: DistributedConfig) -> str:
    """``nccl``, ``gloo`` or ``object_store`` for this layout (``broadcast_backend: auto``)."""
    if dist.broadcast_backend != "auto":
        return dist.broadcast_backend
    on_gpu = dist.gpus_per_learner > 0 and dist.gpus_per_rollout_actor > 0
    if not on_gpu:
        return "gloo"
    if dist.placement == "colocated":
        return "cuda_ipc"  # rank 0 and the actors share a GPU
    return "nccl"


class IpcSource:
    """Rank 0's end of the CUDA IPC transport: one persistent GPU buffer, refilled per version.

    The buffer outlives every handle given out (an actor copies out of it before the driver
    completes the push, and the next version is written only after that)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def publish(self, tensors: dict[str, torch.Tensor]) -> tuple[Any, int]:
        from torch.multiprocessing.reductions import reduce_tensor

        flat = flatten(tensors)
        if not flat.is_cuda:
            raise RuntimeError("cuda_ipc broadcast needs the learner's drafter on a GPU")
        if self.buffer is None or self.buffer.numel() != flat.numel():
            self.buffer = torch.empty_like(flat)
        self.buffer.copy_(flat)
        torch.cuda.synchronize(self.buffer.device)
        return reduce_tensor(self.buffer), int(flat.numel())


@torch.no_grad()
def receive_ipc(handle: Any, tensors: dict[str, torch.Tensor]) -> None:
    """An actor: open rank 0's buffer from its IPC handle and copy it into ``tensors``."""
    rebuild, args = handle
    source = rebuild(*args)
    device = next(iter(tensors.values())).device
    if source.device.index != device.index and device.type == "cuda":
        raise BroadcastMismatch(f"CUDA IPC buffer on {source.device}, replica on {device}")
    unflatten_into(source, tensors)
    torch.cuda.synchronize(source.device)
    del source


def flat_array(tensors: dict[str, torch.Tensor]):
    """The object-store payload: every tensor's bytes in one numpy uint8 array (Ray ships numpy
    without copying it through pickle)."""
    return flatten({n: t.detach().to("cpu") for n, t in tensors.items()}).numpy()


def learners_on_gpu(config) -> bool:
    """Whether the learner ranks train on GPUs (then DeepSpeed holds the drafter in bf16)."""
    return config.distributed.gpus_per_learner > 0 and config.training.device != "cpu"


def replica_dtype(config) -> torch.dtype:
    """The dtype rollout replicas hold the drafter in: the learners' own, so a broadcast moves
    raw bytes and the replica is bit-identical to rank 0 (not a rounded copy of it)."""
    return torch.bfloat16 if learners_on_gpu(config) else torch.float32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def named_tensors(drafter: Eagle3Drafter) -> dict[str, torch.Tensor]:
    """The tensors a sync moves, in name order: all but the target's frozen embedding."""
    return learned_parameters(drafter)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype and shape (in name order), then over a 128-bit
    fingerprint of all their raw bytes (``fingerprint``) computed where the tensors live.

    The check is that every replica holds rank 0's exact bytes after a broadcast. A sha256 of the
    bytes themselves had to bring them to the host and hash them on one CPU core: 0.08 s a push for
    a 47 MB drafter on an H200, on the learner and on every actor, 7 % of a Ray update. The
    fingerprint is two sums on the device and 24 bytes to the host; it changes with any changed,
    moved or missing byte (not a defence against someone forging weights, only against wrong ones)."""
    digest = hashlib.sha256()
    names = sorted(tensors)
    digest.update("".join(f"{n}:{tensors[n].dtype}:{tuple(tensors[n].shape)};" for n in names).encode())
    with torch.no_grad():
        flat = flatten({n: tensors[n] for n in names}) if names else torch.zeros(0, dtype=torch.uint8)
        digest.update(fingerprint(flat))
    return digest.hexdigest()


# (multiplier, offset) pairs of the fingerprint's two sums; both fit int64
_FINGERPRINT_KEYS = ((0x5851F42D4C957F2D, 0x14057B7EF767814F), (0x2545F4914F6CDD1D, 0x61C8864680B583EB))


def fingerprint(flat: torch.Tensor) -> bytes:
    """24 bytes: the byte count, then for each key (k, c) the sum over the little-endian 64-bit
    words w_i of ``flat`` (zero-padded to whole words) of w_i * ((i * k + c) | 1), mod 2^64.

    Odd multipliers make each term a bijection of its word, so a change to one word always
    changes both sums, and the position-dependent multipliers tell moved words apart. Integer
    sums mod 2^64 do not depend on the order of addition: the same value on any device."""
    size = flat.numel()
    pad = (-size) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int64)
    index = torch.arange(words.numel(), dtype=torch.int64, device=flat.device)
    sums = torch.stack([(words * ((index * k + c) | 1)).sum() for k, c in _FINGERPRINT_KEYS])
    return struct.pack("<Qqq", size, *sums.tolist())


def drafter_checksum(drafter: Eagle3Drafter) -> str:
    return checksum(named_tensors(drafter))


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors' bytes in one uint8 buffer (one collective instead of one per tensor)."""
    return torch.cat([tensors[n].detach().contiguous().view(torch.uint8).reshape(-1) for n in sorted(tensors)])


@torch.no_grad()
def unflatten_into(buffer: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    offset = 0
    for name in sorted(tensors):
        target = tensors[name]
        size = target.numel() * target.element_size()
        chunk = buffer[offset : offset + size].view(target.dtype).view(target.shape)
        target.copy_(chunk)
        offset += size
    if offset != buffer.numel():
        raise BroadcastMismatch(f"received {buffer.numel()} bytes, the drafter holds {offset}")


@torch.no_grad()
def load_named(drafter: Eagle3Drafter, state) -> None:
    """Copy an object-store state into a replica: ``flat_array``'s buffer, or a dict of CPU
    tensors in rank 0's dtype."""
    mine = named_tensors(drafter)
    if not isinstance(state, dict):
        device = next(iter(mine.values())).device
        with warnings.catch_warnings():  # a read-only object-store buffer, only read here
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(np.asarray(state))
        unflatten_into(flat.to(device), mine)
        return
    if mine.keys() != state.keys():
        raise BroadcastMismatch(f"weights for {sorted(state)} do not match the replica's {sorted(mine)}")
    for name, tensor in mine.items():
        tensor.copy_(state[name].to(tensor.device, tensor.dtype))


@dataclass
class SyncReport:
    version: int
    transport: str
    seconds: float  # the transfer (rank 0's send; for the object store, until every actor loaded)
    wall_seconds: float  # issue to verified, including waiting for rollouts in progress
    bytes: int
    source_sha256: str
    actor_sha256: list[str]


class BroadcastGroup:
    """One member's end of the stateless broadcast group (rank 0 = learner rank 0, sends)."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
        from torch.distributed import PrefixStore, TCPStore

        timeout = datetime.timedelta(seconds=timeout_s)
        store = TCPStore(address, port, world_size, rank == 0, timeout=timeout)
        store = PrefixStore("draftrl_broadcast", store)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device("cuda", torch.cuda.current_device())
            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = ProcessGroupNCCL(store, rank, world_size, options)
        elif backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            self.device = torch.device("cpu")
            self.group = ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            raise ValueError(f"no collective broadcast over {backend!r}")
        self._store = store  # rank 0 serves the store: keep it alive with the group

    def _broadcast(self, tensor: torch.Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()

    def send(self, tensors: dict[str, torch.Tensor], version: int) -> int:
        """Rank 0: header (version, bytes) then the flat payload. Returns bytes sent."""
        payload = flatten(tensors).to(self.device)
        header = torch.tensor([version, payload.numel()], dtype=torch.int64, device=self.device)
        self._broadcast(header)
        self._broadcast(payload)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return int(payload.numel())

    def receive(self, expected_version: int) -> torch.Tensor:
        """Actors: the flat payload of ``expected_version`` (raises on any other version)."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        version, size = (int(x) for x in header.tolist())
        payload = torch.empty(size, dtype=torch.uint8, device=self.device)
        self._broadcast(payload)
        if version != expected_version:
            raise BroadcastMismatch(f"expected drafter version {expected_version}, rank 0 sent {version}")
        return payload


def verify(report: SyncReport) -> SyncReport:
    """Raise ``BroadcastMismatch`` unless every actor now runs rank 0's exact weights."""
    bad = [i for i, sha in enumerate(report.actor_sha256) if sha != report.source_sha256]
    if bad:
        raise BroadcastMismatch(
            f"drafter version {report.version} over {report.transport}: rollout actors {bad} hold "
            f"weights {[report.actor_sha256[i][:12] for i in bad]}, learner rank 0 holds "
            f"{report.source_sha256[:12]}"
        )
    return report


def timed(start: float) -> float:
    return time.perf_counter() - start
