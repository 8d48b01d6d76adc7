"""Training-time test (TTT): EAGLE-3's unrolled supervised objective.

Index ``t`` of a sequence x_0..x_{T-1} is unrolled for K draft steps. Step ``k`` (1-based) at
index ``t`` feeds the drafter token x_{t+k} at position t+k, with hidden state

    step 1: fc(target aux hidden at t)           (what the target gives after reading x_{<=t})
    step k: the drafter's own pre-norm output of step k-1 at index t

and is supervised by the target's next-token distribution at row t+k (predicting x_{t+k+1}).
This is the chain the drafter runs at inference: step k sees the real context (step-1 keys
at indices <= t) and the k-1 tokens it drafted itself (the same index in steps 2..k), so the
attention of step k at index t covers step-1 keys causally and later steps' keys only on the
diagonal - EAGLE-3's mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from speculative.config import TTT_ATTENTION_DEFAULT, TTT_VOCAB_LOSS_DEFAULT
from speculative.drafter import Eagle3Drafter
from speculative.vocab_kl import fused_vocab_kl


class TTTCache:
    """Keys/values of each unrolled step; step 1 is attended causally, later steps diagonally.

    The dense fp32 reference: it builds [B, heads, T, T] scores at every step. ``FlexTTTCache``
    (``speculative.flex_ttt``) computes the same attention with block-sparse FlexAttention,
    ``SdpaTTTCache`` (``speculative.sdpa_ttt``) with torch's fused causal kernels.
    """

    applies_sliding_window = True

    def __init__(self, key_padding_mask: torch.Tensor | None = None, sliding_window: int | None = None):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_padding_mask = key_padding_mask  # [B, T] True on real tokens
        self.sliding_window = sliding_window  # step-1 keys at most this many indices back

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.keys.append(k)
        self.values.append(v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        length = q.shape[-2]
        scores = torch.matmul(q.float(), self.keys[0].float().transpose(-1, -2)) * scale
        allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if self.sliding_window is not None:
            allowed = allowed.triu(1 - self.sliding_window)
        if self.key_padding_mask is not None:
            allowed = allowed & self.key_padding_mask[:, None, None, :].bool()
        # The most negative finite value, not -inf: a padded query whose window holds no real key
        # then gets a finite (unused) output instead of NaN, which the loss mask cannot cancel.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        diagonal = [(q.float() * key.float()).sum(-1, keepdim=True) * scale for key in self.keys[1:]]
        probs = torch.softmax(torch.cat([scores, *diagonal], dim=-1), dim=-1)
        out = torch.matmul(probs[..., :length], self.values[0].float())
        for j, value in enumerate(self.values[1:]):
            out = out + probs[..., length + j : length + j + 1] * value.float()
        return out.to(q.dtype)


@dataclass
class TTTResult:
    loss: torch.Tensor  # weighted sum over steps of the per-step mean KL; carries the graph
    step_loss: list[float]  # mean KL(target || drafter) per step
    step_accuracy: list[float]  # top-1 agreement with the target's argmax per step
    step_count: list[int]  # supervised positions per step
    # 1 + mean run of consecutive agreeing steps, over positions supervised at every step. A
    # teacher-forced proxy for acceptance length; the tree engine measures the real one.
    accept_length_proxy: float
    loss_value: float = float("nan")  # float(loss), read with the other scalars (one host sync)


def step_weights(num_steps: int, decay: float) -> list[float]:
    """EAGLE-3 weighs step k by decay**(k-1): later steps matter less and are noisier."""
    return [decay**k for k in range(num_steps)]


def restrict_to_draft_vocab(
    target_logits: torch.Tensor, draft_to_target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What TTT needs of the target's logits: the draft-vocab columns and the full argmax.

    Shipping these instead of the full [B, T, V] logits keeps experiences small.
    """
    return target_logits[..., draft_to_target], target_logits.argmax(-1)


def shift_left(x: torch.Tensor, by: int, fill: int | float = 0) -> torch.Tensor:
    """x[:, t + by] at index t, padded with ``fill`` past the end."""
    if by == 0:
        return x
    pad = torch.full_like(x[:, :by], fill)
    return torch.cat([x[:, by:], pad], dim=1)


