"""Batched speculative generation with chain drafting, and batched autoregressive generation.

Many sequences advance at once, each by its own accepted length. One step of the whole batch:

    1. draft: the drafter proposes K tokens for every sequence (K - 1 batched drafter forwards;
       the first proposal comes from the drafter's output at the root, computed by the previous
       step's catch-up), fed its own proposals and pre-norm hidden states;
    2. verify: ONE target forward over [root, d_1 .. d_K] of every sequence, each at its own
       positions and cache slots (a chain: causal attention over the sequence's prefix);
    3. accept: r accepted proposals and the target's next token per sequence (greedy at T = 0,
       the lossless rejection rule of ``speculative.verify`` at T > 0, vectorised), EOS and
       ``max_new_tokens`` stops, the tokens written to the sequence's output row;
    4. catch up: the drafter re-reads the committed tokens with the target's aux hidden states
       from the verification (EAGLE-3's inference protocol, ``speculative.ttt``), giving its
       output at the next root.

Every step is a fixed sequence of tensor ops over static buffers (``speculative.batch_cache``):
no host round trip per sequence or per step. On a GPU the step is ONE CUDA graph (optionally
compiled by Inductor first), replayed a few times between host checks ("is every sequence
done?"). Finished sequences are masked (their state stops changing); at each check their rows
take the next waiting prompts, so a long tail of prompts keeps the batch full.

With ``chain_length=0`` and no drafter the same engine is batched autoregressive decoding: the
speed-up baseline (batch 1, the whole step in one graph) and a fast way to regenerate
answers with the target.

Per cycle the engine can record what Draft-OPD trains on (``record_cycles``): the root, the K
proposals and their drafter log-probs, the accepted count, and the target's log-distribution
over the draft vocabulary at each drafted state (from the verification forward).

The target runs through ``speculative.fused_llama.FusedLlama`` (same function as the reference
``FastLlama``, fewer kernels), the drafter through its own module. The single-sequence engine
(``speculative.engine``) stays the reference: tests check that both give the target's own
greedy text and the same cycles.
"""

from __future__ import annotations

import copy
import gc
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from speculative import argmax_lse_kernel
from speculative.argmax_lse_kernel import argmax_log_prob
from speculative.batch_cache import BatchDraftCache, PrefillDraftCache, visible_up_to
from speculative.drafter import learned_parameters
from speculative.engine import _as_prompt, _eos_set, resolve_compile_mode
from speculative.fused_llama import FusedLlama
from speculative.graphs import gc_paused
from speculative.llama import FastLlama
from speculative.profiling import phase


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sample_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [N, V]`` (need not be normalised) by the inverse CDF at
    ``uniform [N]`` in [0, 1): a zero-probability token is never chosen. Graph-safe."""
    cdf = probs.cumsum(-1)
    point = (uniform * cdf[:, -1])[:, None].to(cdf.dtype)
    return torch.searchsorted(cdf, point, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def sample_rows(logits: torch.Tensor, temperature: float, uniform: torch.Tensor | None) -> torch.Tensor:
    """Argmax at T = 0, else a sample from softmax(logits / T), per row of ``logits [N, V]``."""
    if temperature <= 0:
        return logits.argmax(-1)
    return sample_from(torch.softmax(logits.float() / temperature, -1), uniform)


def accept_chain(
    logits: torch.Tensor, drafted: torch.Tensor, temperature: float, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify chains of deterministic (top-1) proposals, every sequence at once.

    ``logits [B, K+1, V]``: the target at the root (row 0) and after each drafted token;
    ``drafted [B, K]`` target ids; ``uniforms [B, K+1]`` in [0, 1) (T > 0 only). Returns
    (accepted count r [B], the target's next token [B]).

    T = 0: r is the length of the prefix matching the target's argmax, the next token the
    argmax after it. T > 0: ``speculative.verify.verify_stochastic`` for a chain whose proposals
    are a function of the context (q is a point mass): d_k is accepted with probability
    p_k(d_k); at the first rejection the next token is drawn from p with d_k removed
    (renormalised; p itself if nothing is left), after K acceptances from p at the last node.
    """
    steps = drafted.shape[1]
    if temperature <= 0:
        best = logits.argmax(-1)
        accepted = (best[:, :steps] == drafted).long().cumprod(1).sum(1)
        return accepted, best.gather(1, accepted[:, None])[:, 0]
    probs = torch.softmax(logits.float() / temperature, -1)
    p_drafted = probs[:, :steps].gather(2, drafted[..., None])[..., 0]
    accepted = (uniforms[:, :steps] < p_drafted).long().cumprod(1).sum(1)
    rows = torch.arange(probs.shape[0], device=probs.device)
    p = probs[rows, accepted]  # [B, V] the target where the walk stopped
    rejected = drafted.gather(1, accepted.clamp_max(steps - 1)[:, None])
    residual = p.scatter(1, rejected, 0.0)
    use_residual = (accepted < steps)[:, None] & (residual.sum(1, keepdim=True) > 0)
    return accepted, sample_from(torch.where(use_residual, residual, p), uniforms[:, steps])


