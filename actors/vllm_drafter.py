"""Live EAGLE-3 drafter updates inside a running vLLM engine, verified by a logit probe.

Why this exists: vLLM's usual weight-update paths (``reload_weights``, ``start_weight_update``
/``update_weights`` of its weight-transfer engines, the RL weight-sync recipes) address the
*target* model. An on-policy drafter trainer that pushes its weights through them updates
nothing it cares about, and nothing fails: the engine keeps drafting with the old drafter.
(vLLM 0.32 also has ``start_draft_weight_update`` for weight-transfer engines that support it;
it needs such an engine, and it was not evaluated here.) This module loads draftrl's drafter weights into the module
vLLM actually drafts with, and proves it with a probe (the drafter's logits on a fixed input,
computed inside vLLM from vLLM's own modules) that the learner compares with its own forward.

Pieces:

* :class:`DraftrlWorkerExtension` -- passed to vLLM as ``worker_extension_cls`` (its dotted
  path is :data:`WORKER_EXTENSION`); vLLM mixes it into its worker class, so its methods run
  on every worker through ``LLM.collective_rpc("draftrl_...")``.
* :class:`LiveDrafterEngine` -- a ``vllm.LLM`` started with the extension: ``push`` (update +
  prefix-cache reset + probe check), ``probe``, ``generate`` (with vLLM's acceptance counters).
* :func:`reference_probe` -- the same probe through draftrl's :class:`Eagle3Drafter`.
* :func:`run_session_isolated` -- a scripted engine session in a throw-away subprocess (what
  the tests use: vLLM's process-wide state never touches the caller).

vLLM internals relied on (vLLM 0.32, checked at run time, failures are loud):

* the drafter module: ``worker.model_runner.get_draft_model()`` (vLLM's accessor, which is
  ``model_runner.drafter.model`` of the V1 runner's ``EagleProposer`` or
  ``model_runner.speculator.model`` in the V2 runner; those paths are the fallback), an
  ``Eagle3LlamaForCausalLM`` (``vllm/model_executor/models/llama_eagle3.py``) with
  ``model.fc``, ``model.layers[0]`` (``qkv_proj`` = q;k;v stacked, ``gate_up_proj`` = gate;up
  stacked, ``hidden_norm``...), ``model.norm``, ``lm_head`` and ``draft_id_to_target_id`` (the
  checkpoint's ``d2t``, absent for a full-vocabulary drafter);
* unquantized linear layers: on CPU, ``UnquantizedLinearMethod.process_weights_after_loading``
  repacks the weight for oneDNN/sgl kernels (a closure in ``layer.cpu_linear``) and replaces
  ``layer.weight`` by an *empty* tensor; the lm_head keeps its weight but matmuls with a packed
  copy. So a weight is written by installing the full tensor again and re-running that method
  (on GPU it is a no-op and the copy is in place, which keeps CUDA-graph pointers valid);
* the target's embedding is shared with the drafter (never written here), and vLLM also
  shares the target's ``lm_head`` when the checkpoint's is identical to it: an update refuses
  to write any tensor whose storage belongs to the target.

After an update the prefix cache must be reset: cached blocks hold drafter KV computed with the
old weights (:meth:`LiveDrafterEngine.push` does it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

WORKER_EXTENSION = "actors.vllm_drafter.DraftrlWorkerExtension"

# Where vLLM keeps the proposer, per model runner generation (checked in this order).
DRAFTER_LOCATIONS = (
    ("model_runner", "drafter", "model"),  # V1 GPUModelRunner / CPUModelRunner: EagleProposer
    ("model_runner", "speculator", "model"),  # V2 model runner: DraftModelSpeculator
)

# draftrl checkpoint name -> (vLLM parameter owner inside Eagle3LlamaForCausalLM, kind).
# "linear": the owner is a vLLM linear layer whose full weight is the concatenation (dim 0) of
# the listed checkpoint tensors; "tensor": a plain parameter written in place.
_LINEARS: dict[str, tuple[str, ...]] = {
    "model.fc": ("fc.weight",),
    "model.layers.0.self_attn.qkv_proj": (
        "midlayer.self_attn.q_proj.weight",
        "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight",
    ),
    "model.layers.0.self_attn.o_proj": ("midlayer.self_attn.o_proj.weight",),
    "model.layers.0.mlp.gate_up_proj": (
        "midlayer.mlp.gate_proj.weight",
        "midlayer.mlp.up_proj.weight",
    ),
    "model.layers.0.mlp.down_proj": ("midlayer.mlp.down_proj.weight",),
}
_TENSORS: dict[str, str] = {
    "midlayer.input_layernorm.weight": "model.layers.0.input_layernorm.weight",
    "midlayer.hidden_norm.weight": "model.layers.0.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight": "model.layers.0.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
}
_LM_HEAD = "lm_head.weight"
_D2T, _T2D = "d2t", "t2d"


class DrafterNotFoundError(RuntimeError):
    """vLLM's drafter module is not where this code expects it: nothing was updated."""


