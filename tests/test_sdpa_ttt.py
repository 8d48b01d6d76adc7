"""TTT attention through torch's fused causal kernel (``training.attention: sdpa``) against the dense
fp32 reference, and its hand-written backward against finite differences."""

from __future__ import annotations

import pytest
import torch

from speculative.config import TrainingConfig
from speculative.sdpa_ttt import SdpaTTTCache, _CausalPlusDiagonal
from speculative.ttt import TTTCache, make_ttt_cache, restrict_to_draft_vocab, step_weights, training_time_test
from speculative.vocab import DraftVocab
from tests.conftest import padded_batch, tiny_drafter


@pytest.mark.parametrize("later_steps", [0, 1, 3])
def test_the_backward_matches_finite_differences(later_steps):
    """The backward feeds the merged output to the kernel's own backward in place of the causal
    output (the module docstring says why that is exact): float64 gradcheck on the CPU kernel."""
    generator = torch.Generator().manual_seed(later_steps)
    tensors = [torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=generator, requires_grad=True)
               for _ in range(3 + 2 * later_steps)]
    assert torch.autograd.gradcheck(lambda *args: _CausalPlusDiagonal.apply(0.35, *args), tensors)


def test_the_cache_is_a_drop_in_for_the_dense_cache():
    """Random q/k/v over 4 steps, right padding: the same outputs at real rows and the same
    gradients of a loss that reads real rows only."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 37, [1] * 20 + [0] * 17, [1] * 5 + [0] * 32])
    inputs = [[torch.randn(3, 4, 37, 16, generator=generator, requires_grad=True) for _ in range(3)]
              for _ in range(4)]
    weights = [torch.randn(3, 4, 37, 16, generator=generator) * mask[:, None, :, None] for _ in range(4)]

    def run(cache):
        outs = [cache.attend(q, k, v) for q, k, v in inputs]
        loss = sum((out * weight).sum() for out, weight in zip(outs, weights))
        return outs, torch.autograd.grad(loss, [t for step in inputs for t in step])

    dense_outs, dense_grads = run(TTTCache(mask))
    sdpa_outs, sdpa_grads = run(SdpaTTTCache(mask))
    real = mask.bool()[:, None, :, None].expand_as(dense_outs[0])
    for expected, got in zip(dense_outs, sdpa_outs):
        assert torch.allclose(got[real], expected[real], atol=1e-5)
    for expected, got in zip(dense_grads, sdpa_grads):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in dense_grads) > 0.1  # the check compares real gradients


def test_training_time_test_losses_and_gradients_equal_dense(tiny_target):
    vocab = DraftVocab.from_counts(torch.arange(tiny_target.vocab_size).flip(0), 48)
    drafter = tiny_drafter(tiny_target, vocab)
    ids, attention, loss_mask = padded_batch(tiny_target, [37, 12, 29], 37)
    feats = tiny_target.features(ids, attention)

    def run(backend):
        drafter.zero_grad(set_to_none=True)
        drafter.ttt_attention = backend
        result = training_time_test(drafter, ids, attention, loss_mask,
                                    *restrict_to_draft_vocab(feats.logits, drafter.draft_to_target),
                                    feats.aux_hidden, 4, step_weights(4, 0.8))
        result.loss.backward()
        return result, {n: p.grad.clone() for n, p in drafter.named_parameters() if p.grad is not None}

    dense, dense_grads = run("dense")
    sdpa, sdpa_grads = run("sdpa")
    assert sdpa.loss_value == pytest.approx(dense.loss_value, rel=1e-5)
    assert sdpa.step_loss == pytest.approx(dense.step_loss, rel=1e-5, abs=1e-6)
    assert sdpa.step_accuracy == dense.step_accuracy
    assert dense_grads.keys() == sdpa_grads.keys() and len(dense_grads) > 5
    for name, grad in dense_grads.items():
        assert torch.allclose(sdpa_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_what_it_cannot_do_is_refused_by_name_or_left_to_dense(tiny_target):
    with pytest.raises(ValueError, match="right-padded"):
        SdpaTTTCache(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="no sliding window"):
        SdpaTTTCache(torch.ones(1, 4, dtype=torch.long), sliding_window=6)
    drafter = tiny_drafter(tiny_target)
    drafter.ttt_attention, drafter.config.sliding_window = "sdpa", 6
    # the default must not refuse a drafter with a window: such a drafter trains with the dense reference
    assert type(make_ttt_cache(drafter, torch.ones(1, 4, dtype=torch.long))) is TTTCache
    drafter.config.sliding_window = None
    assert type(make_ttt_cache(drafter, torch.ones(1, 4, dtype=torch.long))) is SdpaTTTCache
    assert TrainingConfig().attention == "sdpa" and drafter.ttt_attention == "sdpa"
    drafter.ttt_attention = "sparse"
    with pytest.raises(ValueError, match="dense, flex or sdpa"):
        make_ttt_cache(drafter, torch.ones(1, 4, dtype=torch.long))


def test_gpu_kernel_choice_falls_back_and_names_the_way_out(monkeypatch):
    """On a GPU without a flash kernel for the shape (injected: the fake ops raise), bf16 goes to the
    memory-efficient kernel; with neither, the error names training.attention 'dense'. Meta tensors
    take the GPU branches."""
    import types

    import speculative.sdpa_ttt as sdpa_ttt

    q = torch.empty(2, 3, 5, 8, dtype=torch.bfloat16, device="meta")
    called = []

    def no_kernel(*args, **kwargs):
        called.append("refused")
        raise RuntimeError("no kernel for this GPU")

    def efficient(q, k, v, bias, with_lse, dropout, causal, scale):
        called.append("efficient")
        return q.clone(), torch.empty(q.shape[:-1], dtype=torch.float32, device="meta"), None, None

    monkeypatch.setattr(sdpa_ttt, "aten", types.SimpleNamespace(
        _scaled_dot_product_flash_attention=no_kernel, _scaled_dot_product_efficient_attention=efficient))
    out, lse, state = sdpa_ttt._causal_forward(q, q, q, 0.3)
    assert called == ["refused", "efficient"] and state[0] == "efficient" and lse.shape == (2, 3, 5)
    monkeypatch.setattr(sdpa_ttt, "aten", types.SimpleNamespace(
        _scaled_dot_product_flash_attention=no_kernel, _scaled_dot_product_efficient_attention=no_kernel))
    with pytest.raises(RuntimeError, match="use training.attention 'dense'"):
        sdpa_ttt._causal_forward(q, q, q, 0.3)


def test_the_merge_kernel_takes_only_shapes_whose_offsets_fit_int32():
    """``ttt_merge_kernel.fits``: key j's plane starts at j * q.numel() in the kernels' int32 offsets;
    past 2**31 the sdpa cache merges with the torch code."""
    from speculative.ttt_merge_kernel import fits

    q = torch.empty(2**20, 2**10, device="meta")  # 2**30 elements
    assert fits(q, 0) and not fits(q, 1)
    assert fits(torch.empty(32, 9, 1024, 64, device="meta"), 6)  # the H200 GTO learner's shape, 7 steps
