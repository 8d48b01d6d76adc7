"""Shared fixtures: tiny random Llama and Qwen2 targets built from configs (no hub access needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
from speculative.target import TargetModel
from speculative.vocab import DraftVocab


def tiny_llama(vocab_size: int = 96, hidden: int = 32, layers: int = 8, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


TARGET_ARCHS = ("llama", "qwen2")


def randomize_biases(model: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Qwen2 initialises its q/k/v biases to zero; make them matter (a forward that dropped them
    would then disagree with the Hugging Face one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **config) -> torch.nn.Module:
    """A random tiny target of ``arch`` (``TARGET_ARCHS``) from LlamaConfig/Qwen2Config fields.

    Qwen2 differs from Llama in what these tests must see: q/k/v biases (randomised here), its
    RoPE base (1e6 unless ``rope_parameters`` says otherwise) and, in the 0.5B-3B checkpoints,
    tied embeddings (a case passes ``tie_word_embeddings=True``).
    """
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**config)).eval()
    if arch == "qwen2":
        config.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1_000_000.0})
        return randomize_biases(Qwen2ForCausalLM(Qwen2Config(**config)), seed + 1).eval()
    raise ValueError(f"unknown tiny target architecture {arch!r}; one of {TARGET_ARCHS}")


def tiny_qwen2(vocab_size: int = 96, hidden: int = 32, layers: int = 8, seed: int = 0,
               tie_word_embeddings: bool = False) -> Qwen2ForCausalLM:
    """``tiny_llama``'s shape as a Qwen2 (biases randomised, RoPE base 1e6)."""
    return tiny_causal_lm(
        "qwen2", seed, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings,
    )


def tiny_drafter(target: TargetModel, draft_vocab: DraftVocab | None = None, seed: int = 0) -> Eagle3Drafter:
    vocab = draft_vocab or DraftVocab.full(target.vocab_size)
    config = DrafterConfig.from_target(target.config, vocab.size, target.aux_layer_ids)
    drafter = Eagle3Drafter(config, vocab, target.embed_tokens.weight)
    init_drafter_weights(drafter, seed=seed)
    return drafter


def padded_batch(target: TargetModel, lengths: list[int], width: int, seed: int = 3):
    """(ids, attention, loss mask) of random right-padded rows; the first 3 tokens are not supervised."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (len(lengths), width), generator=generator)
    attention = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    loss_mask = attention.clone()
    loss_mask[:, :3] = 0
    return ids, attention, loss_mask


def stub_cuda_capture(monkeypatch, graph=None):
    """Stand-ins for the CUDA calls of ``StaticDecoder._capture_all`` (each warm-up and the capture
    then run the step eagerly on CPU); ``graph``: the ``torch.cuda.graph`` context to use."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args, **kwargs: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", graph or (lambda graph, **kwargs: contextlib.nullcontext()))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


def collector_probe(dead):
    """A ``torch.cuda.graph`` stand-in for ``stub_cuda_capture`` and the list it fills: per capture,
    (the cyclic collector enabled, ``dead()`` already freed)."""
    import contextlib
    import gc

    seen: list[tuple[bool, bool]] = []

    @contextlib.contextmanager
    def graph(graph, **kwargs):
        seen.append((gc.isenabled(), dead() is None))
        yield

    return graph, seen


def graphs_on_cpu(init):
    """``StaticDecoder.__init__`` for ``compile='graph'`` on CPU: with ``use_graphs`` it runs the
    capture sequence (with ``stub_cuda_capture``'s stand-ins, so a capture can fail as on a GPU),
    then the decoder runs its steps eagerly (nothing to replay)."""
    def wrapped(self, fast, *args, use_graphs=False, **kwargs):
        init(self, fast, *args, use_graphs=False, **kwargs)
        if use_graphs:
            self._capture_all()
    return wrapped


@pytest.fixture
def tiny_target() -> TargetModel:
    return TargetModel(tiny_llama())


