"""Pipeline scalars as ``ray.util.metrics`` gauges and counters, so the Ray dashboard (and the
cluster's Prometheus endpoint) shows them next to Ray's own: tau or its proxy, reward, losses,
staleness, rollout tokens/s, learner samples/s, broadcast seconds and bytes, queue depth, and where
each update's time went (rollout build / copy to host / return, learner idle / fetch / to device /
compute / broadcast), and the learners' and rollout actors' peak memory."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge

GAUGES = {
    "loss": "training loss (objective_loss), mean over ranks",
    "tau": "accepted length: measured (GTO/OPD rollouts) or the TTT proxy (SFT)",
    "reward": "GTO tree reward of the current drafter, mean",
    "top1_step1": "top-1 agreement with the target at draft step 1",
    "staleness_mean": "mean drafter-version lag of the experiences of the last step",
    "staleness_max": "largest drafter-version lag of the experiences of the last step",
    "rollout_tokens_per_s": "tokens scored by the rollout actors per second",
    "learner_samples_per_s": "sequences trained per second of learner step time",
    "broadcast_seconds": "seconds of the last drafter broadcast",
    "queue_depth": "experiences ready and waiting for the learners",
    "drafter_version": "learner updates so far",
    "learner_busy": "learner step time over the wall time between updates (last update)",
    "broadcast_gb_s": "GB/s of the last drafter broadcast's transfer",
    # where the last update's time went (pipeline.driver.BREAKDOWN)
    "rollout_build_s": "seconds a rollout actor spent making one experience (device work)",
    "rollout_to_host_s": "seconds a rollout actor spent copying one experience to the host",
    "rollout_return_s": "seconds from a rollout returning to the driver seeing it (Ray storing it)",
    "rollout_latency_s": "seconds from submitting a rollout to the driver seeing it",
    "rollout_experience_mb": "MB of tensor payload per experience",
    "learner_idle_s": "learner seconds outside train_step and weight sync in the last update interval",
    "learner_fetch_s": "learner seconds fetching the experiences (ray.get)",
    "learner_to_device_s": "learner seconds moving the experiences to its device",
    "learner_compute_s": "learner seconds in forward, backward and optimizer step",
    "learner_other_s": "learner seconds in the rest of train_step",
    "learner_broadcast_s": "learner seconds in weight-sync calls (publish/send, checksums)",
    "update_interval_s": "wall seconds between the last two learner updates",
    # pipeline.driver.PEAK_MEMORY
    "learner_peak_memory_gib": "largest learner rank's peak memory so far, GiB (CUDA allocator; CPU: peak RSS)",
    "rollout_peak_memory_gib": "largest rollout actor's peak memory so far, GiB (CUDA allocator; CPU: peak RSS)",
}
COUNTERS = {
    "experiences": "experiences made by rollout actors",
    "dropped_stale": "experiences dropped as older than max_staleness",
    "broadcast_bytes": "bytes of drafter weights broadcast",
    "actor_restarts": "rollout actors restarted and re-synced",
}


class PipelineMetrics:
    """One gauge/counter per scalar, tagged with the run name (``draftrl_<name>`` in Prometheus)."""

    def __init__(self, run: str):
        self.tags = {"run": run}
        self.gauges = {n: Gauge(f"draftrl_{n}", description=d, tag_keys=("run",)) for n, d in GAUGES.items()}
        self.counters = {n: Counter(f"draftrl_{n}", description=d, tag_keys=("run",)) for n, d in COUNTERS.items()}

    def set(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            if name in self.gauges and value is not None:
                self.gauges[name].set(float(value), tags=self.tags)

    def add(self, name: str, amount: float) -> None:
        if amount > 0:
            self.counters[name].inc(float(amount), tags=self.tags)
