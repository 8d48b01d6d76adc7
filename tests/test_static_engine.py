"""The static-shape engine path (what CUDA graphs replay on GPU), run eagerly on CPU.

On GPU ``compile="graph"`` captures exactly the functions that ``compile="static"`` runs here,
so these tests are what keeps the graph path lossless; ``draftrl eval --check`` then only has
to show on the GPU that replaying them gives the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from speculative.engine import SpeculativeGenerator, resolve_compile_mode
from speculative.graphs import StaticDecoder, StaticDraftCache
from speculative.kv_cache import MaskedKVCache
from speculative.llama import FastLlama
from speculative.target import TargetModel
from speculative.tree import TreeConfig, tree_size
from speculative.vocab import DraftVocab
from tests.conftest import TARGET_ARCHS, collector_probe, graphs_on_cpu, stub_cuda_capture, tiny_drafter
from tests.test_tree_engine import hf_greedy, small_llama, train_agreeing_pair


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def agreeing_pair():
    """A drafter trained by TTT on the target's own greedy outputs: long acceptances."""
    return train_agreeing_pair()


def test_tree_size_matches_the_builder():
    for config, vocab in [(TreeConfig(), 32000), (TreeConfig(4, 3, 100), 40), (TreeConfig.chain(5), 9),
                          (TreeConfig(3, 8, 20), 5)]:
        nodes, fed = tree_size(config, vocab)
        k = min(config.top_k, vocab)
        assert fed == k * (config.depth - 1)
        assert nodes == min(config.total_tokens, k + k * k * (config.depth - 1))


def test_static_draft_cache_matches_masked_cache():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    prefix_k, prefix_v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    eager = MaskedKVCache()
    eager.keys, eager.values = prefix_k.clone(), prefix_v.clone()
    mask = torch.tensor([[[1, 1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 1, 0], [1, 0, 1, 1, 1, 1, 0, 1]]]).bool()
    eager.set_mask(mask)
    want = eager.attend(q, k, v)
    # Same entries at scattered slots of a bigger static cache, junk elsewhere (masked out).
    static = StaticDraftCache(1, 2, 12, 6, 8, torch.float32, "cpu")
    static.keys.normal_()
    static.values.normal_()
    static.keys[:, :, 2:7], static.values[:, :, 2:7] = prefix_k, prefix_v
    full = torch.zeros(1, 3, 18, dtype=torch.bool)
    full[..., 2:7] = mask[..., :5]
    full[..., 13:16] = mask[..., 5:]
    static.prepare(13, full)
    assert torch.allclose(static.attend(q, k, v), want, atol=1e-6)
    static.prepare(torch.tensor([13, 14, 15]), full)
    assert torch.allclose(static.attend(q, k, v), want, atol=1e-6)