@pytest.fixture(scope="session")
def smollm2_sft_run(tmp_path_factory):
    """A short EAGLE-3 SFT run for the real SmolLM2-135M-Instruct on real ShareGPT (a few minutes on CPU).

    Shared by the training integration test and the vLLM acceptance-agreement test.
    """
    from speculative.config import load_config
    from pipeline.trainer import Trainer

    out = tmp_path_factory.mktemp("smollm2_sft")
    config = load_config(
        None,
        [
            f"output_dir={out / 'run'}",
            "target.model=smollm2",
            "data.source=sharegpt",
            "data.max_records=160",
            "data.max_length=96",
            "data.eval_fraction=0.1",
            "data.on_error=skip",
            "drafter.draft_vocab_size=4096",
            "training.ttt_steps=3",
            "training.batch_size=4",
            "training.lr=2e-3",
            "training.warmup_steps=5",
            "training.max_steps=36",
            "training.log_every=6",
            "training.eval_every=36",
            "training.eval_batches=3",
            "training.save_every=36",
            "training.device=cpu",
        ],
    )
    return Trainer(config).run()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, two threads make small matmuls far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOPICS = ["the sea", "prime numbers", "bread", "a robot", "jazz", "volcanoes", "chess", "rain"]


def write_topic_chats(path: Path, count: int) -> Path:
    """``count`` short two-turn chats (OpenAI messages JSONL) cycling through ``TOPICS``."""
    with open(path, "w") as handle:
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            messages = [
                {"role": "user", "content": f"Tell me something about {topic}. ({i})"},
                {"role": "assistant", "content": f"Here is a short fact about {topic}: it is interesting."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    """A random 8-layer Llama with SmolLM2's vocabulary, saved next to SmolLM2's tokenizer.

    Its embedding is scaled to std 0.2 and copied into the lm_head (what ``tiny_qwen2_target_dir``'s
    tied embedding does): at the initial 0.02 the head is nearly flat over 49k ids, no draft is ever
    accepted and the RL tests ran with all-zero GTO advantages and OPD rollouts of rejections
    only. Now a drafter trained a few steps gets drafts accepted, as on a trained target.
    """
    from speculative.target import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    path = tmp_path_factory.mktemp("tiny_target")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=8)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2_target_dir(tmp_path_factory):
    """``tiny_target_dir`` as a Qwen2 (q/k/v biases randomised, RoPE base 1e6, tied embeddings like
    Qwen2.5-Coder-1.5B), saved next to SmolLM2's tokenizer and chat template: ``target.model`` names it.

    The tied embedding is scaled to std 0.2: at the initial 0.02 the head is nearly flat over 49k
    ids (no draft is ever accepted, GTO's advantages are all zero); at 0.2 it is peaked enough for a
    drafter trained a few steps to get drafts accepted, as on a trained target.
    """
    from speculative.target import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    path = tmp_path_factory.mktemp("tiny_qwen2_target")
    model = tiny_qwen2(vocab_size=len(tokenizer), hidden=32, layers=8, tie_word_embeddings=True)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_vllm_dir() -> Path:
    """The real SmolLM2 target as a safetensors directory, for the vLLM tests (skipped without vLLM)."""
    pytest.importorskip("vllm")
    from speculative.target import resolve_target

    try:
        return Path(resolve_target("smollm2"))
    except (FileNotFoundError, ImportError) as missing:
        pytest.skip(f"SmolLM2 target unavailable: {missing}")


# -- tests that need the real Qwen2.5-Coder-1.5B target: not run by `make test` ---------------------
def pytest_addoption(parser):
    parser.addoption("--run-heavy", action="store_true", default=False,
                     help="also run tests marked heavy (the real 1.5B Qwen target: 1.1 GB of packages, "
                          "a 3.55 GB conversion, ~7 GB of memory per float32 copy)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-heavy"):
        return
    skip = pytest.mark.skip(reason="heavy: pass --run-heavy to run it (the real 1.5B Qwen target)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_coder_dir() -> Path:
    """The real Qwen2.5-Coder-1.5B-Instruct as a safetensors directory (joined, checked, converted)."""
    from speculative.target import resolve_target

    return Path(resolve_target("qwen2.5-coder-1.5b"))
