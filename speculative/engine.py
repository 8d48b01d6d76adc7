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
Batch size is 1: the tree builder and the target forward are batched, but per-sequence
acceptance lengths would make the drafter's cat-growing cache ragged; serving-scale batching
belongs to vLLM/SGLang, this engine is for measuring acceptance and for RL rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from speculative.kv_cache import MaskedKVCache
from speculative.llama import FastLlama, StaticKVCache, causal_slot_mask
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
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim == 2:
            if prompt_ids.shape[0] != 1:
                raise ValueError("the generator decodes one sequence at a time")
            prompt_ids = prompt_ids[0]
        return [int(t) for t in prompt_ids.tolist()]
    if hasattr(prompt_ids, "input_ids"):  # a BatchEncoding from apply_chat_template
        return _as_prompt(torch.as_tensor(prompt_ids["input_ids"]))
    return [int(t) for t in prompt_ids]


class SpeculativeGenerator:
    """Speculative (or, without a drafter, plain autoregressive) decoding of one sequence.

    ``target`` is a ``speculative.target.TargetModel`` (its Llama weights are shared, not
    copied); ``drafter`` an ``Eagle3Drafter`` trained for the same aux layers.
    """

    def __init__(
        self,
        target,
        drafter=None,
        tree: TreeConfig | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        record_steps: bool = False,
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
        self._cache: StaticKVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.fast.device

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _cache_for(self, length: int) -> StaticKVCache:
        """Reuse the preallocated cache while it is long enough (stale entries are masked out)."""
        if self._cache is None or self._cache.max_len < length:
            self._cache = self.fast.new_cache(1, length)
        return self._cache

    def _prefill(self, prompt: list[int], cache: StaticKVCache):
        ids = torch.tensor([prompt], device=self.device)
        n = len(prompt)
        out = self.fast(
            ids, torch.arange(n, device=self.device)[None], cache, 0,
            causal_slot_mask(0, n, n, device=self.device), logits_rows=slice(n - 1, n),
        )
        return ids, out

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
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        eos = _eos_set(eos_token_id)
        config = self.tree_config
        start = time.perf_counter()
        device = self.device
        # The last verification chunk (1 + N) may start just before the max_new_tokens-th token.
        cache = self._cache_for(len(prompt) + max_new_tokens + config.total_tokens + 2)
        ids, out = self._prefill(prompt, cache)
        forwards = 1
        root_token = sample_token(out.logits[0, -1], self.temperature, self.generator)
        new = [root_token]
        result = GenerationResult([], [], 0, 0.0)
        new, done = self._stop(new, max_new_tokens, eos)

        drafter = self.drafter
        dcache = MaskedKVCache()
        n = len(prompt)
        if not done:
            # Drafter prefill: tokens x_1..x_n at positions 1..n with h_{p-1} = fc(aux_{p-1}).
            d_ids = torch.cat([ids[:, 1:], torch.tensor([[root_token]], device=device)], dim=1)
            logits, prenorm = drafter(
                d_ids, drafter.fuse_target_hidden(out.aux_hidden),
                torch.arange(1, n + 1, device=device)[None], dcache,
            )
            root_logits, root_hidden = logits[:, -1], prenorm[:, -1]
        root_pos = n  # the root token's position == its target cache slot
        while not done:
            tree = build_draft_tree(
                drafter, dcache, root_logits, root_hidden,
                torch.tensor([root_pos], device=device), config, generator=self.generator,
            )
            chunk = torch.cat([torch.tensor([[root_token]], device=device), tree.tokens], dim=1)
            mask = torch.cat(
                [torch.ones(1, chunk.shape[1], root_pos, dtype=torch.bool, device=device),
                 tree.chunk_mask()], dim=-1,
            )
            out = self.fast(chunk, tree.chunk_positions(), cache, root_pos, mask)
            forwards += 1
            step = verify_tree(tree, out.logits, self.temperature, self.generator)[0]
            if self.record_steps:
                result.steps.append(step)
                result.trees.append(tree)
            result.accept_lengths.append(step.accept_length)
            path = step.accepted_nodes
            if path:  # accepted nodes sit at slots root_pos + 1 + node; move them behind the root
                src = torch.tensor([[root_pos + 1 + i for i in path]], device=device)
                cache.compact(src, root_pos + 1)
            new, done = self._stop(new + step.tokens, max_new_tokens, eos)
            if done:
                break
            # Drafter catch-up on the accepted tokens and the bonus, with the target's features.
            rows = torch.tensor([0] + [1 + i for i in path], device=device)
            logits, prenorm = drafter(
                torch.tensor([step.tokens], device=device),
                drafter.fuse_target_hidden(out.aux_hidden[:, rows]),
                torch.arange(root_pos + 1, root_pos + 2 + len(path), device=device)[None],
                dcache,
            )
            root_logits, root_hidden = logits[:, -1], prenorm[:, -1]
            root_token = step.bonus_token
            root_pos += 1 + len(path)
        result.tokens = new
        result.target_forwards = forwards
        result.wall_time = time.perf_counter() - start
        return result

    @torch.no_grad()
    def generate_autoregressive(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> GenerationResult:
        """The baseline: same static-cache target forward, one token per forward."""
        prompt = _as_prompt(prompt_ids)
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        eos = _eos_set(eos_token_id)
        start = time.perf_counter()
        device = self.device
        cache = self._cache_for(len(prompt) + max_new_tokens + 1)
        _, out = self._prefill(prompt, cache)
        forwards = 1
        new = [sample_token(out.logits[0, -1], self.temperature, self.generator)]
        new, done = self._stop(new, max_new_tokens, eos)
        pos = len(prompt)
        while not done:
            out = self.fast(
                torch.tensor([[new[-1]]], device=device), torch.tensor([[pos]], device=device),
                cache, pos, torch.ones(1, 1, pos + 1, dtype=torch.bool, device=device),
            )
            forwards += 1
            pos += 1
            new.append(sample_token(out.logits[0, -1], self.temperature, self.generator))
            new, done = self._stop(new, max_new_tokens, eos)
        return GenerationResult(new, [], forwards, time.perf_counter() - start)


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
) -> list[GenerationResult]:
    """What a CLI ``draftrl generate``/``benchmark`` calls: decode each prompt in turn.

    ``drafter=None`` gives the autoregressive baseline with the same target forward.
    """
    engine = SpeculativeGenerator(target, drafter, tree, temperature, seed)
    return [engine.generate(p, max_new_tokens, eos_token_id) for p in prompts]
