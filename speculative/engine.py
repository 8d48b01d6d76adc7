"""A Ray-free speculative decoding engine: EAGLE-3 drafter + dynamic draft trees + tree verification.

One generation step (batch size 1):

    1. draft a tree from the root: the pending token (sampled by the target, not yet run
       through it) with the drafter's distribution and pre-norm hidden at that token;
    2. verify: ONE target forward over [root, nodes...] written at the cache slots after the
       prefix, with tree attention (a node sees the prefix, the root and its ancestors);
    3. accept a path and take the target's bonus/correction token (``speculative.verify``);
    4. compact the target cache: the accepted nodes' entries move right behind the root's;
    5. re-prefill the drafter on the accepted tokens + bonus with fc(target aux hidden) of the
       root and accepted nodes from the verification forward - the inference protocol of
       ``speculative.ttt``: the drafter at position p reads token x_p and h_{p-1}.

The drafter's own tree entries are discarded (they were computed from drafted hidden states).

The loop is written once against a small backend interface (prefill, decode, drafter_prefill,
draft_verify, catch_up): ``_EagerBackend`` below (dynamic shapes, the CPU default) or
``speculative.graphs.StaticDecoder`` (fixed shapes; on GPU each step is one CUDA-graph replay,
steps 1-2 together, 4-5 together). Sampling, verification and stopping stay on the host.
Batch size is 1: the tree builder and the target forward are batched, but per-sequence
acceptance lengths would make the drafter's cat-growing cache ragged; serving-scale batching
belongs to vLLM/SGLang, this engine is for measuring acceptance and for RL rollouts.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from speculative.kv_cache import MaskedKVCache
from speculative.llama import FastLlama, StaticKVCache, causal_slot_mask
from speculative.profiling import phase
from speculative.tree import DraftTree, TreeConfig, build_draft_tree
from speculative.verify import VerifyStep, verify_tree


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (prompt excluded), cut after EOS / max_new_tokens
    accept_lengths: list[int]  # per verification forward: accepted draft tokens (bonus excluded)
    target_forwards: int  # including the prefill
    wall_time: float  # seconds
    steps: list[VerifyStep] = field(default_factory=list)  # when ``record_steps``
    trees: list[DraftTree] = field(default_factory=list)  # when ``record_steps``
    # when ``record_steps``: the verification logits [1 + N, Vd] at the draft vocabulary (row 0 =
    # root), i.e. the target's view of every drafted state; Draft-OPD trains on them
    verify_logits: list[torch.Tensor] = field(default_factory=list)
    root_positions: list[int] = field(default_factory=list)  # when ``record_steps``

    @property
    def tau(self) -> float:
        """Mean tokens per verification forward, the bonus token included (EAGLE's tau).

        1.0 for plain autoregressive decoding; the prefill forward is not counted.
        """
        if not self.accept_lengths:
            return 1.0
        return 1.0 + sum(self.accept_lengths) / len(self.accept_lengths)

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.wall_time if self.wall_time > 0 else float("inf")


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Argmax at T = 0, else a sample from softmax(logits / T) (the target's own decoding rule)."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return int(torch.multinomial(probs.float(), 1, generator=generator))


def _as_prompt(prompt_ids) -> list[int]:
    prompt = _prompt_list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    return prompt


def _prompt_list(prompt_ids) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim == 2:
            if prompt_ids.shape[0] != 1:
                raise ValueError("the generator decodes one sequence at a time")
            prompt_ids = prompt_ids[0]
        return [int(t) for t in prompt_ids.tolist()]
    if hasattr(prompt_ids, "input_ids"):  # a BatchEncoding from apply_chat_template
        return _prompt_list(torch.as_tensor(prompt_ids["input_ids"]))
    return [int(t) for t in prompt_ids]


COMPILE_MODES = ("auto", "off", "static", "graph", "inductor")


def resolve_compile_mode(mode: str, device: torch.device | str) -> str:
    """``auto``: CUDA graphs on a CUDA device, the eager path elsewhere.

    ``inductor`` (torch.compile + CUDA graphs) runs without graphs on CPU: compile only.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "auto":
        return "graph" if torch.device(device).type == "cuda" else "off"
    if mode == "graph" and torch.device(device).type != "cuda":
        raise ValueError("compile mode 'graph' (CUDA graphs) needs a CUDA device")
    return mode


class _EagerBackend:
    """The reference path: dynamic shapes, a growing drafter cache, nothing captured."""

    greedy_graphs = cycle_graphs = False  # T = 0 acceptance on the device is the static paths' (``StaticDecoder``)

    def __init__(self, fast: FastLlama, drafter, tree: TreeConfig, generator: torch.Generator):
        self.fast, self.drafter, self.tree_config, self.generator = fast, drafter, tree, generator
        self.device = fast.device
        self.cache: StaticKVCache | None = None
        self.draft_cache = MaskedKVCache()
        self.root_logits = self.root_hidden = self.verify_aux = None

    def reserve(self, prompt_len: int, max_new_tokens: int) -> None:
        """Reuse the preallocated cache while it is long enough (stale entries are masked out)."""
        # The last verification chunk (1 + N) may start just before the max_new_tokens-th token.
        length = prompt_len + max_new_tokens + self.tree_config.total_tokens + 2
        if self.cache is None or self.cache.max_len < length:
            self.cache = self.fast.new_cache(1, length)

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def prefill(self, prompt: list[int]):
        ids = torch.tensor([prompt], device=self.device)
        n = len(prompt)
        out = self.fast(
            ids, torch.arange(n, device=self.device)[None], self.cache, 0,
            causal_slot_mask(0, n, n, device=self.device), logits_rows=slice(n - 1, n),
        )
        return ids, out

    def decode(self, token: int, pos: int) -> torch.Tensor:
        out = self.fast(
            torch.tensor([[token]], device=self.device), torch.tensor([[pos]], device=self.device),
            self.cache, pos, torch.ones(1, 1, pos + 1, dtype=torch.bool, device=self.device),
        )
        return out.logits[0, -1]

    def drafter_prefill(self, ids: torch.Tensor, aux_hidden: torch.Tensor, root_token: int) -> None:
        # Drafter prefill: tokens x_1..x_n at positions 1..n with h_{p-1} = fc(aux_{p-1}).
        n = ids.shape[1]
        self.draft_cache = MaskedKVCache()
        d_ids = torch.cat([ids[:, 1:], torch.tensor([[root_token]], device=self.device)], dim=1)
        logits, prenorm = self.drafter(
            d_ids, self.drafter.fuse_target_hidden(aux_hidden),
            torch.arange(1, n + 1, device=self.device)[None], self.draft_cache,
        )
        self.root_logits, self.root_hidden = logits[:, -1], prenorm[:, -1]

    def draft_verify(self, root_token: int, root_pos: int, greedy: bool = False) -> tuple[DraftTree, torch.Tensor]:
        if greedy:
            raise ValueError("the eager path verifies on the host")
        device = self.device
        tree = build_draft_tree(
            self.drafter, self.draft_cache, self.root_logits, self.root_hidden,
            torch.tensor([root_pos], device=device), self.tree_config, generator=self.generator,
        )
        chunk = torch.cat([torch.tensor([[root_token]], device=device), tree.tokens], dim=1)
        mask = torch.cat(
            [torch.ones(1, chunk.shape[1], root_pos, dtype=torch.bool, device=device),
             tree.chunk_mask()], dim=-1,
        )
        out = self.fast(chunk, tree.chunk_positions(), self.cache, root_pos, mask)
        self.verify_aux = out.aux_hidden
        return tree, out.logits

    def catch_up(self, tokens: list[int], path: list[int], root_pos: int, prepared: bool = False) -> None:
        if prepared:
            raise ValueError("the eager path builds the catch-up's inputs itself")
        device = self.device
        if path:  # accepted nodes sit at slots root_pos + 1 + node; move them behind the root
            src = torch.tensor([[root_pos + 1 + i for i in path]], device=device)
            self.cache.compact(src, root_pos + 1)
        # Drafter catch-up on the accepted tokens and the bonus, with the target's features.
        rows = torch.tensor([0] + [1 + i for i in path], device=device)
        logits, prenorm = self.drafter(
            torch.tensor([tokens], device=device),
            self.drafter.fuse_target_hidden(self.verify_aux[:, rows]),
            torch.arange(root_pos + 1, root_pos + 1 + len(tokens), device=device)[None],
            self.draft_cache,
        )
        self.root_logits, self.root_hidden = logits[:, -1], prenorm[:, -1]


class SpeculativeGenerator:
    """Speculative (or, without a drafter, plain autoregressive) decoding of one sequence.

    ``target`` is a ``speculative.target.TargetModel`` (its Llama weights are shared, not
    copied); ``drafter`` an ``Eagle3Drafter`` trained for the same aux layers.

    ``compile`` picks how the per-step work runs: ``off`` (eager, dynamic shapes; the CPU
    path), ``static`` (the fixed-shape code of ``speculative.graphs`` run eagerly: what CPU
    tests check), ``graph`` (the same, captured as CUDA graphs), ``inductor`` (compiled by
    ``torch.compile`` first, then captured; minutes of compiling) or ``auto`` (graph on CUDA).
    Both the speculative and the autoregressive path use it, so their timings compare like
    with like. ``max_len`` presizes the static cache (prompt + new tokens); a longer request
    rebuilds it (and recaptures the graphs), which a benchmark should avoid while timing.
    ``fused_target``: the static paths run the target as ``FusedLlama`` (a third of the kernels;
    False: ``FastLlama``, the earlier forward, kept for A/B timing). ``span_step``: the static
    paths verify over cache spans of this granularity (one graph each; None: the whole cache).
    ``device_greedy``: at T = 0 the static paths accept inside the draft+verify graph (False: the
    host walks the tree, the earlier path, kept for A/B timing). ``pipelined`` (with it): a whole
    cycle is one graph and the host enqueues the next before reading the last (False: the host
    reads each cycle's outcome, then replays the catch-up; kept for A/B timing).
    ``device_sampled`` / ``pipelined_sampled``: the same two switches at T > 0 with top-k trees
    (rejection sampling in the graph, ``speculative.verify.stochastic_accept_on_device``; False:
    the host verifier). Sampled draft chains and recorded steps (Draft-OPD rollouts need the host
    verifier's rejected nodes and target distributions) always verify on the host. A temperature
    change that needs the other kind of acceptance graphs rebuilds the static decoder (once).
    """

    def __init__(
        self,
        target,
        drafter=None,
        tree: TreeConfig | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        record_steps: bool = False,
        compile: str = "off",
        max_len: int | None = None,
        fused_target: bool = True,
        span_step: int | None = 128,
        device_greedy: bool = True,
        pipelined: bool = True,
        device_sampled: bool = True,
        pipelined_sampled: bool = True,
    ):
        self.target = target
        self.fast = FastLlama.from_target(target)
        self.drafter = drafter.eval() if drafter is not None else None
        if drafter is not None and tuple(drafter.config.aux_layer_ids) != tuple(target.aux_layer_ids):
            raise ValueError(
                f"drafter reads aux layers {tuple(drafter.config.aux_layer_ids)}, the target "
                f"provides {tuple(target.aux_layer_ids)}"
            )
        self.tree_config = tree or TreeConfig()
        self.temperature = float(temperature)
        self.generator = torch.Generator(device=self.fast.device).manual_seed(seed)
        self.record_steps = record_steps
        self.compile = resolve_compile_mode(compile, self.fast.device)
        if self.compile != "off" and self.tree_config.sample_temperature is not None:
            warnings.warn("sampled draft chains run eagerly (compile='off')", stacklevel=2)
            self.compile = "off"
        self.max_len = max_len
        self.fused_target = fused_target
        self.span_step = span_step
        self.device_greedy = device_greedy
        self.pipelined = pipelined
        self.device_sampled = device_sampled
        self.pipelined_sampled = pipelined_sampled
        self.compile_errors: list[str] = []  # fallbacks taken when compiling/capturing failed
        self._eager = _EagerBackend(self.fast, self.drafter, self.tree_config, self.generator)
        self._static = None
        if self.compile != "off" and max_len is not None:
            self._static_for(1, max_len - 1)

    @property
    def device(self) -> torch.device:
        return self.fast.device

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def accept_mode(self) -> str:
        """Where the static paths accept at the current temperature: ``pipelined`` (whole cycles
        as one graph), ``device`` (in the draft+verify graph) or ``host`` (``verify_tree``)."""
        if self.drafter is None or self.record_steps:
            return "host"
        if self.temperature <= 0:
            on_device, pipelined = self.device_greedy, self.pipelined
        elif self.tree_config.sample_temperature is not None:  # sampled chains: q is not a point mass
            return "host"
        else:
            on_device, pipelined = self.device_sampled, self.pipelined_sampled
        return ("pipelined" if pipelined else "device") if on_device else "host"

    def _decoder_serves(self, decoder, mode: str) -> bool:
        """Whether ``decoder``'s graphs run ``mode`` at the current temperature (any decoder can
        verify on the host: the plain draft+verify graphs are always captured)."""
        if mode == "host" or self.drafter is None:
            return True
        return (decoder.cycle_graphs, decoder.greedy_graphs, decoder.sampling) == (
            mode == "pipelined", mode == "device", self.temperature > 0)

    def _static_for(self, prompt_len: int, max_new_tokens: int):
        from speculative.graphs import StaticDecoder

        mode = self.accept_mode()
        fits = self._static is not None and self._static.fits(prompt_len, max_new_tokens)
        if not fits or not self._decoder_serves(self._static, mode):
            needed = prompt_len + max_new_tokens
            if fits:  # the other acceptance graphs (a temperature change): no smaller than before
                needed = max(needed, self._static.max_len - self._static.chunk_len - self._static.margin)
            elif self._static is not None:
                warnings.warn(
                    f"static cache of {self._static.max_len} slots is too short for "
                    f"{needed} tokens: rebuilding (and recapturing graphs)", stacklevel=3,
                )
                needed = max(needed, 2 * self._static.max_len)
            chunk = 1 + self.tree_config.total_tokens if self.drafter is not None else 1
            cycles = mode == "pipelined" and self.drafter is not None
            margin = StaticDecoder.margin_for(self.tree_config, cycles)
            had_decoder, self._static = self._static is not None, None  # free the old buffers and graphs first
            if had_decoder and self.device.type == "cuda":  # (a StaticDecoder is a reference cycle: collect it)
                gc.collect()
            while True:
                cuda = self.device.type == "cuda"
                try:
                    self._static = StaticDecoder(
                        self.fast, self.drafter, self.tree_config, needed + chunk + margin,
                        use_graphs=self.compile == "graph" or (self.compile == "inductor" and cuda),
                        compiled=self.compile == "inductor", fused=self.fused_target, span_step=self.span_step,
                        greedy_graphs=mode != "host", cycle_graphs=cycles,
                        sampling=mode != "host" and self.temperature > 0, generator=self.generator,
                    )
                    break
                except Exception as error:  # a failed compile/capture: one step simpler, loudly
                    fallback = {"inductor": "graph" if cuda else "static", "graph": "static"}.get(self.compile)
                    if fallback is None:
                        raise
                    message = f"compile={self.compile!r} failed ({type(error).__name__}: {error}); using {fallback!r}"
                    warnings.warn(message, stacklevel=3)
                    self.compile_errors.append(message)
                    self.compile = fallback
        return self._static

    def _backend(self, prompt_len: int, max_new_tokens: int):
        if self.compile == "off":
            self._eager.reserve(prompt_len, max_new_tokens)
            return self._eager
        return self._static_for(prompt_len, max_new_tokens)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _stop(tokens: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], bool]:
        for i, tok in enumerate(tokens[:max_new_tokens]):
            if tok in eos:
                return tokens[: i + 1], True
        return tokens[:max_new_tokens], len(tokens) >= max_new_tokens

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> GenerationResult:
        """Speculative decoding; falls back to ``generate_autoregressive`` without a drafter."""
        if self.drafter is None:
            return self.generate_autoregressive(prompt_ids, max_new_tokens, eos_token_id)
        prompt = _as_prompt(prompt_ids)
        eos = _eos_set(eos_token_id)
        backend = self._backend(len(prompt), max_new_tokens)
        self._sync()
        start = time.perf_counter()
        backend.begin()
        with phase("spec/prefill"):  # (a no-op unless ``draftrl eval --profile`` records)
            ids, out = backend.prefill(prompt)
            root_token = sample_token(out.logits[0, -1], self.temperature, self.generator)
        forwards = 1
        new = [root_token]
        result = GenerationResult([], [], 0, 0.0)
        new, done = self._stop(new, max_new_tokens, eos)
        if not done:
            with phase("spec/drafter_prefill"):
                backend.drafter_prefill(ids, out.aux_hidden, root_token)
        root_pos = len(prompt)  # the root token's position == its target cache slot
        # On the static paths (T = 0, or T > 0 with top-k trees) acceptance runs in the draft+verify
        # graph, the host reads a few integers (recorded steps need the host verifier's full detail)
        greedy = self.accept_mode() != "host"
        if greedy and getattr(backend, "sampling", False):
            backend.set_temperature(self.temperature)
        if not done and greedy and backend.cycle_graphs:
            new, forwards = self._pipelined_cycles(backend, new, root_token, root_pos, max_new_tokens, eos, result,
                                                   forwards)
            done = True
        on_device = greedy and backend.greedy_graphs
        while not done:
            with phase("spec/draft_verify"):
                tree, logits = backend.draft_verify(root_token, root_pos, greedy=on_device)
            forwards += 1
            with phase("spec/verify_host"):
                if on_device:
                    step = backend.greedy_step()
                else:
                    step = verify_tree(tree, logits, self.temperature, self.generator)[0]
            if self.record_steps:
                result.steps.append(step)
                result.trees.append(tree if self.compile == "off" else _clone_tree(tree))
                result.verify_logits.append(logits[0][:, self.drafter.draft_to_target].clone())
                result.root_positions.append(root_pos)
            result.accept_lengths.append(step.accept_length)
            new, done = self._stop(new + step.tokens, max_new_tokens, eos)
            if done:
                break
            path = step.accepted_nodes
            with phase("spec/catch_up"):
                backend.catch_up(step.tokens, path, root_pos, prepared=on_device)
            root_token = step.bonus_token
            root_pos += 1 + len(path)
        backend.end()
        self._sync()
        result.tokens = new
        result.target_forwards = forwards
        result.wall_time = time.perf_counter() - start
        return result

    def _pipelined_cycles(self, backend, new: list[int], root_token: int, root_pos: int, max_new_tokens: int,
                          eos: set[int], result: GenerationResult, forwards: int) -> tuple[list[int], int]:
        """Cycles (T = 0, or T > 0 with device sampling) as whole-cycle graphs, one enqueued ahead
        of the outcome the host reads (``StaticDecoder.launch_cycle``): the root after cycle n is
        at most ``depth + 1`` slots past cycle n's, which bounds the span cycle n + 1 needs before
        cycle n is read."""
        depth = self.tree_config.depth
        backend.start_cycles(root_token, root_pos)
        with phase("spec/draft_verify", sync=False):
            pending = backend.launch_cycle(root_pos)
        while True:
            with phase("spec/draft_verify", sync=False):  # draft, verify, accept and catch up: one graph
                ahead = backend.launch_cycle(root_pos + depth + 1)
            with phase("spec/verify_host"):  # waits for the cycle before ``ahead``
                step = backend.cycle_step(pending)
            forwards += 1
            result.accept_lengths.append(step.accept_length)
            new, done = self._stop(new + step.tokens, max_new_tokens, eos)
            if done:  # ``ahead`` ran for nothing: the price of not waiting for the host
                return new, forwards
            root_pos += 1 + step.accept_length
            pending = ahead

    @torch.no_grad()
    def generate_autoregressive(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> GenerationResult:
        """The baseline: same static-cache target forward, one token per forward."""
        prompt = _as_prompt(prompt_ids)
        eos = _eos_set(eos_token_id)
        backend = self._backend(len(prompt), max_new_tokens)
        self._sync()
        start = time.perf_counter()
        with phase("ar/prefill"):
            _, out = backend.prefill(prompt)
            new = [sample_token(out.logits[0, -1], self.temperature, self.generator)]
        forwards = 1
        new, done = self._stop(new, max_new_tokens, eos)
        pos = len(prompt)
        while not done:
            with phase("ar/decode", sync=False):  # the sampled token's int() waits for the step
                logits = backend.decode(new[-1], pos)
                new.append(sample_token(logits, self.temperature, self.generator))
            forwards += 1
            pos += 1
            new, done = self._stop(new, max_new_tokens, eos)
        self._sync()
        return GenerationResult(new, [], forwards, time.perf_counter() - start)


def _clone_tree(tree: DraftTree) -> DraftTree:
    from speculative.graphs import clone_tree

    return clone_tree(tree)


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def generate(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    tree: TreeConfig | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | Iterable[int] | None = None,
    compile: str = "off",
) -> list[GenerationResult]:
    """What a CLI ``draftrl generate``/``benchmark`` calls: decode each prompt in turn.

    ``drafter=None`` gives the autoregressive baseline with the same target forward.
    """
    engine = SpeculativeGenerator(target, drafter, tree, temperature, seed, compile=compile)
    return [engine.generate(p, max_new_tokens, eos_token_id) for p in prompts]
