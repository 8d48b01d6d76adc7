"""Training-only extra sources, mixed into the main source's training split.

Why: a drafter's labels are the target's own distributions, computed on whatever text it reads,
so any chat text teaches it; text the target wrote itself (``draftrl regenerate``) teaches it best,
but a GPU session regenerates only a few million tokens. Extra sources (e.g. the original answers
of the same prompts) add unique text at no generation cost, where the alternative is more epochs
over the same regenerated answers.

The held-out split stays the main source's alone, so the held-out metrics keep measuring the
distribution the drafter is served on, and stay comparable across runs with different extras.
An extra conversation whose prompt (every token before its first supervised one: the system
turn, the first user turn and the assistant header) equals a held-out conversation's is dropped,
so a held-out prompt is never trained on through another answer to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .cache import TokenizedDataset


def prompt_key(input_ids: np.ndarray, loss_mask: np.ndarray) -> bytes | None:
    """Digest of the tokens before the first supervised one; None if nothing is supervised."""
    supervised = np.flatnonzero(loss_mask)
    if len(supervised) == 0:
        return None
    prefix = np.ascontiguousarray(input_ids[: supervised[0]], dtype=np.int64)
    return hashlib.blake2b(prefix.tobytes(), digest_size=16).digest()


def _keys(dataset: TokenizedDataset) -> list[bytes | None]:
    return [prompt_key(item["input_ids"].numpy(), item["loss_mask"].numpy())
            for item in (dataset[i] for i in range(len(dataset)))]


def prompt_keys(dataset: TokenizedDataset) -> set[bytes]:
    return {key for key in _keys(dataset) if key is not None}


def without_prompts(dataset: TokenizedDataset, keys: set[bytes]) -> tuple[TokenizedDataset, int]:
    """(the samples whose prompt key is not in ``keys``, how many were dropped)."""
    if not keys:
        return dataset, 0
    keep = [i for i, key in enumerate(_keys(dataset)) if key not in keys]
    return dataset.subset(np.asarray(keep, dtype=np.int64)), len(dataset) - len(keep)


class TrainingMix(Dataset):
    """Several tokenised datasets read as one: index ``i`` runs through them in order.

    Items keep their own ``source_index`` (position in their own file); ``part_of`` says which
    dataset an index belongs to, for the statistics.
    """

    def __init__(self, parts: Sequence[TokenizedDataset], names: Sequence[str]):
        if len(parts) != len(names) or not parts:
            raise ValueError("a training mix needs one name per part and at least one part")
        self.parts = list(parts)
        self.names = list(names)
        self._ends = np.cumsum([len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def part_of(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a mix of {len(self)} samples")
        return int(np.searchsorted(self._ends, i, side="right"))

    def __getitem__(self, i: int) -> dict[str, Any]:
        part = self.part_of(i)
        start = 0 if part == 0 else int(self._ends[part - 1])
        return self.parts[part][i - start]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([part.lengths for part in self.parts])

    def supervised_token_counts(self, vocab_size: int):
        """The main part's counts only: the draft vocabulary ranks the tokens of the text the
        drafter is served on (the target's own answers), not those of the extra text."""
        return self.parts[0].supervised_token_counts(vocab_size)

    def summary(self) -> list[dict[str, Any]]:
        """Samples and tokens per part, with each part's share of the mix's tokens."""
        tokens = [int(part.lengths.sum()) for part in self.parts]
        total = max(sum(tokens), 1)
        return [{"source": name, "samples": len(part), "tokens": count, "token_share": round(count / total, 4)}
                for name, part, count in zip(self.names, self.parts, tokens)]


def mix_training_data(
    train: TokenizedDataset, held_out: TokenizedDataset | None, extras: Iterable[tuple[str, TokenizedDataset]],
    main_name: str,
) -> tuple[TrainingMix, dict[str, Any]]:
    """The main training split followed by each extra source (held-out prompts dropped)."""
    keys = prompt_keys(held_out) if held_out is not None else set()
    parts, names, dropped = [train], [main_name], {}
    for name, dataset in extras:
        kept, removed = without_prompts(dataset, keys)
        if len(kept) == 0:
            raise ValueError(f"data.extra_sources: {name} has no sample left after dropping the held-out "
                             f"prompts ({removed} dropped)")
        parts.append(kept)
        names.append(name)
        dropped[name] = removed
    mix = TrainingMix(parts, names)
    return mix, {"parts": mix.summary(), "dropped_held_out_prompts": dropped}
