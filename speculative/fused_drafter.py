"""The EAGLE-3 drafter's inference forward with fewer, larger kernels: what the static engine drafts with.

A draft tree runs the drafter once per level (5 times for EAGLE-3's tree), and once more to catch
up after verification. At batch 1 each call is a string of tiny kernels, so the count of kernels,
not the arithmetic, sets its time inside a CUDA graph. ``Eagle3Drafter.forward`` (the reference,
and what training runs) takes about 60 a call; this forward computes the same function with about
25, the way ``speculative.fused_llama`` does for the target:

* q/k/v in ONE matmul and gate/up in ONE matmul, over merged copies of the drafter's weights;
* RoPE from a table by position (one gather), applied to the whole q/k/v row with the sign of
  ``rotate_half`` folded into ``sin`` (identity on the v heads), so keys and values are written to
  the cache in one copy;
* grouped-query attention folded into the query rows (the g query heads sharing a key/value head
  become g x T rows of it): the cache holds the key/value heads only, not g copies of them, and a
  masked SDPA runs on its memory-efficient kernel in the drafter's dtype (it accumulates the
  softmax in fp32, as the reference's fp32 attention does);
* the residual adds fused into the output projections (``addmm``), RMSNorm as ``F.rms_norm``.

The weights are trained while this runs (RL rollouts draft with the current drafter), so the
merged copies are refreshed in place by ``sync_weights``: the static engine calls it before every
sequence, which keeps CUDA-graph addresses fixed and the copies never staler than one generation.
The arithmetic is ``Eagle3Drafter``'s up to rounding (tests compare the two, and the engine's
tokens with the target's greedy decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speculative.drafter import Eagle3Drafter
from speculative.fused_llama import FusedLlama, qkv_rope_factors, qkv_rope_table


class GroupedDraftCache:
    """Preallocated drafter keys/values ``[2, B, kv_heads, slots, d]`` with explicit slots.

    The layout of ``speculative.graphs.StaticDraftCache`` (context slots ``[0, context_len)``, the
    tree's scratch after them) without the g-fold copies of each key/value head. ``prepare`` takes
    the same ``(slots, mask)``; ``FusedDrafter`` reads the mask as an additive bias.
    """

    def __init__(self, batch: int, kv_heads: int, context_len: int, scratch_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.storage = torch.zeros(2, batch, kv_heads, context_len + scratch_len, head_dim, dtype=dtype,
                                   device=device)
        self.slots: int | torch.Tensor = 0
        self.mask: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.storage.shape[-2]

    def prepare(self, slots: int | torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        """Where the next call writes (first of T contiguous slots, or slots ``[T]``) and what it
        sees: ``mask [B, T, size]``, True = may attend (it must include the query's own slot), or
        already as ``FusedDrafter``'s additive bias ``[B, 1, groups * T, size]`` (0 / -inf, query rows
        group-major): a caller that keeps it in a buffer across calls saves the kernels that make it."""
        self.slots, self.mask, self.bias = slots, mask, bias

    def write(self, kv: torch.Tensor) -> None:
        """``kv [2, B, kv_heads, T, d]`` into the prepared slots, keys and values in one copy."""
        if isinstance(self.slots, int):
            self.storage[:, :, :, self.slots : self.slots + kv.shape[-2]] = kv
        else:
            self.storage.index_copy_(3, self.slots, kv)


class FusedDrafter(nn.Module):
    """``Eagle3Drafter``'s drafting call ``(ids, hidden, positions, cache) -> (logits, hidden)``
    over a ``GroupedDraftCache``, with merged projections (inference only)."""

    TABLE_ROPE_TYPES = FusedLlama.TABLE_ROPE_TYPES  # factors that depend on the position only

    def __init__(self, drafter: Eagle3Drafter, max_positions: int):
        super().__init__()
        config = drafter.config
        if config.sliding_window is not None:
            raise ValueError("a drafter trained with a sliding window drafts through Eagle3Drafter.forward, "
                             "which checks the positions against it")
        self.drafter = drafter
        self.config = config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = config.head_dim ** -0.5
        layer = drafter.midlayer
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            self.qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0).contiguous()
            self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).contiguous()
        self._sources = ((self.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (self.gate_up, (mlp.gate_proj, mlp.up_proj)))
        self.rope_table = self._build_rope_table(max_positions)

    # ------------------------------------------------------------------ weights and RoPE

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the drafter's current q/k/v and gate/up weights into the merged tensors, in place."""
        for merged, linears in self._sources:
            torch.cat([linear.weight for linear in linears], 0, out=merged)

    def _rope_direct(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``qkv_rope_factors`` of the drafter's rotary embedding at ``position_ids``."""
        cos, sin = self.drafter.rotary(like, position_ids)  # [B, T, d]
        return qkv_rope_factors(cos, sin, self.num_heads, self.num_kv_heads)

    @torch.no_grad()
    def _build_rope_table(self, positions: int) -> torch.Tensor | None:
        """``[P, 2 (cos, sin'), 2 (q/k heads, v heads), d]`` for positions ``0 .. P-1``: the two
        distinct rows of ``_rope_direct`` (None where the RoPE type rescales with the sequence
        length: then computed per call). ``_row_kind`` maps each q/k/v head to its row."""
        if getattr(self.drafter.rotary, "rope_type", "default") not in self.TABLE_ROPE_TYPES:
            return None
        weight = self.drafter.fc.weight
        like = torch.zeros(1, dtype=weight.dtype, device=weight.device)
        cos, sin = self._rope_direct(like, torch.arange(positions, device=weight.device)[None])
        table, self._row_kind = qkv_rope_table(cos, sin, self.num_heads, self.num_kv_heads)
        return table

    def _rope(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.rope_table
        if table is None:
            return self._rope_direct(like, position_ids)
        rows = table[position_ids[:, :, None], :, self._row_kind]  # [B, T, heads + 2 kv_heads, 2, d]
        return rows[..., 0, :], rows[..., 1, :]

    # ------------------------------------------------------------------ the drafting call

    def fuse_target_hidden(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        return self.drafter.fuse_target_hidden(aux_hidden)

    @property
    def draft_to_target(self) -> torch.Tensor:
        return self.drafter.draft_to_target

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.drafter.to_target_ids(draft_ids)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, cache: GroupedDraftCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step, as ``Eagle3Drafter.forward``: (draft-vocab logits, the next step's hidden)."""
        drafter, config, layer = self.drafter, self.config, self.drafter.midlayer
        batch, length = input_ids.shape
        heads, kv_heads, dim, groups = self.num_heads, self.num_kv_heads, self.head_dim, self.groups
        embeds = drafter.embed_tokens(input_ids).to(hidden.dtype)
        normed = F.rms_norm(hidden, (hidden.shape[-1],), layer.hidden_norm.weight, layer.hidden_norm.eps)
        x = torch.cat([F.rms_norm(embeds, (embeds.shape[-1],), layer.input_layernorm.weight,
                                  layer.input_layernorm.eps), normed], -1)
        qkv = F.linear(x, self.qkv).view(batch, length, heads + 2 * kv_heads, dim)
        cos, sin = self._rope(hidden, position_ids)
        qkv = torch.addcmul(qkv * cos, torch.roll(qkv, dim // 2, -1), sin)
        cache.write(qkv[:, :, heads:].view(batch, length, 2, kv_heads, dim).permute(2, 0, 3, 1, 4))
        # query rows of a kv head: (group member, token), group-major
        grouped = qkv[:, :, :heads].view(batch, length, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
        grouped = grouped.reshape(batch, kv_heads, groups * length, dim)
        bias = cache.bias
        if bias is None:
            mask = cache.mask
            span = mask.shape[-1]
            bias = torch.full(mask.shape, float("-inf"), dtype=qkv.dtype, device=qkv.device).masked_fill_(mask, 0.0)
            bias = bias[:, None, None].expand(batch, 1, groups, length, span).reshape(batch, 1, groups * length, span)
        out = F.scaled_dot_product_attention(grouped, cache.storage[0], cache.storage[1], attn_mask=bias,
                                             scale=self.scaling)
        out = out.view(batch, kv_heads, groups, length, dim).permute(0, 3, 1, 2, 4).reshape(batch * length, -1)
        base = normed if layer.norm_before_residual else hidden
        residual = torch.addmm(base.reshape(batch * length, -1), out, layer.self_attn.o_proj.weight.t())
        x = F.rms_norm(residual, (residual.shape[-1],), layer.post_attention_layernorm.weight,
                       layer.post_attention_layernorm.eps)
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        residual.addmm_(F.silu(gate) * up, layer.mlp.down_proj.weight.t())
        following = residual.view(batch, length, -1)
        normed_out = F.rms_norm(following, (following.shape[-1],), drafter.norm.weight, drafter.norm.eps)
        if config.norm_output:  # the next step reads the normalised stream
            return drafter.lm_head(normed_out), normed_out
        return drafter.lm_head(normed_out), following
