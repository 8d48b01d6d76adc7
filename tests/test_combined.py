"""``objective: gto_opd``: one data batch gives GTO trees and Draft-OPD rollouts from the same
drafter version, and the update is exactly the weighted sum of the two objectives' updates."""

from __future__ import annotations

import copy

import pytest
import torch

from speculative.experience import CombinedExperience
from actors.target_worker import TargetWorker
from learners.gto import gto_loss
from learners.objectives import objective_loss
from learners.opd import opd_loss
from speculative.config import ConfigError, load_config
from tests.test_gto import _sequences
from tests.test_tree_engine import train_agreeing_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(*extra: str):
    return load_config(None, [
        "training.objective=gto_opd", "training.ttt_steps=3",
        "gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8", "gto.group_size=3",
        "gto.groups_per_sequence=2", "opd.chain_length=3", "opd.max_new_tokens=10", "data.max_length=64",
        *extra,
    ])


@pytest.fixture(scope="module")
def setup():
    target, drafter = train_agreeing_pair(steps=25)
    drafter = copy.deepcopy(drafter)
    reference = copy.deepcopy(drafter)
    with torch.no_grad():  # a reference unlike the current drafter, so GTO's rewards differ
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    worker = TargetWorker(target, drafter.draft_to_target)
    batch = _sequences(target, 3, 20, 6, seed=2)
    experience = worker.make_experience(_config(), batch, drafter, reference, drafter_version=7, seed=3)
    return drafter, experience


def _grads(drafter, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in drafter.trainable_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_both_parts_come_from_the_same_batch_and_drafter_version(setup):
    _, experience = setup
    assert isinstance(experience, CombinedExperience)
    assert experience.drafter_version == experience.gto.drafter_version == experience.opd.drafter_version == 7
    assert experience.num_tokens == experience.gto.num_tokens + experience.opd.num_tokens
    # the rollouts start from the prompts of the very sequences the trees were grown on
    assert experience.opd.rollout.input_ids.shape[0] == experience.gto.sft.input_ids.shape[0]
    assert int(experience.gto.path_length.sum()) > 0 and experience.opd.accepted.numel() > 0
    moved = experience.to("cpu")
    assert isinstance(moved, CombinedExperience) and moved.nbytes() == experience.nbytes() > 0


@pytest.mark.parametrize("gto_weight,opd_weight", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
def test_loss_and_gradient_are_the_weighted_sum_of_gto_and_opd(setup, gto_weight, opd_weight):
    drafter, experience = setup
    config = _config(f"combined.gto_weight={gto_weight}", f"combined.opd_weight={opd_weight}")
    drafter.train()
    combined, metrics = objective_loss(drafter, experience, config)
    gto, gto_metrics = gto_loss(drafter, experience.gto, config)
    opd, opd_metrics = opd_loss(drafter, experience.opd, config)
    total = gto_weight * float(gto.detach()) + opd_weight * float(opd.detach())
    assert float(combined.detach()) == pytest.approx(total, rel=1e-5)
    assert metrics["gto/loss"] == pytest.approx(gto_metrics["loss"])
    assert metrics["opd/loss"] == pytest.approx(opd_metrics["loss"])
    assert {"gto/reward", "gto/clip_fraction", "token/loss", "opd/accepted_kl", "rollout/tau"} <= set(metrics)
    gto_grads, opd_grads = _grads(drafter, gto), _grads(drafter, opd)
    for got, a, b in zip(_grads(drafter, combined), gto_grads, opd_grads):
        torch.testing.assert_close(got, gto_weight * a + opd_weight * b, rtol=1e-4, atol=1e-7)
    assert float(opd.detach()) > 0 and any(float(g.abs().sum()) > 0 for g in opd_grads)


def test_combined_weights_are_validated():
    with pytest.raises(ConfigError, match="combined.opd_weight"):
        _config("combined.opd_weight=-1")
    with pytest.raises(ConfigError, match="combined.bogus"):
        _config("combined.bogus=1")
