"""Static-shape decoding for the speculative engine, replayed as CUDA graphs on GPU (gpt-fast style).

A 135M target is launch-bound: a decode step is ~450 small kernels, so eager PyTorch spends its
time in Python and kernel launches, not in math. Here every per-step computation has shapes that
depend only on the tree config and a fixed cache length ``max_len``, never on values, so each can
be captured once as a ``torch.cuda.CUDAGraph`` and replayed with one launch:

* ``decode``: one autoregressive target step (the baseline);
* ``draft_verify``: the whole draft-tree search (``depth - 1`` drafter forwards, top-k, selection)
  *and* the verification forward of the fixed-size chunk [root, N nodes], in ONE graph (one per
  cache *span*: the verification attends over the first ``span`` slots, the shortest multiple of
  ``span_step`` that holds the sequence, as the batched engine's steps do; attending over the
  whole cache at every step made its attention 2.5x the AR step's on the H200);
* ``catch_up[m]``: compaction of the m - 1 accepted nodes in the target cache plus the drafter's
  re-prefill of the m accepted tokens (one graph per m = 1 .. depth + 1).

Values that change between steps (root token and position, accepted tokens) live in static input
buffers that the host fills before a replay; attention masks are built inside the graphs from
those positions (stale slots are masked out, never read).

At T = 0 (``draft_verify(..., greedy=True)``, a second graph per span) the acceptance runs in
the draft+verify graph too (``speculative.verify.greedy_accept_on_device``), which also writes the
catch-up's inputs: the host copies ``2 + 2 * depth`` integers a cycle and replays the catch-up.
With ``cycle_graphs`` (T = 0, pipelined) one graph per span runs a whole cycle: draft, verify,
accept, the catch-up over all ``depth + 1`` columns (those past the accepted count are computed
and ignored: the cache slots they write lie past the new root, masked until a later cycle writes
them again) and the advance of the root token and position, on the device. The host enqueues the
next cycle before it reads the last one's outcome (``launch_cycle`` / ``cycle_step``), so the GPU
does not wait for the host between cycles; a generation that stops computes one cycle too many.
With ``sampling=True`` (T > 0, top-k trees) those same graphs accept by rejection sampling instead
(``speculative.verify.stochastic_accept_on_device``): the temperature is a device buffer
(``set_temperature``) and the ``N + 1`` uniforms a cycle uses are drawn from ``generator`` into a
buffer before each replay (one eager kernel, enqueued like the replay; no random number generator
inside a graph, as in the batched engine). Without it, at T > 0, and where steps are recorded, the
host verifies the tree (``speculative.verify``).
Prefills have a prompt-dependent length and run eagerly (once per prompt); sampling and EOS
checks stay on the host.

The target runs as ``FusedLlama`` (merged q/k/v and gate/up projections, one RoPE gather, grouped
heads folded into the query rows so a masked SDPA takes its memory-efficient kernel): about 13
kernels a layer instead of ``FastLlama``'s ~40, the forward the autoregressive baseline
(``BatchGenerator``) already runs. A tree engine on ``FastLlama`` paid ~3x the baseline's kernels
for every verification. The drafter drafts through ``FusedDrafter`` (the same idea for its one
layer: about 25 kernels a call instead of ~60, over a cache of its key/value heads only).
``fused=False`` keeps both earlier forwards, for comparison.

With ``use_graphs=False`` the very same functions run eagerly: that is how CPU tests check the
static path token for token against the target's greedy decoding, so on GPU the graphs only
replay code that is already tested.

``compiled=True`` first passes each step function through ``torch.compile`` (Inductor,
``fullgraph=True``, static shapes) and captures the compiled code in the graph: Inductor fuses the
~45 small kernels of a layer into a few, which a graph alone cannot do. It costs a compile of
each step function on first use (minutes for a 30-layer target), so it is opt-in. (Inductor's
own ``mode="reduce-overhead"`` graphs are not used: they skip functions that mutate their inputs,
and every step here writes a KV cache.)

Drafter cache layout (``StaticDraftCache``): slots ``[0, max_len)`` hold the accepted context (the
drafter entry of position p at slot p - 1) and ``[max_len, max_len + scratch)`` the entries of the
tree being grown, always at the same slots; positions are explicit (RoPE), so where an entry sits
does not matter to attention, only the mask does.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
import math

import torch

from speculative.fused_drafter import FusedDrafter, GroupedDraftCache
from speculative.fused_llama import FusedLlama
from speculative.llama import FastLlama, causal_slot_mask
from speculative.tree import DraftTree, TreeConfig, grow_draft_tree, tree_size
from speculative.verify import VerifyStep, greedy_accept_on_device, stochastic_accept_on_device


@contextlib.contextmanager
def gc_paused():
    """No automatic garbage collection while a CUDA graph is being captured. A collection that frees
    a dead decoder's graphs mid-capture destroys them (``cudaGraphExecDestroy``), which the default
    ("global") capture mode forbids: PyTorch warns "operation not permitted when stream is capturing
    (function reset)" once per graph and the capture is invalidated (cudaErrorStreamCaptureInvalidated,
    "operation failed due to a previous error during capture"). What ``draftrl eval --check`` most
    likely met on the H200 at float32 T = 1: 12 such warnings, the graph count of the T = 0 decoder
    the engine had just dropped (decode, 7 catch-ups, 2 spans x (draft+verify, cycle))."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GraphCaptureError(RuntimeError):
    """A CUDA graph of ``StaticDecoder`` failed to warm up or capture (the message names which)."""


