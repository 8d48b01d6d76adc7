"""The target worker: hosts the frozen target and turns data batches into experiences.

A plain class: the single-process trainer calls it directly and the Ray pipeline wraps the
same class in a rollout actor. ``make_experience`` is the one entry point per objective.
"""

from __future__ import annotations

import torch

from speculative.drafter import Eagle3Drafter
from speculative.experience import CombinedExperience, Experience, SFTExperience, uses_reference
from speculative.profiling import phase
from speculative.target import TargetModel


class TargetWorker:
    """Hosts the target; knows the current draft vocabulary so experiences stay small."""

    def __init__(self, target: TargetModel, draft_to_target: torch.Tensor):
        self.target = target
        self.draft_to_target = draft_to_target.to(target.device)
        self._fast = None
        self._fused = None
        self._engine = None
        self._engine_key = None
        self._batch_engine = None
        self._batch_engine_key = None
        self._vllm = None
        self._vllm_key = None
        self._draft_head: torch.Tensor | None = None

    def draft_head(self) -> torch.Tensor | None:
        """The target's lm_head rows at the draft ids [Vd, H], built once: with the final-norm states
        at some rows, an experience ships these instead of the rows' draft-vocabulary logits
        (``SFTExperience.packed``). None when the head has a bias (its logits are not that product)."""
        head = self.target.model.lm_head
        if head.bias is not None:
            return None
        if self._draft_head is None:
            self._draft_head = head.weight.index_select(0, self.draft_to_target)
        return self._draft_head

    @property
    def fast(self):
        """The static-cache forward over the target's weights (tree verification, rollouts)."""
        if self._fast is None:
            from speculative.llama import FastLlama

            self._fast = FastLlama.from_target(self.target)
        return self._fast

    @property
    def fused(self):
        """``fast`` with merged projections and fewer kernels (GTO's prefill and verification)."""
        if self._fused is None:
            from speculative.fused_llama import FusedLlama

            self._fused = FusedLlama(self.fast)
        return self._fused

    def rollout_engine(self, drafter: Eagle3Drafter, tree, temperature: float, compile: str = "off",
                       max_len: int | None = None):
        """A speculative decoder recording every verification, kept across calls: the drafter's
        parameters are read in place, so updated weights are used without rebuilding (or
        re-capturing CUDA graphs)."""
        from speculative.engine import SpeculativeGenerator

        key = (id(drafter), tree, temperature, compile)
        if self._engine is None or self._engine_key != key:
            self._engine = SpeculativeGenerator(
                self.target, drafter, tree, temperature, record_steps=True, compile=compile,
                max_len=max_len,
            )
            self._engine_key = key
        return self._engine

    def batch_rollout_engine(self, drafter: Eagle3Drafter, chain_length: int, temperature: float,
                             compile: str = "auto", max_batch: int = 64, max_len: int | None = None,
                             drafter_dtype: torch.dtype | None = None):
        """The batched chain-speculative engine recording every cycle, kept across calls like
        ``rollout_engine`` (its caches and CUDA graphs read the drafter's parameters in place, or
        its ``drafter_dtype`` copy of them, refreshed at every call)."""
        from speculative.batch_engine import BatchGenerator

        key = (id(drafter), chain_length, temperature, compile, max_batch, drafter_dtype)
        if self._batch_engine is None or self._batch_engine_key != key:
            self._batch_engine = None  # free the old caches and graphs first
            self._batch_engine = BatchGenerator(
                self.target, drafter, chain_length, temperature, record_cycles=True, compile=compile,
                max_batch=max_batch, max_len=max_len, drafter_dtype=drafter_dtype,
            )
            self._batch_engine_key = key
        return self._batch_engine

    def vllm_rollouts(self, config):
        """The vLLM engine of ``opd.engine: vllm`` (``actors.vllm_rollout``), kept across calls
        while the settings it was started with hold."""
        from actors.vllm_rollout import VllmRollouts, vllm_dtype, vllm_process
        from speculative.target import resolve_target

        opd, section = config.opd, config.opd.vllm
        process = vllm_process(section.process, self.target.device)
        key = (config.target.model, opd.chain_length, section.model_dump_json(), process,
               config.data.max_length + opd.max_new_tokens)
        if self._vllm is None or self._vllm_key != key:
            if self._vllm is not None:
                self._vllm.close()
            target_dir = resolve_target(config.target.model, config.cache_dir)
            self._vllm = VllmRollouts(
                target_dir, chain_length=opd.chain_length,
                dtype=vllm_dtype(section.dtype, self.target.model.dtype),
                # the longest prompt + rollout, and the last cycle's drafted tokens past it
                max_model_len=config.data.max_length + opd.max_new_tokens + opd.chain_length + 1,
                process=process,
                gpu_memory_utilization=section.gpu_memory_utilization
                if self.target.device.type == "cuda" else None,
            )
            self._vllm_key = key
        return self._vllm

    @torch.no_grad()
    def sft_experience(self, batch: dict[str, torch.Tensor], drafter_version: int = 0) -> SFTExperience:
        device = self.target.device
        with phase("sft/batch_to_device"):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            loss_mask = batch["loss_mask"].to(device)
        # (its phases: sft/target_forward, then sft/restrict_vocab: the lm head and the restriction)
        draft_logits, top1, aux_hidden, hidden = self.target.draft_features(
            input_ids, attention_mask, self.draft_to_target, with_hidden=True)
        return SFTExperience(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            aux_hidden=aux_hidden,
            target_draft_logits=draft_logits,
            target_top1=top1,
            drafter_version=drafter_version,
            # shipped instead of the logits when the head is a plain lm_head (SFTExperience.packed)
            target_hidden=hidden,
            draft_head=None if hidden is None else self.draft_head(),
        )

    def make_experience(
        self,
        config,
        batch: dict[str, torch.Tensor],
        drafter: Eagle3Drafter | None = None,
        reference: Eagle3Drafter | None = None,
        drafter_version: int = 0,
        seed: int = 0,
        shipping: bool = False,
    ) -> Experience:
        """The experience ``config.training.objective`` trains on, from one collated data batch.

        ``drafter`` is this worker's replica of the current drafter (GTO trees, OPD rollouts);
        ``reference`` the frozen reference drafter (GTO); ``seed`` makes the random choices
        (GTO windows) a function of the step, so a resumed run repeats them. ``shipping``: a
        rollout actor's, about to pack it (``packed()``): GTO's part comes packed already, made
        without the logits it would not ship (``gto_experience``).
        """
        objective = config.training.objective
        if objective == "sft":
            return self.sft_experience(batch, drafter_version)
        if drafter is None:
            raise ValueError(f"objective {objective!r} needs the current drafter on the worker")
        if uses_reference(objective) and reference is None:
            raise ValueError(f"objective {objective!r} needs the frozen reference drafter on the worker")
        from actors.gto_rollout import gto_experience
        from actors.opd_rollout import opd_experience

        if objective == "gto":
            return gto_experience(self, config, batch, drafter, reference, drafter_version, seed, shipping)
        if objective == "opd":
            return opd_experience(self, config, batch, drafter, drafter_version, seed)
        if objective == "gto_opd":
            return CombinedExperience(
                gto=gto_experience(self, config, batch, drafter, reference, drafter_version, seed, shipping),
                opd=opd_experience(self, config, batch, drafter, drafter_version, seed),
                drafter_version=drafter_version,
            )
        raise ValueError(f"unknown objective {objective!r}")
