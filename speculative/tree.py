"""Dynamic draft trees (EAGLE-2 style), batched over sequences.

From the root (the last accepted token, whose drafter KV is the last entry of the drafter cache,
with the drafter's distribution and pre-norm hidden there) the tree grows level by level:

    level 1: the root's top-k children;
    level l+1: the k "frontier" nodes of level l (highest cumulative draft log-prob) are fed to
               the drafter in one batched call (tree attention: prefix + ancestors + self) and
               each proposes its top-k children (k*k candidates);

and finally the ``total_tokens`` candidates with the highest cumulative log-prob become the tree.
A child's score is its parent's score plus a log-prob <= 0, so the top-N set is ancestor-closed;
ties are broken towards shallower candidates (stable sort over level-ordered candidates) so that
it stays closed even when a child ties its parent, and closure is checked.

Defaults follow EAGLE's Llama-3 EAGLE-3 evaluation (``gen_ea_answer_llama3chat.py``:
``--total-token 60 --depth 5 --top-k 10``). EAGLE counts the root in ``total_token`` and its
``depth`` is the number of expansion forwards (levels - 1), so here that is ``total_tokens=59``
draft nodes over ``depth=6`` levels: a 60-token verification chunk, exactly as in EAGLE.
(``EaModel.from_pretrained`` defaults to depth 7, i.e. 8 levels.) A chain is ``top_k=1``.

Every node keeps the distribution it was drawn from (its parent's): ``dists`` holds the drafter's
draft-vocab log-probs at every expanded node (row 0 = root) and ``parent_dist`` points each node
at its row, which is what GTO / Draft-OPD need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from speculative.kv_cache import MaskedKVCache
from speculative.vocab_topk import top_k_logprobs


@dataclass
class TreeConfig:
    depth: int = 6  # draft levels below the root (max draft tokens accepted per step)
    top_k: int = 10  # children per expanded node, and frontier nodes per level
    total_tokens: int = 59  # draft nodes in the tree, root excluded
    # None: children are the drafter's top-k (EAGLE-2). A float: children are *sampled* from
    # softmax(logits / t); only for chains (top_k=1), where the tree's shape cannot depend on
    # the sampled values (see ``speculative.verify`` for why that matters).
    sample_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 1:
            raise ValueError(f"tree needs depth, top_k, total_tokens >= 1, got {self}")
        if self.sample_temperature is not None:
            if self.top_k != 1:
                raise ValueError(
                    "sampled children are only lossless for chains (top_k=1): pruning sampled "
                    "siblings by score would bias the verifier"
                )
            if self.sample_temperature <= 0:
                raise ValueError("sample_temperature must be > 0")

    @classmethod
    def chain(cls, length: int, sample_temperature: float | None = None) -> TreeConfig:
        return cls(depth=length, top_k=1, total_tokens=length, sample_temperature=sample_temperature)


@dataclass
class DraftTree:
    """A batch of draft trees of N nodes each; nodes are ordered so a parent precedes its children,
    and siblings are contiguous in descending draft probability."""

    tokens: torch.Tensor  # [B, N] target ids
    draft_ids: torch.Tensor  # [B, N] draft-vocab ids
    parents: torch.Tensor  # [B, N] node index of the parent, -1 for children of the root
    depths: torch.Tensor  # [B, N] 1 for children of the root; also the position offset
    mask: torch.Tensor  # [B, N, N] bool, mask[b, i, j] = j is i or an ancestor of i
    # scores, logprobs, parent_dist, node_dist: None when grown with ``details=False`` (the T = 0 graphs)
    scores: torch.Tensor | None  # [B, N] cumulative draft log-prob from the root
    logprobs: torch.Tensor | None  # [B, N] log q(node) under the distribution it was drawn from
    dists: torch.Tensor | None  # [B, E, Vd] draft log-probs at each expanded node; row 0 = root
    # (None when grown with ``keep_dists=False``: GTO's batched trees need only ``logprobs``)
    parent_dist: torch.Tensor | None  # [B, N] row of ``dists`` the node was drawn from
    node_dist: torch.Tensor | None  # [B, N] row of ``dists`` of the node's own children, -1 if unexpanded
    root_positions: torch.Tensor  # [B] position of the root token
    draft_to_target: torch.Tensor  # [Vd] the drafter's vocabulary map
    sampled: bool  # children were sampled from ``dists`` (True) or chosen by top-k (False)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def probs(self) -> torch.Tensor:
        """q(node) under its parent's distribution [B, N]."""
        return self.logprobs.exp()

    def positions(self) -> torch.Tensor:
        """Absolute positions of the nodes [B, N]."""
        return self.root_positions[:, None] + self.depths

    def chunk_positions(self) -> torch.Tensor:
        """Positions of the verification chunk [root, nodes...] [B, 1 + N]."""
        return torch.cat([self.root_positions[:, None], self.positions()], dim=1)

    def chunk_mask(self) -> torch.Tensor:
        """Tree attention within the chunk [root, nodes...]: [B, 1 + N, 1 + N]."""
        batch, n = self.tokens.shape
        device = self.tokens.device
        # Built by concatenation, not by assigning Python scalars into slices: this runs inside
        # a captured CUDA graph (``speculative.graphs``), where only pure tensor ops belong.
        root = torch.ones(batch, n + 1, 1, dtype=torch.bool, device=device)
        below = torch.cat([torch.zeros(batch, 1, n, dtype=torch.bool, device=device), self.mask], 1)
        return torch.cat([root, below], 2)

    def children(self, b: int) -> dict[int, list[int]]:
        """Children of each node of tree ``b`` in node order (-1 = root)."""
        return children_of(self.parents[b].tolist())

    def path_to(self, b: int, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (inclusive)."""
        path = []
        parents = self.parents[b].tolist()
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]


def children_of(parents: list[int]) -> dict[int, list[int]]:
    """Children of each node (-1 = root), in node order, from the nodes' parent indices."""
    kids: dict[int, list[int]] = {-1: []}
    for i, parent in enumerate(parents):
        kids.setdefault(i, [])
        kids[int(parent)].append(i)
    return kids


def ancestor_mask(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """Ancestor-or-self mask [B, N, N] from parent indices (-1 = root), for trees at most ``depth``
    deep: (I + A)^m > 0 with m >= depth - 1 (a node's farthest ancestor), m a power of two reached
    by squaring: about ``log2(depth)`` products instead of ``depth`` (each a kernel). Its entries
    count paths (at most 2^m); only whether they are positive matters."""
    batch, n = parents.shape
    # I + A in one scatter: column n stands for the root (-1 % (n + 1) == n), dropped after
    eye = torch.eye(n, n + 1, device=parents.device)
    step = eye[None] if batch == 1 else eye.expand(batch, n, n + 1).clone()
    step.scatter_(2, (parents % (n + 1))[..., None], 1.0)
    reach, hops = step[..., :n], 1
    while hops < depth - 1:
        reach, hops = torch.bmm(reach, reach), 2 * hops
        if hops >= 64:  # deeper than any practical tree: keep the counts far from overflowing
            reach = reach.clamp_max(1.0)
    return reach > 0


def _log_q(logits: torch.Tensor, scale: float, sample: bool) -> torch.Tensor:
    """Draft log-probs in fp32 (``dtype=`` casts fp16 inside the kernel; bf16 logits are still
    copied to fp32 first: GTO's many-root search avoids this function, ``speculative.vocab_topk``)."""
    if sample:
        return torch.log_softmax(logits.float() * scale, dim=-1)
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def _choose(logq: torch.Tensor, k: int, sample: bool, generator: torch.Generator | None,
            logits: torch.Tensor | None = None):
    """Children of each row of ``logq [..., Vd]``: top-k, or one sample. Returns (ids, log q).

    Greedy top-k runs on ``logits`` when given: log-softmax is monotone within a row, so the
    same children come out (ties aside), and on bf16 logits the radix select has half the key
    bits (and bytes) of fp32 log-probs."""
    if not sample:
        if logits is None:
            top = torch.topk(logq, k, dim=-1)
            return top.indices, top.values
        ids = torch.topk(logits, k, dim=-1).indices
        return ids, logq.gather(-1, ids)
    flat = logq.reshape(-1, logq.shape[-1]).exp()
    ids = torch.multinomial(flat, 1, generator=generator).reshape(*logq.shape[:-1], 1)
    return ids, logq.gather(-1, ids)


# feed(target_ids [B, w], hidden [B, w, H], positions [B, w], tree_mask [B, w, fed + w]) runs the
# drafter on one level of frontier nodes: ``tree_mask`` says which of the tree entries fed so far
# (in feeding order, this level's last) each new node sees; the whole accepted prefix is always
# visible. Returns (logits [B, w, Vd], pre-norm hidden [B, w, H]). The cache behind it is the
# caller's business: a growing ``MaskedKVCache`` (``build_draft_tree``) or a static one
# (``speculative.graphs``), where every shape is fixed and the whole tree build can be captured.
DrafterFeed = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@torch.no_grad()
def build_draft_tree(
    drafter,
    cache: MaskedKVCache,
    root_logits: torch.Tensor,
    root_hidden: torch.Tensor,
    root_positions: torch.Tensor,
    config: TreeConfig,
    prefix_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DraftTree:
    """Grow one draft tree per sequence.

    ``cache`` holds the drafter's KV for the accepted context, the root token last (so its
    length L is shared by the batch); ``root_logits [B, Vd]`` and ``root_hidden [B, H]`` are the
    drafter's output there and ``root_positions [B]`` the root's position. ``prefix_mask [B, L]``
    hides cache entries (padding). The cache is cropped back to L before returning: tree entries
    were computed from drafted hidden states, and the engine re-prefills accepted tokens with the
    target's.
    """
    batch = root_logits.shape[0]
    prefix_len = cache.length
    if prefix_mask is None:
        prefix_mask = torch.ones(batch, prefix_len, dtype=torch.bool, device=root_logits.device)

    def feed(ids, hidden, positions, tree_mask):
        width = ids.shape[1]
        cache.set_mask(torch.cat([prefix_mask[:, None].expand(batch, width, -1), tree_mask], -1))
        return drafter(ids, hidden, positions, cache)

    try:
        tree, closed = grow_draft_tree(
            drafter, feed, root_logits, root_hidden, root_positions, config, generator
        )
    finally:
        cache.crop(prefix_len)
    if not bool(closed):
        raise RuntimeError("draft tree selection is not ancestor-closed")
    return tree


@torch.no_grad()
def grow_draft_tree(
    drafter,
    feed: DrafterFeed,
    root_logits: torch.Tensor,
    root_hidden: torch.Tensor,
    root_positions: torch.Tensor,
    config: TreeConfig,
    generator: torch.Generator | None = None,
    keep_dists: bool = True,
    details: bool = True,
) -> tuple[DraftTree, torch.Tensor]:
    """The tree search itself, with fixed shapes and no host synchronisation.

    Returns the tree and a 0-d bool tensor, True when the selection is ancestor-closed (it is
    by construction; callers check it when a sync is cheap, the CUDA-graph path once per
    sequence). Every shape depends only on ``config`` and the batch, never on values.
    ``keep_dists=False`` drops the per-node draft distributions (``dists`` is None): for
    thousands of trees at once ([B, E, Vd] floats would not fit), when only ``logprobs`` count.
    ``details=False`` leaves out what only verification at T > 0 and recorded steps read
    (``scores``, ``logprobs``, ``dists``, ``parent_dist``, ``node_dist`` are None): the T = 0
    graphs, which read the tokens, parents, depths and mask only. The tree is the same.

    Every shape-only index (levels' positions, the rows of ``dists``, depths) comes from one
    arithmetic op over the whole tree, not one per level: each op is a kernel, a few
    microseconds at batch 1 whatever its size. Each fed node has exactly k children, in feeding
    order after the root's k, so candidate c was drawn from ``dists`` row ``c // k``.
    """
    batch, vocab = root_logits.shape
    device = root_logits.device
    k = min(config.top_k, vocab)
    sample = config.sample_temperature is not None
    scale = 1.0 / config.sample_temperature if sample else 1.0
    rows = torch.arange(batch, device=device)[:, None]
    exact = keep_dists or sample  # log q from the fp32 log-softmax (else ``top_k_logprobs``)
    keep_dists = keep_dists and details

    if exact:
        root_logq = _log_q(root_logits, scale, sample)
        dists = [root_logq[:, None]]
        ids, logq = _choose(root_logq, k, sample, generator, root_logits)  # [B, k]
    else:
        dists = []
        ids, logq = top_k_logprobs(root_logits, k)
    # Candidates in level order; parents always precede children.
    cand_ids, cand_logq, cand_score = [ids], [logq], [logq]
    width = ids.shape[1]  # k: the root's children, then the k best of each level's k * k candidates
    # candidate index + 1 of each fed node, in feeding order (= its ``dists`` row), 0 for the root
    fed = [torch.arange(width + 1, device=device).expand(batch, -1)]
    frontier_ids, frontier_score = ids, logq
    frontier_hidden = root_hidden[:, None].expand(batch, width, -1)
    frontier_anc = torch.zeros(batch, width, 0, dtype=torch.bool, device=device)
    n_cand = width

    if config.depth > 1:  # one eye and one position per level for the whole tree
        eye = torch.eye(width, dtype=torch.bool, device=device).expand(batch, width, width)
        level_positions = root_positions[:, None] + torch.arange(1, config.depth, device=device)
    for level in range(1, config.depth):
        tree_part = torch.cat([frontier_anc, eye], dim=-1)
        positions = level_positions[:, level - 1 : level].expand(batch, width)
        logits, prenorm = feed(
            drafter.to_target_ids(frontier_ids), frontier_hidden, positions, tree_part
        )
        if exact:
            logq_level = _log_q(logits, scale, sample)
            if keep_dists:
                dists.append(logq_level)
            child_ids, child_logq = _choose(logq_level, k, sample, generator, logits)  # [B, width, k]
        else:  # GTO's many roots: no [rows, Vd] fp32 log-probs at all
            child_ids, child_logq = top_k_logprobs(logits, k)
        kids = child_ids.shape[-1]  # k
        child_score = frontier_score[..., None] + child_logq
        cand_ids.append(child_ids.reshape(batch, -1))
        cand_logq.append(child_logq.reshape(batch, -1))
        cand_score.append(child_score.reshape(batch, -1))
        flat_score = cand_score[-1]
        if level < config.depth - 1:  # the next level's frontier (the last level's is never fed)
            keep = torch.topk(flat_score, min(k, flat_score.shape[1]), dim=-1).indices
            source = keep // kids  # which fed node each new frontier node hangs from
            fed.append(keep + (n_cand + 1))
            frontier_ids = cand_ids[-1].gather(1, keep)
            frontier_score = flat_score.gather(1, keep)
            frontier_hidden = prenorm[rows, source]
            frontier_anc = tree_part[rows, source]
        n_cand += flat_score.shape[1]

    tree = _select_tree(drafter, config, k, width, n_cand, cand_ids, cand_logq, cand_score, fed, dists,
                        root_positions, sample, details, keep_dists)
    return tree


def _select_tree(drafter, config: TreeConfig, k: int, width: int, n_cand: int, cand_ids, cand_logq, cand_score,
                 fed, dists, root_positions, sample: bool, details: bool, keep_dists: bool) -> tuple[DraftTree, torch.Tensor]:
    """The ``total_tokens`` best candidates, in level order, as a ``DraftTree`` (and ``closed``)."""
    ids_all = torch.cat(cand_ids, 1)
    score_all = torch.cat(cand_score, 1)
    batch, device = ids_all.shape[0], ids_all.device
    total = min(config.total_tokens, n_cand)
    # highest score first, ties towards the earlier (shallower) candidate
    order = torch.sort(score_all, dim=1, descending=True, stable=True).indices[:, :total]
    chosen = torch.sort(order, dim=1).values  # level order: parents first
    chosen1 = chosen + 1
    dist_row = chosen // k  # the ``dists`` row each node was drawn from (0: the root's)
    fed_all = torch.cat(fed, 1)  # [B, 1 + fed nodes]: dists row -> candidate index + 1 (0: the root)
    inverse = torch.full((batch, n_cand + 1), -1, dtype=torch.long, device=device)  # candidate + 1 -> node
    inverse.scatter_(1, chosen1, torch.arange(total, device=device).expand(batch, -1))
    parent1 = fed_all.gather(1, dist_row)  # the parent's candidate index + 1, 0 for the root's children
    parents = inverse.gather(1, parent1)  # -1: the root (or a parent not chosen: not closed)
    closed = ((parents >= 0) | (parent1 == 0)).all()

    draft_ids = ids_all.gather(1, chosen)
    # a fed node of dists row r >= 1 sits at depth ceil(r / width) + 1, so its children one deeper
    depths = torch.div(dist_row + (2 * width - 1), width, rounding_mode="floor")
    scores = logprobs = parent_dist = node_dist = None
    if details:
        scores = score_all.gather(1, chosen)
        logprobs = torch.cat(cand_logq, 1).gather(1, chosen)
        parent_dist = dist_row
        node_dist = torch.full((batch, n_cand + 1), -1, dtype=torch.long, device=device)
        expanded = fed_all if config.depth > 1 else fed_all[:, :1]  # (with one level, the root's only)
        node_dist.scatter_(1, expanded, torch.arange(expanded.shape[1], device=device).expand(batch, -1))
        node_dist = node_dist.gather(1, chosen1)
    tree = DraftTree(
        tokens=drafter.to_target_ids(draft_ids),
        draft_ids=draft_ids,
        parents=parents,
        depths=depths,
        mask=ancestor_mask(parents, config.depth),
        scores=scores,
        logprobs=logprobs,
        dists=torch.cat(dists, 1) if keep_dists else None,
        parent_dist=parent_dist,
        node_dist=node_dist,
        root_positions=root_positions,
        draft_to_target=drafter.draft_to_target,
        sampled=sample,
    )
    return tree, closed


def tree_size(config: TreeConfig, draft_vocab_size: int) -> tuple[int, int]:
    """(draft nodes N, drafter entries fed while growing) for ``config``: both fixed.

    Static caches and CUDA graphs size their buffers from this.
    """
    k = min(config.top_k, draft_vocab_size)
    candidates, fed, width = k, 0, k
    for _ in range(1, config.depth):
        fed += width
        candidates += width * k
        width = min(k, width * k)
    return min(config.total_tokens, candidates), fed
