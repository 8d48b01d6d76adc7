"""Bounded staleness for the asynchronous pipeline: admission control plus a hard drop.

Versions count learner updates. An experience made by drafter version ``v`` and trained on at
learner version ``V`` has staleness ``V - v``. Admission control holds a rollout back unless,
when its turn to be trained comes, the lag will be at most ``max_staleness``; anything that
still arrives too old (a slow actor, a restart) is dropped and counted, never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StalenessGate:
    max_staleness: int
    per_step: int  # experiences one learner update consumes (ranks x grad_accum)
    dropped: int = 0
    trained: list[int] = field(default_factory=list)  # staleness of every experience trained on

    def consume_version(self, learner_version: int, training: bool, queued: int) -> int:
        """Learner version that will train an experience with ``queued`` experiences ahead of it."""
        return learner_version + int(training) + queued // self.per_step

    def may_admit(self, learner_version: int, training: bool, queued: int, actor_version: int) -> bool:
        """Admit a rollout by an actor holding ``actor_version``, ``queued`` experiences ahead."""
        return self.consume_version(learner_version, training, queued) - actor_version <= self.max_staleness

    def fresh_enough(self, learner_version: int, experience_version: int) -> bool:
        return learner_version - experience_version <= self.max_staleness

    def select(self, learner_version: int, ready: list[dict]) -> tuple[list[dict], list[dict]]:
        """Split ready experience metadata into (kept, dropped) for a step at ``learner_version``."""
        kept = [m for m in ready if self.fresh_enough(learner_version, m["version"])]
        dropped = [m for m in ready if not self.fresh_enough(learner_version, m["version"])]
        self.dropped += len(dropped)
        return kept, dropped

    def record(self, learner_version: int, versions: list[int]) -> None:
        self.trained.extend(learner_version - v for v in versions)
