"""Tree verification: which drafted tokens the target accepts, and the token it adds.

Greedy (T = 0): walk down from the root taking the child whose token is the target's argmax;
the bonus token is the argmax where the walk stops. The output is the target's greedy decoding.

Stochastic (T > 0): multi-candidate recursive rejection sampling. At each node, with p the
target's distribution there, try its children in order; child j is accepted with probability
min(1, p(x_j) / q_j(x_j)) where q_j is the distribution x_j was drawn from *given the siblings
tried before it*; on rejection p <- normalize(max(p - q_j, 0)). If every child is rejected (or
the node is a leaf) the next token is sampled from the current p. Emitting x with probability
p(x) at every step, the output has exactly the target's distribution, *provided* q_j really is
the conditional law of x_j. What the tree represents decides q_j:

* top-k trees (EAGLE-2/3): the children are a deterministic function of the context, so q_j is
  a point mass on x_j. Then p(x_j)/q_j(x_j) = p(x_j) and max(p - q_j, 0) is p with x_j zeroed:
  accept x_j with probability p(x_j), else remove it from p and renormalise - exactly EAGLE's
  ``evaluate_posterior`` (``qx = 1.0``). Using the drafter's probabilities as q here would be
  biased, because the children were never sampled from them.
* sampled chains (``TreeConfig.sample_temperature``): the child was drawn from the parent's
  drafter distribution q, the classic speculative-sampling test min(1, p/q). (Several siblings
  drawn without replacement would use q with the earlier siblings zeroed and renormalised; the
  tree builder only samples chains, because pruning sampled siblings by their score would make
  the kept set depend on the sampled values and break the guarantee.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from speculative.tree import DraftTree, children_of


@dataclass
class VerifyStep:
    """The outcome of verifying one tree (one sequence, one target forward)."""

    accepted_nodes: list[int]  # node indices, root's child first
    accepted_tokens: list[int]
    bonus_token: int  # the target's own token after the accepted path (correction or bonus)
    stop_node: int  # node the accepted path ends at (-1 = root)
    first_rejected: int | None  # first child tried at ``stop_node``; None when it is a leaf
    rejected_nodes: list[int] = field(default_factory=list)  # every child tried and rejected
    # Target distribution at ``stop_node`` before any residual update: softmax(logits / T),
    # or softmax(logits) when T = 0. Row ``1 + stop_node`` of the verification logits.
    target_probs: torch.Tensor | None = None

    @property
    def accept_length(self) -> int:
        return len(self.accepted_nodes)

    @property
    def tokens(self) -> list[int]:
        """What this step appends to the sequence: accepted tokens then the bonus token."""
        return self.accepted_tokens + [self.bonus_token]


def _proposal(tree: DraftTree, b: int, node: int, vocab_size: int) -> torch.Tensor:
    """The drafter distribution node ``node`` was drawn from, over the target vocabulary."""
    row = tree.dists[b, int(tree.parent_dist[b, node])].exp().double()
    q = torch.zeros(vocab_size, dtype=torch.float64, device=row.device)
    q[tree.draft_to_target.to(row.device)] = row
    return q


def _tree_lists(tree: DraftTree, b: int, *rows: torch.Tensor) -> tuple[dict[int, list[int]], list[int], list[list]]:
    """Children of tree ``b``, its tokens and ``rows`` (1-D tensors) as Python lists, in ONE
    device-to-host copy: each ``.tolist()`` of a CUDA tensor is a synchronisation, and the
    engine verifies one tree per target forward."""
    n = tree.num_nodes
    flat = torch.cat([tree.tokens[b].double(), tree.parents[b].double(), *[r.double() for r in rows]]).tolist()
    tokens = [int(t) for t in flat[:n]]
    kids = children_of(flat[n: 2 * n])
    out, start = [], 2 * n
    for r in rows:
        out.append(flat[start: start + r.numel()])
        start += r.numel()
    return kids, tokens, out


def _step(kids: dict[int, list[int]], tokens: list[int], accepted: list[int], rejected: list[int], node: int,
          bonus: int, target_probs: torch.Tensor) -> VerifyStep:
    return VerifyStep(
        accepted_nodes=accepted, accepted_tokens=[tokens[i] for i in accepted], bonus_token=bonus,
        stop_node=node, first_rejected=kids[node][0] if kids[node] else None, rejected_nodes=rejected,
        target_probs=target_probs,
    )


def verify_greedy(tree: DraftTree, b: int, logits: torch.Tensor) -> VerifyStep:
    """``logits [1 + N, V]``: the target's logits at the root (row 0) and at each node."""
    # argmax ids < 2^53 survive the float64 round trip exactly.
    kids, tokens, (best,) = _tree_lists(tree, b, logits.argmax(-1))
    best = [int(t) for t in best]
    node, accepted, rejected = -1, [], []
    while True:
        want = best[node + 1]
        match = next((c for c in kids[node] if tokens[c] == want), None)
        if match is None:
            rejected.extend(kids[node])
            break
        rejected.extend(c for c in kids[node] if c < match)
        accepted.append(match)
        node = match
    return _step(kids, tokens, accepted, rejected, node, best[node + 1], torch.softmax(logits[node + 1].float(), -1))


