"""The target's Llama forward with fewer, larger kernels: what the batched engine's step graphs run.

A CUDA graph removes launch overhead, not kernel count: a decode step of a small model is a
long string of tiny kernels, each costing a few microseconds however little it computes.
``FastLlama`` (the reference) runs the Hugging Face modules one by one, about 40 kernels a
layer (more where SDPA falls back to its math path). This forward computes the same function
with about half as many:

* q/k/v in ONE matmul and gate/up in ONE matmul (merged copies of the frozen weights);
* RoPE on the q/k/v row at once (identity on v), with the sign of ``rotate_half`` folded into
  ``sin``, so keys and values go to the cache in one indexed copy (``BatchKVCache`` keeps both);
  its factors come from a table by position (one gather a forward, not a dozen kernels);
* grouped-query attention folded into the query length: the g query heads that share a
  key/value head become g x T query rows of that head, so SDPA runs without expanding the
  cache g times and, with a mask, on its memory-efficient kernel instead of the math path.
* the residual adds fused into the output projections (``addmm_``, in place: an out-of-place
  ``addmm`` first copies the residual, one more kernel), RMSNorm as ``F.rms_norm`` (one kernel
  on GPU). Under ``torch.compile`` the adds are left to Inductor, which fuses each into the
  next RMSNorm;
* a decode step's attention mask built once and broadcast over heads and query rows.

At batch 1 a decode step is then about 13 kernels a layer (RMSNorm, q/k/v GEMM, 3 for RoPE,
the cache write, SDPA, o_proj, RMSNorm, gate/up GEMM, SiLU, product, down_proj); Inductor
(``compile="inductor"`` in the engine) fuses the pointwise ones, about 9 a layer.

Prefills (an empty cache, right-padded prompts) attend causally within the chunk instead of
through a mask: padding sits after every real token, so a causal mask never shows it to a real
query, and SDPA can use its flash kernel.

The arithmetic is the Hugging Face model's up to rounding (tests compare it with ``FastLlama``
and with the target's own greedy decoding). The merged weights are copies: the target is frozen,
so they never go stale, and they cost one more copy of the layer weights, made once per model,
device and dtype and shared by every ``FusedLlama`` over it (the tree engine, the AR baseline's
batched engine and GTO's verification hold one copy between them, not one each: for an 8B
target that is about 13 GB in bf16).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from speculative import decode_attention_kernel
from speculative import rope_kernel as rope_kernel_module
from speculative import silu_mul_kernel
from speculative.batch_cache import BatchKVCache
from speculative.llama import FastLlama, FastLlamaOutput


def qkv_rope_factors(cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin' ``[B, T, heads + 2 kv_heads, d]`` for RoPE over a whole merged q/k/v row, from
    a rotary embedding's cos, sin ``[B, T, d]``: its factors on the q and k heads, identity on the
    v heads (cos 1, sin 0), so the k/v heads of the result go to a cache as they are, in one copy.
    ``rotate_half(x) * sin == roll(x, d/2) * sin'`` with the sign folded into sin'."""
    batch, length, dim = cos.shape
    half, rotated = dim // 2, heads + kv_heads
    sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
    cos = torch.cat([cos[:, :, None].expand(batch, length, rotated, dim),
                     torch.ones_like(cos)[:, :, None].expand(batch, length, kv_heads, dim)], 2)
    sin = torch.cat([sin[:, :, None].expand(batch, length, rotated, dim),
                     torch.zeros_like(sin)[:, :, None].expand(batch, length, kv_heads, dim)], 2)
    return cos, sin


