"""Live drafter updates inside a running vLLM-CPU engine (``actors.vllm_drafter``).

One engine session (a subprocess, SmolLM2 target, fp32, 3-token chains) starts from a "good"
drafter, has a "bad" one pushed in, a malformed update refused, and the good one pushed back.
After every update vLLM's probe logits must equal draftrl's own ``Eagle3Drafter`` forward to
fp32 tolerance, and vLLM's acceptance counters must move with the weights: down for the bad
drafter, and back to exactly the first run's numbers (same tokens, same counters) for the good
one, i.e. the live-updated engine behaves as if it had been started from those weights.

The good drafter is built from the target's own weights (it proposes "the last token again",
which SmolLM2 confirms on repetitive text); the bad one is the good one with random noise on
every tensor (so the probe checks q/k/v, o_proj and the MLP too) and a negated lm_head.
A second session has no drafter at all: the extension must refuse loudly instead of updating
nothing. On an idle 2-core box the file takes about a minute and a half.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from actors.vllm_drafter import (
    WORKER_EXTENSION,
    compare_probe,
    drafter_state,
    reference_probe,
    run_session_isolated,
)

REPO = Path(__file__).resolve().parent.parent
NUM_SPECULATIVE_TOKENS = 3
DRAFT_VOCAB = 8192  # the lowest target ids: a reduced vocabulary, so d2t is exercised too
PROMPTS = [
    [{"role": "user", "content": "Repeat after me: no no no no no no no no no no no no"}],
    [{"role": "user", "content": "Count from 1 to 30, separated by commas."}],
]
ENGINE = {"dtype": "float32", "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
          "max_model_len": 512, "max_num_seqs": 4}
FP32 = {"atol": 1e-4, "rtol": 1e-4}


# --------------------------------------------------------------------------------------------
# Fast: the extras' import paths
# --------------------------------------------------------------------------------------------
def _extra_pins() -> dict[str, list[str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["project"]["optional-dependencies"]


_IMPORT_CHECK = """
import json, sys
import vllm
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker
extension = resolve_obj_by_qualname(sys.argv[1])
own = [a for a in dir(extension) if not a.startswith("__")]
print(json.dumps({"version": vllm.__version__, "name": extension.__name__, "own": own,
                  "clash": [a for a in own if hasattr(CPUWorker, a) or hasattr(Worker, a)]}))
