"""Pieces of issue 17 items 3-4 and 6 that run without Ray: merged micro-batches, the zero-copy
pickling of experiences, the flat broadcast payload, and the CPU smoke run of bench/throughput.py."""

from __future__ import annotations

import json
from dataclasses import replace
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speculative.broadcast import IpcSource, checksum, flat_array, load_named, named_tensors
from speculative.experience import GTOExperience, OPDExperience, SFTExperience, concat_experiences

REPO = Path(__file__).resolve().parents[1]


def sft(rows: int, length: int, seed: int) -> SFTExperience:
    g = torch.Generator().manual_seed(seed)
    return SFTExperience(
        input_ids=torch.randint(0, 50, (rows, length), generator=g),
        attention_mask=torch.ones(rows, length, dtype=torch.long),
        loss_mask=torch.ones(rows, length, dtype=torch.long),
        aux_hidden=torch.randn(rows, length, 6, generator=g).to(torch.bfloat16),
        target_draft_logits=torch.randn(rows, length, 5, generator=g),
        target_top1=torch.randint(0, 50, (rows, length), generator=g),
        drafter_version=3,
    )


def gto(rows: int, length: int, positions: int, seed: int) -> GTOExperience:
    per = {name: torch.rand(positions) for name in ("reward", "reference_reward", "expected_length",
                                                    "reference_expected_length", "rollout_path_logprob",
                                                    "reference_path_logprob")}
    return GTOExperience(sft=sft(rows, length, seed), sequence=torch.arange(positions) % rows,
                         index=torch.arange(positions), group=torch.arange(positions) // 2,
                         path_ids=torch.ones(positions, 3, dtype=torch.long),
                         path_length=torch.full((positions,), 2), drafter_version=3, **per)


def test_concat_pads_sequences_and_reindexes_positions():
    a, b = gto(2, 5, 4, 0), gto(3, 7, 6, 1)
    merged = concat_experiences([a, b])
    assert merged.sft.input_ids.shape == (5, 7) and merged.sft.aux_hidden.dtype == torch.bfloat16
    assert torch.equal(merged.sft.input_ids[:2, :5], a.sft.input_ids)
    assert int(merged.sft.attention_mask[:2, 5:].sum()) == 0  # padding is not a real token
    assert merged.sequence.tolist() == a.sequence.tolist() + (b.sequence + 2).tolist()
    assert set(merged.group[:4].tolist()).isdisjoint(merged.group[4:].tolist())
    assert merged.num_tokens == a.num_tokens + b.num_tokens and merged.drafter_version == 3


def opd(rows: int, length: int, cycles: int, seed: int, with_data: bool) -> OPDExperience:
    g = torch.Generator().manual_seed(seed)
    rollout = sft(rows, length, seed)
    rollout.target_draft_logits = rollout.target_draft_logits[..., :0]  # OPD ships [B, T, 0]
    return OPDExperience(
        rollout=rollout, sequence=torch.arange(cycles) % rows, index=torch.arange(cycles),
        accepted=torch.randint(0, 3, (cycles,), generator=g),
        step_inputs=torch.randint(0, 50, (cycles, 3), generator=g),
        proposals=torch.randint(0, 5, (cycles, 3), generator=g), target_logprobs=torch.randn(cycles, 3, 5, generator=g),
        rollout_logprobs=torch.randn(cycles, 3, generator=g), response_tokens=4 * rows, target_forwards=cycles,
        data=sft(rows, length + 1, seed + 7) if with_data else None, drafter_version=3,
    )


def _assert_same(left, right) -> None:
    assert type(left) is type(right)
    for name, value in vars(left).items():
        other = getattr(right, name)
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and value.shape == other.shape and torch.equal(value, other), name
        elif hasattr(value, "nbytes"):
            _assert_same(value, other)
        else:
            assert value == other, name


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_merging_straight_onto_the_device_equals_moving_then_merging(device):
    """The learner's one-copy merge (``concat_experiences(parts, device)``) and the actor's pinned
    ``to_host`` give exactly the tensors of the plain path."""
    parts = [gto(2, 5, 4, 0), gto(3, 7, 6, 1), gto(1, 6, 0, 2)]
    plain = concat_experiences([p.to(device) for p in parts])
    direct = concat_experiences(parts, device, non_blocking=True)
    if device == "cuda":
        torch.cuda.synchronize()
    _assert_same(plain, direct)
    assert direct.sft.target_draft_logits.device.type == device
    _assert_same(concat_experiences(parts[:1], device), parts[0].to(device))
    back = plain.to_host()
    assert all(t.device.type == "cpu" for t in back._tensors())
    _assert_same(back, concat_experiences(parts))
    for with_data in (False, True):
        parts = [opd(2, 5, 3, 0, with_data), opd(3, 8, 4, 1, with_data)]
        plain, direct = concat_experiences([p.to(device) for p in parts]), concat_experiences(parts, device, True)
        if device == "cuda":
            torch.cuda.synchronize()
        _assert_same(plain, direct)


