"""``draftrl regenerate --engine batched``: the target's own answers without vLLM (the GPU machine
has none), on tiny random Llama and Qwen2 targets with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from speculative.target import load_tokenizer, stop_token_ids
from tests.conftest import TARGET_ARCHS, tiny_causal_lm, write_topic_chats
from tests.test_tree_engine import hf_greedy
from tools.cli import main
from tools.regenerate import BatchedChat, RegenerateError, RequestParams, Sampling, regenerate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=TARGET_ARCHS)
def tiny_chat_target(request, tmp_path_factory):
    tokenizer = load_tokenizer("smollm2")
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model = tiny_causal_lm(request.param, 0, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=request.param == "qwen2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_greedy_answers_are_the_targets_and_read_back(tiny_chat_target, tmp_path, capsys):
    source = write_topic_chats(tmp_path / "chats.jsonl", 5)
    out = tmp_path / "regen"
    code = main(["regenerate", "--source", str(source), "--out", str(out), "--target", str(tiny_chat_target),
                 "--engine", "batched", "--temperature", "0", "--max-tokens", "6", "--shard-size", "2",
                 "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.split("[draftrl] report: ", 1)[1])
    assert (report["conversations"], report["shards"]) == (5, 3)
    rows = pq.read_table(out / "regenerated.parquet").to_pylist()
    chat = BatchedChat(str(tiny_chat_target), dtype="float32", max_model_len=256, seed=0, max_num_seqs=4)
    tokenizer, model = chat.tokenizer, chat.target.model
    stop = stop_token_ids(model, tokenizer)
    for row in rows:
        user = row["messages"][:1]
        text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        want = hf_greedy(model, tokenizer.encode(text, add_special_tokens=False), 6)
        cut = next((i for i, t in enumerate(want) if t in stop), None)
        want = want if cut is None else want[:cut]
        assert row["messages"][1]["content"] == tokenizer.decode(want, skip_special_tokens=True)
        assert row["generated_tokens"][0] == (6 if cut is None else cut + 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["engine"] == "batched"


def test_batched_engine_refuses_what_it_cannot_sample(tiny_chat_target):
    chat = BatchedChat(str(tiny_chat_target), dtype="float32", max_model_len=128, seed=0, max_num_seqs=2)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(RegenerateError, match="top-p"):
        chat.chat([messages], [RequestParams(temperature=1.0, top_p=0.9, max_tokens=4)])
    with pytest.raises(RegenerateError, match="one temperature"):
        chat.chat([messages, messages], [RequestParams(0.0, max_tokens=4), RequestParams(1.0, max_tokens=4)])
    out = chat.chat([messages], [RequestParams(1.0, max_tokens=3)])[0].outputs[0]
    assert 1 <= len(out.token_ids) <= 3 and out.finish_reason in ("stop", "length")


def test_time_budget_stops_between_shards_and_the_next_run_resumes(tiny_chat_target, tmp_path, monkeypatch):
    """``max_minutes``: no shard starts after the budget; the committed ones are joined into
    committed.parquet (trainable now) and a later run completes the rest to the same rows."""
    import tools.regenerate as regen

    source = write_topic_chats(tmp_path / "chats.jsonl", 5)
    common = dict(target=str(tiny_chat_target), shard_size=2, dtype="float32", max_model_len=256,
                  max_num_seqs=4, progress=False, engine="batched",
                  sampling=Sampling(temperature=0.0, max_tokens=6))
    whole = regenerate(source, tmp_path / "whole", **common)
    assert whole.complete and whole.shards == 3

    real_write = regen._write_shard
    calls = []

    def write_then_run_out_of_time(out_dir, index, rows, committed):
        calls.append(index)  # the first shard takes "ten minutes": the budget is spent after it
        clock = regen.time.perf_counter
        monkeypatch.setattr(regen.time, "perf_counter", lambda: clock() + 600)
        return real_write(out_dir, index, rows, committed)

    monkeypatch.setattr(regen, "_write_shard", write_then_run_out_of_time)
    out = tmp_path / "budget"
    first = regenerate(source, out, max_minutes=1.0, **common)
    monkeypatch.undo()
    assert calls == [0] and not first.complete
    assert (first.shards, first.shards_written, first.conversations) == (3, 1, 2)
    assert first.output_file == str(out / "committed.parquet") and not (out / "regenerated.parquet").exists()
    want = pq.read_table(tmp_path / "whole" / "regenerated.parquet").to_pylist()
    assert pq.read_table(out / "committed.parquet").to_pylist() == want[:2]

    second = regenerate(source, out, **common)
    assert second.complete and (second.shards_resumed, second.shards_written) == (1, 2)
    assert not (out / "committed.parquet").exists()
    assert pq.read_table(out / "regenerated.parquet").to_pylist() == want

    # Shards brought to another machine (manifest + shards only) join without a model, and a
    # changed shard is refused rather than silently left out.
    from tools.regenerate import join_committed

    moved = tmp_path / "moved"
    (moved / "shards").mkdir(parents=True)
    shutil.copy(out / "manifest.json", moved)
    for shard in (out / "shards").iterdir():
        shutil.copy(shard, moved / "shards")
    joined = join_committed(moved)
    assert joined == moved / "regenerated.parquet" and pq.read_table(joined).to_pylist() == want
    partial = json.loads((moved / "manifest.json").read_text())
    partial["complete"] = False
    del partial["shards"]["2"]
    (moved / "manifest.json").write_text(json.dumps(partial))
    assert pq.read_table(join_committed(moved)).to_pylist() == want[:4]
    assert join_committed(moved) == moved / "committed.parquet"
    with open(moved / partial["shards"]["1"]["file"], "ab") as handle:
        handle.write(b"x")
    with pytest.raises(RegenerateError, match="1 of the 2 shards"):
        join_committed(moved)


def test_max_turns_caps_the_answers_per_conversation(tiny_chat_target, tmp_path):
    """Three-turn chats with ``max_turns=2``: two regenerated answers each, the third user turn
    dropped with its answer; the setting is recorded, so a resume with another cap refuses."""
    turns = [("user", "Name a colour."), ("assistant", "Red."), ("user", "Another?"), ("assistant", "Blue."),
             ("user", "And one more?"), ("assistant", "Green.")]
    source = tmp_path / "three_turns.jsonl"
    source.write_text("".join(json.dumps({"messages": [{"role": r, "content": f"{c} ({i})"} for r, c in turns]})
                              + "\n" for i in range(3)))
    common = dict(target=str(tiny_chat_target), shard_size=2, dtype="float32", max_model_len=256,
                  max_num_seqs=4, progress=False, engine="batched",
                  sampling=Sampling(temperature=0.0, max_tokens=4))
    out = tmp_path / "capped"
    report = regenerate(source, out, max_turns=2, **common)
    rows = pq.read_table(out / "regenerated.parquet").to_pylist()
    assert report.conversations == 3 and len(rows) == 3
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
        assert len(row["generated_tokens"]) == 2
    assert json.loads((out / "manifest.json").read_text())["settings"]["max_turns"] == 2
    with pytest.raises(RegenerateError, match="max_turns"):
        regenerate(source, out, max_turns=1, **common)
    uncapped = regenerate(source, tmp_path / "all", **common)
    assert all(len(r["generated_tokens"]) == 3
               for r in pq.read_table(tmp_path / "all" / "regenerated.parquet").to_pylist())
    assert uncapped.generated_tokens > report.generated_tokens


def test_a_copy_of_the_source_resumes_and_changed_content_refuses(tiny_chat_target, tmp_path):
    """The source is identified by content: a re-extracted copy (new mtime, as on a fresh GPU
    machine) resumes the committed shards; a source whose content changed is refused."""
    import os

    source = write_topic_chats(tmp_path / "chats.jsonl", 4)
    common = dict(target=str(tiny_chat_target), shard_size=2, dtype="float32", max_model_len=256,
                  max_num_seqs=4, progress=False, engine="batched",
                  sampling=Sampling(temperature=0.0, max_tokens=4))
    out = tmp_path / "regen"
    first = regenerate(source, out, **common)
    assert first.shards_written == 2
    os.utime(source, ns=(1, 1))  # touched, same bytes
    again = regenerate(source, out, **common)
    assert (again.shards_resumed, again.shards_written) == (2, 0)
    source.write_text(source.read_text().replace("(0)", "(zero)"))
    with pytest.raises(RegenerateError, match="source_sha256"):
        regenerate(source, out, **common)
