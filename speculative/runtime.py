"""Run-time choices every process makes the same way: device, dtype, seeds, the LR schedule.

The single-process trainer, the rollout actors and the learner ranks all call these, so they
live in the core rather than in one of those callers.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(choice: str, setting: str = "training.device") -> torch.device:
    """``auto``: CUDA where a GPU is visible, else CPU. A CUDA choice without one is an error that
    names the setting it came from (a config field, a CLI flag)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{setting} is {choice!r} but no CUDA device is visible")
    return device


def auto_dtype(device: torch.device) -> torch.dtype:
    """What a model dtype of "auto" means (the target's, a drafting copy's): bf16 on CUDA, fp32
    elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far, GiB: the CUDA caching allocator's peak allocation on a
    GPU (what decides an out-of-memory), the process's peak resident set on CPU. The pipeline
    reports it per learner rank and rollout actor, so a larger chunking's headroom is visible."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def target_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``target.dtype`` (or ``--dtype``): a name of ``DTYPES``, or "auto" (``auto_dtype``)."""
    return auto_dtype(device) if choice == "auto" else DTYPES[choice]


def adamw_with_schedule(params, training) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The drafter's optimizer and LR schedule from ``training``: AdamW, warm-up then cosine."""
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay, betas=(0.9, 0.95))
    warmup = warmup_steps(training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, training.max_steps, training.min_lr_ratio)
    )
    return optimizer, scheduler


def warmup_steps(training) -> int:
    """``training.warmup_ratio`` of ``max_steps`` (rounded up) when set, else ``warmup_steps``."""
    ratio = getattr(training, "warmup_ratio", None)
    if ratio is None:
        return training.warmup_steps
    return math.ceil(ratio * training.max_steps)