def test_experiences_pickle_as_numpy_and_come_back_equal():
    e = gto(2, 5, 4, 0)
    back = pickle.loads(pickle.dumps(e, protocol=5))
    for name in ("input_ids", "aux_hidden", "target_draft_logits"):
        left, right = getattr(e.sft, name), getattr(back.sft, name)
        assert left.dtype == right.dtype and torch.equal(left, right)
    assert torch.equal(back.reward, e.reward) and back.drafter_version == 3


def test_flat_object_store_payload_loads_bit_identical():

    source = torch.nn.Linear(4, 3).to(torch.bfloat16)
    replica = torch.nn.Linear(4, 3).to(torch.bfloat16)
    tensors = dict(source.named_parameters())
    payload = flat_array(tensors)
    assert payload.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    load_named(replica, payload)  # named_tensors reads named_parameters (no frozen embedding here)
    assert checksum(named_tensors(replica)) == checksum(named_tensors(source))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a GPU tensor's checksum goes through one flat copy"))])
def test_checksum_is_sha256_of_the_headers_then_the_bytes_fingerprint(device):
    """Flattened and fingerprinted where the tensors live (CPU or GPU), the digest has one
    definition (checked against numpy's unsigned arithmetic here), so learners and actors on
    either side of a broadcast agree; and any flipped byte, moved word, dtype or name changes it."""
    import hashlib
    import struct

    from speculative.broadcast import _FINGERPRINT_KEYS, flatten

    generator = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 3, generator=generator).to(torch.bfloat16).t(),
               "a.bias": torch.randn(7, generator=generator), "c": torch.arange(6, dtype=torch.int64)}
    tensors = {k: v.to(device) for k, v in tensors.items()}
    names = sorted(tensors)
    expected = hashlib.sha256("".join(f"{n}:{tensors[n].dtype}:{tuple(tensors[n].shape)};" for n in names).encode())
    raw = flatten(tensors).cpu().numpy().tobytes()
    words = np.frombuffer(raw + bytes(-len(raw) % 8), dtype="<u8")
    index = np.arange(words.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        sums = [int((words * ((index * np.uint64(k) + np.uint64(c)) | np.uint64(1))).sum(dtype=np.uint64))
                for k, c in _FINGERPRINT_KEYS]
    expected.update(struct.pack("<QQQ", len(raw), *sums))
    assert checksum(tensors) == expected.hexdigest()
    flipped = dict(tensors, c=tensors["c"].clone())
    flipped["c"][3] += 1
    assert checksum(flipped) != checksum(tensors)
    swapped = dict(tensors, c=tensors["c"].flip(0).contiguous())  # the same words, other places
    assert checksum(swapped) != checksum(tensors)
    bit = dict(tensors, **{"a.bias": tensors["a.bias"].clone()})
    bit["a.bias"].view(torch.int32)[6] ^= 1 << 31  # one bit of the last word
    assert checksum(bit) != checksum(tensors)
    assert checksum(dict(tensors, c=tensors["c"].to(torch.int32))) != checksum(tensors)
    assert checksum({("d" if k == "c" else k): v for k, v in tensors.items()}) != checksum(tensors)


def _open_ipc_and_hash(handle, sizes: dict[str, int], queue) -> None:
    """Child process: an actor's side of the cuda_ipc broadcast."""
    from speculative.broadcast import receive_ipc

    tensors = {name: torch.zeros(n, dtype=torch.bfloat16, device="cuda") for name, n in sizes.items()}
    receive_ipc(handle, tensors)
    queue.put(checksum(tensors))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_moves_rank0_bytes_into_another_process_bit_identical():
    context = torch.multiprocessing.get_context("spawn")
    tensors = {"a.weight": torch.randn(4096, device="cuda").bfloat16(), "b.bias": torch.randn(77, device="cuda").bfloat16()}
    source = IpcSource()
    for version in range(2):  # the buffer is refilled and handed out again
        tensors["a.weight"].add_(1.0)
        handle, size = source.publish(tensors)
        assert size == 2 * (4096 + 77)
        queue = context.Queue()
        child = context.Process(target=_open_ipc_and_hash, args=(handle, {k: v.numel() for k, v in tensors.items()}, queue))
        child.start()
        received = queue.get(timeout=180)
        child.join(60)
        assert received == checksum(tensors), version


def test_throughput_bench_cpu_smoke_writes_every_key(tmp_path):
    out = tmp_path / "throughput"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--device", "cpu",
                           "--out", str(out), "--set", "gto.sequences_per_forward=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("prefill_ceiling_tok_s", "gto_tok_s", "opd_tok_s", "gto_ceiling_ratio", "opd_ceiling_ratio",
                "ray_updates_per_s_gto", "single_process_updates_per_s_gto", "learner_busy_async",
                "broadcast_gb_s", "broadcast_step_share", "gpu", "errors"):
        assert key in summary, key
    assert summary["prefill_ceiling_tok_s"] > 0 and summary["gto_tok_s"] > 0
    # The rollouts drafted with the warm-trained drafter, and the trainers started from it.
    assert "warm" not in summary["errors"] and summary["warm_drafter"]["steps"] > 0
    assert (out / "warm_drafter" / "config.json").is_file()
    assert f"init_from: {out / 'warm_drafter'}" in (out / "runs" / "single_gto" / "config.yaml").read_text()
    assert (out / "README.md").is_file()
    # the trainers' chunking as --set left it, in their config and in the tables (CPU default 2x2)
    assert summary["sizes"]["pipeline_gto_chunk"] == "1x2"
    assert "sequences_per_forward: 1" in (out / "runs" / "single_gto" / "config.yaml").read_text()
    assert "S x C 1x2" in (out / "README.md").read_text()
    if summary["ray_available"] and summary["deepspeed_available"]:  # where a Ray update's time went
        from pipeline.driver import BREAKDOWN

        parts = summary["ray"]["async"]["breakdown"]
        assert all(parts[key] is not None and parts[key] >= 0 for key in BREAKDOWN), parts
        assert "update interval s" in (out / "README.md").read_text()
        # the Ray run at the pipeline's own staleness default (not a bench-only setting), and the
        # learner's and rollout actor's peak memory (CPU: peak RSS) in the summary and its table
        from speculative.distributed_config import DistributedConfig

        assert summary["ray"]["async"]["max_staleness"] == DistributedConfig().max_staleness
        assert summary["learner_peak_memory_gib"] > 0.1 and summary["rollout_peak_memory_gib"] > 0.1
        assert "peak memory, GiB" in (out / "README.md").read_text()


