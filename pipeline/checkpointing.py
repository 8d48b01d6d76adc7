"""Training checkpoints: the drafter (EAGLE-3 layout, fp32) plus everything needed to resume.

``checkpoints/step_NNNNNN/`` holds ``drafter/`` and ``trainer_state.pt`` (optimizer, scheduler,
step, data cursor, RNG states). A checkpoint is written to a temporary directory and renamed,
and ``checkpoints/latest`` is updated last, so a crash mid-save leaves the previous one intact.
Every file's sha256 goes into ``MANIFEST.json``; a checkpoint is verified against it before use.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculative.checkpoint import save_drafter
from speculative.drafter import Eagle3Drafter
from speculative.files import atomic_directory, verify_manifest, write_manifest

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    drafter: Eagle3Drafter,
    state: dict[str, Any],
    keep: int,
    extra_drafters: dict[str, Eagle3Drafter] | None = None,
) -> Path:
    """``extra_drafters`` (e.g. GTO's frozen ``reference``) are saved next to ``drafter/``."""
    final = root / f"step_{step:06d}"
    with atomic_directory(final) as staging:
        save_drafter(drafter, staging / "drafter", dtype=torch.float32, metadata={"step": step})
        for name, extra in (extra_drafters or {}).items():
            save_drafter(extra, staging / name, dtype=torch.float32, metadata={"step": step, "role": name})
        torch.save({**state, "step": step, "rng": rng_state()}, staging / STATE_FILE)
        write_manifest(staging)
    commit_checkpoint(root, final, keep)
    return final


def commit_checkpoint(root: Path, final: Path, keep: int) -> None:
    """Point ``root/latest`` at ``final`` (atomically) and prune all but the newest ``keep``."""
    (root / "latest.tmp").write_text(final.name)
    (root / "latest.tmp").replace(root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def open_run(out: Path, resume: bool, config_text: str) -> Path | None:
    """Create ``out`` for a run and return the checkpoint to resume from (None: a fresh run).

    A fresh run never writes over an existing one: that needs ``--resume`` or another output_dir.
    """
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    if not resume and (out / "checkpoints" / "latest").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or pick another output_dir")
    (out / "config.yaml").write_text(config_text)
    return checkpoint


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete or missing")
    verify_manifest(path)  # before anything reads it
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
