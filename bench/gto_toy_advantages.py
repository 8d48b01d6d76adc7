"""Does GTO's surrogate, with the paper's advantages, raise the tree reward on a CPU toy?

The toy of ``tests/test_gto.py::test_surrogate_on_credited_paths_raises_tree_reward`` (a
predictable tiny target, trees of depth 4 / top-2 / 6 nodes so the budget binds, greedy accepted
length of the drafter's own trees over 8 x 24-token contexts). The reference M0 is the drafter
after 20 TTT steps, the trained drafter M starts from the same run after 25 (so M != M0 and the
advantages are not all zero). 20 surrogate-only steps (token loss weight 0, Adam lr 3e-4) per
arm and context seed:

  paper    GTO's own loss (learners.gto.gto_loss): debiased, group-standardised advantages
  negated  the same with the advantages' sign flipped (reward and reference reward swapped)
  all_up   every accepted path credited with advantage +1 (same ratio and clip as GTO)

    .venv/bin/python bench/gto_toy_advantages.py [--seeds 4] [--steps 20]

Prints the change of mean accepted length per arm and seed (docs/methods/gto.md, section 8).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.gto_rollout import gto_experience  # noqa: E402
from actors.target_worker import TargetWorker  # noqa: E402
from learners.gto import clipped_surrogate, group_advantages, gto_loss  # noqa: E402
from speculative.ttt import path_logprob  # noqa: E402
from tests.test_gto import _gto_config, _mean_tree_reward, _sequences  # noqa: E402
from tests.test_tree_engine import train_agreeing_pair  # noqa: E402


def all_up_loss(drafter, exp, config) -> torch.Tensor:
    """GTO's clipped surrogate (ratio against the reference) with every accepted path at A = +1."""
    has_path = exp.path_length > 0
    _, _, dense = group_advantages(exp.reward, exp.group, has_path)
    sft = exp.sft
    logprob = path_logprob(drafter, sft.input_ids, sft.attention_mask, sft.aux_hidden, exp.sequence,
                           exp.index, exp.path_ids, exp.path_length)
    per_token = (logprob - exp.reference_path_logprob) / exp.path_length.clamp_min(1)
    loss, _ = clipped_surrogate(per_token, has_path.float(), has_path, dense, config.gto.clip_epsilon)
    return loss


def run(arm: str, target, start, reference, config, batch, steps: int) -> tuple[float, float]:
    drafter = copy.deepcopy(start)
    worker = TargetWorker(target, drafter.draft_to_target)
    optimizer = torch.optim.Adam(drafter.trainable_parameters(), lr=3e-4, betas=(0.9, 0.95))
    before = _mean_tree_reward(worker, drafter, config, batch)
    for step in range(steps):
        exp = gto_experience(worker, config, batch, drafter, reference, seed=step)
        if arm == "negated":
            exp = dataclasses.replace(exp, reward=exp.reference_reward, reference_reward=exp.reward)
        drafter.train()
        loss = all_up_loss(drafter, exp, config) if arm == "all_up" else gto_loss(drafter, exp, config)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, _mean_tree_reward(worker, drafter, config, batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, reference = train_agreeing_pair(20)
    _, start = train_agreeing_pair(25)
    config = _gto_config(tree_depth=4, tree_top_k=2, tree_total_tokens=6, group_size=4, groups_per_sequence=4,
                         reward_temperature=0.0, reward="max", token_loss_weight=0.0, loss_weight=1.0)
    rows = []
    for seed in range(args.seeds):
        batch = _sequences(target, 8, 24, 4, seed=100 + seed)
        for arm in ("paper", "negated", "all_up"):
            before, after = run(arm, target, start, reference, config, batch, args.steps)
            rows.append({"seed": seed, "arm": arm, "before": before, "after": after, "change": after - before})
            print(json.dumps(rows[-1]), flush=True)
    print("| arm | change of mean accepted length, per seed |\n|---|---|")
    for arm in ("paper", "negated", "all_up"):
        print(f"| {arm} | " + ", ".join(f"{r['change']:+.3f}" for r in rows if r["arm"] == arm) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
