"""A compact Llama forward for the target, with a static KV cache and explicit attention masks.

Why not the Hugging Face forward: speculative decoding verifies a whole draft *tree* in one
forward, which needs (a) explicit position ids (siblings share a position), (b) an explicit
boolean mask over cache slots (a node sees the prefix and its ancestors only), and (c) a cache
whose entries can be moved after acceptance. A preallocated cache ``[B, kv_heads, max_len, d]``
per layer also keeps tensor shapes static, which is what CUDA graphs and ``torch.compile`` want
(gpt-fast style).

The layers' modules (projections, norms, MLP, rotary embedding, lm_head) are the Hugging Face
model's own, shared rather than copied, so every RoPE type, GQA, ``head_dim``, biases and tied
embeddings behave exactly as in ``transformers``. The forward also returns the EAGLE-3 aux hidden
states with ``TargetModel``'s convention: id ``L`` is the residual stream entering decoder layer
``L`` (``hidden_states[L]`` in Hugging Face terms), concatenated in ``aux_layer_ids`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Qwen2 is Llama's decoder with q/k/v biases (and, as an option no Qwen2.5 checkpoint turns on,
# sliding-window layers, refused below): the shared HF modules carry the biases, RoPE base and
# tied embeddings, so one forward serves both.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class StaticKVCache:
    """Preallocated keys/values ``[B, kv_heads, max_len, head_dim]`` per layer.

    Slots are addressed explicitly by the caller (``cache_slots`` in ``FastLlama.forward``), so
    the cache itself keeps no length: the engine owns the bookkeeping.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        # One tensor [2, layers, B, kv_heads, max_len, d]: the per-layer keys/values are views of
        # it, so compaction moves every layer's entries in one gather and one scatter (a handful
        # of kernels instead of 4 per layer: it runs after every verification).
        self.storage = torch.zeros(
            (2, num_layers, batch_size, num_kv_heads, max_len, head_dim), dtype=dtype, device=device
        )
        self.keys = list(self.storage[0].unbind(0))
        self.values = list(self.storage[1].unbind(0))
        self.batch_size = batch_size
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v ``[B, kv_heads, T, d]`` at ``slots[b, t]``, or at ``slots .. slots+T-1`` (int)."""
        if isinstance(slots, int):  # contiguous: a plain slice copy, no scatter
            self.keys[layer][:, :, slots : slots + k.shape[-2]] = k
            self.values[layer][:, :, slots : slots + k.shape[-2]] = v
            return
        if k.shape[0] == 1:  # one sequence: one index_copy_ kernel (the CUDA-graph decode path)
            self.keys[layer].index_copy_(2, slots.reshape(-1), k)
            self.values[layer].index_copy_(2, slots.reshape(-1), v)
            return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)
        self.values[layer][rows, :, slots] = v.transpose(1, 2)

    def compact(self, src_slots: torch.Tensor, dst_start: torch.Tensor | int) -> None:
        """Move entries ``src_slots [B, M]`` to the contiguous slots ``dst_start .. dst_start+M-1``.

        After a tree is verified, the accepted nodes sit at scattered slots behind the prefix;
        moving them right after it keeps the cache a contiguous prefix again.
        """
        compact_slots(self.storage, src_slots, dst_start)


def compact_slots(storage: torch.Tensor, src_slots: torch.Tensor, dst_start: torch.Tensor | int) -> None:
    """In a ``[2, layers, B, kv_heads, S, d]`` cache, move slots ``src_slots [B, M]`` to
    ``dst_start .. dst_start+M-1`` for every layer at once. Sources are gathered before writing,
    so overlapping ranges are safe."""
    batch, count = src_slots.shape
    if count == 0:
        return
    start = torch.as_tensor(dst_start, device=src_slots.device).reshape(-1, 1)
    dst = start + torch.arange(count, device=src_slots.device)[None]
    dst = dst.expand(batch, count)
    rows = torch.arange(batch, device=src_slots.device)[:, None]
    moved = storage[:, :, rows, :, src_slots]  # [B, M, 2, layers, kv_heads, d], a copy
    storage[:, :, rows, :, dst] = moved


@dataclass
class FastLlamaOutput:
    logits: torch.Tensor | None  # [B, T', V] (T' = rows asked for with ``logits_rows``, else T)
    aux_hidden: torch.Tensor | None  # [B, T, n_aux * H] (None where not asked for)
    hidden: torch.Tensor | None = None  # [B, T', H] final-norm output (the lm_head's input; T' as logits)


class FastLlama(nn.Module):
    """Llama forward over an explicit-slot static KV cache; shares the HF model's weights."""

    def __init__(self, hf_model: nn.Module, aux_layer_ids: tuple[int, ...]):
        super().__init__()
        config = hf_model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"FastLlama supports {SUPPORTED_MODEL_TYPES}, not {config.model_type!r}"
            )
        sliding = [i for i, kind in enumerate(getattr(config, "layer_types", None) or [])
                   if kind != "full_attention"]
        if sliding:
            raise NotImplementedError(
                f"{config.model_type} layers {sliding} use sliding-window attention "
                "(use_sliding_window), which the static-cache forward does not implement"
            )
        self.hf = hf_model.eval().requires_grad_(False)
        self.config = config
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = hf_model.lm_head
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.layers[0].self_attn.scaling
        self.aux_layer_ids = tuple(aux_layer_ids)
        bad = [i for i in self.aux_layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"aux_layer_ids {bad} out of range for {self.num_layers} layers")

    @classmethod
    def from_target(cls, target) -> FastLlama:
        """From a ``speculative.target.TargetModel`` (keeps its aux layer ids)."""
        return cls(target.model, target.aux_layer_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(
            self.num_layers, batch_size, self.num_kv_heads, max_len, self.head_dim,
            self.dtype, self.device,
        )

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: StaticKVCache,
        cache_slots: torch.Tensor | int,
        attn_mask: torch.Tensor,
        logits_rows: torch.Tensor | slice | None = None,
        apply_lm_head: bool = True,
        aux_hidden: bool = True,
    ) -> FastLlamaOutput:
        """Run ``input_ids [B, T]`` at ``position_ids [B, T]``, writing k/v to ``cache_slots``.

        ``cache_slots`` is ``[B, T]`` (per-sequence slots) or an int: the first of T contiguous
        slots, the same for every sequence (prefill, decode and tree chunks are all contiguous).

        ``attn_mask [B, T, S]`` (True = may attend) covers cache slots ``0 .. S-1``; it must
        include each token's own slot. Pass ``S = cache.max_len`` for fully static shapes, or
        the used length for less work. ``logits_rows [T']`` restricts the lm_head to some rows
        (e.g. only the last one after a prefill); ``apply_lm_head=False`` skips it and returns the
        final-norm hidden states instead, for callers that need logits at data-dependent rows
        (GTO's tree verification reads them only at nodes with children). ``aux_hidden=False``:
        ``aux_hidden`` is None (nothing concatenated).
        """
        batch, length = input_ids.shape
        span = attn_mask.shape[-1]
        if span > cache.max_len:
            raise ValueError(f"mask covers {span} slots, the cache has {cache.max_len}")
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(hidden, position_ids)
        # The boolean mask as an additive bias, once per forward: SDPA would convert it in every
        # layer (the same -inf/0 values), a few kernels each, and small models are launch-bound.
        mask = torch.zeros(attn_mask[:, None].shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill_(~attn_mask[:, None].to(torch.bool), float("-inf"))  # [B, 1, T, S]
        aux: list[torch.Tensor | None] = [None] * len(self.aux_layer_ids)
        for index, layer in enumerate(self.layers):
            for j, layer_id in enumerate(self.aux_layer_ids):
                if layer_id == index:
                    aux[j] = hidden
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.write(index, cache_slots, k, v)
            keys = cache.keys[index][:, :, :span]
            values = cache.values[index][:, :, :span]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        final = self.norm(hidden)
        aux_out = torch.cat(aux, dim=-1) if aux_hidden else None
        if not apply_lm_head:
            return FastLlamaOutput(logits=None, aux_hidden=aux_out, hidden=final)
        if logits_rows is not None:
            final = final[:, logits_rows]
        logits = self.lm_head(final)
        return FastLlamaOutput(logits=logits, aux_hidden=aux_out, hidden=final)


def causal_slot_mask(start: int, length: int, span: int, batch: int = 1,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Mask ``[B, length, span]`` for tokens at slots ``start..start+length-1`` over a prefix cache."""
    rows = torch.arange(length, device=device)[:, None] + start
    cols = torch.arange(span, device=device)[None]
    return (cols <= rows)[None].expand(batch, length, span)