class DrafterUpdateError(RuntimeError):
    """The weights do not fit vLLM's drafter, or the probe disagrees after an update."""


# ------------------------------------------------------------------------------------------
# Weights in draftrl's checkpoint layout
# ------------------------------------------------------------------------------------------
def drafter_state(drafter: Any) -> dict[str, torch.Tensor]:
    """The tensors ``save_drafter`` would write for ``drafter`` (an ``Eagle3Drafter``), in memory.

    Same names and rules as the on-disk layout: no ``embed_tokens`` (vLLM shares the target's),
    ``d2t``/``t2d`` only for a reduced draft vocabulary.
    """
    from speculative.checkpoint import _SKIPPED_ON_SAVE

    tensors = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in drafter.state_dict().items()
        if not name.startswith(_SKIPPED_ON_SAVE)
    }
    vocab = drafter.vocab
    if vocab.size < vocab.target_vocab_size:
        tensors[_D2T] = vocab.d2t.contiguous()
        tensors[_T2D] = vocab.t2d.contiguous()
    return tensors


def read_weights(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Checkpoint tensors from a drafter directory (checksum verified) or a .safetensors file."""
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_dir():
        from speculative.checkpoint import _read_weights, verify_checksum

        if (path / "config.json").is_file():
            verify_checksum(path)
        return _read_weights(path)
    if path.is_file():
        return load_file(path)
    raise FileNotFoundError(f"drafter weights not found: {path}")


# ------------------------------------------------------------------------------------------
# The probe: a fixed input, the same arithmetic on both sides
# ------------------------------------------------------------------------------------------
@dataclass
class ProbeInputs:
    """A deterministic drafter input: tokens, positions and fused-target aux hidden states."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    aux_hidden: torch.Tensor  # [T, n_aux * target_hidden] float32


def probe_inputs(
    vocab_size: int, aux_width: int, *, seed: int = 0, length: int = 8, scale: float = 1.0
) -> ProbeInputs:
    """The probe input both sides build from the same seed (so only the seed crosses processes)."""
    gen = torch.Generator().manual_seed(seed)
    return ProbeInputs(
        input_ids=torch.randint(0, vocab_size, (length,), generator=gen),
        positions=torch.arange(length),
        aux_hidden=torch.randn(length, aux_width, generator=gen) * scale,
    )


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      kv_heads: int, head_dim: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over one causal sequence; q/k/v are [T, heads * d]."""
    length = q.shape[0]
    q = q.view(length, heads, head_dim).transpose(0, 1)
    k = k.view(length, kv_heads, head_dim).transpose(0, 1)
    v = v.view(length, kv_heads, head_dim).transpose(0, 1)
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    return out.to(q.dtype).transpose(0, 1).reshape(length, heads * head_dim)


class _CausalCache:
    """draftrl's ``AttentionCache`` protocol for one causal sequence ([B, heads, T, d])."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.no_grad()
def reference_probe(drafter: Any, *, seed: int = 0, length: int = 8) -> torch.Tensor:
    """draftrl's drafter logits ([T, draft_vocab], float32) on the probe input of ``seed``.

    One draft step over a causal sequence: ``fc`` fuses the aux states, then the decoder layer,
    norm and lm_head, exactly what :meth:`DraftrlWorkerExtension.draftrl_probe_drafter`
    computes with vLLM's modules.
    """
    config = drafter.config
    inputs = probe_inputs(
        config.vocab_size, len(config.aux_layer_ids) * config.target_hidden_size,
        seed=seed, length=length,
    )
    dtype = drafter.fc.weight.dtype
    device = drafter.fc.weight.device
    hidden = drafter.fuse_target_hidden(inputs.aux_hidden.to(device, dtype))[None]
    logits, _ = drafter(
        inputs.input_ids.to(device)[None], hidden, inputs.positions.to(device)[None], _CausalCache()
    )
    return logits[0].float().cpu()


def compare_probe(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Max absolute / relative-to-scale differences and argmax agreement of two probe results."""
    ours, theirs = ours.float(), theirs.float()
    diff = (ours - theirs).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / ours.abs().max().clamp_min(1e-12)),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }


# ------------------------------------------------------------------------------------------
# Inside vLLM: the worker extension
# ------------------------------------------------------------------------------------------
def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - only used in messages
        return "unknown"


def _drafter_problems(obj: Any) -> list[str]:
    """What an object lacks to be the EAGLE-3 Llama drafter this module knows how to update."""
    problems = [attr for attr in ("combine_hidden_states", "compute_logits", "lm_head", "model")
                if not hasattr(obj, attr)]
    inner = getattr(obj, "model", None)
    if inner is not None:
        problems += [f"model.{attr}" for attr in ("fc", "layers", "norm") if not hasattr(inner, attr)]
        layers = getattr(inner, "layers", None)
        if layers is not None and not (len(layers) and hasattr(layers[0], "hidden_norm")):
            problems.append("model.layers[0].hidden_norm")
    return problems


def locate_drafter(worker: Any) -> tuple[str, nn.Module]:
    """Return (where, module) of the EAGLE-3 drafter vLLM drafts with in ``worker``.

    First vLLM's own accessor ``model_runner.get_draft_model()`` (it unwraps CUDA-graph
    wrappers; V1 and V2 runners), then the attribute paths in :data:`DRAFTER_LOCATIONS`.
    Raises :class:`DrafterNotFoundError` naming every place looked at and what was there: a
    silent fallback would let an "update" change nothing (or only the target).
    """
    seen = []
    runner = getattr(worker, "model_runner", None)
    getter = getattr(runner, "get_draft_model", None)
    if callable(getter):
        where = "worker.model_runner.get_draft_model()"
        found = getter()
        if found is None:
            seen.append(f"{where}: None")
        elif problems := _drafter_problems(found):
            seen.append(f"{where}: a {type(found).__name__} without {', '.join(problems)}")
        else:
            return where, found
    for path in DRAFTER_LOCATIONS:
        obj: Any = worker
        for depth, name in enumerate(path):
            obj = getattr(obj, name, None)
            if obj is None:
                seen.append(f"worker.{'.'.join(path[: depth + 1])}: absent")
                break
        else:
            dotted = "worker." + ".".join(path)
            if callable(getattr(obj, "unwrap", None)):  # a CUDA-graph wrapper
                obj, dotted = obj.unwrap(), dotted + ".unwrap()"
            if problems := _drafter_problems(obj):
                seen.append(f"{dotted}: a {type(obj).__name__} without {', '.join(problems)}")
                continue
            return dotted, obj
    spec = getattr(getattr(worker, "vllm_config", None), "speculative_config", None)
    raise DrafterNotFoundError(
        "no EAGLE-3 drafter module found in this vLLM worker, so no drafter weights were "
        f"loaded (vLLM {_vllm_version()}, worker {type(worker).__name__}, model runner "
        f"{type(runner).__name__}, speculative_config method "
        f"{getattr(spec, 'method', None)!r}). Looked at: {'; '.join(seen)}. Start the engine "
        "with speculative_config={'method': 'eagle3', ...}; if it was, this vLLM version moved "
        "the drafter and actors/vllm_drafter.locate_drafter needs the new path."
    )


def _storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters() if p.numel()}


def _plan_update(
    drafter: nn.Module, target: nn.Module | None, weights: Mapping[str, torch.Tensor]
) -> list[tuple[str, str, nn.Module | torch.Tensor, torch.Tensor]]:
    """Validate ``weights`` against vLLM's drafter; return the writes, or raise before any.

    Each write is (vLLM name, kind, module-or-parameter, new full tensor). Every check happens
    here so that a wrong layout leaves the engine exactly as it was.
    """
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    modules = dict(drafter.named_modules())
    params = dict(drafter.named_parameters())
    d2t_param = getattr(drafter, "draft_id_to_target_id", None)
    expected = set(_TENSORS) | {_LM_HEAD} | {n for names in _LINEARS.values() for n in names}
    if d2t_param is not None:
        expected.add(_D2T)
    allowed = expected | {_T2D}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - allowed)
    problems = []
    if missing or unexpected:
        hint = ""
        if _D2T in unexpected:
            hint = " (a d2t for a drafter vLLM serves with the full target vocabulary)"
        elif _D2T in missing:
            hint = " (vLLM's drafter has a reduced draft vocabulary and needs d2t)"
        problems.append(
            f"names do not match draftrl's EAGLE-3 checkpoint layout{hint}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    writes: list[tuple[str, str, Any, torch.Tensor]] = []
    target_storages = _storages(target) if target is not None else set()
    for owner, names in _LINEARS.items():
        module = modules.get(owner)
        if not isinstance(module, LinearBase):
            problems.append(f"vLLM drafter has no linear layer {owner!r} "
                            f"(found {type(module).__name__})")
            continue
        if not isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod):
            problems.append(f"{owner}: quantized ({type(module.quant_method).__name__}); live "
                            "updates support unquantized drafters only")
            continue
        if getattr(module, "tp_size", 1) != 1:
            problems.append(f"{owner}: tensor-parallel size {module.tp_size}; live updates "
                            "support an unsharded drafter only")
            continue
        if any(n not in weights for n in names):
            continue
        parts = [weights[n] for n in names]
        shape = (int(sum(module.output_partition_sizes)),
                 int(getattr(module, "input_size_per_partition", module.input_size)))
        full = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tuple(full.shape) != shape:
            shapes = {n: tuple(w.shape) for n, w in zip(names, parts)}
            problems.append(f"{owner}: vLLM expects {shape}, got {shapes}")
            continue
        if module.weight.numel() and module.weight.untyped_storage().data_ptr() in target_storages:
            problems.append(f"{owner}.weight shares storage with the target model")
            continue
        writes.append((owner, "linear", module, full))
    for name, vllm_name in _TENSORS.items():
        param = params.get(vllm_name)
        if param is None:
            problems.append(f"vLLM drafter has no parameter {vllm_name!r} (for {name})")
        elif name in weights and tuple(weights[name].shape) != tuple(param.shape):
            problems.append(f"{name}: vLLM's {vllm_name} is {tuple(param.shape)}, got "
                            f"{tuple(weights[name].shape)}")
        elif name in weights:
            writes.append((vllm_name, "tensor", param, weights[name]))
    head = getattr(drafter, "lm_head", None)
    if target is not None and head is not None and head is getattr(target, "lm_head", None):
        problems.append("vLLM shares the target's lm_head with the drafter (the checkpoint's "
                        "lm_head was identical to the target's); writing it would change the "
                        "target. Start the engine from a drafter with its own lm_head")
    elif head is not None and _LM_HEAD in weights:
        rows = int(getattr(head, "org_vocab_size", head.weight.shape[0]))
        new = weights[_LM_HEAD]
        if tuple(new.shape) != (rows, head.weight.shape[1]):
            problems.append(f"lm_head.weight: vLLM expects ({rows}, {head.weight.shape[1]}), "
                            f"got {tuple(new.shape)}")
        elif head.weight.untyped_storage().data_ptr() in target_storages:
            problems.append("lm_head.weight shares storage with the target model")
        else:
            writes.append(("lm_head", "lm_head", head, new))
    if d2t_param is not None and _D2T in weights:
        if tuple(weights[_D2T].shape) != tuple(d2t_param.shape):
            problems.append(f"d2t: vLLM expects {tuple(d2t_param.shape)}, got "
                            f"{tuple(weights[_D2T].shape)}")
        else:
            writes.append(("draft_id_to_target_id", "tensor", d2t_param, weights[_D2T]))
    for vllm_name, kind, obj, _ in writes:
        if kind == "tensor" and obj.untyped_storage().data_ptr() in target_storages:
            problems.append(f"{vllm_name} shares storage with the target model")
    if problems:
        raise DrafterUpdateError(
            "refusing to update vLLM's drafter, nothing was written:\n  - " + "\n  - ".join(problems)
        )
    return writes


def _write_linear(module: nn.Module, full: torch.Tensor) -> None:
    """Install ``full`` as the layer's weight and let vLLM re-derive its runtime form."""
    weight = module.weight
    full = full.to(weight.device, weight.dtype)
    if tuple(weight.shape) == tuple(full.shape):
        weight.data.copy_(full)  # kept in place: captured graphs still point at this storage
    else:  # CPU: vLLM packed the weight elsewhere and left an empty placeholder
        module.weight = nn.Parameter(full.clone(), requires_grad=False)
    module.quant_method.process_weights_after_loading(module)


def _write_lm_head(module: nn.Module, new: torch.Tensor) -> None:
    weight = module.weight
    rows = new.shape[0]
    with torch.no_grad():
        weight[:rows].copy_(new.to(weight.device, weight.dtype))
        weight[rows:].zero_()  # vocabulary padding rows
    module.quant_method.process_weights_after_loading(module)  # CPU: repack the matmul copy


class _ProbeAttention(nn.Module):
    """Stands in for vLLM's paged ``Attention`` during a probe: plain causal attention."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _causal_attention(q, k, v, self.heads, self.kv_heads, self.head_dim)


class DraftrlWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); call via ``collective_rpc``.

    Method names carry a ``draftrl_`` prefix: vLLM refuses an extension whose attributes
    collide with the worker's.
    """

    def draftrl_locate_drafter(self) -> dict[str, Any]:
        """Where the drafter is and what it looks like (raises if absent)."""
        path, drafter = locate_drafter(self)
        target = getattr(getattr(self, "model_runner", None), "model", None)
        d2t = getattr(drafter, "draft_id_to_target_id", None)
        return {
            "path": path,
            "class": type(drafter).__name__,
            "vllm_version": _vllm_version(),
            "dtype": str(drafter.lm_head.weight.dtype).removeprefix("torch."),
            "draft_vocab_size": int(getattr(drafter.lm_head, "org_vocab_size",
                                            drafter.lm_head.weight.shape[0])),
            "has_d2t": d2t is not None,
            "embed_shared_with_target": target is not None
            and drafter.model.embed_tokens is getattr(getattr(target, "model", None),
                                                      "embed_tokens", None),
            "lm_head_shared_with_target": target is not None
            and drafter.lm_head is getattr(target, "lm_head", None),
        }

    @torch.no_grad()
    def draftrl_update_drafter(
        self, weights: Mapping[str, torch.Tensor] | str | os.PathLike
    ) -> dict[str, Any]:
        """Load draftrl-layout drafter weights (a dict, a drafter dir or a .safetensors file).

        Everything is validated before the first write; returns what was written.
        """
        started = time.perf_counter()
        path, drafter = locate_drafter(self)
        if not isinstance(weights, Mapping):
            weights = read_weights(weights)
        target = getattr(getattr(self, "model_runner", None), "model", None)
        writes = _plan_update(drafter, target, weights)
        for _, kind, obj, tensor in writes:
            if kind == "linear":
                _write_linear(obj, tensor)
            elif kind == "lm_head":
                _write_lm_head(obj, tensor)
            else:
                obj.data.copy_(tensor.to(obj.device, obj.dtype))
        return {
            "path": path,
            "written": [name for name, *_ in writes],
            "elements": int(sum(t.numel() for *_, t in writes)),
            "seconds": time.perf_counter() - started,
        }

    @torch.no_grad()
    def draftrl_probe_drafter(self, seed: int = 0, length: int = 8) -> dict[str, Any]:
        """The drafter's draft-vocabulary logits on the probe input of ``seed``, from vLLM.

        vLLM's own modules compute it (``combine_hidden_states``, the EAGLE-3 decoder layer
        and ``compute_logits``, i.e. every weight as vLLM holds it, packed or not); only the
        paged attention kernel, which needs a scheduled batch, is swapped for plain causal
        attention for the duration of the call.
        """
        path, drafter = locate_drafter(self)
        config = drafter.config
        n_aux = int(getattr(drafter.model, "num_aux_hidden_states", 3))
        target_hidden = int(getattr(config, "target_hidden_size", None) or config.hidden_size)
        inputs = probe_inputs(config.vocab_size, n_aux * target_hidden, seed=seed, length=length)
        device = drafter.lm_head.weight.device
        dtype = drafter.lm_head.weight.dtype
        attention = drafter.model.layers[0].self_attn
        original = attention.attn
        attention.attn = _ProbeAttention(
            attention.num_heads, attention.num_kv_heads, attention.head_dim
        )
        try:
            hidden = drafter.combine_hidden_states(inputs.aux_hidden.to(device, dtype))
            # LlamaModel.forward itself, not the (possibly torch.compile'd) __call__.
            normed, _ = drafter.model.forward(
                inputs.input_ids.to(device), inputs.positions.to(device), hidden
            )
            logits = drafter.compute_logits(normed)
        finally:
            attention.attn = original
        d2t = getattr(drafter, "draft_id_to_target_id", None)
        draft_size = int(getattr(drafter.lm_head, "org_vocab_size", drafter.lm_head.weight.shape[0]))
        target_ids = torch.arange(draft_size, device=logits.device)
        if d2t is not None:
            target_ids = target_ids + d2t
        draft_logits = logits[:, target_ids]
        outside = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        outside[target_ids] = False
        return {
            "path": path,
            "seed": seed,
            "logits": draft_logits.float().cpu().tolist(),
            "target_ids": target_ids.cpu().tolist(),
            # compute_logits maps draft ids onto the target vocabulary with -inf elsewhere
            "outside_all_neg_inf": bool(torch.isneginf(logits[:, outside]).all()),
        }


# ------------------------------------------------------------------------------------------
# The driver side: an engine with the extension
# ------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    logits: torch.Tensor  # [T, draft_vocab] float32
    target_ids: list[int]
    outside_all_neg_inf: bool


class LiveDrafterEngine:
    """A ``vllm.LLM`` with an EAGLE-3 drafter that can be replaced while it runs.

    Create it under ``if __name__ == "__main__":`` (vLLM may spawn processes). ``push`` is the
    learner-facing call: update, reset the prefix cache, probe, compare, raise on mismatch.
    """

    def __init__(
        self,
        target_dir: str | Path,
        drafter_dir: str | Path,
        *,
        num_speculative_tokens: int = 3,
        dtype: str = "bfloat16",
        max_model_len: int = 1024,
        seed: int = 0,
        enforce_eager: bool = True,
        max_num_seqs: int = 8,
        speculative: bool = True,
        llm_options: Mapping[str, Any] | None = None,
    ) -> None:
        from actors.vllm_engine import CPU_ENGINE_ENV, engine_kwargs

        for key, value in CPU_ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        self.num_speculative_tokens = num_speculative_tokens
        kwargs = engine_kwargs(
            target_dir, drafter_dir=drafter_dir if speculative else None,
            num_speculative_tokens=num_speculative_tokens, dtype=dtype,
            max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
        )
        kwargs.update(llm_options or {})  # e.g. gpu_memory_utilization beside a colocated target
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
        self.llm = LLM(**kwargs)

    def _one(self, method: str, *args: Any) -> Any:
        results = self.llm.collective_rpc(method, args=args)
        if not results:
            raise DrafterNotFoundError(f"collective_rpc({method!r}) reached no worker")
        return results[0]

    def locate(self) -> dict[str, Any]:
        return self._one("draftrl_locate_drafter")

    def update(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike) -> dict[str, Any]:
        """Load new drafter weights on every worker, then drop prefix-cached drafter KV.

        In-memory weights travel as a safetensors file in a temporary directory: with a
        multiprocess engine core (vLLM's default) ``collective_rpc`` serialises its arguments,
        and tensors do not survive that (the workers share this host's file system).
        """
        if isinstance(weights, os.PathLike):
            weights = str(weights)
        if isinstance(weights, Mapping):
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="draftrl_push.") as tmp:
                path = Path(tmp) / "drafter.safetensors"
                save_file({name: t.detach().to("cpu").contiguous() for name, t in weights.items()}, path)
                report = self._one("draftrl_update_drafter", str(path))
        else:
            report = self._one("draftrl_update_drafter", weights)
        if not self.llm.reset_prefix_cache():
            raise DrafterUpdateError("vLLM refused to reset its prefix cache (requests running?): "
                                     "cached blocks would keep drafter KV of the old weights")
        return report

    def probe(self, seed: int = 0, length: int = 8) -> ProbeResult:
        raw = self._one("draftrl_probe_drafter", seed, length)
        return ProbeResult(torch.tensor(raw["logits"]), raw["target_ids"], raw["outside_all_neg_inf"])

    def push(self, drafter: Any, *, seed: int = 0, atol: float = 1e-3, rtol: float = 1e-3
             ) -> dict[str, Any]:
        """Update from a learner's ``Eagle3Drafter`` and verify with the probe (raises on mismatch).

        Default tolerances suit an fp32 engine; a bf16 engine needs ~5e-2.
        """
        report = self.update(drafter_state(drafter))
        theirs = self.probe(seed)
        ours = reference_probe(drafter, seed=seed, length=theirs.logits.shape[0])
        stats = compare_probe(ours, theirs.logits)
        expected_ids = drafter.draft_to_target.cpu().tolist()
        if theirs.target_ids != expected_ids or not theirs.outside_all_neg_inf:
            raise DrafterUpdateError("vLLM's draft->target vocabulary mapping differs from the "
                                     "learner's after the update")
        if not torch.allclose(ours, theirs.logits, atol=atol, rtol=rtol):
            raise DrafterUpdateError(f"vLLM's drafter disagrees with the learner's after the "
                                     f"update: {stats}")
        return {**report, "probe": stats}

    def generate(self, prompts: Sequence[Any], *, max_tokens: int = 64, ignore_eos: bool = False,
                 stop_token_ids: Sequence[int] | None = None) -> tuple[list[list[int]], Any]:
        """Greedy generation; returns (output token ids, vLLM's SpecDecodeStats for this call).

        A prompt is a chat, a string, or a list of token ids (used as they are).
        ``stop_token_ids`` with ``ignore_eos=True`` makes exactly those tokens stop a sequence
        (the stop token is kept in the output ids), instead of vLLM's own EOS choice.
        """
        from vllm import SamplingParams

        from actors.vllm_engine import _spec_counters, _stats_delta, render_prompts

        tokenizer = self.llm.get_tokenizer()
        prompt_ids = [
            [int(t) for t in prompt] if _is_token_ids(prompt) else render_prompts(tokenizer, [prompt])[0]
            for prompt in prompts
        ]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                stop_token_ids=list(stop_token_ids) if stop_token_ids else None)
        before = _spec_counters(self.llm.get_metrics())
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False
        )
        stats = _stats_delta(before, _spec_counters(self.llm.get_metrics()),
                             self.num_speculative_tokens)
        return [list(out.outputs[0].token_ids) for out in outputs], stats

    def close(self) -> None:
        from actors.vllm_engine import _shutdown

        _shutdown(self.llm)


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    )