class StaticDraftCache:
    """Preallocated drafter keys/values ``[B, heads, max_len + scratch, d]`` with explicit slots.

    Implements the drafter's ``attend(q, k, v)`` protocol with ``MaskedKVCache``'s arithmetic
    (fp32 scores, masked softmax), so static and eager drafting agree to rounding.
    """

    def __init__(self, batch: int, heads: int, context_len: int, scratch_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, heads, context_len + scratch_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.context_len = context_len
        self.scratch_len = scratch_len
        self._slots: int | torch.Tensor = 0
        self._mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.keys.shape[-2]

    def prepare(self, slots: int | torch.Tensor, mask: torch.Tensor) -> None:
        """Where the next call writes (first of T contiguous slots, or slots ``[T]``) and what it
        sees: ``mask [B, T, size]``, True = may attend (it must include the query's own slot)."""
        self._slots, self._mask = slots, mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if isinstance(self._slots, int):
            self.keys[:, :, self._slots : self._slots + k.shape[-2]] = k
            self.values[:, :, self._slots : self._slots + k.shape[-2]] = v
        else:
            self.keys.index_copy_(2, self._slots, k)
            self.values.index_copy_(2, self._slots, v)
        scores = torch.matmul(q.float(), self.keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self._mask[:, None], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), self.values.float()).to(q.dtype)


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def clone_tree(tree: DraftTree) -> DraftTree:
    """A copy that survives the next replay (graph outputs are overwritten in place)."""
    fields = {
        f.name: getattr(tree, f.name).clone()
        for f in dataclasses.fields(tree)
        if isinstance(getattr(tree, f.name), torch.Tensor)
    }
    return dataclasses.replace(tree, **fields)