"""


@pytest.mark.parametrize("extra", ["vllm", "vllm-cpu"])
def test_vllm_extra_import_path(extra):
    """Each vLLM extra: its distribution (if installed) is in the pinned range, ``import vllm``
    works, and vLLM's own resolver finds the worker extension by its dotted path.

    In a subprocess, like every vLLM use in the tests: importing vLLM changes process state.
    """
    from packaging.requirements import Requirement

    (requirement,) = [Requirement(r) for r in _extra_pins()[extra] if r.startswith("vllm")]
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"extra '{extra}' ({requirement}) is not installed here")
    assert requirement.specifier.contains(installed), (
        f"{requirement.name} {installed} is outside the pin {requirement} of extra '{extra}'"
    )
    proc = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, WORKER_EXTENSION], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["version"] == installed
    assert found["name"] == "DraftrlWorkerExtension"
    # vLLM refuses an extension whose attributes collide with its worker's.
    assert found["own"] and all(a.startswith("draftrl_") for a in found["own"])
    assert not found["clash"]


def test_vllm_pins_are_bounded():
    """Both extras name a minimum and an exclusive maximum: the extension reads vLLM internals."""
    from packaging.requirements import Requirement

    for extra in ("vllm", "vllm-cpu"):
        (requirement,) = [Requirement(r) for r in _extra_pins()[extra] if r.startswith("vllm")]
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "<" in operators, (extra, str(requirement))


# --------------------------------------------------------------------------------------------
# Slow: a real engine
# --------------------------------------------------------------------------------------------
def _repeat_drafter(smollm2_vllm_dir: Path):
    """An EAGLE-3 drafter (draftrl's class) that proposes the target's current token again.

    ``fc`` passes through the last aux state, which is the target's final pre-norm residual
    (aux id = number of layers); attention and MLP add nothing; ``norm`` and ``lm_head`` are the
    target's final norm and (tied) embedding rows, so it drafts the target's current argmax.
    """
    from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
    from speculative.target import TargetModel
    from speculative.vocab import DraftVocab

    target = TargetModel.load(str(smollm2_vllm_dir), dtype=torch.float32)
    layers, hidden = target.num_layers, target.hidden_size
    config = DrafterConfig.from_target(target.config, DRAFT_VOCAB, (2, layers // 2, layers))
    vocab = DraftVocab(torch.arange(DRAFT_VOCAB), target.vocab_size)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=0)
    with torch.no_grad():
        drafter.fc.weight.copy_(torch.cat([torch.zeros(hidden, 2 * hidden), torch.eye(hidden)], 1))
        drafter.midlayer.self_attn.o_proj.weight.zero_()
        drafter.midlayer.mlp.down_proj.weight.zero_()
        drafter.norm.weight.copy_(target.model.model.norm.weight)
        drafter.lm_head.weight.copy_(target.embed_tokens.weight[:DRAFT_VOCAB])
    return drafter.float().eval()


def _perturbed(drafter, seed: int = 1):
    """The same drafter with noise on every trained tensor and a negated lm_head: drafts badly."""
    import copy

    bad = copy.deepcopy(drafter)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bad.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        bad.lm_head.weight.neg_()
    return bad


def _probe_of(step: dict) -> torch.Tensor:
    assert step["ok"], step
    assert step["outside_all_neg_inf"], "vLLM's logits outside the draft vocabulary are not -inf"
    assert step["target_ids"] == list(range(DRAFT_VOCAB)), "vLLM's d2t mapping is not the learner's"
    return torch.tensor(step["logits"])


@pytest.fixture(scope="module")
def session(smollm2_vllm_dir: Path, tmp_path_factory):
    """One engine: good -> bad -> malformed (refused) -> good, probing and generating between."""
    from speculative.checkpoint import save_drafter

    tmp = tmp_path_factory.mktemp("live_update")
    good = _repeat_drafter(smollm2_vllm_dir)
    bad = _perturbed(good)
    good_dir = save_drafter(good, tmp / "good", dtype=torch.float32)
    save_file(drafter_state(bad), tmp / "bad.safetensors")
    # Malformed 1: vLLM's own (stacked) parameter names instead of the checkpoint layout.
    vllm_names = drafter_state(bad)
    vllm_names["model.layers.0.self_attn.qkv_proj.weight"] = torch.cat([
        vllm_names.pop(f"midlayer.self_attn.{p}_proj.weight") for p in "qkv"
    ])
    save_file(vllm_names, tmp / "vllm_layout.safetensors")
    # Malformed 2: right names, but fc shaped for a target twice as wide.
    wide = drafter_state(bad)
    wide["fc.weight"] = torch.zeros(wide["fc.weight"].shape[0], 2 * wide["fc.weight"].shape[1])
    save_file(wide, tmp / "wrong_shape.safetensors")
    steps = [
        {"op": "locate"},
        {"op": "probe", "seed": 0},                                        # 1 good (from disk)
        {"op": "generate", "max_tokens": 24},                              # 2
        {"op": "update", "weights": str(tmp / "bad.safetensors")},         # 3
        {"op": "probe", "seed": 0},                                        # 4 bad
        {"op": "generate", "max_tokens": 24},                              # 5
        {"op": "update", "weights": str(tmp / "vllm_layout.safetensors")},  # 6 refused
        {"op": "update", "weights": str(tmp / "wrong_shape.safetensors")},  # 7 refused
        {"op": "probe", "seed": 0},                                        # 8 still bad
        {"op": "update", "weights": str(good_dir)},                        # 9 good again
        {"op": "probe", "seed": 0},                                        # 10
        {"op": "generate", "max_tokens": 24},                              # 11
    ]
    result = run_session_isolated(smollm2_vllm_dir, good_dir, steps, prompts=PROMPTS, engine=ENGINE)
    return {"good": good, "bad": bad, "steps": result["steps"]}


@pytest.mark.slow
def test_probe_matches_learner_after_each_update(session):
    steps, good, bad = session["steps"], session["good"], session["bad"]
    assert steps[0]["ok"] and steps[0]["path"] == "worker.model_runner.get_draft_model()", steps[0]
    assert steps[0]["class"] == "Eagle3LlamaForCausalLM" and steps[0]["has_d2t"]
    assert not steps[0]["lm_head_shared_with_target"]
    ours_good, ours_bad = reference_probe(good, seed=0), reference_probe(bad, seed=0)
    # The probe can tell the two drafters apart, so agreeing with one of them means something.
    assert compare_probe(ours_good, ours_bad)["max_abs_diff"] > 1.0
    update = steps[3]
    assert update["ok"], update
    assert update["written"] == [
        "model.fc", "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.0.input_layernorm.weight", "model.layers.0.hidden_norm.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head",
        "draft_id_to_target_id",
    ]
    for index, ours in [(1, ours_good), (4, ours_bad), (8, ours_bad), (10, ours_good)]:
        theirs = _probe_of(steps[index])
        torch.testing.assert_close(theirs, ours, **FP32, msg=lambda m, i=index: f"step {i}: {m}")
        assert compare_probe(ours, theirs)["argmax_agreement"] == 1.0
        print(f"probe step {index}: {compare_probe(ours, theirs)}")  # shown with -rP


@pytest.mark.slow
def test_acceptance_counters_follow_the_pushed_weights(session):
    steps = session["steps"]
    first, bad, again = steps[2], steps[5], steps[11]
    for step in (first, bad, again):
        assert step["ok"], step
        assert step["spec"]["num_drafts"] > 0
    for name, step in (("good (from disk)", first), ("bad (pushed)", bad), ("good (pushed)", again)):
        print(f"{name}: {step['spec']}")  # shown with -rP
    good_accepted = first["spec"]["num_accepted_tokens"]
    assert good_accepted > 0, first["spec"]
    assert bad["spec"]["num_accepted_tokens"] < good_accepted / 4, (first["spec"], bad["spec"])
    # Greedy speculative decoding is lossless: the text never depends on the drafter.
    assert bad["token_ids"] == first["token_ids"]
    # Pushing the good weights back restores the from-disk engine exactly.
    assert again["token_ids"] == first["token_ids"]
    assert again["spec"] == first["spec"]


@pytest.mark.slow
def test_malformed_updates_are_refused_and_write_nothing(session):
    steps = session["steps"]
    layout, shape = steps[6], steps[7]
    assert not layout["ok"] and layout["error_type"] == "DrafterUpdateError"
    assert "nothing was written" in layout["error"]
    assert "model.layers.0.self_attn.qkv_proj.weight" in layout["error"]  # the unexpected name
    assert "midlayer.self_attn.q_proj.weight" in layout["error"]  # the missing one
    assert not shape["ok"] and shape["error_type"] == "DrafterUpdateError"
    assert "model.fc: vLLM expects (576, 1728)" in shape["error"], shape["error"]
    # Step 8's probe (checked above) still equals the bad drafter: neither update wrote anything.


@pytest.mark.slow
def test_engine_without_drafter_refuses_loudly(smollm2_vllm_dir, tmp_path):
    """No speculative_config: there is no drafter module, and an update must say so."""
    from speculative.checkpoint import save_drafter

    good_dir = save_drafter(_repeat_drafter(smollm2_vllm_dir), tmp_path / "good", dtype=torch.float32)
    result = run_session_isolated(
        smollm2_vllm_dir, good_dir,
        [{"op": "update", "weights": str(good_dir)}, {"op": "probe"}, {"op": "locate"}],
        engine={**ENGINE, "speculative": False},
    )
    for step in result["steps"]:
        assert not step["ok"], step
        assert step["error_type"] == "DrafterNotFoundError", step
        assert "no EAGLE-3 drafter module found" in step["error"]
        assert "no drafter weights were loaded" in step["error"]
        assert "worker.model_runner.get_draft_model(): None" in step["error"]
        assert "worker.model_runner.drafter: absent" in step["error"]
        assert "speculative_config method None" in step["error"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