# ------------------------------------------------------------------------------------------
# A scripted session in a subprocess (tests, smoke checks)
# ------------------------------------------------------------------------------------------
def _run_session(request: dict[str, Any]) -> dict[str, Any]:
    """Run ``request["steps"]`` against one engine; each step's result or error is recorded.

    Steps: ``{"op": "locate"}``, ``{"op": "update", "weights": PATH}``,
    ``{"op": "probe", "seed": S}``, ``{"op": "generate", "max_tokens": N}`` (on the step's
    ``prompts``, else ``request["prompts"]``; optional ``ignore_eos``, ``stop_token_ids``). Errors are recorded (type and message), not raised, so that a
    test can check that a refused update left the engine usable.
    """
    started = time.perf_counter()
    engine = LiveDrafterEngine(request["target_dir"], request["drafter_dir"],
                               **request.get("engine", {}))
    loaded = time.perf_counter() - started
    results: list[dict[str, Any]] = []
    try:
        for step in request["steps"]:
            op = step["op"]
            try:
                if op == "locate":
                    out: dict[str, Any] = engine.locate()
                elif op == "update":
                    out = engine.update(step["weights"])
                elif op == "probe":
                    probe = engine.probe(step.get("seed", 0), step.get("length", 8))
                    out = {"logits": probe.logits.tolist(), "target_ids": probe.target_ids,
                           "outside_all_neg_inf": probe.outside_all_neg_inf}
                elif op == "generate":
                    generate_started = time.perf_counter()
                    tokens, stats = engine.generate(
                        step.get("prompts", request["prompts"]), max_tokens=step.get("max_tokens", 32),
                        ignore_eos=step.get("ignore_eos", True),
                        stop_token_ids=step.get("stop_token_ids"),
                    )
                    out = {"token_ids": tokens, "spec": stats.to_dict(),
                           "seconds": time.perf_counter() - generate_started}
                else:
                    raise ValueError(f"unknown step {op!r}")
                results.append({"op": op, "ok": True, **out})
            except Exception as error:  # noqa: BLE001 - recorded for the caller to judge
                results.append({"op": op, "ok": False, "error_type": type(error).__name__,
                                "error": str(error)})
    finally:
        engine.close()
    return {"load_seconds": loaded, "steps": results}


