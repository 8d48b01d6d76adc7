"""A growing key/value cache with an explicit attention mask: the drafter at inference time.

Each call appends the new keys/values and lets the new queries see exactly the keys the caller
allows (causal prefill, a chain, or a draft tree). Cropping drops entries that verification
rejected.
"""

from __future__ import annotations

import math

import torch


class MaskedKVCache:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, heads, S, d]
        self.values: torch.Tensor | None = None
        self.next_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def set_mask(self, mask: torch.Tensor) -> None:
        """Mask for the next ``attend``: [B or 1, new, length + new], True = may attend."""
        self.next_mask = mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        mask = self.next_mask
        if mask is None:  # plain causal over what is cached
            new, total = q.shape[-2], self.length
            mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(total - new)[None]
        self.next_mask = None
        scores = torch.matmul(q.float(), self.keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), self.values.float()).to(q.dtype)

    def crop(self, length: int) -> None:
        if self.keys is not None:
            self.keys = self.keys[..., :length, :]
            self.values = self.values[..., :length, :]

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the cache entries at ``indices`` (e.g. the accepted path of a tree)."""
        if self.keys is not None:
            self.keys = self.keys.index_select(-2, indices)
            self.values = self.values.index_select(-2, indices)