def qkv_rope_table(cos: torch.Tensor, sin: torch.Tensor, heads: int,
                   kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table ``[P, 2 (cos, sin'), 2 (q/k heads, v heads), d]``, row kind ``[heads + 2 kv_heads]``)
    from ``qkv_rope_factors`` at positions ``0 .. P-1`` (``cos``/``sin`` ``[1, P, rows, d]``): its two
    distinct rows per position, and which of them each q/k/v head reads."""
    table = torch.stack([torch.stack([cos[0, :, 0], cos[0, :, -1]], 1),
                         torch.stack([sin[0, :, 0], sin[0, :, -1]], 1)], 1)
    return table, torch.tensor([0] * (heads + kv_heads) + [1] * kv_heads, device=cos.device)


class MergedProjections:
    """Per layer, (weight, bias) of q/k/v merged and of gate/up merged."""

    def __init__(self, fast: FastLlama):
        with torch.no_grad():
            self.qkv = [FusedLlama._merged(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                        for layer in fast.layers]
            self.gate_up = [FusedLlama._merged(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in fast.layers]


# target layers -> {(device, dtype): the merged copy}, held weakly: it lives as long as a FusedLlama uses it
_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def merged_projections(fast: FastLlama) -> MergedProjections:
    """The merged projections of ``fast``'s layers on their current device and dtype: built once
    and shared by every ``FusedLlama`` alive over them (the layers are frozen), freed with the last."""
    per_model = _MERGED.setdefault(fast.layers, {})
    key = (fast.device, fast.dtype)
    merged = per_model[key]() if key in per_model else None
    if merged is None:
        merged = MergedProjections(fast)
        per_model[key] = weakref.ref(merged)
    return merged


class FusedLlama(nn.Module):
    """``FastLlama``'s function (same aux-hidden convention) with merged projections."""

    def __init__(self, fast: FastLlama):
        super().__init__()
        self.fast = fast
        self.num_layers, self.head_dim = fast.num_layers, fast.head_dim
        self.num_heads, self.num_kv_heads = fast.num_heads, fast.num_kv_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = fast.scaling
        self.aux_layer_ids = fast.aux_layer_ids
        self.norm_eps = [
            (layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
            for layer in fast.layers
        ]
        self.final_eps = fast.norm.variance_epsilon
        self._merged_copy = merged_projections(fast)  # held here: the shared copy lives while we do
        self.qkv, self.gate_up = self._merged_copy.qkv, self._merged_copy.gate_up
        # RoPE factors by position, built by ``new_cache`` (``_rope_rows``); None: computed per forward
        self.rope_table: torch.Tensor | None = None
        self._row_kind: torch.Tensor | None = None
        self.rope_kernel: bool | None = None  # None: ``speculative.rope_kernel`` where it is wanted
        # None: ``speculative.decode_attention_kernel`` where it is wanted (``resolve_kernels``)
        self.decode_kernel: bool | None = None
        # None: ``speculative.silu_mul_kernel`` where it is wanted (a SiLU MLP only, as Llama's)
        self.silu_kernel: bool | None = None
        self._silu_mlp = getattr(fast.config, "hidden_act", "silu") == "silu"

    @staticmethod
    def _merged(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([linear.weight for linear in linears], 0).contiguous()
        biases = [linear.bias for linear in linears]
        if all(b is None for b in biases):
            return weight, None
        return weight, torch.cat([b if b is not None else torch.zeros(l.out_features, dtype=weight.dtype,
                                                                      device=weight.device)
                                  for b, l in zip(biases, linears)])

    @property
    def dtype(self) -> torch.dtype:
        return self.fast.dtype

    @property
    def device(self) -> torch.device:
        return self.fast.device

    @property
    def config(self):
        return self.fast.config

    @property
    def lm_head(self) -> nn.Module:
        return self.fast.lm_head

    def new_cache(self, batch_size: int, max_len: int) -> BatchKVCache:
        """A cache of ``max_len`` slots; also makes the RoPE table cover positions ``0 .. max_len-1``."""
        fast = self.fast
        self._build_rope_table(max_len)
        return BatchKVCache.empty(fast.num_layers, batch_size, fast.num_kv_heads, max_len, fast.head_dim,
                                  fast.dtype, fast.device)

    # RoPE types whose factors at a position depend on that position only (``dynamic`` and
    # ``longrope`` rescale by the longest sequence seen): those can come from a table
    TABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

    def _rope_direct(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``qkv_rope_factors`` of the target's rotary embedding at ``position_ids``."""
        cos, sin = self.fast.rotary_emb(like, position_ids)  # [B, T, d]
        return qkv_rope_factors(cos, sin, self.num_heads, self.num_kv_heads)

    @torch.no_grad()
    def _build_rope_table(self, positions: int) -> None:
        """``rope_table [P, 2 (cos, sin'), 2 (q/k heads, v heads), d]``: ``_rope_direct``'s values
        (the same elementwise arithmetic, so the same numbers) for positions ``0 .. P-1``, so a
        forward gathers them in one kernel instead of about a dozen."""
        if getattr(self.fast.rotary_emb, "rope_type", "default") not in self.TABLE_ROPE_TYPES:
            return
        if self.rope_table is not None and self.rope_table.shape[0] >= positions:
            return
        like = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self._rope_direct(like, torch.arange(positions, device=self.device)[None])  # [1, P, rows, d]
        self.rope_table, self._row_kind = qkv_rope_table(cos, sin, self.num_heads, self.num_kv_heads)

    def _rope_rows(self, like: torch.Tensor, position_ids: torch.Tensor, cache: BatchKVCache):
        """``_rope_direct``'s cos, sin', from the table where it covers the cache (every position
        is below ``cache.max_len`` when a token's position is its slot: the batched engine, prefills)."""
        table = self.rope_table
        if table is None or table.shape[0] < cache.max_len:
            return self._rope_direct(like, position_ids)
        rows = table[position_ids[:, :, None], :, self._row_kind]  # [B, T, rows, 2, d]
        if torch.compiler.is_compiling():  # Inductor fuses the strided reads into its kernels
            return rows[..., 0, :], rows[..., 1, :]
        # eagerly, strided cos/sin turn every layer's RoPE products into non-vectorised kernels:
        # two copies a forward instead (see ``BatchKVCache.write_kv`` on the eager paths)
        return rows[..., 0, :].contiguous(), rows[..., 1, :].contiguous()

    def _use_rope_kernel(self, like: torch.Tensor, cache: BatchKVCache) -> bool:
        """RoPE by ``speculative.rope_kernel`` (eager CUDA forwards whose positions the table
        covers; ``rope_kernel`` True forces it, e.g. on CPU under Triton's interpreter, False
        keeps the torch expression). Inductor fuses the expression into its own kernels."""
        if self.rope_table is None or self.rope_table.shape[0] < cache.max_len or torch.compiler.is_compiling():
            return False
        return rope_kernel_module.wanted(like) if self.rope_kernel is None else self.rope_kernel

    def resolve_kernels(self) -> None:
        """Run the kernel gates' one-time checks on the model's device now, eagerly: a step
        compiled by Inductor reads their outcome (it cannot run a check while tracing), and a
        CUDA graph capture cannot run one either."""
        weights = self.fast.embed_tokens.weight
        decode_attention_kernel.wanted(weights)
        rope_kernel_module.wanted(weights)
        silu_mul_kernel.wanted(weights)

    def _use_decode_kernel(self, like: torch.Tensor) -> bool:
        """Attention over a prefix by ``speculative.decode_attention_kernel`` (CUDA, where its gate
        passed; compiled steps use the outcome ``resolve_kernels`` found; ``decode_kernel`` True
        forces it, e.g. on CPU under Triton's interpreter, False keeps SDPA)."""
        return decode_attention_kernel.wanted.chosen(like, self.decode_kernel)

    def _use_silu_kernel(self, like: torch.Tensor) -> bool:
        """The MLP's ``silu(gate) * up`` by ``speculative.silu_mul_kernel`` (eager CUDA forwards of
        a SiLU MLP; ``silu_kernel`` True forces it, e.g. on CPU under Triton's interpreter, False
        keeps the torch expression). Inductor fuses the expression into its own kernel."""
        if not self._silu_mlp or torch.compiler.is_compiling():
            return False
        return silu_mul_kernel.wanted(like) if self.silu_kernel is None else self.silu_kernel

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # LlamaRMSNorm's function in one fused kernel where torch has one (it rounds once, at the
        # end, where Hugging Face rounds before the weight: a rounding-level difference in bf16)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def _add_linear(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, in_place: bool) -> torch.Tensor:
        """residual + linear(x) in one kernel. ``in_place`` accumulates into ``residual`` itself
        (which nothing else may hold): the out-of-place ``addmm`` first copies ``residual`` into
        a new tensor (one more kernel: cuBLAS adds into its output; only a 1-D bias and more
        than one row take the copy-free cuBLASLt path). Same GEMM, same result."""
        if torch.compiler.is_compiling():
            # Inductor: a plain GEMM, and the add fused into the kernel that follows (the next
            # RMSNorm); its addmm would be out of place (the copy again)
            return residual + F.linear(x, linear.weight, linear.bias)
        shape = residual.shape
        flat, x = residual.view(-1, shape[-1]), x.reshape(-1, x.shape[-1])
        out = flat.addmm_(x, linear.weight.t()) if in_place else torch.addmm(flat, x, linear.weight.t())
        if linear.bias is not None:
            out = out + linear.bias
        return out.view(shape)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: BatchKVCache,
        cache_slots: torch.Tensor | int,
        attn_mask: torch.Tensor | None,
        logits_index: torch.Tensor | None = None,
        aux_hidden: bool = True,
        apply_lm_head: bool = True,
        visible: torch.Tensor | None = None,
    ) -> FastLlamaOutput:
        """Run ``input_ids [B, T]`` at ``position_ids [B, T]``, writing k/v at ``cache_slots``.

        ``attn_mask [B, T, S]`` (True = may attend, own slot included) covers cache slots
        ``0 .. S-1``; ``None`` is a prefill from slot 0: causal attention within the chunk
        (``cache_slots`` must then be 0). ``logits_index [B, T']`` picks, per sequence, the rows
        the lm_head runs on (e.g. each prompt's last token); default: every row.
        ``aux_hidden=False``: no aux hidden states (``None``; autoregressive decoding reads none).
        ``apply_lm_head=False``: the final-norm hidden states instead of logits (``hidden``), as
        ``FastLlama``'s, for callers that need logits at data-dependent rows only.
        ``visible [B]`` (T = 1) or ``[B, T]``: each token's mask is the prefix of slots
        ``0 .. visible - 1`` (the caller vouches for it: a decode step, a verified chain), so
        attention may read that prefix through the decode-attention kernel instead of SDPA over
        ``attn_mask``.
        """
        fast = self.fast
        batch, length = input_ids.shape
        heads, kv_heads, dim, groups = self.num_heads, self.num_kv_heads, self.head_dim, self.groups
        hidden = fast.embed_tokens(input_ids)
        half = dim // 2
        rope_kernel = self._use_rope_kernel(hidden, cache)
        silu_kernel = self._use_silu_kernel(hidden)
        if not rope_kernel:
            cos, sin = self._rope_rows(hidden, position_ids, cache)  # [B, T, heads + 2 kv_heads, d]
        if not isinstance(cache_slots, int):
            cache_slots = (torch.arange(batch, device=hidden.device)[:, None], cache_slots)
        decode = visible is not None and attn_mask is not None and self._use_decode_kernel(hidden)
        if attn_mask is not None:
            span = attn_mask.shape[-1]
            if span > cache.max_len:
                raise ValueError(f"mask covers {span} slots, the cache has {cache.max_len}")
            if not decode:
                bias = torch.full(attn_mask.shape, float("-inf"), dtype=hidden.dtype, device=hidden.device)
                bias = bias.masked_fill_(attn_mask, 0.0)  # [B, T, S]
                if (length == 1 or groups == 1) and torch.compiler.is_compiling():
                    bias = bias[:, None]  # SDPA broadcasts it; Inductor makes it once, not per layer
                else:  # query rows of a kv head: (group member, token), group-major; materialised once
                    # a forward (eagerly a broadcast mask cost more per layer than this one copy)
                    bias = bias[:, None, None].expand(batch, 1, groups, length, span).reshape(
                        batch, 1, groups * length, span)
        elif cache_slots != 0:
            raise ValueError("a prefill (attn_mask=None) writes from slot 0")
        aux_ids = self.aux_layer_ids if aux_hidden else ()
        aux: list[torch.Tensor | None] = [None] * len(aux_ids)
        # the residual stream (from the embedding's own new tensor on) is updated in place
        # (``_add_linear``), except where a layer's input is kept as an aux hidden state: there
        # the attention residual makes a new tensor
        for index, layer in enumerate(fast.layers):
            kept = index in aux_ids
            for j, layer_id in enumerate(aux_ids):
                if layer_id == index:
                    aux[j] = hidden
            attn = layer.self_attn
            eps_in, eps_post = self.norm_eps[index]
            x = self._norm(hidden, layer.input_layernorm.weight, eps_in)
            qkv = F.linear(x, *self.qkv[index]).view(batch, length, heads + 2 * kv_heads, dim)
            if rope_kernel:
                qkv = rope_kernel_module.rope_in_place(qkv, position_ids, self.rope_table, heads + kv_heads)
            else:
                qkv = torch.addcmul(qkv * cos, torch.roll(qkv, half, -1), sin)
            q, kv = qkv[:, :, :heads], qkv[:, :, heads:].view(batch, length, 2, kv_heads, dim)
            cache.write_kv(index, cache_slots, kv)
            if decode:  # each token over its own prefix (one token a sequence: q [B, heads, d], visible [B])
                out = decode_attention_kernel.decode_attention(
                    q.reshape(batch, heads, dim) if visible.dim() == 1 else q, cache.storage[0, index, :, :, :span],
                    cache.storage[1, index, :, :, :span], visible, self.scaling,
                ).view(batch, length, heads, dim)
            elif attn_mask is None:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
                    is_causal=True, scale=self.scaling, enable_gqa=groups > 1,
                ).transpose(1, 2)  # [B, T, heads, d]
            else:
                grouped = q.view(batch, length, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
                grouped = grouped.reshape(batch, kv_heads, groups * length, dim)
                keys = cache.storage[0, index, :, :, :span]
                values = cache.storage[1, index, :, :, :span]
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bias, scale=self.scaling)
                out = out.view(batch, kv_heads, groups, length, dim).permute(0, 3, 1, 2, 4)
            hidden = self._add_linear(hidden, out.reshape(batch, length, heads * dim), attn.o_proj, not kept)
            x = self._norm(hidden, layer.post_attention_layernorm.weight, eps_post)
            gate_up = F.linear(x, *self.gate_up[index])
            if silu_kernel:
                act = silu_mul_kernel.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = layer.mlp.act_fn(gate) * up
            hidden = self._add_linear(hidden, act, layer.mlp.down_proj, True)
        if logits_index is not None:
            hidden = hidden[torch.arange(batch, device=hidden.device)[:, None], logits_index]
        final = self._norm(hidden, fast.norm.weight, self.final_eps)
        aux_out = torch.cat(aux, dim=-1) if aux else None
        if not apply_lm_head:
            return FastLlamaOutput(logits=None, aux_hidden=aux_out, hidden=final)
        return FastLlamaOutput(logits=fast.lm_head(final), aux_hidden=aux_out, hidden=final)