def test_compile_modes():
    assert resolve_compile_mode("auto", "cpu") == "off"
    assert resolve_compile_mode("static", "cpu") == "static"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_compile_mode("graph", "cpu")
    with pytest.raises(ValueError, match="compile mode"):
        resolve_compile_mode("fast", "cpu")
    target = TargetModel(small_llama(0, layers=3))
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(FastLlama.from_target(target), use_graphs=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-target", "fast-target"])
@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_static_greedy_equals_target_greedy_random_drafters(arch, fused):
    """Mostly rejections: the correction path, d2t mapping, varied tree shapes, cache reuse; with
    the target as ``FusedLlama`` (the default) and as ``FastLlama`` (the A/B alternative)."""
    for seed in range(8 if arch == "llama" and fused else 4):
        hf = small_llama(200 + seed, layers=3, arch=arch)
        target = TargetModel(hf)
        vocab = DraftVocab.from_counts(torch.randperm(64), 40) if seed % 2 else None
        drafter = tiny_drafter(target, vocab, seed=seed)
        tree = TreeConfig(depth=2 + seed % 4, top_k=1 + seed % 4, total_tokens=4 + 2 * seed)
        engine = SpeculativeGenerator(target, drafter, tree, compile="static", fused_target=fused)
        assert engine._static_for(1, 24).fused is fused
        prompt = torch.randint(0, 64, (1 + 2 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = hf_greedy(hf, prompt, 24)
        result = engine.generate(prompt, 24)
        assert result.tokens == want, seed
        assert result.target_forwards == 1 + len(result.accept_lengths)
        assert engine.generate_autoregressive(prompt, 24).tokens == want
        # Reusing the static caches for another prompt: stale entries must stay invisible.
        assert engine.generate(prompt[:2], 12).tokens == hf_greedy(hf, prompt[:2], 12)


def test_static_path_equals_eager_path_step_by_step(agreeing_pair):
    """Long acceptances (compaction, multi-token catch-up): same tokens, same trees, same
    acceptance lengths as the eager engine, and the target's greedy output."""
    target, drafter = agreeing_pair
    accepted = steps = 0
    for seed in range(8):
        tree = [TreeConfig(depth=5, top_k=4, total_tokens=16), TreeConfig.chain(4)][seed % 2]
        prompt = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(100 + seed)).tolist()
        eager = SpeculativeGenerator(target, drafter, tree, record_steps=True).generate(prompt, 32)
        static_engine = SpeculativeGenerator(target, drafter, tree, record_steps=True, compile="static")
        static = static_engine.generate(prompt, 32)
        assert static.tokens == eager.tokens == hf_greedy(target.model, prompt, 32), seed
        assert static.accept_lengths == eager.accept_lengths, seed
        for a, b in zip(eager.trees, static.trees):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
            assert torch.allclose(a.dists, b.dists, atol=1e-5)
        # Recorded trees are copies, not views of the decoder's buffers.
        assert static.trees[0].root_positions.data_ptr() != static_engine._static.pos.data_ptr()
        accepted += sum(static.accept_lengths)
        steps += len(static.accept_lengths)
    assert accepted / steps > 1.5


def test_static_sampling_matches_eager_sampling(agreeing_pair):
    """At T > 0 with the host verifier the static path consumes the generator exactly like the eager one."""
    target, drafter = agreeing_pair
    tree = TreeConfig(depth=4, top_k=3, total_tokens=10)
    prompt = [5, 9, 2, 33, 4, 17]
    eager = SpeculativeGenerator(target, drafter, tree, temperature=1.0, seed=3).generate(prompt, 24)
    static = SpeculativeGenerator(target, drafter, tree, temperature=1.0, seed=3, compile="static",
                                  device_sampled=False)  # the host verifier (the device path: below)
    assert static.generate(prompt, 24).tokens == eager.tokens
    base = SpeculativeGenerator(target, None, temperature=1.0, seed=4).generate_autoregressive(prompt, 24)
    static_base = SpeculativeGenerator(target, None, temperature=1.0, seed=4, compile="static")
    assert static_base.generate_autoregressive(prompt, 24).tokens == base.tokens


def test_static_cache_grows_when_a_request_does_not_fit(agreeing_pair):
    target, drafter = agreeing_pair
    tree = TreeConfig(depth=3, top_k=2, total_tokens=6)
    engine = SpeculativeGenerator(target, drafter, tree, compile="static", max_len=16)
    assert engine._static.max_len == 64  # 16 + 1 + 6, rounded up to a multiple of 64
    prompt = list(range(1, 41))
    with pytest.warns(UserWarning, match="rebuilding"):
        result = engine.generate(prompt, 40)
    assert engine._static.max_len >= 40 + 40 + 7
    assert result.tokens == hf_greedy(target.model, prompt, 40)


def test_sampled_chains_fall_back_to_the_eager_path(agreeing_pair):
    target, drafter = agreeing_pair
    with pytest.warns(UserWarning, match="eagerly"):
        engine = SpeculativeGenerator(target, drafter, TreeConfig.chain(3, sample_temperature=1.0),
                                      temperature=1.0, compile="static")
    assert engine.compile == "off"
    assert len(engine.generate([1, 2, 3], 8).tokens) == 8


def test_failed_graph_build_falls_back_to_static(agreeing_pair):
    """A capture that fails (here: graphs on CPU) degrades to the static path with a warning."""
    target, drafter = agreeing_pair
    engine = SpeculativeGenerator(target, drafter, TreeConfig(depth=3, top_k=2, total_tokens=6), compile="static")
    engine.compile = "graph"  # as if resolved on a GPU
    prompt = [4, 8, 15, 16, 23]
    with pytest.warns(UserWarning, match="compile='graph' failed"):
        result = engine.generate(prompt, 12)
    assert engine.compile == "static" and "CUDA" in engine.compile_errors[0]
    assert result.tokens == hf_greedy(target.model, prompt, 12)


def test_spans_cover_the_cache_in_steps():
    target = TargetModel(small_llama(0, layers=3))
    decoder = StaticDecoder(FastLlama.from_target(target), max_len=200, span_step=64)
    assert decoder.max_len == 256 and decoder.spans() == [64, 128, 192, 256]
    assert decoder.span_for(64) == 64 and decoder.span_for(65) == 128 and decoder.span_for(256) == 256
    assert StaticDecoder(FastLlama.from_target(target), max_len=200, span_step=None).spans() == [256]
    assert StaticDecoder(FastLlama.from_target(target), max_len=200, span_step=96).spans() == [96, 192, 256]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-target", "fast-target"])
def test_short_spans_keep_decoding_lossless(agreeing_pair, fused):
    """Spans of 16 slots: a generation crosses several (each a different draft+verify step, one
    graph each on GPU); tokens and trees stay those of the whole-cache path."""
    target, drafter = agreeing_pair
    tree = TreeConfig(depth=4, top_k=3, total_tokens=10)
    for seed in range(3):
        prompt = torch.randint(0, 64, (3 + 5 * seed,), generator=torch.Generator().manual_seed(300 + seed)).tolist()
        whole = SpeculativeGenerator(target, drafter, tree, record_steps=True, compile="static",
                                     fused_target=fused, span_step=None).generate(prompt, 40)
        engine = SpeculativeGenerator(target, drafter, tree, record_steps=True, compile="static",
                                      fused_target=fused, span_step=16)
        spans = engine._static_for(len(prompt), 40).spans()
        assert len(spans) >= 4
        short = engine.generate(prompt, 40)
        assert short.tokens == whole.tokens == hf_greedy(target.model, prompt, 40), seed
        assert short.accept_lengths == whole.accept_lengths
        # the generation crossed spans: its roots sat below and above several span boundaries
        assert len({engine._static.span_for(p + engine._static.chunk_len) for p in short.root_positions}) >= 2


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-then-catch-up", "pipelined"])
def test_device_greedy_acceptance_equals_the_host_verifier(agreeing_pair, pipelined):
    """At T = 0 without recorded steps the static path accepts inside the draft+verify step and
    prepares the catch-up on the device (pipelined: the whole cycle, the root's advance included,
    with the next cycle enqueued before the host reads); it must take the host verifier's steps."""
    target, drafter = agreeing_pair
    for seed, tree in enumerate([TreeConfig(depth=5, top_k=4, total_tokens=16), TreeConfig.chain(4),
                                 TreeConfig(depth=3, top_k=2, total_tokens=5)]):
        prompt = torch.randint(0, 64, (4 + seed,), generator=torch.Generator().manual_seed(400 + seed)).tolist()
        host = SpeculativeGenerator(target, drafter, tree, record_steps=True, compile="static").generate(prompt, 40)
        engine = SpeculativeGenerator(target, drafter, tree, compile="static", pipelined=pipelined)
        calls = []
        decoder = engine._static_for(len(prompt), 40)
        assert (decoder.cycle_graphs, decoder.greedy_graphs) == (pipelined, not pipelined)
        name = "launch_cycle" if pipelined else "greedy_step"
        original = getattr(decoder, name)
        setattr(decoder, name, lambda *args: calls.append(1) or original(*args))
        device = engine.generate(prompt, 40)
        # the device path ran (pipelined: every cycle read, plus the one enqueued past the stop)
        assert len(calls) == len(device.accept_lengths) + pipelined > pipelined
        assert device.tokens == host.tokens == hf_greedy(target.model, prompt, 40), seed
        assert device.accept_lengths == host.accept_lengths, seed
        assert max(device.accept_lengths) >= 2  # multi-token catch-ups prepared on the device


@pytest.mark.parametrize("fused", [True, False], ids=["fused-target", "fast-target"])
def test_pipelined_cycles_cross_spans_and_fit_a_cache_sized_to_the_margin(agreeing_pair, fused):
    """Spans of 16 slots, picked from a bound on the root before the last cycle is read, and a
    cache of exactly prompt + new tokens + chunk + ``margin`` slots: the cycle enqueued past the
    stop still writes inside it (a write outside fails on the CPU), and the text stays lossless."""
    from speculative.graphs import StaticDecoder

    target, drafter = agreeing_pair
    tree = TreeConfig(depth=4, top_k=3, total_tokens=10)
    for seed in range(3):
        new_tokens = 40 + seed
        prompt_len = 64 - new_tokens - (1 + tree.total_tokens) - tree.depth  # fills 64 slots exactly
        prompt = torch.randint(0, 64, (prompt_len,), generator=torch.Generator().manual_seed(500 + seed)).tolist()
        engine = SpeculativeGenerator(target, drafter, tree, compile="static", fused_target=fused)
        decoder = StaticDecoder(engine.fast, drafter, tree, 64, fused=fused, span_step=16, cycle_graphs=True)
        assert decoder.max_len == 64 and decoder.fits(prompt_len, new_tokens)
        assert not decoder.fits(prompt_len + 1, new_tokens)
        engine._static = decoder
        roots = []
        original = decoder.launch_cycle
        decoder.launch_cycle = lambda bound: roots.append(bound) or original(bound)
        out = engine.generate(prompt, new_tokens)
        assert engine._static is decoder  # not rebuilt
        assert out.tokens == hf_greedy(target.model, prompt, new_tokens), seed
        assert len({decoder.span_for(min(r + decoder.chunk_len, 64)) for r in roots}) >= 2


def test_greedy_graphs_only_where_they_can_replay(agreeing_pair):
    """Recorded steps (RL rollouts) and --greedy-verify host build no T = 0 variant of the graphs;
    pipelined T = 0 cycles (the default) replace the greedy draft+verify graphs."""
    target, drafter = agreeing_pair
    tree = TreeConfig(depth=3, top_k=2, total_tokens=6)
    default = SpeculativeGenerator(target, drafter, tree, compile="static")._static_for(4, 8)
    assert default.cycle_graphs and not default.greedy_graphs and default.margin == tree.depth
    unpipelined = SpeculativeGenerator(target, drafter, tree, compile="static", pipelined=False)._static_for(4, 8)
    assert unpipelined.greedy_graphs and not unpipelined.cycle_graphs and unpipelined.margin == 0
    recorded = SpeculativeGenerator(target, drafter, tree, compile="static", record_steps=True)._static_for(4, 8)
    assert not recorded.greedy_graphs and not recorded.cycle_graphs
    host = SpeculativeGenerator(target, drafter, tree, compile="static", device_greedy=False)
    decoder = host._static_for(4, 8)
    assert not decoder.greedy_graphs and not decoder.cycle_graphs
    with pytest.raises(ValueError, match="greedy"):
        decoder.draft_verify(1, 4, greedy=True)
    with pytest.raises(ValueError, match="cycle_graphs"):
        decoder.start_cycles(1, 4)
    assert host.generate([1, 2, 3, 4], 12).tokens == hf_greedy(target.model, [1, 2, 3, 4], 12)


def test_cycle_capture_warms_up_every_call_from_slot_zero(agreeing_pair, monkeypatch):
    """``_capture`` runs a step twice before capturing it; a cycle advances ``pos`` on the device,
    so the second warm-up used to start at ``count + 1 >= 1``: with the shortest span holding
    exactly one chunk (e.g. ``--span-step 64`` with 63 draft tokens, or 59 and an acceptance of
    4+ in the warm-up) the verification indexed past the span (on GPU a device-side assert that
    kills the CUDA context). The capture sequence runs here with stand-ins for the CUDA calls
    (each warm-up and the capture run the step eagerly)."""
    target, drafter = agreeing_pair
    tree = TreeConfig(depth=4, top_k=3, total_tokens=15)
    fast = FastLlama.from_target(target)
    decoder = StaticDecoder(fast, drafter, tree, 64, span_step=16, cycle_graphs=True)
    assert decoder.chunk_len == 16 == decoder.spans()[0]  # the shortest span holds one chunk at slot 0
    stub_cuda_capture(monkeypatch)
    starts = []
    original = decoder._cycle_fn
    decoder._cycle_fn = lambda span: starts.append(int(decoder.pos)) or original(span)
    decoder._capture_steps()
    assert ("cycle", 16) in decoder._graphs and ("draft_verify", 64, False) in decoder._graphs
    assert starts == [0] * (3 * len(decoder.spans()))  # every run of a cycle from slot 0
    # and the decoder (eager here) still decodes losslessly afterwards
    engine = SpeculativeGenerator(target, drafter, tree, compile="static")
    engine._static = decoder
    prompt = [3, 1, 4, 1, 5]
    assert engine.generate(prompt, 20).tokens == hf_greedy(target.model, prompt, 20)


def test_a_failed_capture_names_the_graph_dtype_and_acceptance(agreeing_pair, monkeypatch):
    """A capture that fails says which graph (its key), in which dtype, with which acceptance, and
    chains the CUDA error, so the engine's fallback warning (and ``compile_errors``) carry it."""
    import contextlib

    from speculative.graphs import GraphCaptureError

    target, drafter = agreeing_pair
    tree = TreeConfig(depth=3, top_k=2, total_tokens=6)
    decoder = StaticDecoder(FastLlama.from_target(target), drafter, tree, 64, cycle_graphs=True, sampling=True)
    cause = RuntimeError("CUDA error: operation failed due to a previous error during capture")

    @contextlib.contextmanager
    def failing_graph(graph, **kwargs):  # the injected fault: the cycle graph's capture fails
        yield
        if ("draft_verify", 64, False) in decoder._graphs:  # captured just before the cycle graph
            raise cause

    stub_cuda_capture(monkeypatch, failing_graph)
    with pytest.raises(GraphCaptureError) as caught:
        decoder._capture_steps()
    message = str(caught.value)
    assert caught.value.__cause__ is cause and str(cause) in message
    assert message.startswith("capture of CUDA graph ('cycle', 64) failed")
    assert "target float32, drafter float32, sampling on, cycle graphs" in message
    assert "2 graphs captured before" in message  # decode, draft_verify
    # a warm-up failure says so; the engine's fallback carries the message
    stub_cuda_capture(monkeypatch)
    engine = SpeculativeGenerator(target, drafter, tree, temperature=1.0, compile="static")
    engine.compile = "graph"  # as if resolved on a GPU
    monkeypatch.setattr(StaticDecoder, "__init__", graphs_on_cpu(StaticDecoder.__init__))
    monkeypatch.setattr(StaticDecoder, "_decode_step", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.warns(UserWarning, match="compile='graph' failed"):
        engine.generate([4, 8, 15], 6)
    assert engine.compile == "static"
    assert "GraphCaptureError: warm-up of CUDA graph 'decode' failed (target float32, drafter float32, " \
           "sampling on, cycle graphs" in engine.compile_errors[0] and "RuntimeError: boom" in engine.compile_errors[0]


def test_no_garbage_collection_during_a_capture(agreeing_pair, monkeypatch):
    """A dropped StaticDecoder is a reference cycle: the cyclic collector frees it, and with it its
    CUDA graphs. Freed during another decoder's capture, that destroys graphs mid-capture and
    invalidates it (what the check met on the H200 at float32 T = 1). So the capture sequence
    collects first and no collection runs inside a capture."""
    import gc
    import weakref

    from speculative.graphs import GraphCaptureError

    target, drafter = agreeing_pair
    tree = TreeConfig(depth=3, top_k=2, total_tokens=6)
    fast = FastLlama.from_target(target)
    dropped = weakref.ref(StaticDecoder(fast, drafter, tree, 64, cycle_graphs=True))
    assert dropped() is not None  # a cycle: only the collector frees it
    decoder = StaticDecoder(fast, drafter, tree, 64, cycle_graphs=True)
    graph, seen = collector_probe(dropped)
    stub_cuda_capture(monkeypatch, graph)
    assert gc.isenabled()
    decoder._capture_all()
    assert len(seen) == len(decoder._graphs) == 1 + 2 + 4  # decode, draft+verify and cycle, 4 catch-ups
    assert seen == [(False, True)] * len(seen) and gc.isenabled()

    def failing(graph, **kwargs):
        assert not gc.isenabled()
        raise RuntimeError("capture failed")

    stub_cuda_capture(monkeypatch, failing)
    with pytest.raises(GraphCaptureError, match="capture of CUDA graph 'decode' failed"):
        decoder._capture_all()
    assert gc.isenabled()  # re-enabled after a failed capture too


@pytest.mark.parametrize("mode", ["host", "device", "pipelined"])
def test_static_sampling_matches_target_distribution(monkeypatch, mode):
    """End to end at T = 0.8 on the static path, per ``--sampled-verify`` mode: 3-token continuations
    vs the target's exact law (``test_engine_sampling_matches_target_distribution``'s harness). The
    device modes accept inside the draft+verify step / the whole cycle
    (``stochastic_accept_on_device``, its uniforms drawn into a buffer before each replay); a broken
    device acceptance (every drafted token with p > 0 accepted) fails the same test."""
    from speculative.verify import stochastic_accept_on_device
    from tests.test_tree_engine import _engine_counts, _exact_joint, _tiny_vocab_pair, chi_square_pvalue

    target, drafter = _tiny_vocab_pair(seed=3)
    prompt, temperature = [2, 7, 1, 6], 0.8
    joint = _exact_joint(target, prompt, temperature, 8)
    engine = SpeculativeGenerator(target, drafter, TreeConfig(depth=2, top_k=3, total_tokens=6),
                                  temperature=temperature, seed=11, compile="static",
                                  device_sampled=mode != "host", pipelined_sampled=mode == "pipelined")
    assert engine.accept_mode() == mode
    calls = []
    monkeypatch.setattr("speculative.graphs.stochastic_accept_on_device",
                        lambda *args, **kwargs: calls.append(1) or stochastic_accept_on_device(*args, **kwargs))
    counts, accepting = _engine_counts(engine, prompt, 400)
    assert (len(calls) > 400) == (mode != "host")
    assert accepting > 100
    assert chi_square_pvalue(counts, joint) > 1e-3
    if mode == "pipelined":  # negative control
        def accept_all(tree, logits, depth, temperature, uniforms, **constants):
            zeros = torch.cat([torch.zeros(tree.tokens.shape, dtype=torch.float64), uniforms[:, -1:]], 1)
            return stochastic_accept_on_device(tree, logits, depth, temperature, uniforms=zeros, **constants)

        monkeypatch.setattr("speculative.graphs.stochastic_accept_on_device", accept_all)
        assert chi_square_pvalue(_engine_counts(engine, prompt, 200)[0], joint) < 1e-6


def test_device_sampling_runs_pipelined_and_switches_with_the_temperature(agreeing_pair):
    """T > 0 with top-k trees: pipelined cycles (the default) take exactly the steps of the
    read-then-catch-up device path (the same random numbers in the same order), accept about as
    much as the host verifier, and a temperature change rebuilds the decoder for the other
    acceptance (T = 0 stays the target's greedy decoding); recorded steps and sampled chains keep
    the host verifier."""
    target, drafter = agreeing_pair
    tree = TreeConfig(depth=4, top_k=3, total_tokens=10)
    accepts = {}
    for mode in ("host", "device", "pipelined"):
        engine = SpeculativeGenerator(target, drafter, tree, temperature=1.0, compile="static",
                                      device_sampled=mode != "host", pipelined_sampled=mode == "pipelined")
        decoder = engine._static_for(6, 40)
        assert (decoder.cycle_graphs, decoder.greedy_graphs, decoder.sampling) == (
            mode == "pipelined", mode == "device", mode != "host")
        outs = []
        for seed in range(4):
            prompt = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(600 + seed)).tolist()
            engine.reseed(seed)
            outs.append(engine.generate(prompt, 40))
        assert engine._static is decoder
        accepts[mode] = [a for o in outs for a in o.accept_lengths]
        if mode == "pipelined":
            assert [o.tokens for o in outs] == device_tokens
            assert [o.accept_lengths for o in outs] == device_lengths
        device_tokens, device_lengths = [o.tokens for o in outs], [o.accept_lengths for o in outs]
    mean = {mode: sum(a) / len(a) for mode, a in accepts.items()}
    assert mean["pipelined"] >= 1.0 and mean["host"] >= 1.0, mean
    assert max(accepts["pipelined"]) == tree.depth and min(accepts["pipelined"]) >= 0
    # T = 0 -> greedy cycles (rebuilt, no smaller), then back to T > 0
    engine.temperature = 0.0
    prompt = [5, 9, 2, 33, 4, 17]
    assert engine.generate(prompt, 24).tokens == hf_greedy(target.model, prompt, 24)
    greedy = engine._static
    assert greedy is not decoder and not greedy.sampling and greedy.cycle_graphs
    assert greedy.max_len >= decoder.max_len
    engine.temperature = 1.0
    assert len(engine.generate(prompt, 24).tokens) == 24 and engine._static.sampling
    # recorded steps and sampled chains: the host verifier
    assert SpeculativeGenerator(target, drafter, tree, temperature=1.0, record_steps=True,
                                compile="static").accept_mode() == "host"
    with pytest.warns(UserWarning, match="eagerly"):
        chain = SpeculativeGenerator(target, drafter, TreeConfig.chain(3, sample_temperature=1.0), temperature=1.0,
                                     compile="static")
    assert chain.accept_mode() == "host"
