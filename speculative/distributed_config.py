"""The ``distributed`` section: how the Ray pipeline lays out rollout actors and learners.

Kept apart from ``speculative.config`` so the pipeline's own settings evolve in one place.
``enabled: false`` (the default) runs the single-process trainer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DistributedConfig(Section):
    enabled: bool = Field(False, description="run on Ray (rollout actors + learner group)")
    address: str | None = Field(None, description="Ray address; None: the job's cluster or a local one")
    num_learners: int = Field(1, ge=1, description="ranks of the DeepSpeed learner group")
    num_rollout_actors: int = Field(1, ge=1)
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(
        2, ge=0,
        description="async: oldest drafter version lag trained on. At 1 and one experience an update, "
        "admission lets one rollout run while the learner trains, so the learner waits for it; at 2 "
        "(one H200, GTO at 32x16) the learner was busy 94 % and Ray made 1.08x the single process's "
        "updates/s, against 77 % and 0.94x at 1. Once the learner step got faster (2026-12-03) two actors at "
        "2 kept it busy 78 %; 3 gave 91 % at the same updates/s (1.01x, the GPU 97 % busy either way): on one "
        "GPU that share is a balance, not a speed, so 2 stays the default (bench/results/throughput_h200)")
    broadcast_every: int = Field(1, ge=1, description="learner updates between drafter broadcasts")
    placement: Literal["colocated", "separate"] = "colocated"
    gpus_per_learner: float = Field(0.0, ge=0.0)
    gpus_per_rollout_actor: float = Field(0.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    broadcast_backend: Literal["auto", "nccl", "gloo", "cuda_ipc", "object_store"] = Field(
        "auto", description="drafter broadcast: nccl (own GPUs), gloo (CPU), cuda_ipc (learner rank 0 and the "
        "actors on one GPU: actors copy from rank 0's GPU buffer through a CUDA IPC handle), object_store; "
        "auto picks nccl / gloo / cuda_ipc by placement (cuda_ipc falls back to object_store if the GPUs differ "
        "or the first push fails)"
    )
    zero_stage: Literal[0, 1, 2] = 1
    rollouts_in_flight_per_actor: int = Field(
        1, ge=1, description="async: rollout calls queued on one actor at a time"
    )
    prefetch_experiences: bool = Field(
        False, description="async: as soon as the next update's experiences are ready, each learner rank "
        "fetches them and merges them onto its device in a thread of its own (its own CUDA stream) while "
        "the current update trains, taking the copy (36 ms of a 0.73 s update, GTO 32 sequences) off the "
        "learner's critical path. Off by default: on one H200 shared with the rollout actors the learner's "
        "compute grew by as much (0.667 -> 0.704 s; 1.198 against 1.218 updates/s without) and its peak "
        "memory by 2 GiB; a learner on a GPU of its own (placement separate) is where it may pay, not "
        "measured yet"
    )
    max_actor_restarts: int = Field(3, ge=0, description="Ray max_restarts of rollout actors")
    resource_wait_report_s: float = Field(
        30.0, gt=0.0, description="period of the 'waiting for resources' message (never a failure)"
    )
    collective_timeout_s: float = Field(300.0, gt=0.0, description="torch.distributed op timeout")
    resource_wait_timeout_s: float | None = Field(
        None, gt=0.0, description="give up waiting for the placement groups after this long (None: wait "
        "for an autoscaler forever, with progress messages)"
    )
