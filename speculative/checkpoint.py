"""Save and load drafters in the EAGLE-3 layout that vLLM and SGLang read.

A drafter directory holds ``config.json`` (``LlamaForCausalLMEagle3``, ``draft_vocab_size``,
``eagle_config.eagle_aux_hidden_state_layer_ids``) and ``model.safetensors`` with ``fc``,
``midlayer.*``, ``norm``, ``lm_head``, ``d2t`` and ``t2d``. The target embedding is left out:
vLLM shares the target's when the checkpoint has none. Loading also accepts EAGLE's published
checkpoints (``pytorch_model.bin``) and SpecForge outputs, which use the same tensor names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from speculative.files import atomic_directory, file_sha256
from speculative.drafter import DrafterConfig, Eagle3Drafter
from speculative.vocab import DraftVocab

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"
_SKIPPED_ON_SAVE = ("embed_tokens.",)


def hf_config(config: DrafterConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` as vLLM/SGLang expect it for an EAGLE-3 Llama drafter."""
    rope = dict(config.rope_parameters)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
            "use_aux_hidden_state": True,
        },
    }


def drafter_config_from_hf(data: dict[str, Any], source: Path) -> DrafterConfig:
    """Read an EAGLE-3 ``config.json`` (ours, EAGLE's or SpecForge's)."""
    try:
        heads = data["num_attention_heads"]
        hidden = data["hidden_size"]
        eagle = data.get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids") or data.get(
            "eagle_aux_hidden_state_layer_ids"
        )
        rope = data.get("rope_parameters") or dict(
            data.get("rope_scaling") or {},
            rope_type=(data.get("rope_scaling") or {}).get("rope_type", "default"),
            rope_theta=data.get("rope_theta", 10000.0),
        )
        return DrafterConfig(
            hidden_size=hidden,
            intermediate_size=data["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=data.get("num_key_value_heads", heads),
            head_dim=data.get("head_dim") or hidden // heads,
            vocab_size=data["vocab_size"],
            draft_vocab_size=data.get("draft_vocab_size") or data["vocab_size"],
            target_hidden_size=data.get("target_hidden_size") or hidden,
            aux_layer_ids=tuple(aux) if aux else (),
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            rope_parameters=rope,
            max_position_embeddings=data.get("max_position_embeddings", 8192),
            hidden_act=data.get("hidden_act", "silu"),
        )
    except KeyError as missing:
        raise ValueError(f"{source}: config.json lacks the field {missing}") from None


def save_drafter(
    drafter: Eagle3Drafter,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the drafter atomically (a temp dir renamed into place) with a weights checksum."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        tensors = {
            name: tensor.detach().to("cpu", dtype).contiguous()
            for name, tensor in drafter.state_dict().items()
            if not name.startswith(_SKIPPED_ON_SAVE)
        }
        vocab = drafter.vocab
        if vocab.size < vocab.target_vocab_size:
            # vLLM has no d2t parameter for a full-vocabulary drafter and refuses one.
            tensors["d2t"] = vocab.d2t.contiguous()
            tensors["t2d"] = vocab.t2d.contiguous()
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        config = hf_config(drafter.config, dtype)
        config["draftrl"] = {
            "weights_sha256": file_sha256(staging / WEIGHTS_FILE),
            **(metadata or {}),
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(load_file(file))
        return weights
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        weights = {}
        for file in bins:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
        return weights
    raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")


def verify_checksum(directory: Path) -> None:
    """Refuse a drafter whose weights differ from the checksum written at save time."""
    config = json.loads((directory / "config.json").read_text())
    expected = (config.get("draftrl") or {}).get("weights_sha256")
    if expected and file_sha256(directory / WEIGHTS_FILE) != expected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE}: checksum mismatch (truncated or corrupted checkpoint)"
        )


def load_drafter(
    directory: str | Path,
    embed_weight: torch.Tensor,
    aux_layer_ids: tuple[int, ...] | None = None,
) -> Eagle3Drafter:
    """Load an EAGLE-3 drafter for a target whose input embedding is ``embed_weight``.

    ``aux_layer_ids`` fills in checkpoints that do not name their target layers (EAGLE's
    originals); a checkpoint that names them keeps its own.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: not a drafter directory (no config.json)")
    verify_checksum(directory)
    config = drafter_config_from_hf(json.loads(config_path.read_text()), config_path)
    if not config.aux_layer_ids:
        if aux_layer_ids is None:
            raise ValueError(f"{config_path}: no eagle_aux_hidden_state_layer_ids; pass them")
        config.aux_layer_ids = tuple(aux_layer_ids)
    if embed_weight.shape[0] != config.vocab_size or embed_weight.shape[1] != config.hidden_size:
        raise ValueError(
            f"{config_path}: drafter is for vocab {config.vocab_size} x hidden "
            f"{config.hidden_size}, but the target embedding is {tuple(embed_weight.shape)}"
        )
    weights = _read_weights(directory)
    if "d2t" in weights:
        vocab = DraftVocab.from_d2t(weights.pop("d2t"), config.vocab_size)
    else:  # as vLLM reads it: draft id i is target id i
        vocab = DraftVocab(torch.arange(config.draft_vocab_size), config.vocab_size)
    weights.pop("t2d", None)
    weights = {name: w for name, w in weights.items() if not name.startswith(_SKIPPED_ON_SAVE)}
    drafter = Eagle3Drafter(config, vocab, embed_weight)
    expected = {n for n in drafter.state_dict() if not n.startswith(_SKIPPED_ON_SAVE)}
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match an EAGLE-3 drafter "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    dtype = drafter.fc.weight.dtype
    drafter.load_state_dict({n: w.to(dtype) for n, w in weights.items()}, strict=False)
    return drafter