@dataclass
class ChainCycles:
    """Every verification cycle of a batch, in (sequence, cycle) order.

    Cycle m of sequence ``sequence[m]``: the root (committed, not yet verified) token
    ``root_token[m]`` at position ``root_pos[m]``; the drafter proposed ``proposals[m]``
    (draft ids) with log-probs ``rollout_logprobs[m]``; the target accepted ``accepted[m]``;
    ``target_logprobs[m, k]`` is the target's log-distribution (T = 1) over the draft
    vocabulary at the state drafted token k + 1 was drawn in (verification row k).
    """

    sequence: torch.Tensor  # [M]
    root_pos: torch.Tensor  # [M]
    accepted: torch.Tensor  # [M]
    root_token: torch.Tensor  # [M]
    proposals: torch.Tensor  # [M, K]
    target_logprobs: torch.Tensor  # [M, K, Vd]
    rollout_logprobs: torch.Tensor  # [M, K]
    # [M, K, H] the target's final-norm states at those rows: target_logprobs is the log-softmax of
    # their lm_head product at the draft ids, so an experience can ship these instead (smaller by Vd / H)
    target_hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.accepted.shape[0]


@dataclass
class BatchGenerationResult:
    tokens: list[list[int]]  # per prompt: the new tokens, cut after EOS / max_new_tokens
    accept_lengths: list[list[int]]  # per prompt, per verification: accepted draft tokens
    steps: int  # batched step forwards run (every sequence's verifications share them)
    wall_time: float  # seconds, prefills included, graph capture excluded
    setup_time: float = 0.0  # seconds spent building caches / capturing graphs in this call
    cycles: ChainCycles | None = None  # when ``record_cycles``

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def target_forwards(self) -> list[int]:
        """Per prompt: its prefill and its verifications."""
        return [1 + len(a) for a in self.accept_lengths]

    @property
    def tau(self) -> float:
        """Mean committed tokens per verification (bonus included), over all sequences."""
        lengths = [a for row in self.accept_lengths for a in row]
        return 1.0 + sum(lengths) / len(lengths) if lengths else 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.wall_time if self.wall_time > 0 else float("inf")