def run_session_isolated(
    target_dir: str | Path,
    drafter_dir: str | Path,
    steps: Sequence[dict[str, Any]],
    *,
    prompts: Sequence[Any] = (),
    engine: dict[str, Any] | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """:func:`_run_session` in a fresh ``python -m actors.vllm_drafter --worker`` process.

    Uses one in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the session's
    worker is then that subprocess itself, and nothing of vLLM's global state reaches the caller.
    """
    from actors.vllm_engine import WORKER_ENV

    request = {"target_dir": str(target_dir), "drafter_dir": str(drafter_dir),
               "steps": list(steps), "prompts": list(prompts), "engine": dict(engine or {})}
    with tempfile.TemporaryDirectory(prefix="vllm_drafter.") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        log_path = Path(tmp) / "vllm.log"
        request_path.write_text(json.dumps(request))
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "actors.vllm_drafter", "--worker", str(request_path),
                 str(result_path)],
                stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                env={**WORKER_ENV, **os.environ}, cwd=Path(__file__).resolve().parent.parent,
            )
        if proc.returncode != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace")[-6000:]
            raise RuntimeError(f"vLLM session subprocess failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.vllm_drafter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("REQUEST", "RESULT"), required=True)
    args = parser.parse_args(argv)
    request = json.loads(Path(args.worker[0]).read_text())
    Path(args.worker[1]).write_text(json.dumps(_run_session(request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
