"""Placement groups for the two layouts, and a patient wait for the resources they need.

``colocated``: bundle i holds learner i and rollout actor i together (fractional GPUs of one
device: ``gpus_per_learner + gpus_per_rollout_actor <= 1``). ``separate``: one group of learner
bundles and one of rollout bundles, so each side owns its GPUs. A group that does not fit yet
is waited for with a periodic message (what is needed, what the cluster has), never failed,
so an autoscaler has time to add nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from speculative.distributed_config import DistributedConfig


@dataclass
class Layout:
    groups: list[PlacementGroup]
    learners: list[PlacementGroupSchedulingStrategy]  # one per rank
    rollouts: list[PlacementGroupSchedulingStrategy]  # one per rollout actor

    def release(self) -> None:
        for group in self.groups:
            remove_placement_group(group)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def bundles(dist: DistributedConfig) -> dict[str, list[dict[str, float]]]:
    """The bundles each placement group asks for, by group name."""
    n_learn, n_roll = dist.num_learners, dist.num_rollout_actors
    if dist.placement == "colocated":
        if dist.gpus_per_learner + dist.gpus_per_rollout_actor > 1.0 + 1e-9:
            raise ValueError("colocated: gpus_per_learner + gpus_per_rollout_actor must fit one GPU (<= 1)")
        shared = []
        for i in range(max(n_learn, n_roll)):
            members = (i < n_learn) + (i < n_roll)
            gpus = dist.gpus_per_learner * (i < n_learn) + dist.gpus_per_rollout_actor * (i < n_roll)
            shared.append(_bundle(dist.cpus_per_actor * members, gpus))
        return {"colocated": shared}
    return {
        "learners": [_bundle(dist.cpus_per_actor, dist.gpus_per_learner)] * n_learn,
        "rollouts": [_bundle(dist.cpus_per_actor, dist.gpus_per_rollout_actor)] * n_roll,
    }


class ResourcesUnavailable(RuntimeError):
    """The cluster did not provide the placement groups within ``resource_wait_timeout_s``."""


def wait_until_ready(group: PlacementGroup, name: str, needed: list[dict[str, float]], report_s: float,
                     timeout_s: float | None = None) -> None:
    """Block until ``group`` is placed, printing progress every ``report_s`` seconds (and giving up
    after ``timeout_s``, if set)."""
    started = time.time()
    while True:
        wait = report_s if timeout_s is None else max(0.0, min(report_s, timeout_s - (time.time() - started)))
        done, _ = ray.wait([group.ready()], timeout=wait)
        if done:
            return
        total: dict[str, float] = {}
        for bundle in needed:
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + value
        available = {k: v for k, v in ray.available_resources().items() if k in total}
        waited = time.time() - started
        if timeout_s is not None and waited >= timeout_s:
            cluster = {k: v for k, v in ray.cluster_resources().items() if k in total}
            raise ResourcesUnavailable(
                f"placement group '{name}' needs {len(needed)} bundles {needed}, {total} in all "
                f"(distributed.num_learners / num_rollout_actors x gpus_per_learner / gpus_per_rollout_actor / "
                f"cpus_per_actor); the cluster has {cluster} in all and {available} free after "
                f"{waited:.0f}s (distributed.resource_wait_timeout_s = {timeout_s:g})")
        print(
            f"[draftrl] waiting {waited:.0f}s for placement group '{name}': needs "
            f"{len(needed)} bundles, {total} in all; cluster has {available} free "
            f"(an autoscaler can add nodes; still waiting)",
            flush=True,
        )


def reserve(dist: DistributedConfig) -> Layout:
    """Create and wait for the placement groups; return where each actor goes."""
    wanted = bundles(dist)
    groups: dict[str, PlacementGroup] = {}
    for name, spec in wanted.items():
        groups[name] = placement_group(spec, strategy="PACK", name="")
    try:
        for name, group in groups.items():
            wait_until_ready(group, name, wanted[name], dist.resource_wait_report_s, dist.resource_wait_timeout_s)
    except BaseException:
        for group in groups.values():
            remove_placement_group(group)  # a pending request would hold the autoscaler's demand
        raise

    def strategy(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index,
                                                placement_group_capture_child_tasks=True)

    if dist.placement == "colocated":
        shared = groups["colocated"]
        learners = [strategy(shared, i) for i in range(dist.num_learners)]
        rollouts = [strategy(shared, i) for i in range(dist.num_rollout_actors)]
    else:
        learners = [strategy(groups["learners"], i) for i in range(dist.num_learners)]
        rollouts = [strategy(groups["rollouts"], i) for i in range(dist.num_rollout_actors)]
    return Layout(list(groups.values()), learners, rollouts)
