"""Save and load drafters: draftrl's vLLM layout, and the layouts of SpecForge and speculators.

A drafter directory holds ``config.json`` and ``model.safetensors`` with ``fc``, ``midlayer.*``,
``norm``, ``lm_head``, ``d2t`` and ``t2d`` (plus ``input_norm``/``fc_norm.*`` for those variants).
The target embedding is left out: vLLM shares the target's when the checkpoint has none.
``speculative.checkpoint_formats`` knows the other tools' layouts; ``load_drafter`` reads any of
them (EAGLE's ``pytorch_model.bin`` originals too) and ``export_drafter`` writes any of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from speculative import checkpoint_formats as formats
from speculative.files import atomic_directory, file_sha256
from speculative.drafter import DrafterConfig, Eagle3Drafter
from speculative.vocab import DraftVocab

ARCHITECTURE = formats.SPECFORGE_ARCHITECTURE
WEIGHTS_FILE = "model.safetensors"
_SKIPPED_ON_SAVE = ("embed_tokens.",)


def hf_config(config: DrafterConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` as vLLM expects it for an EAGLE-3 Llama drafter (draftrl's default layout)."""
    return formats.vllm_config(config, dtype)


def drafter_config_from_hf(data: dict[str, Any], source: Path, layout: str = "auto") -> DrafterConfig:
    """Read an EAGLE-3 ``config.json`` of any layout (ours, EAGLE's, SpecForge's, speculators')."""
    return formats.drafter_config(data, source, formats.detect_layout(data, source, layout))


def read_checkpoint(directory: str | Path, layout: str = "auto") -> tuple[DrafterConfig, dict[str, torch.Tensor], str]:
    """(config, tensors named as the drafter module names them, detected layout) of a directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: not a drafter directory (no config.json)")
    verify_checksum(directory)
    data = json.loads(config_path.read_text())
    layout = formats.detect_layout(data, config_path, layout)
    config = formats.drafter_config(data, config_path, layout)
    return config, formats.canonical_weights(_read_weights(directory), layout), layout


def _drafter_tensors(drafter: Eagle3Drafter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
    return tensors


def _write(out_dir: Path, config_json: dict[str, Any], tensors: dict[str, torch.Tensor],
           metadata: dict[str, Any]) -> Path:
    with atomic_directory(out_dir) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        config_json["draftrl"] = {"weights_sha256": file_sha256(staging / WEIGHTS_FILE), **metadata}
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return out_dir


def format_config(config: DrafterConfig, fmt: str, dtype: torch.dtype, *, verifier: str | None = None,
                  verifier_architectures: list[str] | None = None, speculative_tokens: int = 3,
                  source: str = "drafter") -> dict[str, Any]:
    """``config.json`` of ``fmt`` (``vllm``, ``speculators`` or ``specforge``/``sglang``)."""
    if fmt == "vllm":
        return formats.vllm_config(config, dtype)
    if fmt == "speculators":
        return formats.speculators_config(config, dtype, verifier, verifier_architectures or ["LlamaForCausalLM"],
                                          speculative_tokens)
    if fmt in ("specforge", "sglang"):
        return formats.specforge_config(config, dtype, source)
    raise ValueError(f"unknown export format {fmt!r}; one of {formats.EXPORT_FORMATS} (sglang = specforge)")


def save_drafter(
    drafter: Eagle3Drafter,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, Any] | None = None,
    format: str = "vllm",
    **format_options: Any,
) -> Path:
    """Write the drafter atomically (a temp dir renamed into place) with a weights checksum.

    ``format`` picks the layout (``format_config``); the ``draftrl`` block records the checksum,
    the format, the aux numbering it uses, and ``metadata``.
    """
    fmt = "specforge" if format == "sglang" else format
    config_json = format_config(drafter.config, fmt, dtype, source=str(out_dir), **format_options)
    tensors = formats.export_names(_drafter_tensors(drafter, dtype), fmt)
    info = {"format": fmt, "aux_layer_numbering": "output" if fmt == "specforge" else "input", **(metadata or {})}
    if format_options.get("verifier"):
        info.setdefault("verifier", format_options["verifier"])
    return _write(Path(out_dir), config_json, tensors, info)


def export_drafter(source: str | Path, out_dir: str | Path, fmt: str, *, layout: str = "auto",
                   verifier: str | None = None, verifier_architectures: list[str] | None = None,
                   speculative_tokens: int = 3, dtype: torch.dtype | None = None) -> Path:
    """Rewrite a drafter directory (any layout) in ``fmt`` without loading a target.

    The verifier defaults to the one the source recorded (``draftrl.verifier``, or speculators'
    ``speculators_config.verifier``).
    """
    source = Path(source)
    data = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    config, tensors, _ = read_checkpoint(source, layout)
    recorded = data.get("draftrl") or {}
    verifier = verifier or recorded.get("verifier") or (
        ((data.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path"))
    if not verifier and recorded.get("target"):  # drafters saved before the verifier was recorded
        from speculative.target import verifier_id

        verifier = verifier_id(recorded["target"])
    if verifier_architectures is None:
        verifier_architectures = (data.get("draftrl") or {}).get("verifier_architectures") or (
            ((data.get("speculators_config") or {}).get("verifier") or {}).get("architectures"))
    if not verifier_architectures and recorded.get("target"):  # e.g. Qwen2ForCausalLM for a built-in
        from speculative.target import verifier_architectures as target_architectures

        verifier_architectures = target_architectures(recorded["target"])
    fmt = "specforge" if fmt == "sglang" else fmt
    tensors = {n: t for n, t in tensors.items() if not n.startswith(_SKIPPED_ON_SAVE)}
    if dtype is None:
        dtype = next((t.dtype for n, t in tensors.items() if n == "fc.weight"), torch.bfloat16)
    tensors = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous() for n, t in tensors.items()}
    config_json = format_config(config, fmt, dtype, verifier=verifier, verifier_architectures=verifier_architectures,
                                speculative_tokens=speculative_tokens, source=str(source))
    info = {"format": fmt, "aux_layer_numbering": "output" if fmt == "specforge" else "input",
            "exported_from": str(source)}
    if verifier:
        info["verifier"] = verifier
    return _write(Path(out_dir), config_json, formats.export_names(tensors, fmt), info)


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
    layout: str = "auto",
) -> Eagle3Drafter:
    """Load an EAGLE-3 drafter (any layout) for a target whose input embedding is ``embed_weight``.

    ``aux_layer_ids`` fills in checkpoints that do not name their target layers (EAGLE's
    originals); a checkpoint that names them keeps its own (converted to input numbering).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    config, weights, _ = read_checkpoint(directory, layout)
    if not config.aux_layer_ids:
        if aux_layer_ids is None:
            raise ValueError(f"{config_path}: no eagle_aux_hidden_state_layer_ids; pass them")
        config.aux_layer_ids = tuple(aux_layer_ids)
    if embed_weight.shape[0] != config.vocab_size or embed_weight.shape[1] != config.hidden_size:
        raise ValueError(
            f"{config_path}: drafter is for vocab {config.vocab_size} x hidden "
            f"{config.hidden_size}, but the target embedding is {tuple(embed_weight.shape)}"
        )
    if "d2t" in weights:
        vocab = DraftVocab.from_d2t(weights.pop("d2t"), config.vocab_size)
    else:  # as vLLM reads it: draft id i is target id i
        vocab = DraftVocab(torch.arange(config.draft_vocab_size), config.vocab_size)
    weights.pop("t2d", None)
    if "embed_tokens.weight" in weights:
        formats.check_same_embedding(weights["embed_tokens.weight"], embed_weight, config_path)
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
