"""``bench/gto_verify_profile.py`` on CPU with the tiny random target: one real GTO batch, its
verification forwards replayed alone, every variant checked equal to the baseline (and a wrong one
reported DIFFERENT)."""

from __future__ import annotations

import json

from bench.gto_verify_profile import main, parse_args, prepare
from bench.gto_verify_profile import experience as gto_batch
from tests.conftest import write_topic_chats

GTO = ["gto.tree_depth=3", "gto.tree_top_k=3", "gto.tree_total_tokens=8", "gto.group_size=3",
       "gto.groups_per_sequence=2"]


class Shapes:
    """An observer of the batch's own forwards: what each one was given."""

    def __init__(self):
        self.seen = []

    def begin(self, **chunk):
        pass

    def forward(self, prefix, packed, **_):
        self.seen.append({"rows": packed.tokens.shape[0], "packed_length": packed.tokens.shape[1], "prefix": prefix,
                          "kv_length": prefix + packed.tokens.shape[1], "mask": list(packed.mask.shape),
                          "real_slots": int(packed.has_logits.sum())})


def test_verification_forwards_replayed_alone_and_variants_checked(tmp_path, tiny_target_dir, one_thread):
    chats = write_topic_chats(tmp_path / "chats.jsonl", 24)
    out = tmp_path / "out"
    argv = ["--target", str(tiny_target_dir), "--data", str(chats), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--max-records", "24",
            "--draft-vocab-size", "512", "--batch-size", "3", "--chunk", "2x2", "--precision", "fp32",
            "--warmup", "1", "--reps", "1", "--chunkings", "1,3,4", "--self-check", "--profile", "--out", str(out),
            *[a for s in GTO for a in ("--set", s)]]
    assert main(argv) == 0
    report = json.loads((out / "gto_verify.json").read_text())
    assert (out / "gto_verify.md").exists() and len(list(out.iterdir())) == 2

    # one row per forward of the batch, at the batch's own shapes (the same batch, observed here)
    shapes = Shapes()
    gto_batch(prepare(parse_args(argv)), shapes)
    rows = report["forwards"]
    assert len(rows) == len(shapes.seen) == report["batch"]["forwards"] > 1
    assert report["batch"]["sequence_chunks"] == 2  # 3 sequences, 2 per forward
    for row, seen in zip(rows, shapes.seen):
        assert {k: row[k] for k in ("rows", "packed_length", "prefix", "kv_length", "real_slots")} == \
            {k: seen[k] for k in ("rows", "packed_length", "prefix", "kv_length", "real_slots")}
        assert row["mask"]["shape"] == seen["mask"] and row["dtype"] == "float32"
        assert row["forward_ms"]["reps"] == 1 and row["forward_ms"]["median"] > 0 and row["verify_ms"]["median"] > 0
        assert row["cost"]["gemm_gflop"] > 0 and row["cost"]["attention_gflop_dense"] >= row["cost"]["attention_gflop_visible"]
        assert row["replay_matches_batch"]["equal"] and row["replay_matches_batch"]["rel_err"] == 0.0
    assert report["batch"]["replay_matches_batch"]

    # every variant checked; the wrong one (a key slot hidden) reported DIFFERENT, the others equal
    variants = {v["name"]: v for v in report["variants"]}
    for name in ("sdpa=math", "sdpa=flash", "forward=fast", "C=1", "C=3"):
        assert variants[name]["status"] == "equal", variants[name]
        assert all("check" in e and e["check"]["equal"] for e in variants[name]["per_part"])
    for name in ("sdpa=efficient", "sdpa=cudnn"):  # no CPU kernel: reported, not failed
        assert variants[name]["status"] == "unsupported"
    assert variants["C=4"]["status"] == "not applicable"  # 4 does not divide the 6 position slots
    assert variants["C=1"]["forwards"] == 2 * variants["C=2 (the batch's)"]["forwards"]
    wrong = variants["self-check: slot 0 hidden"]
    assert wrong["status"] == "DIFFERENT" and wrong["self_check_caught"]
    assert all(not e["check"]["equal"] and e["check"]["rel_err"] > 1e-3 for e in wrong["per_part"])
    assert report["all_variants_equal"] and report["self_check_caught"] and not report["different"]
    assert report["not_run"] == {"sdpa=efficient": "unsupported", "sdpa=cudnn": "unsupported", "C=4": "not applicable"}
    assert report["profile"]["top_kernels"] and len(report["profile"]["forwards"]) == len(rows)
    assert report["in_batch"]["ranges"]["gto/verify"]["count"] == len(rows)
    text = (out / "gto_verify.md").read_text()
    assert "| self-check: slot 0 hidden |" in text and "caught" in text