def make_ttt_cache(drafter: Eagle3Drafter, attention_mask: torch.Tensor):
    """The attention of one unroll: ``drafter.ttt_attention`` picks the dense reference, flex or sdpa."""
    backend = getattr(drafter, "ttt_attention", TTT_ATTENTION_DEFAULT)  # duck-typed drafters lack it
    window = getattr(getattr(drafter, "config", None), "sliding_window", None)
    if backend == "sdpa" and window is not None:
        backend = "dense"  # torch's flash kernel takes no mask: the window needs the masked reference
    if backend == "flex":
        from speculative.flex_ttt import FlexTTTCache

        return FlexTTTCache(attention_mask, sliding_window=window)
    if backend == "sdpa":
        from speculative.sdpa_ttt import SdpaTTTCache

        return SdpaTTTCache(attention_mask)
    if backend != "dense":
        raise ValueError(f"unknown TTT attention {backend!r} (dense, flex or sdpa)")
    return TTTCache(attention_mask, sliding_window=window)


def unroll(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    aux_hidden: torch.Tensor,
    num_steps: int,
    step_inputs: list[torch.Tensor] | None = None,
    logit_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    with_logits: bool = True,
) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor]]:
    """Run the drafter's chain at every index at once; yields (k, logits, pre-norm hidden) per step.

    Step k at index t feeds ``step_inputs[k-1][:, t]`` (target ids) at position t+k; by default
    the data token x_{t+k}, which is teacher forcing (TTT). Passing other tokens replays chains
    the drafter drafted itself: GTO scores a tree's accepted path this way and Draft-OPD replays
    its rollouts, both with exactly the attention the drafter had at inference.
    ``logit_rows`` (sequence [P], index [P]): the logits only there ([P, Vd] per step, the rows a
    replay reads) instead of [B, T, Vd]; the lm_head is the largest product of a step.
    ``with_logits=False``: no lm_head at all (logits None), for callers that fuse it into their loss.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    cache = make_ttt_cache(drafter, attention_mask)
    hidden = drafter.fuse_target_hidden(aux_hidden)
    for k in range(1, num_steps + 1):
        tokens = shift_left(input_ids, k) if step_inputs is None else step_inputs[k - 1]
        if not with_logits:
            logits, hidden = None, drafter.hidden_step(tokens, hidden, positions + k, cache)
        elif logit_rows is None:
            logits, hidden = drafter(tokens, hidden, positions + k, cache)
        else:
            hidden = drafter.hidden_step(tokens, hidden, positions + k, cache)
            logits = drafter.draft_logits(hidden[logit_rows])
        yield k, logits, hidden


class DenseStepKL:
    """Each step's KL from whole [B, T, Vd] tensors: the readable reference (``ttt_vocab_loss="dense"``).

    The target side once per unroll, not once per step: p, and sum_v p log p per row (KL = that -
    sum_v p log q). Step k compares the drafter at index t with the target at row t+k: a slice of
    both (indices t >= T-k are never supervised), so no [B, T, N] tensor is shifted per step.
    """

    def __init__(self, drafter: Eagle3Drafter, target_draft_logits: torch.Tensor, target_top1: torch.Tensor,
                 valids: list[torch.Tensor]):
        target_logp = torch.log_softmax(target_draft_logits.float(), dim=-1)
        self.target_p = target_logp.exp()
        self.target_neg_entropy = (self.target_p * target_logp).sum(-1)  # [B, T]
        self.drafter, self.target_top1, self.valids = drafter, target_top1, valids

    def __call__(self, k: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of valid * KL over step k's rows, agreement [B, T] with the target's argmax)."""
        valid = self.valids[k - 1]
        kept = max(logits.shape[1] - k, 0)  # indices t < T-k; valid is 0 past them
        drafter_logq = torch.log_softmax(logits[:, :kept].float(), dim=-1)
        cross = (self.target_p[:, k:] * drafter_logq).sum(-1)
        kl = self.target_neg_entropy[:, k:] - cross
        agree = self.drafter.to_target_ids(logits.argmax(-1)) == shift_left(self.target_top1, k)
        return (kl * valid[:, :kept]).sum(), agree.float()


