"""The EAGLE-3 drafter: one Llama decoder layer over [token embedding ; fused target hidden].

Module and parameter names follow the checkpoint layout vLLM's ``llama_eagle3.py`` and SGLang
read (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``), and the forward follows vLLM's
arithmetic exactly, so a drafter trained here proposes the same tokens when vLLM serves it:

    g      = fc(concat(aux hidden states of the target))             # step 1 only
    x      = concat(input_layernorm(embed(token)), hidden_norm(h))   # h = g, or previous output
    r      = h + attn(x)                                             # residual is the raw h
    r      = r + mlp(post_attention_layernorm(r))
    logits = lm_head(norm(r))     and r (pre-norm) is the hidden fed to the next draft step.

Attention is delegated to a cache object (``attend(q, k, v)``) so that the same layer serves
training-time test (``speculative.ttt``), and tree drafting with a KV cache at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from speculative.vocab import DraftVocab


@dataclass
class DrafterConfig:
    """Shape of an EAGLE-3 drafter; serialised as the vLLM/SGLang ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...] = (2, 15, 27)
    rms_norm_eps: float = 1e-5
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"

    @classmethod
    def from_target(
        cls,
        target_config: Any,
        draft_vocab_size: int,
        aux_layer_ids: tuple[int, ...],
        intermediate_size: int | None = None,
    ) -> DrafterConfig:
        """A drafter shaped like one layer of ``target_config`` (what EAGLE-3 does)."""
        heads = target_config.num_attention_heads
        rope = getattr(target_config, "rope_parameters", None) or {
            "rope_type": "default",
            "rope_theta": getattr(target_config, "rope_theta", 10000.0),
        }
        return cls(
            hidden_size=target_config.hidden_size,
            intermediate_size=intermediate_size or target_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", heads),
            head_dim=getattr(target_config, "head_dim", None)
            or target_config.hidden_size // heads,
            vocab_size=target_config.vocab_size,
            draft_vocab_size=min(draft_vocab_size, target_config.vocab_size),
            target_hidden_size=target_config.hidden_size,
            aux_layer_ids=tuple(aux_layer_ids),
            rms_norm_eps=target_config.rms_norm_eps,
            rope_parameters=dict(rope),
            max_position_embeddings=target_config.max_position_embeddings,
            hidden_act=getattr(target_config, "hidden_act", "silu"),
        )

    def llama_config(self) -> LlamaConfig:
        """The same shape as a transformers ``LlamaConfig`` (for RoPE and for export)."""
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_hidden_layers=1,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters),
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aux_layer_ids"] = list(self.aux_layer_ids)
        return data


class AttentionCache(Protocol):
    """Decides which keys each query sees; returns the attention output [B, heads, T, d]."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class DraftAttention(nn.Module):
    """Llama attention whose q/k/v read the 2H-wide [embedding ; hidden] input."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.q_proj = nn.Linear(2 * h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = cache.attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DraftMLP(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionCache,
    ) -> torch.Tensor:
        """Returns the pre-norm residual stream (vLLM's ``hidden_prenorm``)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        residual = hidden + self.self_attn(x, cos, sin, cache)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Drafter(nn.Module):
    """EAGLE-3 draft model. ``embed_tokens`` is the target's, frozen and never saved."""

    def __init__(self, config: DrafterConfig, vocab: DraftVocab, embed_weight: torch.Tensor):
        super().__init__()
        if vocab.size != config.draft_vocab_size or vocab.target_vocab_size != config.vocab_size:
            raise ValueError(
                f"draft vocabulary ({vocab.size} of {vocab.target_vocab_size}) does not match "
                f"the drafter config ({config.draft_vocab_size} of {config.vocab_size})"
            )
        if tuple(embed_weight.shape) != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"target embedding has shape {tuple(embed_weight.shape)}, the drafter expects "
                f"({config.vocab_size}, {config.hidden_size})"
            )
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight = nn.Parameter(embed_weight.detach(), requires_grad=False)
        n_aux = len(config.aux_layer_ids)
        self.fc = nn.Linear(n_aux * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = DraftDecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config.llama_config())
        self.register_buffer("draft_to_target", vocab.draft_to_target.clone(), persistent=False)
        self.register_buffer("target_to_draft", vocab.target_to_draft.clone(), persistent=False)

    @property
    def vocab(self) -> DraftVocab:
        return DraftVocab(self.draft_to_target.cpu(), self.config.vocab_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fuse_target_hidden(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """Project the concatenated aux hidden states of the target to the drafter width."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: AttentionCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step. Returns (logits over the draft vocab, pre-norm hidden for the next step)."""
        prenorm = self.hidden_step(input_ids, hidden, position_ids, cache)
        return self.draft_logits(prenorm), prenorm

    def hidden_step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: AttentionCache,
    ) -> torch.Tensor:
        """``forward`` without the lm_head: the pre-norm hidden only. Callers that need logits at a
        few rows (the last prompt token of a prefill) then call ``draft_logits`` on those rows."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary(hidden, position_ids)
        return self.midlayer(embeds, hidden, cos, sin, cache)

    def draft_logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary from pre-norm hidden states."""
        return self.lm_head(self.norm(prenorm))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.draft_to_target[draft_ids]


def init_drafter_weights(drafter: Eagle3Drafter, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) linear weights, unit norms: the usual Llama initialisation, seeded."""
    generator = torch.Generator().manual_seed(seed)
    for module in drafter.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
