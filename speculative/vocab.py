"""The draft vocabulary: the drafter predicts only the N most frequent target tokens.

vLLM's EAGLE-3 loader stores the mapping as an offset table: for draft id ``i`` the target id is
``i + d2t[i]`` (``compute_logits`` in ``llama_eagle3.py`` scatters draft logits to
``arange(N) + d2t``). ``t2d`` is a boolean mask over the target vocabulary (True where the token
is in the draft vocabulary); vLLM skips it, SGLang and EAGLE's own code read it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