class StaticDecoder:
    """Static caches, input/output buffers and (optionally) CUDA graphs for one sequence.

    ``max_len`` bounds prompt + generated tokens + the verification chunk; the engine rebuilds
    the decoder when a request needs more (graphs are tied to buffer addresses and shapes).
    """

    def __init__(self, fast: FastLlama, drafter=None, tree: TreeConfig | None = None,
                 max_len: int = 1024, use_graphs: bool = False, compiled: bool = False, fused: bool = True,
                 span_step: int | None = 128, greedy_graphs: bool = True, cycle_graphs: bool = False,
                 sampling: bool = False, generator: torch.Generator | None = None):
        if use_graphs and fast.device.type != "cuda":
            raise ValueError("CUDA graphs need the target on a CUDA device")
        if drafter is not None and tree is not None and tree.sample_temperature is not None:
            raise ValueError("sampled draft chains draw random numbers while drafting: use the eager path")
        self.fast = fast
        self.drafter = drafter
        self.tree_config = tree or TreeConfig()
        self.device = fast.device
        self.use_graphs = use_graphs
        self.max_len = round_up(max_len)
        self.span_step = span_step
        # Cache spans the verification attends over, one draft+verify graph each, so a short
        # sequence does not attend over (and mask) the whole static cache. Inductor compiles one
        # variant per span (minutes each): there, one span, the whole cache.
        step = span_step if span_step and not compiled else self.max_len
        self._spans = sorted({min(s, self.max_len) for s in range(step, self.max_len + step, step)})
        # capture the T = 0 variant of each draft+verify graph (one more graph a span) only where
        # it can be replayed: not for recorded steps (RL rollouts), nor with device_greedy off
        # ``cycle_graphs`` (pipelined T = 0 cycles) replaces them: one whole-cycle graph a span
        self.cycle_graphs = cycle_graphs and drafter is not None
        self.greedy_graphs = greedy_graphs and not self.cycle_graphs
        # the acceptance those graphs run: greedy (T = 0) or rejection sampling at ``temperature``
        self.sampling = sampling and drafter is not None
        self.generator = generator
        self.temperature = torch.ones((), dtype=torch.float32, device=self.device)
        self.uniforms: torch.Tensor | None = None  # [1, N + 1], drawn before each sampling replay
        long = dict(dtype=torch.long, device=self.device)
        self.fused = fused
        self.target = FusedLlama(fast) if fused else fast  # same call, same outputs (to rounding)
        self.cache = self.target.new_cache(1, self.max_len)
        self.cols = torch.arange(self.max_len, **long)
        self.token = torch.zeros(1, 1, **long)  # decode input / root token
        self.pos = torch.zeros(1, **long)  # decode position / root position
        self.num_nodes = self.scratch = 0
        self.draft = drafter  # the drafting call: ``FusedDrafter`` (fused) or the drafter itself
        if drafter is not None:
            config = drafter.config
            self.num_nodes, fed = tree_size(self.tree_config, config.draft_vocab_size)
            # tree scratch rounded up so every mask row is 16-byte aligned (SDPA's efficient kernel)
            self.scratch = round_up(fed, 16)
            dtype = drafter.fc.weight.dtype
            if fused and config.sliding_window is None:
                self.draft = FusedDrafter(drafter, self.max_len + self.tree_config.depth + 2)
                self.draft_cache = GroupedDraftCache(
                    1, config.num_key_value_heads, self.max_len, self.scratch, config.head_dim, dtype, self.device
                )
            else:
                self.draft_cache = StaticDraftCache(
                    1, config.num_attention_heads, self.max_len, self.scratch, config.head_dim, dtype, self.device
                )
            self.root_logits = torch.zeros(1, config.draft_vocab_size, dtype=dtype, device=self.device)
            self.root_hidden = torch.zeros(1, config.hidden_size, dtype=dtype, device=self.device)
            self.trees_ok = torch.ones((), dtype=torch.bool, device=self.device)
            self._no_slots = torch.zeros(1, max(self.scratch, 1), self.scratch, dtype=torch.bool, device=self.device)
            self._context: torch.Tensor | None = None
            if isinstance(self.draft, FusedDrafter):
                # the drafter's additive masks (0 / -inf), query rows group-major, kept across calls:
                # the tree levels' bias is written once a cycle (the context) and once a level (the
                # tree part, which only grows), the catch-up's once a call; each is one kernel
                groups, width = self.draft.groups, min(self.tree_config.top_k, config.draft_vocab_size)
                slots = self.draft_cache.size
                self._level_bias = torch.zeros(1, 1, groups, width, slots, dtype=dtype, device=self.device)
                # flat: the first m rows of it are contiguous, for each catch-up length m
                self._catch_up_bias = torch.zeros(groups * (self.tree_config.depth + 1) * slots, dtype=dtype,
                                                  device=self.device)
                self._bias_values = torch.tensor([0.0, float("-inf")], dtype=dtype, device=self.device)
                # slot indices with the tree scratch past any position: ``cols_ext < p`` is the context
                self._cols_ext = torch.cat([self.cols, torch.full((self.scratch,), 2 ** 62, **long)])
            # Catch-up inputs per accepted count m: row 0 tokens, row 1 rows of the verification
            # chunk whose aux hidden feeds them, row 2 (first m - 1) cache slots to compact.
            # Views of one buffer, so the greedy draft+verify graph can fill them on the device.
            depth = self.tree_config.depth
            self.catch_up_all = torch.zeros(3, depth + 1, **long)
            self.catch_up_inputs = {m: self.catch_up_all[:, :m] for m in range(1, depth + 2)}
            # pos + these: column i's drafter slot (pos + i, element i) and position (pos + 1 + i, element i + 1)
            self._catch_up_offsets = torch.arange(depth + 2, **long)
            # The greedy outcome, computed in the graph (``greedy=True``) and copied to the host in
            # one transfer: [accepted count, bonus token, path nodes (depth), path tokens (depth)]
            self.accept_result = torch.zeros(2 + 2 * depth, **long)
            # the root token is a view of the bonus token's entry: a pipelined cycle's acceptance
            # writes the next root there (no copy); the host's ``fill_`` of a root writes it too,
            # read by nothing before the next acceptance overwrites it
            self.token = self.accept_result[1:2].view(1, 1)
            if self.sampling:
                self.uniforms = torch.zeros(1, self.num_nodes + 1, dtype=torch.float64, device=self.device)
            # The verification's aux hidden states, copied where every catch-up graph reads them
            # (each span's draft+verify graph has its own outputs)
            aux_width = len(fast.aux_layer_ids) * fast.config.hidden_size
            self.verify_aux = torch.zeros(1, self.chunk_len, aux_width, dtype=fast.dtype, device=self.device)
            # pos + these: the verification chunk's slots (row 0: offsets 0 .. N, built once) and
            # positions (row 1: 0, then the nodes' depths, written each cycle), in one add
            self._chunk_offsets_all = torch.zeros(2, self.chunk_len, **long)
            self._chunk_offsets_all[0] = torch.arange(self.chunk_len, **long)
            self._chunk_offsets = self._chunk_offsets_all[0]
            # slot indices shifted by one (element i holds i - 1): ``< pos`` gives the target's
            # prefix-and-root mask (elements 0 .. span - 1) and the drafter's context (elements 1 ..)
            # in one comparison
            slot_cols = self._cols_ext if isinstance(self.draft, FusedDrafter) else self.cols
            self._cols_shifted = torch.cat([slot_cols.new_full((1,), -1), slot_cols])
            # the acceptance's constants: node rows 1 .. N, and which node index precedes which
            self._node_rows = self._chunk_offsets[1:]
            self._earlier_index = self._node_rows[None, :] < self._node_rows[:, None]
            # Pipelined cycles: each cycle's outcome is copied (asynchronously on GPU) into one of two
            # host buffers, so the next cycle can overwrite ``accept_result`` before the host reads.
            pinned = self.device.type == "cuda"
            self._cycle_results = [torch.zeros(2 + 2 * depth, dtype=torch.long, pin_memory=pinned)
                                   for _ in range(2)]
            self._cycle_events = [torch.cuda.Event() if pinned else None for _ in range(2)]
            self._cycles_launched = 0
        self._graphs: dict[object, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._decode_fn, self._draft_verify_fn, self._catch_up_fn, self._cycle_fn = (
            self._decode_step, self._draft_verify_step, self._catch_up_step, self._cycle_step
        )
        if compiled:
            from torch import _dynamo

            # One compiled variant per catch-up length m and per decoder instance.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 64))
            options = dict(fullgraph=True, dynamic=False)
            self._decode_fn = torch.compile(self._decode_step, **options)
            self._draft_verify_fn = torch.compile(self._draft_verify_step, **options)
            self._catch_up_fn = torch.compile(self._catch_up_step, **options)
            self._cycle_fn = torch.compile(self._cycle_step, **options)
        if use_graphs:
            self._capture_all()

    @property
    def chunk_len(self) -> int:
        """Tokens in one verification forward: the root and the draft nodes."""
        return 1 + self.num_nodes

    @staticmethod
    def margin_for(tree: TreeConfig, cycle_graphs: bool) -> int:
        """Slots past ``prompt + max_new_tokens + chunk_len`` that a request needs: a pipelined
        generation's extra cycle starts up to ``depth`` slots later than the last needed one."""
        return tree.depth if cycle_graphs else 0

    @property
    def margin(self) -> int:
        return self.margin_for(self.tree_config, self.cycle_graphs)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len + max_new_tokens + self.chunk_len + self.margin <= self.max_len

    def spans(self) -> list[int]:
        """The cache spans, shortest first (fixed at construction)."""
        return self._spans

    def span_for(self, needed: int) -> int:
        """The shortest span holding ``needed`` slots."""
        return self._spans[bisect.bisect_left(self._spans, needed)]

    # ---------------------------------------------------------------- graph-captured steps

    def _decode_step(self) -> torch.Tensor:
        pos = self.pos.view(1, 1)
        mask = (self.cols <= self.pos)[None, None]  # [1, 1, S]: the prefix and itself
        if self.fused:
            return self.target(self.token, pos, self.cache, pos, mask, aux_hidden=False).logits[0, -1]
        return self.target(self.token, pos, self.cache, pos, mask).logits[0, -1]

    def _bias_where(self, allowed: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` = 0 where ``allowed`` (broadcast to it), else -inf: one kernel."""
        torch.where(allowed.expand(out.shape), self._bias_values[0], self._bias_values[1], out=out)

    def _feed(self, ids, hidden, positions, tree_mask):
        """``grow_draft_tree``'s drafter call: context slots below the root's, tree scratch."""
        batch, width = ids.shape
        fed = tree_mask.shape[-1] - width
        if isinstance(self.draft, FusedDrafter):  # the context part was written for the cycle
            bias = self._level_bias
            self._bias_where(tree_mask[:, None, None], bias[..., self.max_len : self.max_len + fed + width])
            self.draft_cache.prepare(self.max_len + fed, None, bias.view(1, 1, -1, bias.shape[-1]))
            return self.draft(ids, hidden, positions, self.draft_cache)
        context = self._context[:, None].expand(batch, width, self.max_len)  # computed once a step
        unused = self._no_slots[:, :width, : self.scratch - fed - width]  # a constant: no kernel a level
        self.draft_cache.prepare(self.max_len + fed, torch.cat([context, tree_mask, unused], -1))
        return self.draft(ids, hidden, positions, self.draft_cache)

    def _draft_verify_step(self, span: int, greedy: bool = False, aux_out: list | None = None):
        """``aux_out`` (a list): the verification's aux hidden states are appended to it instead of
        copied into ``verify_aux`` (a whole cycle's catch-up reads them in the same graph)."""
        upto_root = self._cols_shifted[None] < self.pos[:, None]  # element s: slot s <= pos
        context = upto_root[:, 1:]  # slots < pos: the accepted prefix, the drafter's context
        if isinstance(self.draft, FusedDrafter):  # the context, and no tree entries yet
            self._bias_where(context[:, None, None, None], self._level_bias)  # [1, max_len + scratch]
        self._context = context[:, : self.max_len]  # [1, max_len]: the accepted prefix
        tree, closed = grow_draft_tree(  # at T = 0 the graph reads the tree's shape and tokens only
            self.draft, self._feed, self.root_logits, self.root_hidden, self.pos, self.tree_config, details=not greedy
        )
        self.trees_ok.logical_and_(closed)
        length = self.chunk_len
        chunk = torch.cat([self.token, tree.tokens], 1)
        self._chunk_offsets_all[1, 1:].copy_(tree.depths[0])
        slots_and_positions = self.pos[:, None] + self._chunk_offsets_all  # [2, T]
        slots = slots_and_positions[0:1]  # [1, T]
        # the target attends over slots [0, span) only: the prefix, then the chunk (span >= pos + T)
        # (``tree.chunk_mask()`` within the chunk: every row sees the root, the root row only it)
        mask = upto_root[:, None, :span].expand(1, length, span).contiguous()  # the prefix and the root
        mask[:, 1:].scatter_(2, slots[:, None, 1:].expand(1, length - 1, length - 1), tree.mask)  # the nodes
        out = self.target(chunk, slots_and_positions[1:2], self.cache, slots, mask)  # == tree.chunk_positions()
        if aux_out is None:
            self.verify_aux.copy_(out.aux_hidden)
        else:
            aux_out.append(out.aux_hidden)
        if greedy:
            self._accept_on_device(tree, out.logits)
        return tree, out.logits

    def _accept_on_device(self, tree: DraftTree, logits: torch.Tensor) -> None:
        """The accepted path and bonus token (T = 0: ``greedy_accept_on_device``; ``sampling``:
        ``stochastic_accept_on_device`` at ``temperature``) into
        ``accept_result``, and the catch-up's inputs for them into ``catch_up_all``, so the host
        neither reads the tree nor writes the catch-up's inputs: it copies ``2 + 2 * depth``
        integers. Written with ``out=`` into the fixed buffers (every op here is a kernel)."""
        depth = self.tree_config.depth
        if self.sampling:
            count, path, bonus = stochastic_accept_on_device(tree, logits, depth, self.temperature,
                                                             uniforms=self.uniforms, node_rows=self._node_rows,
                                                             earlier_index=self._earlier_index)
        else:  # [1], [1, depth], [1]
            count, path, bonus = greedy_accept_on_device(tree, logits, depth, node_rows=self._node_rows)
        path = path[0]
        tokens = self.catch_up_all[0, :depth]
        torch.index_select(tree.tokens[0], 0, path, out=tokens)  # the accepted tokens
        torch.cat([count, bonus, path, tokens], out=self.accept_result)
        self.catch_up_all[0].index_copy_(0, count, bonus)  # then the bonus token, at column count
        rows = self.catch_up_all[1, 1:]
        torch.add(path, 1, out=rows)  # verification rows (row 0: the root's, 0)
        torch.add(rows, self.pos, out=self.catch_up_all[2, :depth])  # the accepted entries' slots, pos + 1 + node

    def _catch_up_step(self, m: int, root_row: torch.Tensor | None = None,
                       aux: torch.Tensor | None = None) -> torch.Tensor:
        """``root_row`` (``[1]``, on the device): the row that is the next root (default the last);
        ``aux``: the verification's aux hidden states (default ``verify_aux``). Returns the
        columns' positions ``pos + 1 + i`` ``[1, m]``."""
        inputs = self.catch_up_inputs[m]
        slots_and_positions = self.pos[:, None] + self._catch_up_offsets[: m + 1]  # [1, m + 1], one kernel
        positions, slots = slots_and_positions[:, 1:], slots_and_positions[0, :m]  # [1, m], [m] (== positions - 1)
        if m > 1:  # accepted nodes behind the root in the target cache, to slots pos + 1 ..
            storage = self.cache.storage  # [2, layers, 1, kv_heads, S, d]; the sources gathered first
            storage[:, :, 0, :, positions[0, : m - 1]] = storage[:, :, 0, :, inputs[2, : m - 1]]
        if isinstance(self.draft, FusedDrafter):
            context = self._cols_ext[None, :] < positions[0, :, None]  # slots <= position - 1, [m, max_len + scratch]
            width = context.shape[-1]
            bias = self._catch_up_bias[: self.draft.groups * m * width].view(1, 1, self.draft.groups, m, width)
            self._bias_where(context[None, None, None], bias)
            self.draft_cache.prepare(slots, None, bias.view(1, 1, -1, width))
        else:
            context = self.cols[None, None, :] < positions[:, :, None]
            unused = torch.zeros(1, m, self.scratch, dtype=torch.bool, device=self.device)
            self.draft_cache.prepare(slots, torch.cat([context, unused], -1))
        hidden = self.drafter.fuse_target_hidden((self.verify_aux if aux is None else aux)[:, inputs[1]])
        logits, prenorm = self.draft(inputs[0:1], hidden, positions, self.draft_cache)
        if root_row is None:
            self.root_logits.copy_(logits[:, -1])
            self.root_hidden.copy_(prenorm[:, -1])
        else:
            torch.index_select(logits[0], 0, root_row, out=self.root_logits)
            torch.index_select(prenorm[0], 0, root_row, out=self.root_hidden)
        return positions

    def _cycle_step(self, span: int) -> None:
        """A whole cycle on the device (T = 0, or T > 0 with ``sampling``): draft + verify +
        acceptance (``accept_result``), the catch-up over all ``depth + 1`` columns with the next
        root at column ``count``, then the root token and position advanced to the bonus token and
        ``pos + count + 1``."""
        aux = []
        self._draft_verify_step(span, greedy=True, aux_out=aux)
        count = self.accept_result[:1]
        positions = self._catch_up_step(self.tree_config.depth + 1, root_row=count, aux=aux[0])
        torch.index_select(positions[0], 0, count, out=self.pos)  # pos + count + 1
        # the root token: the bonus token the acceptance wrote into ``accept_result[1]`` (``token`` is a view of it)

    # ---------------------------------------------------------------- capture / run

    def _capture(self, key, fn, reset=None) -> None:
        """Warm up on a side stream (cuBLAS workspaces, allocator), then capture ``fn``.
        ``reset`` (if any) runs before each warm-up call and before the capture: for a step that
        advances its own inputs (a pipelined cycle moves ``pos``), so each run starts where the
        first did (a second warm-up from a later slot could index past the shortest span).
        A failure raises ``GraphCaptureError`` naming the graph, the stage (warm-up or capture),
        the dtypes and the acceptance, chained to the error itself (the engine's fallback warning
        and ``compile_errors`` carry its message)."""
        stage = "warm-up"
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    if reset is not None:
                        reset()
                    fn()
                if reset is not None:
                    reset()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            stage = "capture"
            graph = torch.cuda.CUDAGraph()
            with gc_paused(), torch.cuda.graph(graph):
                out = fn()
        except Exception as error:
            raise GraphCaptureError(f"{stage} of CUDA graph {key!r} failed ({self.describe()}): "
                                    f"{type(error).__name__}: {error}") from error
        self._graphs[key] = (graph, out)

    def describe(self) -> str:
        """What a capture error needs to say about this decoder: dtypes, acceptance, shapes."""
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        drafter = f", drafter {name(self.drafter.fc.weight.dtype)}" if self.drafter is not None else ""
        if self.drafter is None:
            accept = "no drafter"
        else:
            accept = ("sampling on" if self.sampling else "sampling off") + (
                ", cycle graphs" if self.cycle_graphs else ", device acceptance" if self.greedy_graphs else "")
        return (f"target {name(self.fast.dtype)}{drafter}, {accept}, max_len {self.max_len}, spans {self._spans}, "
                f"{len(self._graphs)} graphs captured before")

    @torch.no_grad()
    def _capture_all(self) -> None:
        # Dead decoders go now, not during a capture (``gc_paused``): a StaticDecoder is a reference
        # cycle (its step functions are its bound methods), so one dropped by the engine waits for
        # the cyclic collector (torch.cuda.graph no longer collects before capturing: torch 2.13
        # does only with torch.compiler.config.force_cudagraph_gc)
        gc.collect()
        with torch.cuda.device(self.device):
            self._capture_steps()
        torch.cuda.synchronize(self.device)

    def _capture_steps(self) -> None:
        # Inputs are zeros: every slot index used while warming up and capturing is in range,
        # and whatever the warm-up writes into the caches is masked out or overwritten later.
        self._capture("decode", self._decode_fn)
        if self.drafter is not None:
            for span in self.spans():
                for greedy in (False, True) if self.greedy_graphs else (False,):
                    self._capture(("draft_verify", span, greedy),
                                  lambda span=span, greedy=greedy: self._draft_verify_fn(span, greedy))
                if self.cycle_graphs:  # the warm-up advances the position: every run from slot 0
                    self._capture(("cycle", span), lambda span=span: self._cycle_fn(span), reset=self.pos.zero_)
                    self.pos.zero_()  # and the next captures' inputs zeros again
            for m in self.catch_up_inputs:
                self._capture(("catch_up", m), lambda m=m: self._catch_up_fn(m))
            self.trees_ok.fill_(True)

    def _run(self, key, fn, *args):
        if self.use_graphs:
            graph, out = self._graphs[key]
            graph.replay()
            return out
        return fn(*args)

    # ---------------------------------------------------------------- the engine's interface

    @torch.no_grad()
    def prefill(self, prompt: list[int]):
        """Target prefill (eager: its length varies) into slots ``0 .. n-1``."""
        n = len(prompt)
        ids = torch.tensor([prompt], device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        if self.fused:  # causal within the chunk from slot 0; the lm_head on the last row only
            out = self.target(ids, positions, self.cache, 0, None, logits_index=positions[:, -1:])
        else:
            out = self.target(ids, positions, self.cache, 0, causal_slot_mask(0, n, n, device=self.device),
                              logits_rows=slice(n - 1, n))
        return ids, out

    @torch.no_grad()
    def decode(self, token: int, pos: int) -> torch.Tensor:
        """Logits ``[V]`` after ``token`` at position (== cache slot) ``pos``."""
        self.token.fill_(token)
        self.pos.fill_(pos)
        return self._run("decode", self._decode_fn)

    @torch.no_grad()
    def drafter_prefill(self, ids: torch.Tensor, aux_hidden: torch.Tensor, root_token: int) -> None:
        """Drafter over x_1..x_{n-1}, root at positions 1..n with h_{p-1} (eager, once a prompt)."""
        n = ids.shape[1]
        d_ids = torch.cat([ids[:, 1:], torch.tensor([[root_token]], device=self.device)], dim=1)
        mask = torch.cat(
            [causal_slot_mask(0, n, self.max_len, device=self.device),
             torch.zeros(1, n, self.scratch, dtype=torch.bool, device=self.device)], -1,
        )
        self.draft_cache.prepare(0, mask)
        logits, prenorm = self.draft(
            d_ids, self.drafter.fuse_target_hidden(aux_hidden),
            torch.arange(1, n + 1, device=self.device)[None], self.draft_cache,
        )
        self.root_logits.copy_(logits[:, -1])
        self.root_hidden.copy_(prenorm[:, -1])

    @torch.no_grad()
    def draft_verify(self, root_token: int, root_pos: int, greedy: bool = False) -> tuple[DraftTree, torch.Tensor]:
        """Grow the tree from the root and verify it: (tree, target logits ``[1, 1 + N, V]``).
        ``greedy``: also accept on the device (at T = 0; by rejection sampling when built with
        ``sampling``); ``greedy_step`` then reads the outcome."""
        self.token.fill_(root_token)
        self.pos.fill_(root_pos)
        if greedy and not self.greedy_graphs:
            raise ValueError("this decoder was built without the greedy draft+verify graphs (greedy_graphs=False)")
        span = self.span_for(root_pos + self.chunk_len)
        if greedy:
            self._draw_uniforms()
        return self._run(("draft_verify", span, greedy), self._draft_verify_fn, span, greedy)

    def _draw_uniforms(self) -> None:
        """The next sampling acceptance's random numbers, from ``generator`` (enqueued before the
        replay that reads them, after the one that read the last)."""
        if self.sampling:
            self.uniforms.uniform_(generator=self.generator)

    def set_temperature(self, temperature: float) -> None:
        """The temperature the ``sampling`` acceptance divides the logits by (a buffer the graphs read)."""
        self.temperature.fill_(float(temperature))

    def start_cycles(self, root_token: int, root_pos: int) -> None:
        """Set the first root of pipelined cycles; later roots are advanced on the device."""
        if not self.cycle_graphs:
            raise ValueError("this decoder was built without the pipelined cycle graphs (cycle_graphs=False)")
        self.token.fill_(root_token)
        self.pos.fill_(root_pos)

    @torch.no_grad()
    def launch_cycle(self, max_root_pos: int) -> int:
        """Enqueue one cycle (its root: at most ``max_root_pos``, which picks the span) and the copy
        of its outcome to the host; returns the handle ``cycle_step`` reads. At most two cycles
        may be in flight unread (two host buffers)."""
        span = self.span_for(min(max_root_pos + self.chunk_len, self.max_len))
        self._draw_uniforms()
        self._run(("cycle", span), self._cycle_fn, span)
        handle = self._cycles_launched % 2
        self._cycle_results[handle].copy_(self.accept_result, non_blocking=True)
        if self._cycle_events[handle] is not None:  # on the stream the replay and the copy ran on
            self._cycle_events[handle].record(torch.cuda.current_stream(self.device))
        self._cycles_launched += 1
        return handle

    def cycle_step(self, handle: int) -> VerifyStep:
        """The outcome of the cycle ``launch_cycle`` returned ``handle`` for (waits for it)."""
        if self._cycle_events[handle] is not None:
            self._cycle_events[handle].synchronize()
        return self._parse_accept(self._cycle_results[handle].tolist())

    def _parse_accept(self, values: list[int]) -> VerifyStep:
        depth = self.tree_config.depth
        count, bonus = values[0], values[1]
        nodes, tokens = values[2: 2 + count], values[2 + depth: 2 + depth + count]
        return VerifyStep(accepted_nodes=nodes, accepted_tokens=tokens, bonus_token=bonus,
                          stop_node=nodes[-1] if nodes else -1, first_rejected=None)

    def greedy_step(self) -> VerifyStep:
        """The outcome of the last ``draft_verify(..., greedy=True)``: one small device-to-host copy.
        The catch-up inputs are already in place (``catch_up(..., prepared=True)``). Only what
        decoding needs is filled: ``rejected_nodes``, ``first_rejected`` and ``target_probs`` are
        empty (the host verifier gives them, for recorded steps)."""
        return self._parse_accept(self.accept_result.tolist())

    @torch.no_grad()
    def catch_up(self, tokens: list[int], path: list[int], root_pos: int, prepared: bool = False) -> None:
        """Compact the accepted nodes behind the root, re-prefill the drafter on ``tokens``."""
        m = len(tokens)
        if not prepared:  # else the greedy draft+verify graph wrote them, and pos is still root_pos
            slots = [root_pos + 1 + i for i in path] + [0]
            rows = [0] + [1 + i for i in path]
            self.catch_up_inputs[m].copy_(torch.tensor([tokens, rows, slots[:m]]))
            self.pos.fill_(root_pos)
        self._run(("catch_up", m), self._catch_up_fn, m)

    def begin(self) -> None:
        if self.drafter is not None:
            self.trees_ok.fill_(True)
            if isinstance(self.draft, FusedDrafter):  # RL rollouts draft with weights that train
                self.draft.sync_weights()

    def end(self) -> None:
        if self.drafter is not None and not bool(self.trees_ok):
            raise RuntimeError("draft tree selection is not ancestor-closed")
