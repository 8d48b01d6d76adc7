"""The EAGLE-3 checkpoint layouts of other tools: which one a directory is, and how to read/write it.

Four layouts hold the same tensors under different config files and names:

``draftrl``      draftrl's own export: vLLM's reading of ``LlamaForCausalLMEagle3`` plus a
                 ``draftrl`` block (checksum, verifier, the aux numbering it uses).
``vllm``         ``Eagle3LlamaForCausalLM`` (vLLM's own class name): vLLM's reading.
``specforge``    ``LlamaForCausalLMEagle3`` without a ``draftrl`` block: SpecForge's trainer and
                 EAGLE's originals; the layout SGLang serves.
``speculators``  vLLM speculators' ``Eagle3Speculator``: ``speculators_model_type: eagle3``, the
                 decoder shape nested in ``transformer_layer_config``, weights ``layers.0.*``.

Auxiliary layer ids. draftrl, vLLM and speculators name the *input* of a target layer
(``hidden_states[i]``, default ``(2, L/2, L-3)``). SpecForge and SGLang name a layer's *output*:
SpecForge's default is ``[1, L/2-1, L-4]`` and SGLang's ``set_eagle3_layers_to_capture`` adds one
to every configured id. So ids read from a ``specforge`` config are converted (+1) with a warning,
and the ``specforge`` export writes them back (-1). A config without ids gets the same layers
under both numberings (both engines then default to ``(2, L/2, L-3)`` inputs).

Flags. ``norm_before_residual``, ``norm_before_fc``, ``fc_norm`` and ``norm_output`` mean what
vLLM's ``llama_eagle3.py`` and speculators' ``Eagle3DraftModel`` compute (``speculative.drafter``).
SpecForge's ``LlamaForCausalLMEagle3`` reads two of them differently: ``norm_output`` (default
true) there only decides whether the logits see the final norm, and it ignores
``norm_before_residual``/``norm_before_fc``; a ``specforge`` config is read SpecForge's way and
anything draftrl cannot compute exactly is refused by name (``UnsupportedCheckpoint``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from speculative.drafter import DrafterConfig

LAYOUTS = ("draftrl", "vllm", "specforge", "speculators")
EXPORT_FORMATS = ("vllm", "speculators", "specforge")
SPECFORGE_ARCHITECTURE = "LlamaForCausalLMEagle3"
VLLM_ARCHITECTURE = "Eagle3LlamaForCausalLM"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
SPECULATORS_SCHEMA_VERSION = "0.9.0"  # the speculators release whose config layout this writes


class UnsupportedCheckpoint(ValueError):
    """A checkpoint asks for something the drafter does not compute; the message names it."""


class AuxLayerNumberingWarning(UserWarning):
    """Auxiliary layer ids were converted between output and input numbering."""


def detect_layout(data: dict[str, Any], source: Path, override: str = "auto") -> str:
    """Which tool wrote ``config.json`` (see the module docstring); ``override`` forces one."""
    if override != "auto":
        if override not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout {override!r}; one of {LAYOUTS}")
        return override
    if "speculators_model_type" in data:
        kind = data["speculators_model_type"]
        if kind != "eagle3":
            raise UnsupportedCheckpoint(f"{source}: speculators_model_type {kind!r} is not an EAGLE-3 drafter")
        return "speculators"
    if isinstance(data.get("draftrl"), dict):
        return "draftrl"
    architectures = data.get("architectures") or []
    if VLLM_ARCHITECTURE in architectures:
        return "vllm"
    if SPECFORGE_ARCHITECTURE in architectures:
        return "specforge"
    raise UnsupportedCheckpoint(
        f"{source}: architectures {architectures} name no EAGLE-3 Llama drafter "
        f"({SPECFORGE_ARCHITECTURE}, {VLLM_ARCHITECTURE} or speculators' {SPECULATORS_ARCHITECTURE})"
    )


def aux_numbering(data: dict[str, Any], layout: str) -> str:
    """'input' (vLLM's numbering) or 'output' (SpecForge's and SGLang's)."""
    if layout == "draftrl":
        return data["draftrl"].get("aux_layer_numbering", "input")
    return "output" if layout == "specforge" else "input"


def _refuse(source: Path, field: str, why: str) -> UnsupportedCheckpoint:
    return UnsupportedCheckpoint(f"{source}: '{field}' {why}")


def _rope(shape: dict[str, Any], source: Path) -> dict[str, Any]:
    rope = shape.get("rope_parameters")
    if not rope:
        scaling = dict(shape.get("rope_scaling") or {})
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        rope = {**scaling, "rope_type": kind, "rope_theta": shape.get("rope_theta", 10000.0)}
    rope = dict(rope)
    if "mrope_section" in rope:
        raise _refuse(source, "rope_parameters.mrope_section", "(multimodal RoPE) is not implemented")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(source, "partial_rotary_factor", "below 1 is not implemented")
    return rope


def _check_shape(shape: dict[str, Any], source: Path, prefix: str) -> None:
    """Refuse, by name, every architectural option the one-layer Llama drafter does not have."""
    def name(key: str) -> str:
        return prefix + key

    if shape.get("num_hidden_layers", 1) != 1:
        raise _refuse(source, name("num_hidden_layers"), f"= {shape['num_hidden_layers']}: only one draft layer is implemented")
    for key in ("attention_bias", "mlp_bias", "bias", "qkv_bias"):
        if shape.get(key):
            raise _refuse(source, name(key), "is true: biases are not implemented")
    if shape.get("model_type", "llama") != "llama":
        raise _refuse(source, name("model_type"), f"= {shape['model_type']!r}: only Llama draft layers are implemented "
                      "(qwen3's q_norm/k_norm are not)")
    if shape.get("tie_word_embeddings"):
        raise _refuse(source, name("tie_word_embeddings"), "is true: the drafter has its own lm_head")
    if shape.get("logit_scale", 1.0) != 1.0:
        raise _refuse(source, name("logit_scale"), "is not implemented")
    if shape.get("hidden_act", "silu") != "silu":
        raise _refuse(source, name("hidden_act"), f"= {shape['hidden_act']!r}: only SiLU is implemented")


def _sliding_window(shape: dict[str, Any], source: Path, prefix: str) -> int | None:
    layer_types = shape.get("layer_types") or []
    sliding = "sliding_attention" in layer_types or (not layer_types and shape.get("use_sliding_window"))
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise _refuse(source, prefix + "layer_types", f"{sorted(unknown)} are not implemented")
    if not sliding:
        return None
    window = shape.get("sliding_window")
    if not window:
        raise _refuse(source, prefix + "sliding_window", "is missing for a sliding_attention layer")
    return int(window)


def _flags(data: dict[str, Any], layout: str, source: Path) -> dict[str, bool]:
    """The variant flags in draftrl's (= vLLM's) meaning, or a named refusal."""
    eagle = data.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state") is False:
        raise _refuse(source, "eagle_config.use_aux_hidden_state", "is false: a drafter without aux states is not EAGLE-3")
    if data.get("embed_requires_grad"):
        raise _refuse(source, "embed_requires_grad", "is true: draftrl shares the target's frozen embedding")
    if layout == "specforge":
        for key in ("norm_before_residual", "norm_before_fc"):
            if data.get(key) or eagle.get(key):
                raise _refuse(source, key, "is set in a SpecForge-layout config: SpecForge's LlamaForCausalLMEagle3 "
                              "ignores it while vLLM applies it, so what the weights were trained with is unknown; "
                              "set drafter.init_layout to 'vllm' if they were trained with it")
        if data.get("norm_output", True) is False:
            raise _refuse(source, "norm_output", "is false: SpecForge then computes logits without the final norm, "
                          "which neither vLLM nor SGLang serves")
        return {"norm_before_residual": False, "norm_before_fc": False,
                "fc_norm": bool(data.get("fc_norm", False)), "norm_output": False}
    if layout == "speculators" and "norm_before_residual" not in data:
        raise _refuse(source, "norm_before_residual", "is missing: speculators' config defaults it to false, vLLM's "
                      "reader to true; set it explicitly")
    flags = {
        "norm_before_residual": bool(data.get("norm_before_residual", False)),
        "norm_before_fc": bool(eagle.get("norm_before_fc", data.get("norm_before_fc", False))),
        "fc_norm": bool(data.get("fc_norm", False)),
        "norm_output": bool(data.get("norm_output", False)),
    }
    if flags["norm_before_fc"] and flags["fc_norm"]:
        raise _refuse(source, "norm_before_fc", "and 'fc_norm' are both set; they exclude each other")
    return flags


def drafter_config(data: dict[str, Any], source: Path, layout: str) -> DrafterConfig:
    """A ``DrafterConfig`` (aux ids in input numbering) from any layout's ``config.json``."""
    shape, prefix = data, ""
    if layout == "speculators":
        shape, prefix = data.get("transformer_layer_config"), "transformer_layer_config."
        if not isinstance(shape, dict):
            raise _refuse(source, "transformer_layer_config", "is missing: not a speculators EAGLE-3 config")
    _check_shape(shape, source, prefix)
    try:
        heads = shape["num_attention_heads"]
        hidden = shape["hidden_size"]
        eagle = data.get("eagle_config") or {}
        aux = data.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        aux = tuple(int(i) for i in aux) if aux else ()
        if aux and aux_numbering(data, layout) == "output":
            converted = tuple(i + 1 for i in aux)
            if layout == "specforge":  # inferred from the layout (a draftrl block states it): say so
                warnings.warn(
                    f"{source}: eagle_aux_hidden_state_layer_ids {list(aux)} number layer outputs (SpecForge/SGLang); "
                    f"draftrl and vLLM number layer inputs, so they are read as {list(converted)} (the same layers)",
                    AuxLayerNumberingWarning, stacklevel=3,
                )
            aux = converted
        return DrafterConfig(
            hidden_size=hidden,
            intermediate_size=shape["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=shape.get("num_key_value_heads") or heads,
            head_dim=shape.get("head_dim") or hidden // heads,
            vocab_size=shape["vocab_size"],
            draft_vocab_size=data.get("draft_vocab_size") or shape["vocab_size"],
            target_hidden_size=data.get("target_hidden_size") or hidden,
            aux_layer_ids=aux,
            rms_norm_eps=shape.get("rms_norm_eps", 1e-5),
            rope_parameters=_rope(shape, source),
            max_position_embeddings=shape.get("max_position_embeddings", 8192),
            hidden_act=shape.get("hidden_act", "silu"),
            sliding_window=_sliding_window(shape, source, prefix),
            **_flags(data, layout, source),
        )
    except KeyError as missing:
        raise ValueError(f"{source}: config.json lacks the field {prefix}{missing.args[0]}") from None


def canonical_weights(weights: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Tensor names as the drafter module has them (``midlayer.*``); speculators' verifier copies dropped."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith(("verifier_lm_head.", "verifier_norm.")):
            continue  # speculators keeps the verifier's head for its loss; never part of the drafter
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
        out[name] = tensor
    return out


# -- writing ---------------------------------------------------------------------------------------

def legacy_rope(rope: dict[str, Any]) -> dict[str, Any] | None:
    """``rope_scaling`` as pre-``rope_parameters`` readers expect it (None for plain RoPE)."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    return {key: value for key, value in rope.items() if key != "rope_theta"}


def layer_shape(config: DrafterConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The decoder-layer fields every layout shares (a transformers ``LlamaConfig``'s names)."""
    rope = dict(config.rope_parameters)
    shape = {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": config.vocab_size,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_parameters": rope,
        "rope_scaling": legacy_rope(rope),
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.sliding_window is not None:
        shape.update(sliding_window=config.sliding_window, use_sliding_window=True,
                     layer_types=["sliding_attention"])
    return shape


def _true_flags(config: DrafterConfig) -> dict[str, bool]:
    return {name: True for name in config.active_variants()}


def vllm_config(config: DrafterConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for vLLM (draftrl's default export). Flags are written only when on, so a
    plain EAGLE-3 drafter reads the same in SpecForge, whose defaults differ from vLLM's."""
    return {
        "architectures": [SPECFORGE_ARCHITECTURE],
        **layer_shape(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        **_true_flags(config),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
            "use_aux_hidden_state": True,
        },
    }


def specforge_config(config: DrafterConfig, dtype: torch.dtype, source: str = "drafter") -> dict[str, Any]:
    """``config.json`` for SpecForge and SGLang: output-numbered aux ids, SpecForge's flag meanings."""
    unsupported = [name for name in config.active_variants() if name != "fc_norm"]
    if config.sliding_window is not None:
        unsupported.append("sliding_window")
    if unsupported:
        raise UnsupportedCheckpoint(
            f"{source}: {unsupported} cannot be written for SpecForge/SGLang: SpecForge's "
            "LlamaForCausalLMEagle3 does not compute them; export --format vllm or speculators instead"
        )
    if 0 in config.aux_layer_ids:
        raise UnsupportedCheckpoint(f"{source}: aux layer 0 (the embeddings) has no output-numbered id")
    out = {
        "architectures": [SPECFORGE_ARCHITECTURE],
        **layer_shape(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [i - 1 for i in config.aux_layer_ids],
            "use_aux_hidden_state": True,
        },
    }
    if config.fc_norm:
        out["fc_norm"] = True
    return out


def speculators_config(config: DrafterConfig, dtype: torch.dtype, verifier: str | None,
                       verifier_architectures: list[str], speculative_tokens: int) -> dict[str, Any]:
    """``config.json`` of speculators' ``Eagle3Speculator`` (what vLLM's speculators reader takes)."""
    if not verifier:
        raise ValueError("the speculators format records the verifier's model id: pass --verifier (or train "
                         "with target.model set to a hub id or a built-in target)")
    return {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_SCHEMA_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
        },
        "transformer_layer_config": layer_shape(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
        # vLLM's speculators reader defaults a missing norm_before_residual to true: write all four.
        **{name: bool(getattr(config, name)) for name in DrafterConfig.VARIANT_FLAGS},
        "embed_requires_grad": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_names(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Tensor names of ``fmt``: speculators keeps its decoder layers in ``layers.0.*``."""
    if fmt != "speculators":
        return dict(tensors)
    return {("layers.0." + n[len("midlayer."):]) if n.startswith("midlayer.") else n: t for n, t in tensors.items()}


def check_same_embedding(checkpoint_embed: torch.Tensor, target_embed: torch.Tensor, source: Path) -> None:
    """A checkpoint that carries an embedding must carry the target's: draftrl uses the target's."""
    if tuple(checkpoint_embed.shape) != tuple(target_embed.shape):
        raise _refuse(source, "embed_tokens.weight", f"has shape {tuple(checkpoint_embed.shape)}, the target's "
                      f"embedding {tuple(target_embed.shape)}")
    theirs = checkpoint_embed.float()
    ours = target_embed.detach().to(checkpoint_embed.dtype).float().to(theirs.device)
    gap = float((theirs - ours).abs().max()) if theirs.numel() else 0.0
    scale = float(ours.abs().max()) if ours.numel() else 0.0
    if not math.isfinite(gap) or gap > 1e-3 * max(scale, 1e-6):
        raise _refuse(source, "embed_tokens.weight", f"differs from the target's input embedding (max gap {gap:.3g}): "
                      "it was trained or belongs to another target; draftrl shares the target's frozen embedding")