def verify_stochastic(
    tree: DraftTree,
    b: int,
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> VerifyStep:
    """Recursive rejection sampling over tree ``b`` (see the module docstring)."""
    if not tree.sampled:
        return _verify_topk_stochastic(tree, b, logits, temperature, generator)
    kids = tree.children(b)
    tokens = tree.tokens[b].tolist()
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    node, accepted, rejected = -1, [], []
    while True:
        p = probs[node + 1].clone()
        q = _proposal(tree, b, kids[node][0], vocab) if kids[node] else None
        chosen = None
        for child in kids[node]:
            x = tokens[child]
            ratio = p[x] / q[x]
            u = torch.rand((), generator=generator, dtype=torch.float64, device=p.device)
            if float(u) < float(ratio):
                chosen = child
                break
            rejected.append(child)
            # Residual of a sampled proposal; the next sibling's proposal excludes x.
            p = (p - q).clamp_min(0.0)
            q[x] = 0.0
            q = q / q.sum() if q.sum() > 0 else q
            total = p.sum()
            p = p / total if total > 0 else probs[node + 1].clone()
        if chosen is None:
            break
        accepted.append(chosen)
        node = chosen
    bonus = int(torch.multinomial(p.float(), 1, generator=generator))
    return _step(kids, tokens, accepted, rejected, node, bonus, probs[node + 1].float())


def _verify_topk_stochastic(
    tree: DraftTree, b: int, logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> VerifyStep:
    """Rejection sampling over a top-k tree (point-mass proposals) with two host syncs per tree.

    With q a point mass, trying child x_j after siblings x_1..x_{j-1} were rejected accepts it with
    probability p(x_j) / (1 - p(x_1) - ... - p(x_{j-1})): the residual p with the rejected tokens
    removed, renormalised. So the walk needs only each node's probability under its parent's
    distribution, gathered on the device and copied once with one uniform per node (each node is
    tried at most once); the residual is rebuilt on the device only for the bonus token.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # [1 + N, V]
    n = tree.num_nodes
    node_p = probs[tree.parents[b] + 1, tree.tokens[b]]  # p(x_c) at c's parent, [N]
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64, device=probs.device)
    kids, tokens, (node_p, uniforms) = _tree_lists(tree, b, node_p, uniforms)
    node, accepted, rejected = -1, [], []
    while True:
        removed, zeroed = 0.0, []  # mass of the rejected siblings, and their tokens
        chosen = None
        for child in kids[node]:
            remaining = 1.0 - removed
            if remaining <= 0.0:  # every bit of mass removed (rounding): start from p again
                removed, zeroed, remaining = 0.0, [], 1.0
            if uniforms[child] < node_p[child] / remaining:
                chosen = child
                break
            rejected.append(child)
            removed += node_p[child]
            zeroed.append(tokens[child])
        if chosen is None:
            break
        accepted.append(chosen)
        node = chosen
    p = probs[node + 1]
    if zeroed and removed < 1.0:
        p = p.clone()
        p[torch.tensor(zeroed, device=p.device)] = 0.0
    bonus = int(torch.multinomial(p.float(), 1, generator=generator))
    return _step(kids, tokens, accepted, rejected, node, bonus, probs[node + 1].float())


def _accepted_path(accepted: torch.Tensor, node_rows: torch.Tensor, depth: int):
    """From the accepted-node mask ``[B, N]`` (one path from the root, nodes stored parents
    first): ``count [B]``, ``stop_row [B]`` (the last accepted node + 1; 0: the root) and
    ``path [B, depth]`` (the accepted nodes by depth in the first ``count`` columns)."""
    n = accepted.shape[-1]
    count = accepted.sum(-1)
    stop_row = (accepted * node_rows).amax(-1)
    path = torch.sort(accepted.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :depth]
    if n < depth:  # a tree smaller than its depth: pad (only the first ``count`` columns are read)
        path = torch.nn.functional.pad(path, (0, depth - n))
    return count, stop_row, path


def greedy_accept_on_device(tree: DraftTree, logits: torch.Tensor, depth: int, node_rows: torch.Tensor | None = None):
    """``verify_greedy``'s outcome for every tree of the batch with tensor ops only (no host sync:
    CUDA graphs capture it with the verification, and the host then copies a few integers).

    A node is accepted when it and each of its ancestors is the target's argmax at its parent.
    Siblings carry distinct tokens, so the accepted nodes form one path from the root, and nodes
    are stored parents first, so that path in node order is the path by depth: its last node is
    the one with the largest index. Returns ``count [B]`` (accepted nodes), ``path [B, depth]``
    (the accepted nodes by depth in the first ``count`` columns; other nodes after them) and
    ``bonus [B]`` (the target's argmax where the path stops). About a dozen kernels.
    ``node_rows``: ``arange(1, N + 1)`` if the caller keeps one (a constant: one kernel less).
    """
    batch, n = tree.tokens.shape
    pred = logits.argmax(-1)  # [B, 1 + N]: the target's token after the root and after each node
    match = tree.tokens == pred.gather(1, tree.parents + 1)  # [B, N]
    accepted = (tree.mask <= match[:, None, :]).all(-1)  # ancestor-or-self => matches
    if node_rows is None:
        node_rows = torch.arange(1, n + 1, device=pred.device)
    count, stop_row, path = _accepted_path(accepted, node_rows, depth)
    bonus = pred.gather(1, stop_row[:, None])[:, 0]
    return count, path, bonus


def stochastic_accept_on_device(tree: DraftTree, logits: torch.Tensor, depth: int, temperature,
                                generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None,
                                return_residual: bool = False, node_rows: torch.Tensor | None = None,
                                earlier_index: torch.Tensor | None = None):
    """``_verify_topk_stochastic``'s outcome for every top-k tree of the batch (point-mass
    proposals, ``tree.sampled`` False) with tensor ops only: no host sync, so a CUDA graph captures
    it with the verification, as ``greedy_accept_on_device`` at T = 0. Same return triple:
    ``count [B]``, ``path [B, depth]``, ``bonus [B]`` (``return_residual``: also the bonus
    distribution ``[B, V]``, unnormalised, for tests). ``temperature``: a float or a 0-d tensor
    (the static decoder's buffer, so a graph serves every T > 0).

    The host walk tries the children of a node in node order (siblings are stored contiguously, in
    try order) and accepts child c with probability p(x_c) / (1 - sum of p over the earlier
    siblings), all of which were rejected when c is tried. That sum does not depend on the
    outcomes, so every node is tested at once with its own uniform: ``tentative[c]``; a node is
    *chosen* when it is tentative and no earlier sibling is (the walk would have stopped there);
    accepted = every node of its ancestor-or-self path chosen (``tree.mask``). At most one child of
    each node is chosen, so the accepted nodes form one path. The bonus is drawn where it stops from
    p with the tokens of all the stop node's children zeroed (each was tried and rejected), by the
    inverse CDF at one more uniform (a zero-probability token is never drawn).

    Random numbers: ``uniforms [B, N + 1]`` in [0, 1), float64: one per node, then the bonus's.
    The static decoder draws them into a buffer before each replay, as the batched engine does
    (no random number generator inside a graph); without them they are drawn here from
    ``generator`` (at B = 1 the first ``N`` are the very draws of ``_verify_topk_stochastic``,
    whose bonus is a multinomial draw instead).

    Rounding (differences from the host walk only where float64 has removed all of a node's mass):
    the host resets its running sum (``remaining <= 0``) and keeps summing from that sibling on;
    here each such sibling is tested against p alone (remaining := 1), and the bonus zeroes all the
    stop node's children's tokens when their summed p is below 1 (the host: those since the reset),
    falling back to p unchanged when nothing would be left. Node probabilities use the logits'
    precision but at least float32 (the host: float64), so a uniform within ~1e-7 of its threshold
    may decide the other way.

    Constants a caller may keep (each saves kernels a call): ``node_rows`` = ``arange(1, N + 1)``,
    ``earlier_index [N, N]`` = ``node_rows[None, :] < node_rows[:, None]``.
    """
    batch, n = tree.tokens.shape
    vocab = logits.shape[-1]
    work = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(work) / temperature  # [B, 1 + N, V]
    lse = torch.logsumexp(scaled, -1)  # [B, 1 + N]
    rows = tree.parents + 1  # the parent's row of the verification logits, [B, N]
    flat = scaled.reshape(batch, -1).gather(1, torch.add(tree.tokens, rows, alpha=vocab))  # [B, N]
    node_p = (flat - lse.gather(1, rows)).exp().double()  # p(x_c) at c's parent
    if uniforms is None:
        uniforms = torch.rand(batch, n + 1, generator=generator, dtype=torch.float64, device=logits.device)
    if node_rows is None:
        node_rows = torch.arange(1, n + 1, device=logits.device)
    if earlier_index is None:
        earlier_index = node_rows[None, :] < node_rows[:, None]
    # earlier[b, c, j]: j is an earlier sibling of c (same parent, smaller index)
    earlier = (tree.parents[:, :, None] == tree.parents[:, None, :]) & earlier_index
    removed = torch.bmm(earlier.double(), node_p[..., None])[..., 0]  # mass of c's earlier siblings
    remaining = 1.0 - removed
    remaining = torch.where(remaining > 0, remaining, 1.0)
    tentative = uniforms[:, :n] < node_p / remaining
    chosen = tentative & ~(earlier & tentative[:, None, :]).any(-1)
    accepted = (tree.mask <= chosen[:, None, :]).all(-1)  # ancestor-or-self => chosen
    count, stop_row, path = _accepted_path(accepted, node_rows, depth)
    # the bonus: p at the stop node, its children's tokens zeroed (all were tried and rejected)
    stop_scaled = scaled.gather(1, stop_row[:, None, None].expand(batch, 1, vocab))[:, 0]  # [B, V]
    p = (stop_scaled - lse.gather(1, stop_row[:, None])).exp().double()
    child = rows == stop_row[:, None]  # [B, N]: the stop node's children (parent row == stop row)
    zero = child & ((node_p * child).sum(-1) < 1.0)[:, None]
    at = torch.where(zero, tree.tokens, vocab)  # the extra column absorbs the nodes not zeroed
    residual = torch.cat([p, p.new_zeros(batch, 1)], 1).scatter(1, at, 0.0)[:, :vocab]
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    cdf = residual.cumsum(-1)
    point = uniforms[:, n:] * cdf[:, -1:]
    bonus = torch.searchsorted(cdf, point, right=True)[:, 0].clamp_max(vocab - 1)
    if return_residual:
        return count, path, bonus, residual
    return count, path, bonus


def verify_tree(
    tree: DraftTree,
    target_logits: torch.Tensor,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[VerifyStep]:
    """Verify every tree of the batch. ``target_logits [B, 1 + N, V]``: row 0 is the root."""
    if target_logits.shape[1] != tree.num_nodes + 1:
        raise ValueError(
            f"expected logits for the root and {tree.num_nodes} nodes, got {target_logits.shape[1]} rows"
        )
    steps = []
    for b in range(target_logits.shape[0]):
        if temperature <= 0:
            steps.append(verify_greedy(tree, b, target_logits[b]))
        else:
            steps.append(verify_stochastic(tree, b, target_logits[b], temperature, generator))
    return steps