def _grads(drafter, experience) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from speculative.sft import sft_loss

    drafter.zero_grad(set_to_none=True)
    loss, _ = sft_loss(drafter, experience, 3, 0.8)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in drafter.trainable_parameters()]


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_packed_experiences_ship_only_the_logit_rows_the_loss_reads_and_train_identically(form):
    """An actor ships ``experience.packed()``: the teacher-forced logits only at the rows training-
    time test reads (the position before each supervised token), as the logits themselves or (the
    target worker's default) as the target's final-norm states there plus its lm_head rows at the
    draft ids. After the object store and the learner's merge, the loss and every gradient are
    the dense experience's (bit-identical when the logits travel), for one part and for merged
    ragged parts; a packed experience never reaches a loss."""
    from actors.target_worker import TargetWorker
    from speculative.sft import sft_loss
    from speculative.target import TargetModel
    from speculative.vocab import DraftVocab
    from tests.conftest import tiny_drafter, tiny_llama
    from tests.test_gto import _sequences

    target = TargetModel(tiny_llama(vocab_size=96, layers=4, seed=2), aux_layer_ids=(1, 2, 3))
    vocab = DraftVocab.from_counts(torch.rand(96, generator=torch.Generator().manual_seed(0)), 40)
    drafter = tiny_drafter(target, vocab, seed=3)
    worker = TargetWorker(target, drafter.draft_to_target)
    dense = []
    for seed, (rows, length, prompt) in enumerate([(3, 20, 6), (2, 14, 9)]):
        batch = _sequences(target, rows, length, prompt, seed=seed)
        batch["attention_mask"][0, length - 4:] = 0  # a shorter first sequence: padding
        batch["loss_mask"][0, length - 4:] = 0
        experience = worker.sft_experience(batch)
        assert experience.target_hidden is not None and experience.draft_head is not None
        dense.append(experience if form == "hidden" else replace(experience, target_hidden=None, draft_head=None))
    shipped = [pickle.loads(pickle.dumps(e.packed(form).to_host(), protocol=5)) for e in dense]
    for e, s in zip(dense, shipped):
        read = int(e.rows_read().sum())
        assert s.logit_rows is not None and read < e.input_ids.numel() and s.nbytes() < e.nbytes()
        if form == "logits":
            assert s.target_draft_logits.shape == (read, 40) and s.target_hidden is None
        else:
            assert s.target_draft_logits.shape == (0, 40) and s.target_hidden.shape == (read, e.target_hidden.shape[-1])
        with pytest.raises(ValueError, match="packed"):
            sft_loss(drafter, s, 3, 0.8)
    one_dense, one_shipped = _grads(drafter, dense[0]), _grads(drafter, concat_experiences(shipped[:1], "cpu"))
    merged_dense = _grads(drafter, concat_experiences(dense))
    merged_shipped = [_grads(drafter, concat_experiences(shipped, "cpu")), _grads(drafter, concat_experiences(shipped))]
    for left, right in [(one_dense, one_shipped), *((merged_dense, m) for m in merged_shipped)]:
        if form == "logits":
            assert torch.equal(left[0], right[0])
            assert all(torch.equal(a, b) for a, b in zip(left[1], right[1]))
        else:  # the lm_head product redone: the same up to the GEMM's summation order
            torch.testing.assert_close(left[0], right[0], rtol=1e-5, atol=1e-6)
            for a, b in zip(left[1], right[1]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert float(one_dense[0]) > 0
    # nested: a GTO experience packs its SFT part, and the merge restores it
    nested = gto(2, 5, 4, 0)
    nested.sft.loss_mask[:, :2] = 0
    packed = nested.packed()
    assert packed.sft.logit_rows is not None and packed.nbytes() < nested.nbytes()
    restored = concat_experiences([packed], "cpu")
    read = nested.sft.rows_read()
    assert torch.equal(restored.sft.target_draft_logits[read], nested.sft.target_draft_logits[read])
    assert int(restored.sft.target_draft_logits[~read].abs().sum()) == 0


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_packed_opd_experiences_ship_only_the_target_states_the_loss_reads(device):
    """Without a rejected suffix (the authors' recipe) an OPD experience ships the target's
    distributions at the accepted states and the first error only; the cycle losses computed from
    the merged experience equal the dense ones bit for bit. With a suffix, every state ships."""
    from learners.opd import distillation_terms, stream_masks

    parts = [opd(2, 5, 6, 0, True), opd(3, 8, 9, 1, True)]
    for part in parts:
        part.reads_rejected_suffix = False
        part.accepted[0] = 3  # a whole chain accepted: no error state in that cycle
    shipped = [pickle.loads(pickle.dumps(p.packed().to_host(), protocol=5)) for p in parts]
    for part, s in zip(parts, shipped):
        read = int(part.logprob_rows_read().sum())
        assert s.target_logprobs.shape == (read, 5) and read < part.target_logprobs.shape[0] * 3
        # (with 5 draft tokens the row indices outweigh the rows saved; at 32 000 they are 0.01 %)
        assert s.data.logit_rows is not None and s.data.target_draft_logits.numel() < part.data.target_draft_logits.numel()
    dense = concat_experiences(parts)
    for merged in (concat_experiences(shipped, device, non_blocking=True), concat_experiences(shipped).to(device),
                   concat_experiences(shipped[:1], device)):
        reference = dense if merged.accepted.numel() == dense.accepted.numel() else parts[0]
        draft = torch.randn(*reference.target_logprobs.shape, generator=torch.Generator().manual_seed(5))
        acc, rej = (m.to(device) for m in stream_masks(reference.accepted, 3, "first"))
        (fwd_a, rev_a), (fwd_b, rev_b) = (distillation_terms(draft.to(device), e.target_logprobs.to(device), -10.0, 20.0)
                                          for e in (reference, merged))
        assert torch.equal((fwd_a * acc).sum(), (fwd_b * acc).sum()) and float((fwd_a * acc).sum()) > 0
        assert torch.equal((rev_a * rej).sum(), (rev_b * rej).sum()) and float((rev_a * rej).sum()) > 0
        assert merged.logprob_rows is None and merged.data.logit_rows is None
    suffix = opd(2, 5, 6, 0, False)
    assert torch.equal(suffix.packed().target_logprobs, suffix.target_logprobs)  # every state is read