class FusedStepKL:
    """Each step's KL at its supervised rows only, the lm_head fused in (``speculative.vocab_kl``):
    no [B, T, Vd] tensor is built (``ttt_vocab_loss="fused"``, the default)."""

    def __init__(self, drafter: Eagle3Drafter, target_draft_logits: torch.Tensor, target_top1: torch.Tensor,
                 valids: list[torch.Tensor]):
        self.drafter = drafter
        self.target = target_draft_logits.reshape(-1, target_draft_logits.shape[-1])
        self.target_top1 = target_top1.reshape(-1)
        self.shape = target_top1.shape
        # Every step's rows at once, before the drafter runs: one host synchronisation per unroll
        # while the device has nothing queued, not one per step behind the forward.
        flat = torch.stack([valid.reshape(-1) for valid in valids]) if valids else None
        counts = (flat != 0).sum(-1).tolist() if flat is not None else []
        self.rows = torch.nonzero(flat)[:, 1].split(counts) if flat is not None else []
        self.weights = [flat[k, rows] for k, rows in enumerate(self.rows)]

    def __call__(self, k: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``DenseStepKL``'s, from the step's hidden states (its rows were listed up front)."""
        rows = self.rows[k - 1]
        head_input = self.drafter.head_input(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows))
        kl_sum, argmax = fused_vocab_kl(head_input, self.drafter.lm_head.weight, self.target, rows + k,
                                        self.weights[k - 1])
        agreed = (self.drafter.to_target_ids(argmax) == self.target_top1[rows + k]).float()
        agree = torch.zeros(self.target_top1.shape, device=agreed.device).index_put_((rows,), agreed)
        return kl_sum, agree.view(self.shape)


def training_time_test(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    target_draft_logits: torch.Tensor,
    target_top1: torch.Tensor,
    aux_hidden: torch.Tensor,
    num_steps: int,
    weights: list[float],
    in_draft_vocab: torch.Tensor | None = None,
) -> TTTResult:
    """Unroll ``num_steps`` draft steps over a batch; KL from the target restricted to the draft vocab.

    ``target_draft_logits`` are the target's logits at the draft vocabulary's ids [B, T, N] and
    ``target_top1`` its argmax over the full vocabulary (see ``restrict_to_draft_vocab``).
    ``loss_mask[b, j]`` marks tokens the drafter should learn to propose (assistant tokens);
    step k at index t predicts x_{t+k+1}, so it counts where ``loss_mask[t+k+1]`` is set.
    ``in_draft_vocab`` ([target vocab] bool), when given, also drops the states whose target
    argmax is outside the draft vocabulary (SpecForge's and Draft-OPD's EAGLE-3 position mask).
    ``drafter.ttt_vocab_loss`` picks how each step's KL is computed: "fused" (``FusedStepKL``) or
    the "dense" reference (``DenseStepKL``); the same loss, gradient and agreement.
    """
    mask = loss_mask.float() * attention_mask.float()
    valids = []
    for k in range(1, num_steps + 1):
        valid = shift_left(mask, k + 1, 0.0)
        if in_draft_vocab is not None:
            valid = valid * shift_left(in_draft_vocab[target_top1].float(), k, 0.0)
        valids.append(valid)
    vocab_loss = getattr(drafter, "ttt_vocab_loss", TTT_VOCAB_LOSS_DEFAULT)
    if vocab_loss == "fused":
        step_kl = FusedStepKL(drafter, target_draft_logits, target_top1, valids)
    elif vocab_loss == "dense":
        step_kl = DenseStepKL(drafter, target_draft_logits, target_top1, valids)
    else:
        raise ValueError(f"unknown TTT vocabulary loss {vocab_loss!r} (fused or dense)")

    total = aux_hidden.new_zeros((), dtype=torch.float32)
    # Per-step scalars stay on the device and come to the host together at the end: one
    # synchronisation per unroll instead of three per step.
    step_means, step_agreed, step_counts = [], [], []
    run_alive = None
    run_length = torch.zeros_like(input_ids, dtype=torch.float32)
    all_valid = torch.ones_like(run_length)
    unrolled = unroll(drafter, input_ids, attention_mask, aux_hidden, num_steps, with_logits=vocab_loss == "dense")
    for k, logits, hidden in unrolled:
        valid = valids[k - 1]
        kl_sum, agree = step_kl(k, hidden if logits is None else logits)
        count = valid.sum()
        step_mean = kl_sum / count.clamp_min(1.0)
        total = total + weights[k - 1] * step_mean
        step_means.append(step_mean.detach())
        step_agreed.append((agree * valid).sum() / count.clamp_min(1.0))
        step_counts.append(count)
        run_alive = agree if run_alive is None else run_alive * agree
        run_length = run_length + run_alive
        all_valid = all_valid * valid
    steps = len(step_means)
    if not steps:
        return TTTResult(total, [], [], [], 1.0, 0.0)
    proxy = 1.0 + (run_length * all_valid).sum() / all_valid.sum().clamp_min(1.0)
    host = torch.stack([*step_means, *step_agreed, *step_counts, proxy, total.detach()]).tolist()
    step_loss, step_accuracy = host[:steps], host[steps:2 * steps]
    step_count = [int(c) for c in host[2 * steps:3 * steps]]
    return TTTResult(total, step_loss, step_accuracy, step_count, host[-2], host[-1])


def replay_chains(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    aux_hidden: torch.Tensor,
    sequence: torch.Tensor,
    index: torch.Tensor,
    fed_tokens: torch.Tensor,
) -> list[torch.Tensor]:
    """The drafter's logits along given chains, exactly as it computed them at inference.

    Chain p starts at index ``index[p]`` of sequence ``sequence[p]`` (context x_0..x_t, root
    x_{t+1}) and feeds ``fed_tokens[p, k-1]`` (target ids) at step k, so ``fed_tokens[p, 0]``
    must be the root. Returns, per step k, the logits [P, Vd] of the distribution step k
    drafted from. Chains must start at distinct (sequence, index) pairs. One unroll of
    ``K = fed_tokens.shape[1]`` steps over the whole batch serves every chain at once.
    """
    steps = fed_tokens.shape[1]
    inputs = []
    for k in range(1, steps + 1):
        tokens = shift_left(input_ids, k).clone()
        tokens[sequence, index] = fed_tokens[:, k - 1]
        inputs.append(tokens)
    return [logits for _, logits, _ in unroll(drafter, input_ids, attention_mask, aux_hidden, steps, inputs,
                                               logit_rows=(sequence, index))]


def path_logprob(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    aux_hidden: torch.Tensor,
    sequence: torch.Tensor,
    index: torch.Tensor,
    path_ids: torch.Tensor,
    path_length: torch.Tensor,
) -> torch.Tensor:
    """log q(path) [P] under ``drafter`` along chains rooted as in ``replay_chains``: the sum over the accepted path's steps (0 if empty).

    Differentiable when called with grad enabled (the learner's numerator); the same call
    under ``no_grad`` gives the reference's denominator.
    """
    depth = int(path_length.max()) if path_length.numel() else 0
    if depth == 0:
        return torch.zeros(path_ids.shape[0], device=path_ids.device)
    root = input_ids[sequence, index + 1]
    fed = torch.cat([root[:, None], drafter.to_target_ids(path_ids[:, : depth - 1])], dim=1)
    logits = replay_chains(drafter, input_ids, attention_mask, aux_hidden, sequence, index, fed)
    steps = torch.stack(
        [torch.log_softmax(step.float(), -1).gather(1, path_ids[:, k : k + 1]).squeeze(1)
         for k, step in enumerate(logits)], dim=1,
    )  # [P, depth]
    on_path = torch.arange(depth, device=steps.device)[None] < path_length[:, None]
    return (steps * on_path).sum(-1)