class BatchGenerator:
    """Batched chain-speculative (or, without a drafter, autoregressive) decoding.

    ``target`` is a ``speculative.target.TargetModel``; ``drafter`` an ``Eagle3Drafter`` for its
    aux layers, drafting chains of ``chain_length`` tokens (0 and no drafter: autoregressive).
    ``max_batch`` sequences advance at once (a call with fewer prompts runs on the first rows,
    rounded up to a power of two); ``max_len`` presizes the caches for prompt + new tokens.

    ``compile``: ``static`` (the step run eagerly: CPU and tests), ``graph`` (each step one CUDA
    graph), ``inductor`` (compiled, then captured; off CUDA compiled only, no graphs: how CPU
    tests check the compiled step), ``auto`` (graph on CUDA, static elsewhere);
    ``off`` means ``static`` (there is no dynamic-shape path here). A failed compile or capture
    falls back one level with a warning (``compile_errors``).

    ``sync_every``: steps replayed between host checks. ``span_step``: attention reads only the
    first S slots of the caches, S a multiple of ``span_step`` (or the whole cache) that covers
    every live sequence until the next check: one graph per S (``None``: the whole cache, one
    graph). ``inductor_span_step``: the same for ``inductor``, where each S is also one more
    compile (``dynamic=False``; about as long as the first on a GPU, less with a warm kernel
    cache); ``None`` means ``span_step``, 0 the whole cache (one compile). Both modes prepare
    every span of a width at its first ``generate`` (and again after the caches grow or the
    temperature changes), so no compile or capture lands inside a later, timed call: a 576-slot
    cache with the default step (256) is three compiles under ``inductor`` (256, 512, 576).
    ``inductor_options``: more ``torch.compile`` options for ``inductor`` (e.g. ``max_autotune``:
    Triton GEMM templates, tuned per shape, with the following pointwise ops fused into them).

    ``drafter_dtype``: the drafter's arithmetic here. None: its own weights' dtype. Another dtype
    (a learner's fp32 drafter served in bf16, as vLLM serves it): the engine drafts with a copy in
    that dtype, refreshed from ``drafter``'s weights at every ``generate`` (the captured steps read
    the copy in place, so weights updated in place between calls are drafted with). The drafter's
    caches are kept in the same dtype. An fp32 drafter's GEMMs and attention were 2.7 of a
    64-sequence OPD step's 7.0 ms of kernels on an H200 (``bench/results/opd_engine_h200``).
    """

    def __init__(
        self,
        target,
        drafter=None,
        chain_length: int = 0,
        temperature: float = 0.0,
        seed: int = 0,
        record_cycles: bool = False,
        compile: str = "auto",
        max_batch: int = 64,
        max_len: int | None = None,
        sync_every: int = 8,
        span_step: int | None = 256,
        eos_slots: int = 8,
        inductor_span_step: int | None = None,
        inductor_options: dict[str, Any] | None = None,
        drafter_dtype: torch.dtype | None = None,
    ):
        if (drafter is None) != (chain_length == 0):
            raise ValueError("a drafter drafts chains of chain_length >= 1; without one, chain_length must be 0")
        if chain_length < 0 or max_batch < 1 or sync_every < 1:
            raise ValueError("chain_length >= 0, max_batch >= 1 and sync_every >= 1 are required")
        if drafter is not None and tuple(drafter.config.aux_layer_ids) != tuple(target.aux_layer_ids):
            raise ValueError(
                f"drafter reads aux layers {tuple(drafter.config.aux_layer_ids)}, the target "
                f"provides {tuple(target.aux_layer_ids)}"
            )
        if record_cycles and drafter is None:
            raise ValueError("record_cycles needs a drafter (cycles are verifications of drafted chains)")
        self.target = target
        self.fast = FastLlama.from_target(target)
        self.model = FusedLlama(self.fast)
        self.source_drafter = drafter  # whose weights the engine drafts with
        if drafter is not None and drafter_dtype not in (None, drafter.fc.weight.dtype):
            drafter = copy.deepcopy(drafter)  # refreshed by ``_refresh_drafter``
            for param in drafter.parameters():  # the weights only: RoPE's frequencies stay as they are
                param.data = param.data.to(drafter_dtype)
        self.drafter = drafter.eval() if drafter is not None else None
        self.chain_length = chain_length
        self.temperature = float(temperature)
        self.record_cycles = record_cycles
        self.max_batch = max_batch
        self.sync_every = sync_every
        self.span_step = span_step
        self.inductor_span_step = span_step if inductor_span_step is None else inductor_span_step
        self.inductor_options = dict(inductor_options or {})
        self.eos_slots = eos_slots
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        mode = resolve_compile_mode(compile, self.device)
        self.compile = "static" if mode == "off" else mode
        self.compile_errors: list[str] = []
        self.max_len = 0  # slots per sequence; buffers are built by _reserve
        # per (width, span): its captured step (None: compiled by Inductor off CUDA, run as a function)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}
        self._pool = None
        self._step_fn = self._step
        if max_len is not None:
            self._reserve(max_len)

    @property
    def device(self) -> torch.device:
        return self.fast.device

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def set_temperature(self, temperature: float) -> None:
        """Change the sampling temperature; the captured steps (which baked it in) are dropped
        and recaptured on the next ``generate``."""
        if float(temperature) != self.temperature:
            self.temperature = float(temperature)
            self._graphs.clear()

    @torch.no_grad()
    def _refresh_drafter(self) -> None:
        """The drafting copy (``drafter_dtype``) takes the source drafter's current weights (the
        learned ones: the shared embedding is frozen, the copy converted it once)."""
        if self.drafter is self.source_drafter:
            return
        mine = learned_parameters(self.drafter)
        for name, source in learned_parameters(self.source_drafter).items():
            mine[name].copy_(source)

    # ------------------------------------------------------------------------------ buffers

    def _reserve(self, needed: int) -> None:
        """Caches and state for prompt + new tokens up to ``needed`` (rebuilt when too short)."""
        k = self.chain_length
        slots = round_up(needed + k + 1, 64)
        if slots <= self.max_len:
            return
        if self.max_len:
            warnings.warn(f"batch engine caches of {self.max_len} slots are too short for {needed} "
                          "tokens: rebuilding (and recapturing graphs)", stacklevel=3)
            slots = max(slots, 2 * self.max_len)
        self._graphs.clear()
        self.max_len = slots
        batch, device = self.max_batch, self.device
        long = dict(dtype=torch.long, device=device)
        self.cache = self.model.new_cache(batch, slots)
        self.root_token = torch.zeros(batch, **long)
        self.root_pos = torch.zeros(batch, **long)
        self.count = torch.zeros(batch, **long)  # new tokens so far, the root included
        self.max_new = torch.ones(batch, **long)
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out_tokens = torch.zeros(batch, slots, **long)
        self.eos = torch.full((self.eos_slots,), -1, **long)
        self.step_index = torch.zeros(1, **long)
        window = self.sync_every
        self.uniforms = torch.zeros(window, batch, k + 1, device=device)
        self.rec_active = torch.zeros(window, batch, dtype=torch.bool, device=device)
        self.rec_accepted = torch.zeros(window, batch, **long)
        if self.drafter is None:
            return
        config = self.drafter.config
        dtype = self.drafter.fc.weight.dtype
        self.draft_cache = BatchDraftCache.empty(batch, config.num_attention_heads, slots, config.head_dim, dtype,
                                                 device)
        self.root_logits = torch.zeros(batch, config.draft_vocab_size, dtype=dtype, device=device)
        self.root_hidden = torch.zeros(batch, config.hidden_size, dtype=dtype, device=device)
        if self.record_cycles:
            vocab = config.draft_vocab_size
            self.rec_root_pos = torch.zeros(window, batch, **long)
            self.rec_root_token = torch.zeros(window, batch, **long)
            self.rec_proposals = torch.zeros(window, batch, k, **long)
            self.rec_logq = torch.zeros(window, batch, k, device=device)
            self.rec_target = torch.zeros(window, batch, k, vocab, dtype=self.model.dtype, device=device)
            hidden = self.fast.config.hidden_size  # the target's final-norm states: shipped instead of rec_target
            self.rec_target_hidden = torch.zeros(window, batch, k, hidden, dtype=self.model.dtype, device=device)

    def _record(self, buffer: torch.Tensor, width: int, value: torch.Tensor) -> None:
        buffer[:, :width].index_copy_(0, self.step_index, value[None])

    # ------------------------------------------------------------------------------ one step

    @torch.no_grad()
    def _step(self, width: int, span: int) -> None:
        if self.chain_length == 0:
            self._autoregressive_step(width, span)
        else:
            self._speculative_step(width, span)
        self.step_index.add_(1)

    def _uniforms(self, width: int) -> torch.Tensor | None:
        if self.temperature <= 0:
            return None
        return self.uniforms.index_select(0, self.step_index)[0, :width]

    def _commit(self, width: int, live: torch.Tensor, tokens: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Append the first ``new [B]`` of ``tokens [B, T]`` to each live sequence, cut at EOS and
        at ``max_new_tokens``; returns which sequences go on."""
        count, offsets = self.count[:width], torch.arange(tokens.shape[1], device=tokens.device)
        within = offsets[None] < new[:, None]
        hit = (tokens[..., None] == self.eos).any(-1) & within
        has_eos = hit.any(1)
        kept = torch.where(has_eos, hit.int().argmax(1) + 1, new)  # up to and with the first EOS
        kept = torch.minimum(kept, self.max_new[:width] - count)
        finished = has_eos | (count + new >= self.max_new[:width])
        index = (count[:, None] + offsets).clamp_max(self.out_tokens.shape[1] - 1)
        self.out_tokens[:width].scatter_(1, index, tokens)  # past ``kept``: overwritten or ignored
        count.add_(torch.where(live, kept, 0))
        going_on = live & ~finished
        self.active[:width].copy_(going_on)
        return going_on

    def _autoregressive_step(self, width: int, span: int) -> None:
        live = self.active[:width].clone()
        root_pos, root_token = self.root_pos[:width], self.root_token[:width]
        positions = root_pos[:, None]
        out = self.model(root_token[:, None], positions, self.cache.rows(width), positions,
                         visible_up_to(positions, span), aux_hidden=False, visible=root_pos + 1)
        uniforms = self._uniforms(width)
        token = sample_rows(out.logits[:, 0], self.temperature, None if uniforms is None else uniforms[:, 0])
        # ``_commit`` of one token, in fewer kernels: a live row keeps its token (it ends the
        # row at EOS or at max_new_tokens); a row that is not live is left as it is
        count = self.count[:width]
        finished = (token[:, None] == self.eos).any(-1) | (count + 1 >= self.max_new[:width])
        self.out_tokens[:width].scatter_(1, count.clamp_max(self.out_tokens.shape[1] - 1)[:, None], token[:, None])
        count.add_(live)
        self.active[:width].copy_(live & ~finished)
        root_token.copy_(torch.where(live, token, root_token))
        root_pos.add_(live)
        self._record(self.rec_active, width, live)

    def _speculative_step(self, width: int, span: int) -> None:
        drafter, steps = self.drafter, self.chain_length
        d2t = drafter.draft_to_target
        device = self.device
        live = self.active[:width].clone()
        root_pos, root_token = self.root_pos[:width], self.root_token[:width]
        draft_cache = self.draft_cache.rows(width)
        rows = torch.arange(width, device=device)

        # 1. draft a chain of K tokens from the drafter's output at the root (each pick as the tree
        #    search picks its top 1, ties to the first id: ``argmax_log_prob``)
        pick, logq = argmax_log_prob(self.root_logits[:width])
        proposals, logqs = [pick], [logq]
        hidden = self.root_hidden[:width, None]
        for level in range(1, steps):  # proposal ``level`` is fed at position root + level, slot root + level - 1
            at = (root_pos + level)[:, None]
            draft_cache.prepare(at - 1, at, span)  # it sees the committed entries and the chain's so far
            logits, hidden = drafter(d2t[proposals[-1]], hidden, at, draft_cache)
            pick, logq = argmax_log_prob(logits[:, 0])
            proposals.append(pick)
            logqs.append(logq)
        proposals = torch.cat(proposals, 1)  # [B, K] draft ids
        drafted = d2t[proposals]

        # 2. verify [root, d_1 .. d_K] at each sequence's own positions (== cache slots)
        offsets = torch.arange(steps + 1, device=device)
        positions = root_pos[:, None] + offsets
        out = self.model(torch.cat([root_token[:, None], drafted], 1), positions, self.cache.rows(width),
                         positions, visible_up_to(positions, span), visible=positions + 1)

        # 3. accept, commit, stop
        accepted, bonus = accept_chain(out.logits, drafted, self.temperature, self._uniforms(width))
        accepted = torch.where(live, accepted, 0)
        tokens = torch.where(offsets[None] == accepted[:, None], bonus[:, None],
                             torch.cat([drafted, bonus[:, None]], 1))  # d_1 .. d_r, bonus, junk
        going_on = self._commit(width, live, tokens, accepted + 1)
        self._record(self.rec_active, width, live)
        self._record(self.rec_accepted, width, accepted)
        if self.record_cycles:
            self._record(self.rec_root_pos, width, root_pos)
            self._record(self.rec_root_token, width, root_token)
            self._record(self.rec_proposals, width, proposals)
            self._record(self.rec_logq, width, torch.cat(logqs, 1))
            target = torch.log_softmax(out.logits[:, :steps, d2t].float(), -1)
            self._record(self.rec_target, width, target.to(self.rec_target.dtype))
            self._record(self.rec_target_hidden, width, out.hidden[:, :steps])

        # 4. catch up: the drafter reads the committed tokens with the target's features; its
        #    entry for position p (token p, the target's hidden at p - 1) goes to slot p - 1
        #    (over the chain's entries at those slots), seeing the slots up to its own
        last = root_pos[:, None] + offsets  # each catch-up query's own slot
        draft_cache.prepare(last, last + 1, span)
        prenorm = drafter.hidden_step(tokens, drafter.fuse_target_hidden(out.aux_hidden), last + 1, draft_cache)
        root_hidden = prenorm[rows, accepted]
        keep = going_on[:, None]
        self.root_logits[:width].copy_(torch.where(keep, drafter.draft_logits(root_hidden),
                                                   self.root_logits[:width]))
        self.root_hidden[:width].copy_(torch.where(keep, root_hidden, self.root_hidden[:width]))
        root_token.copy_(torch.where(going_on, bonus, root_token))
        root_pos.copy_(torch.where(going_on, root_pos + accepted + 1, root_pos))

    # ------------------------------------------------------------------------------ graphs

    def _spans(self) -> list[int]:
        """Every span a step may attend: the multiples of the span step, and the whole cache."""
        step = (self.inductor_span_step if self.compile == "inductor" else self.span_step) or self.max_len
        return sorted({min(round_up(s, step), self.max_len) for s in range(step, self.max_len + step, step)})

    def _span_for(self, needed: int) -> int:
        return next(s for s in self._spans() if s >= min(needed, self.max_len))

    def _prepare_graphs(self, width: int) -> None:
        """Capture the step at this width for every span (all rows idle: nothing live changes).
        Under ``inductor`` each span is one more compile (``dynamic=False`` specialises on it)."""
        if self.compile == "static" or all((width, s) in self._graphs for s in self._spans()):
            return
        self.active.zero_()
        self.model.resolve_kernels()  # eagerly: neither a trace nor a capture can check a kernel
        if self.drafter is not None:
            argmax_lse_kernel.wanted(self.root_logits)  # the drafter's pick (``argmax_log_prob``)
        while True:
            try:
                if self.compile == "inductor":
                    from torch import _dynamo

                    # one compiled variant per (width, span): widths are powers of two up to max_batch
                    limit = max(64, (self.max_batch.bit_length() + 1) * len(self._spans()))
                    for name in ("recompile_limit", "cache_size_limit"):
                        if hasattr(_dynamo.config, name):
                            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), limit))
                if self.compile == "inductor" and self._step_fn == self._step:
                    from torch._inductor import config as inductor_config

                    # one attention mask for every layer's SDPA, not a copy made per layer (a
                    # kernel per layer); an option of recent torch only
                    options = ({"cache_sdpa_constraint": True}
                               if hasattr(inductor_config, "cache_sdpa_constraint") else {})
                    options.update(self.inductor_options)
                    self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False, options=options)
                if self.device.type != "cuda":
                    if self.compile != "inductor":
                        raise RuntimeError(f"compile={self.compile!r} needs CUDA graphs on a CUDA device")
                    # off CUDA: compile only (no graphs); one idle step per span compiles it now,
                    # so that a failed compile falls back here rather than mid-generation
                    for span in self._spans():
                        if (width, span) not in self._graphs:
                            self.step_index.zero_()
                            self._step_fn(width, span)
                            self._graphs[(width, span)] = None
                    break
                gc.collect()  # dead decoders' graphs go now, not mid-capture (``gc_paused``)
                for span in self._spans():
                    if (width, span) not in self._graphs:
                        self._capture(width, span)
                break
            except Exception as error:  # a failed compile/capture: one step simpler, loudly
                cuda = self.device.type == "cuda"
                fallback = {"inductor": "graph" if cuda else "static", "graph": "static"}[self.compile]
                message = f"compile={self.compile!r} failed ({type(error).__name__}: {error}); using {fallback!r}"
                warnings.warn(message, stacklevel=3)
                self.compile_errors.append(message)
                self.compile, self._step_fn = fallback, self._step
                self._graphs.clear()
                if fallback == "static":
                    break
        self.active.zero_()
        self.step_index.zero_()

    def _capture(self, width: int, span: int) -> None:
        """Warm up on a side stream (cuBLAS workspaces, allocator, Inductor), then capture."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step_index.zero_()
                self._step_fn(width, span)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.step_index.zero_()
        graph = torch.cuda.CUDAGraph()
        with gc_paused(), torch.cuda.graph(graph, pool=self._pool):
            self._step_fn(width, span)
        torch.cuda.synchronize(self.device)
        self._graphs[(width, span)] = graph

    def _run_step(self, width: int, span: int) -> None:
        if self.compile == "static" or self.device.type != "cuda":  # eager, or compiled without graphs
            self._step_fn(width, span)
        else:
            graph = self._graphs.get((width, span))
            if graph is None:  # not reached: ``generate`` prepares every span of its width
                raise RuntimeError(f"no captured step for width {width}, span {span}")
            graph.replay()

    # ------------------------------------------------------------------------------ prefill

    @torch.no_grad()
    def _admit(self, rows: list[int], prompts: list[list[int]], max_new_tokens: int,
               token_budget: int = 16384) -> None:
        """Prefill ``prompts`` into ``rows`` (right-padded, in chunks of about ``token_budget``
        tokens), sample each one's first token and set its state."""
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths share a chunk
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(prompts[order[end]]) * (end + 1 - start) <= token_budget:
                end += 1
            chunk = order[start:end]
            self._prefill([rows[i] for i in chunk], [prompts[i] for i in chunk], max_new_tokens)
            start = end

    def _prefill(self, rows: list[int], prompts: list[list[int]], max_new_tokens: int) -> None:
        device, count = self.device, len(rows)
        length = max(len(p) for p in prompts)
        ids = torch.zeros(count, length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        ids = ids.to(device)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        rows_t = torch.tensor(rows, device=device)
        positions = torch.arange(length, device=device).expand(count, length)
        temp = self.model.new_cache(count, length)
        out = self.model(ids, positions, temp, 0, None, logits_index=(lengths - 1)[:, None],
                         aux_hidden=self.drafter is not None)
        uniform = torch.rand(count, generator=self.generator, device=device) if self.temperature > 0 else None
        first = sample_rows(out.logits[:, 0], self.temperature, uniform)
        self.cache.copy_rows_from(rows_t, temp)
        if self.drafter is not None:
            # the drafter reads x_1 .. x_{n-1}, then the first new token, at positions 1 .. n
            shifted = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            shifted[torch.arange(count, device=device), lengths - 1] = first
            prefill = PrefillDraftCache()
            prenorm = self.drafter.hidden_step(
                shifted, self.drafter.fuse_target_hidden(out.aux_hidden), positions + 1, prefill)
            root_hidden = prenorm[torch.arange(count, device=device), lengths - 1]
            self.root_hidden[rows_t] = root_hidden
            self.root_logits[rows_t] = self.drafter.draft_logits(root_hidden)
            self.draft_cache.copy_rows_from(rows_t, prefill)
        self.root_token[rows_t] = first
        self.root_pos[rows_t] = lengths
        self.count[rows_t] = 1
        self.max_new[rows_t] = max_new_tokens
        self.out_tokens[rows_t, 0] = first
        self.active[rows_t] = ~(first[:, None] == self.eos).any(-1) & (max_new_tokens > 1)

    # ------------------------------------------------------------------------------ generate

    def _set_eos(self, eos: set[int]) -> None:
        if len(eos) > self.eos_slots:
            raise ValueError(f"at most {self.eos_slots} stop tokens (eos_slots), got {len(eos)}")
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(sorted(eos), device=self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> BatchGenerationResult:
        """Decode every prompt (at most ``max_batch`` at a time; finished rows take the next)."""
        prompts = [_as_prompt(p) for p in prompts]
        if not prompts:
            raise ValueError("no prompt to generate from")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        setup = time.perf_counter()
        self._refresh_drafter()
        self._reserve(max(len(p) for p in prompts) + max_new_tokens)
        width = min(self.max_batch, 1 << (len(prompts) - 1).bit_length())
        self._prepare_graphs(width)  # every span up front: no compile or capture inside a timed call
        self._set_eos(_eos_set(eos_token_id))
        self.active.zero_()
        self._sync()
        start = time.perf_counter()
        setup = start - setup

        k = self.chain_length
        tokens: list[list[int] | None] = [None] * len(prompts)
        row_sequence = [-1] * width
        pending = list(range(len(prompts)))[::-1]
        gathered: list[dict[str, torch.Tensor]] = []
        steps = 0
        state = torch.zeros(3, width, dtype=torch.long)  # host copy: active, count, root position
        while True:
            free = [b for b in range(width) if not state[0, b]]
            if pending and free:
                take = free[: len(pending)]
                admitted = [pending.pop() for _ in take]
                for b, s in zip(take, admitted):
                    row_sequence[b] = s
                with phase("ar/prefill" if k == 0 else "batch/prefill"):  # no-op unless profiling
                    self._admit(take, [prompts[s] for s in admitted], max_new_tokens)
                state = self._host_state(width)
                self._harvest(state, row_sequence, tokens, take)
                continue  # rows whose first token ended them are free again
            if not bool(state[0].any()):
                break
            live = state[0].bool()
            run = int(min(self.sync_every, int((max_new_tokens - state[1][live]).max())))
            span = self._span_for(int(state[2][live].max()) + run * (k + 1))
            if self.temperature > 0:
                self.uniforms.uniform_(generator=self.generator)
            self.step_index.zero_()
            step_phase = "ar/decode" if k == 0 else "batch/step"
            for _ in range(run):
                with phase(step_phase, sync=False):  # a host check only every sync_every steps
                    self._run_step(width, span)
            steps += run
            before = live
            state = self._host_state(width)
            gathered.append(self._collect(run, width, row_sequence, steps - run))
            ended = [b for b in range(width) if before[b] and not state[0, b]]
            self._harvest(state, row_sequence, tokens, ended)
        self._sync()
        wall = time.perf_counter() - start
        return self._result(prompts, tokens, gathered, steps, wall, setup)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _host_state(self, width: int) -> torch.Tensor:
        return torch.stack([self.active[:width].long(), self.count[:width], self.root_pos[:width]]).cpu()

    def _harvest(self, state: torch.Tensor, row_sequence: list[int], tokens: list, rows: list[int]) -> None:
        """Copy out the tokens of sequences that ended in ``rows``."""
        done = [b for b in rows if not state[0, b]]
        if not done:
            return
        out = self.out_tokens[done, : int(state[1, done].max())].cpu()
        for i, b in enumerate(done):
            tokens[row_sequence[b]] = out[i, : int(state[1, b])].tolist()

    def _collect(self, run: int, width: int, row_sequence: list[int], first_step: int) -> dict[str, torch.Tensor]:
        """The records of the last ``run`` steps, for the rows that were live in them."""
        live = self.rec_active[:run, :width]
        step, row = torch.nonzero(live, as_tuple=True)
        sequences = torch.tensor(row_sequence, device=self.device)
        out = {"sequence": sequences[row], "step": first_step + step}
        if self.chain_length:
            out["accepted"] = self.rec_accepted[step, row]
        if self.record_cycles:
            for name in ("root_pos", "root_token", "proposals", "logq", "target", "target_hidden"):
                out[name] = getattr(self, f"rec_{name}")[step, row]
        return out

    def _result(self, prompts, tokens, gathered, steps: int, wall: float, setup: float) -> BatchGenerationResult:
        accept_lengths: list[list[int]] = [[] for _ in prompts]
        merged: dict[str, torch.Tensor] = {}
        if self.chain_length and gathered:
            # (sequence, cycle) order; each window's records go straight to their rows of the
            # output (the target log-probs are large: no concatenated copy of them)
            sizes = [g["sequence"].shape[0] for g in gathered]
            key = torch.cat([g["sequence"] * (steps + 1) + g["step"] for g in gathered])
            destination = torch.empty_like(key)
            destination[torch.argsort(key)] = torch.arange(key.shape[0], device=key.device)
            for name in list(gathered[0]):
                first = gathered[0][name]
                out = first.new_empty((key.shape[0], *first.shape[1:]))
                for rows, window in zip(destination.split(sizes), gathered):
                    out.index_copy_(0, rows, window.pop(name))
                merged[name] = out
            for s, a in zip(merged["sequence"].tolist(), merged["accepted"].tolist()):
                accept_lengths[s].append(a)
        cycles = None
        if self.record_cycles:
            k, vocab = self.chain_length, self.drafter.config.draft_vocab_size
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            get = merged.get
            cycles = ChainCycles(
                sequence=get("sequence", empty), root_pos=get("root_pos", empty),
                accepted=get("accepted", empty), root_token=get("root_token", empty),
                proposals=get("proposals", empty.reshape(0, k)),
                target_logprobs=get("target", torch.zeros(0, k, vocab, dtype=self.model.dtype, device=self.device)),
                rollout_logprobs=get("logq", torch.zeros(0, k, device=self.device)),
                target_hidden=get("target_hidden", torch.zeros(0, k, self.fast.config.hidden_size,
                                                                dtype=self.model.dtype, device=self.device)),
            )
        return BatchGenerationResult(tokens, accept_lengths, steps, wall, setup, cycles)


def batch_generate(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    chain_length: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | Iterable[int] | None = None,
    compile: str = "auto",
    max_batch: int = 64,
) -> BatchGenerationResult:
    """One-shot helper: ``drafter=None`` (and ``chain_length=0``) is batched autoregressive decoding."""
    engine = BatchGenerator(target, drafter, chain_length, temperature, seed, compile=compile,
                            max_batch=max_batch, max_len=max(len(p) for p in prompts) + max_new_tokens)
    return engine.generate(prompts, max_new_tokens, eos_token_id)
