"""The draft vocabulary: the drafter predicts only the N most frequent target tokens.

vLLM's EAGLE-3 loader stores the mapping as an offset table: for draft id ``i`` the target id is
``i + d2t[i]`` (``compute_logits`` in ``llama_eagle3.py`` scatters draft logits to
``arange(N) + d2t``). ``t2d`` is a boolean mask over the target vocabulary (True where the token
is in the draft vocabulary); vLLM skips it, SGLang and EAGLE's own code read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class DraftVocab:
    """``draft_to_target[i]`` is the target id of draft id ``i``; ids are kept ascending."""

    draft_to_target: torch.Tensor  # int64 [N]
    target_vocab_size: int

    def __post_init__(self) -> None:
        ids = self.draft_to_target.to(torch.long)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("draft vocabulary must be a non-empty 1-D list of target ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.target_vocab_size:
            raise ValueError(
                f"draft vocabulary has target ids outside [0, {self.target_vocab_size})"
            )
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("draft vocabulary repeats a target id")
        self.draft_to_target = ids

    @property
    def size(self) -> int:
        return len(self.draft_to_target)

    @classmethod
    def full(cls, target_vocab_size: int) -> DraftVocab:
        return cls(torch.arange(target_vocab_size), target_vocab_size)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int) -> DraftVocab:
        """Keep the ``size`` most frequent tokens (ties and unseen tokens go to the lower id)."""
        vocab_size = len(counts)
        size = min(size, vocab_size)
        # Stable sort on -count keeps lower ids first among equal counts.
        order = torch.sort(-counts.to(torch.float64), stable=True).indices
        chosen = torch.sort(order[:size]).values
        return cls(chosen, vocab_size)

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, target_vocab_size: int) -> DraftVocab:
        d2t = d2t.to(torch.long)
        return cls(torch.arange(len(d2t)) + d2t, target_vocab_size)

    @property
    def d2t(self) -> torch.Tensor:
        """Offsets as vLLM reads them: target id = draft id + d2t[draft id]."""
        return self.draft_to_target - torch.arange(self.size)

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.target_vocab_size, dtype=torch.bool)
        mask[self.draft_to_target] = True
        return mask

    @property
    def target_to_draft(self) -> torch.Tensor:
        """Draft id of each target token, or -1 where the token is not in the draft vocabulary."""
        table = torch.full((self.target_vocab_size,), -1, dtype=torch.long)
        table[self.draft_to_target] = torch.arange(self.size)
        return table

    def coverage(self, counts: torch.Tensor) -> float:
        """Fraction of the counted (supervised) tokens the draft vocabulary can produce."""
        total = counts.sum()
        return float(counts[self.draft_to_target].sum() / total) if total > 0 else 0.0


def _load_tensor_file(path: Path, what: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix in (".pt", ".pth", ".bin"):
        return torch.load(path, map_location="cpu", weights_only=True)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    raise ValueError(f"{path}: {what} must be .pt (SpecForge), .npy (speculators) or .safetensors")


def load_vocab_mapping(path: str | Path, target_vocab_size: int, t2d_path: str | Path | None = None) -> DraftVocab:
    """An existing draft vocabulary: SpecForge's ``vocab_mapping_path`` (a ``.pt`` dict with ``d2t``
    and ``t2d``), speculators' ``d2t.npy`` (+ ``t2d.npy``), or a safetensors file with ``d2t``.

    Both tools store ``d2t`` as offsets (target id = draft id + d2t) and ``t2d`` as a boolean mask
    over the target vocabulary; the two must describe the same tokens, and fit the target.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary mapping not found: {path}")
    loaded = _load_tensor_file(path, "a vocabulary mapping")
    t2d = None
    if isinstance(loaded, dict):
        if "d2t" not in loaded:
            raise ValueError(f"{path}: field 'd2t' missing (has {sorted(loaded)})")
        d2t, t2d = loaded["d2t"], loaded.get("t2d")
    else:
        d2t = loaded
    if t2d_path is not None:
        t2d_file = Path(t2d_path).expanduser()
        if not t2d_file.is_file():
            raise FileNotFoundError(f"t2d mapping not found: {t2d_file}")
        t2d = _load_tensor_file(t2d_file, "a t2d mapping")
        t2d = t2d["t2d"] if isinstance(t2d, dict) else t2d
    d2t = torch.as_tensor(d2t)
    if d2t.ndim != 1 or d2t.is_floating_point() or d2t.dtype == torch.bool:
        raise ValueError(f"{path}: field 'd2t' must be a 1-D integer tensor, not {d2t.dtype} {tuple(d2t.shape)}")
    try:
        vocab = DraftVocab.from_d2t(d2t, target_vocab_size)
    except ValueError as error:
        raise ValueError(f"{path}: field 'd2t': {error} (is it for this target?)") from None
    if t2d is not None:
        t2d = torch.as_tensor(t2d).bool()
        if tuple(t2d.shape) != (target_vocab_size,):
            raise ValueError(f"{t2d_path or path}: field 't2d' has shape {tuple(t2d.shape)}, the target "
                             f"vocabulary has {target_vocab_size} tokens")
        if not torch.equal(t2d, vocab.t2d):
            raise ValueError(f"{t2d_path or path}: field 't2d' marks {int(t2d.sum())} tokens that differ from "
                             f"the {vocab.size} tokens d2t maps to")
    return vocab
