"""The EAGLE-3 drafter: one Llama decoder layer over [token embedding ; fused target hidden].

Module and parameter names follow the checkpoint layout vLLM's ``llama_eagle3.py`` and SGLang
read (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``), and the forward follows vLLM's
arithmetic exactly, so a drafter trained here proposes the same tokens when vLLM serves it:

    g      = fc(concat(aux hidden states of the target))             # step 1 only
    x      = concat(input_layernorm(embed(token)), hidden_norm(h))   # h = g, or previous output
    r      = h + attn(x)                                             # residual is the raw h
    r      = r + mlp(post_attention_layernorm(r))
    logits = lm_head(norm(r))     and r (pre-norm) is the hidden fed to the next draft step.

Other trainers add normalisations, each a flag of ``DrafterConfig`` computed as vLLM's
``llama_eagle3.py`` and speculators' ``Eagle3DraftModel`` compute it (all off = EAGLE-3):

    norm_before_fc        g = fc(input_norm(concat(aux)))           one RMSNorm over the concatenation
    fc_norm               g = fc(concat(fc_norm_i(aux_i)))          one RMSNorm per auxiliary state
    norm_before_residual  r = hidden_norm(h) + attn(x)              the residual is the normalised h
    norm_output           the hidden fed to the next step is norm(r), not r (logits unchanged)
    sliding_window        step-1 keys older than the window are not attended (training-time test)

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

from speculative.config import TTT_ATTENTION_DEFAULT, TTT_VOCAB_LOSS_DEFAULT
from speculative.vocab import DraftVocab


SHARED_FROZEN = ("embed_tokens.",)  # parameter name prefixes of the target's frozen embedding


def learned_parameters(drafter: nn.Module) -> dict[str, nn.Parameter]:
    """A drafter's parameters that training changes, by name in name order: all but the target's
    embedding, which it shares, frozen (so a broadcast or a drafting copy need never move it)."""
    return {name: p for name, p in sorted(drafter.named_parameters(), key=lambda item: item[0])
            if not name.startswith(SHARED_FROZEN)}


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
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    sliding_window: int | None = None

    VARIANT_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")

    def __post_init__(self) -> None:
        if self.norm_before_fc and self.fc_norm:
            raise ValueError("norm_before_fc and fc_norm exclude each other (one norm over the "
                             "concatenated auxiliary states, or one per state)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not implemented (the drafter's MLP is SiLU-gated)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, not {self.sliding_window}")

    def active_variants(self) -> list[str]:
        """The non-EAGLE-3 flags this drafter computes (empty for a plain EAGLE-3 drafter)."""
        return [name for name in self.VARIANT_FLAGS if getattr(self, name)]

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
        # Hugging Face's LlamaRMSNorm (normalise in fp32, round to x's dtype, times the weight in its
        # own dtype) as torch's fused norm: one kernel instead of six or seven, and one fused backward
        # (a draft tree runs 4 norms a level, a TTT unroll 3 a step). Values and gradients bit-identical
        # on CPU in float32 and bfloat16; on CUDA the fused kernel sums in its own order (rounding-level).
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)  # e.g. bf16 x, fp32 weight (autocast)


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
        self.norm_before_residual = config.norm_before_residual

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionCache,
    ) -> torch.Tensor:
        """Returns the pre-norm residual stream (vLLM's ``hidden_prenorm``)."""
        normed = self.hidden_norm(hidden)
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        residual = (normed if self.norm_before_residual else hidden) + self.self_attn(x, cos, sin, cache)
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
        # Created only when their flag is on, so a plain EAGLE-3 drafter has exactly EAGLE-3's tensors.
        if config.norm_before_fc:
            self.input_norm = RMSNorm(n_aux * config.target_hidden_size, config.rms_norm_eps)
        if config.fc_norm:
            self.fc_norm = nn.ModuleList(
                RMSNorm(config.target_hidden_size, config.rms_norm_eps) for _ in range(n_aux)
            )
        self.midlayer = DraftDecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config.llama_config())
        self.register_buffer("draft_to_target", vocab.draft_to_target.clone(), persistent=False)
        self.register_buffer("target_to_draft", vocab.target_to_draft.clone(), persistent=False)
        # How training-time test attends ("sdpa", the "dense" reference or "flex") and computes each step's KL
        # ("fused" with the lm_head, or the "dense" reference): run settings, not saved.
        self.ttt_attention = TTT_ATTENTION_DEFAULT
        self.ttt_vocab_loss = TTT_VOCAB_LOSS_DEFAULT

    @property
    def vocab(self) -> DraftVocab:
        return DraftVocab(self.draft_to_target.cpu(), self.config.vocab_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fuse_target_hidden(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """Project the concatenated aux hidden states of the target to the drafter width."""
        x = aux_hidden.to(self.fc.weight.dtype)
        if self.config.norm_before_fc:
            x = self.input_norm(x)
        if self.config.fc_norm:
            chunks = x.chunk(len(self.fc_norm), dim=-1)
            x = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: AttentionCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step. Returns (logits over the draft vocab, the hidden for the next step):
        the pre-norm residual stream, or its normalised form with ``norm_output``."""
        following = self.hidden_step(input_ids, hidden, position_ids, cache)
        return self.draft_logits(following), following

    def hidden_step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: AttentionCache,
    ) -> torch.Tensor:
        """``forward`` without the lm_head: the hidden fed to the next step only. Callers that need
        logits at a few rows (the last prompt token of a prefill) then call ``draft_logits`` on them."""
        window = self.config.sliding_window
        if window is not None and not getattr(cache, "applies_sliding_window", False):
            if int(position_ids.max()) >= window:  # inference caches attend the whole context
                raise NotImplementedError(
                    f"the drafter was trained with sliding_window {window}; drafting at positions past "
                    "it is only implemented in training-time test"
                )
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary(hidden, position_ids)
        prenorm = self.midlayer(embeds, hidden, cos, sin, cache)
        return self.norm(prenorm) if self.config.norm_output else prenorm

    def draft_logits(self, following: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary from ``hidden_step``'s output."""
        return self.lm_head(self.head_input(following))

    def head_input(self, following: torch.Tensor) -> torch.Tensor:
        """What the lm_head multiplies: ``hidden_step``'s output, normalised here unless
        ``norm_output`` already did (training-time test fuses the head into its loss)."""
        return following if self.config.norm_output else self.norm(following)

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
