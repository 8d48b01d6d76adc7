"""The Draft Tree Reward of GTO (arXiv 2509.22134, Sec. 3.1): acceptance measured without sampling.

Verification with top-k trees (``speculative.verify``) accepts child x of an accepted node with
probability exactly p(x), the target's probability of x there (given the accepted drafted
prefix), whatever siblings were tried before it. So node v is accepted with probability

    P(v) = prod_{u on the path root -> v} p(u | ancestors of u)

and, from one target forward over the tree (the verification forward itself):

* a branch (root -> leaf i) has expected accepted length  L_i = sum_{v on branch i} P(v)
  (paper Eq. 3-4: what verifying that branch alone would accept on average);
* the tree as a whole accepts  E = sum_v P(v)  draft tokens on average (nodes at one depth are
  accepted in disjoint events), the number draftrl's Monte-Carlo test checks;
* GTO's reward is the smooth maximum over branches  r = (1/eta) log sum_i exp(eta L_i)  (Eq. 5).

At target temperature 0, p(u) is 1 when u is the target's argmax and 0 otherwise: L_i is the
integer length a greedy verifier accepts on branch i and E is the greedy accepted length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculative.tree import DraftTree

AGGREGATIONS = ("lse", "max", "mean", "expected")


def node_log_acceptance(tree: DraftTree, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(node | ancestors) [B, N]: the target's log-prob of each node's token at its parent.

    ``target_logits [B, 1 + N, V]``: row 0 at the root, row 1 + i at node i (the verification
    forward's layout). At temperature 0 the value is 0 for the argmax token and -inf otherwise.
    """
    rows = torch.arange(tree.tokens.shape[0], device=tree.tokens.device)[:, None]
    token_logit = target_logits[rows, tree.parents + 1, tree.tokens]  # [B, N]
    if temperature <= 0:
        return log_acceptance(tree, token_logit, None, target_logits.argmax(-1), temperature)
    log_norm = torch.logsumexp(target_logits.float() / temperature, dim=-1)  # [B, 1 + N]
    return log_acceptance(tree, token_logit, log_norm, None, temperature)


def log_acceptance(
    tree: DraftTree,
    token_logit: torch.Tensor,
    row_log_norm: torch.Tensor | None,
    row_argmax: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``node_log_acceptance`` from the three things it reads of the logits, so that a caller
    verifying thousands of trees can reduce each forward's [.., V] logits right away:
    ``token_logit [B, N]`` (node i's token's logit at its parent's row), ``row_log_norm
    [B, 1 + N]`` (logsumexp(logits / temperature) per row; read at temperature > 0) and
    ``row_argmax [B, 1 + N]`` (the target's argmax per row; read at temperature 0)."""
    parent_row = tree.parents + 1  # root (-1) -> row 0
    token_logit = token_logit.float()
    if temperature <= 0:
        best = row_argmax.gather(1, parent_row)
        return torch.where(best == tree.tokens, 0.0, float("-inf")).to(token_logit)
    return token_logit / temperature - row_log_norm.gather(1, parent_row)


def path_probability(tree: DraftTree, log_accept: torch.Tensor) -> torch.Tensor:
    """P(v) [B, N]: probability that node v is accepted (product over its path)."""
    finite = log_accept.clamp_min(-1e4)  # exp(-1e4) == 0; avoids 0 * -inf in the matmul
    return torch.exp(torch.bmm(tree.mask.float(), finite[..., None]).squeeze(-1))


def leaves(tree: DraftTree) -> torch.Tensor:
    """[B, N] True where a node has no child in the tree."""
    batch, n = tree.parents.shape
    has_child = torch.zeros(batch, n + 1, dtype=torch.bool, device=tree.parents.device)
    has_child.scatter_(1, torch.where(tree.parents < 0, n, tree.parents), True)
    return ~has_child[:, :n]


@dataclass
class TreeScore:
    reward: torch.Tensor  # [B] the aggregated reward
    branch_values: torch.Tensor  # [B, N] L_i at leaves (the value of the branch ending there)
    is_leaf: torch.Tensor  # [B, N]
    accept_probability: torch.Tensor  # [B, N] P(v)
    expected_length: torch.Tensor  # [B] E = sum_v P(v)


def score_tree(
    tree: DraftTree,
    target_logits: torch.Tensor,
    temperature: float = 1.0,
    eta: float = 1.0,
    aggregation: str = "lse",
) -> TreeScore:
    """Branch values, the exact expected accepted length, and the reward ``aggregation`` of them."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return score_log_acceptance(tree, node_log_acceptance(tree, target_logits, temperature), eta, aggregation)


def score_log_acceptance(
    tree: DraftTree, log_accept: torch.Tensor, eta: float = 1.0, aggregation: str = "lse"
) -> TreeScore:
    """``score_tree`` from the nodes' log acceptance probabilities [B, N]."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    prob = path_probability(tree, log_accept)
    branch = torch.bmm(tree.mask.float(), prob[..., None]).squeeze(-1)  # sum over the path
    is_leaf = leaves(tree)
    expected = prob.sum(-1)
    if aggregation == "lse":
        reward = torch.logsumexp((eta * branch).masked_fill(~is_leaf, float("-inf")), -1) / eta
    elif aggregation == "max":
        reward = branch.masked_fill(~is_leaf, float("-inf")).amax(-1)
    elif aggregation == "mean":
        reward = (branch * is_leaf).sum(-1) / is_leaf.sum(-1)
    else:
        reward = expected
    return TreeScore(reward, branch, is_leaf, prob, expected)


def greedy_accepted_path(
    tree: DraftTree, target_logits: torch.Tensor, max_depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The longest accepted sequence under greedy verification (GTO's S-hat), batched.

    Returns (draft ids [B, max_depth] 0-padded, node indices [B, max_depth] -1-padded, lengths
    [B]). It is the path ``speculative.verify.verify_greedy`` accepts: the nodes whose every
    ancestor-or-self token is the target's argmax at its parent.
    """
    return accepted_path(tree, node_log_acceptance(tree, target_logits, 0.0), max_depth)


def accepted_path(
    tree: DraftTree, greedy_log_accept: torch.Tensor, max_depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``greedy_accepted_path`` from the nodes' log acceptance at temperature 0 [B, N]."""
    accepted = path_probability(tree, greedy_log_accept) > 0.5
    depth = torch.where(accepted, tree.depths, 0)  # [B, N]; one accepted node per depth
    batch = tree.tokens.shape[0]
    device = tree.tokens.device
    nodes = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=device)
    index = torch.arange(tree.num_nodes, device=device).expand(batch, -1)
    # Scatter node i into column depth[i]; rejected nodes all land in column 0 (dropped).
    nodes.scatter_(1, depth, torch.where(accepted, index, -1))
    nodes = nodes[:, 1:]
    lengths = accepted.sum(-1)
    ids = torch.where(nodes >= 0, tree.draft_ids.gather(1, nodes.clamp_min(0)), 0)
    return ids, nodes, lengths
