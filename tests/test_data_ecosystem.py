"""SpecForge's and speculators' data: role/content conversations, pre-tokenised rows, Hugging Face
datasets (local: saved with ``save_to_disk`` or as data files), tokenising over several processes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speculative.data import DataError
from speculative.data.hub import parse_hf_name
from tests.test_data import TWO_TURNS, build, openai, tokenizer, write_jsonl  # noqa: F401  (fixture)

OTHER = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]


def specforge_row(i: int, messages: list[dict]) -> dict:
    """What SpecForge's and speculators' prepare_data write: an id and role/content conversations."""
    return {"id": f"row-{i}", "conversations": messages}


def _rows(dataset):
    return [(d["input_ids"].tolist(), d["loss_mask"].tolist(), d["source_index"]) for d in dataset]


def test_role_content_conversations_are_detected(tokenizer, tmp_path):
    records = [specforge_row(i, m) for i, m in enumerate([TWO_TURNS, OTHER, TWO_TURNS])]
    theirs, stats = build(write_jsonl(tmp_path / "specforge.jsonl", records), tokenizer, tmp_path)
    ours, _ = build(write_jsonl(tmp_path / "ours.jsonl", [openai(m) for m in (TWO_TURNS, OTHER, TWO_TURNS)]),
                    tokenizer, tmp_path)
    assert stats["format"] == "openai" and stats["samples"] == 3
    assert _rows(theirs) == _rows(ours)
    forced, _ = build(tmp_path / "specforge.jsonl", tokenizer, tmp_path / "forced", format="openai")
    assert _rows(forced) == _rows(ours)


def _token_rows(tokenizer, count=4):
    rows = []
    for i in range(count):
        text = tokenizer.apply_chat_template(TWO_TURNS if i % 2 else OTHER, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (len(ids) - 5)})
    return rows


def test_pretokenized_jsonl_and_parquet(tokenizer, tmp_path):
    rows = _token_rows(tokenizer)
    jsonl, stats = build(write_jsonl(tmp_path / "tokens.jsonl", rows), tokenizer, tmp_path, max_length=30)
    assert stats["format"] == "pretokenized" and stats["samples"] == 4
    assert stats["truncated"] == sum(len(r["input_ids"]) > 30 for r in rows)
    expected = [(r["input_ids"][:30], r["loss_mask"][:30], i) for i, r in enumerate(rows)]
    assert _rows(jsonl) == expected
    pq.write_table(pa.table({"input_ids": [r["input_ids"] for r in rows], "loss_mask": [r["loss_mask"] for r in rows],
                             "extra": list(range(4))}), tmp_path / "tokens.parquet")
    parquet, _ = build(tmp_path / "tokens.parquet", tokenizer, tmp_path, max_length=30)
    assert _rows(parquet) == expected


@pytest.mark.parametrize("row,field,message", [
    ({"input_ids": [1, 2, 3], "loss_mask": [0, 1]}, "loss_mask", "2 loss_mask entries for 3 input_ids"),
    ({"input_ids": [1, 10**7], "loss_mask": [0, 1]}, "input_ids", r"input_ids\[1\] = 10000000 is outside"),
    ({"input_ids": [1, 2], "loss_mask": [0, 2]}, "loss_mask", r"loss_mask\[1\] = 2, not 0 or 1"),
    ({"input_ids": [1, 2]}, "loss_mask", "row has no 'loss_mask'"),
    ({"input_ids": ["a", "b"], "loss_mask": [0, 1]}, "input_ids", ".*not integers"),
])
def test_pretokenized_errors_name_line_and_field(tokenizer, tmp_path, row, field, message):
    good = _token_rows(tokenizer, 1)[0]
    path = write_jsonl(tmp_path / "tokens.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"tokens\.jsonl, line 3, field '{field}': {message}"):
        build(path, tokenizer, tmp_path)
    _, stats = build(path, tokenizer, tmp_path, on_error="skip")
    assert stats["samples"] == 2 and sum(stats["skipped"].values()) == 1


def test_unknown_records_are_refused_early(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="neither conversations.*nor pre-tokenised rows"):
        build(path, tokenizer, tmp_path)


def test_hf_datasets_saved_to_disk_and_parallel_tokenising(tokenizer, tmp_path):
    """speculators' prepare_data output (save_to_disk of input_ids/loss_mask) and a saved
    conversation dataset; num_proc=2 tokenises through datasets.map and gives the same rows."""
    import datasets

    conversations = [specforge_row(i, m) for i, m in enumerate([TWO_TURNS, OTHER] * 3)]
    datasets.Dataset.from_list(conversations).save_to_disk(str(tmp_path / "chats"))
    serial, stats = build(tmp_path / "chats", tokenizer, tmp_path / "c1")
    parallel, stats2 = build(tmp_path / "chats", tokenizer, tmp_path / "c2", num_proc=2)
    assert stats["samples"] == stats2["samples"] == 6 and stats2["format"] == "openai"
    assert _rows(serial) == _rows(parallel)
    files, _ = build(write_jsonl(tmp_path / "chats.jsonl", conversations), tokenizer, tmp_path / "c3")
    assert _rows(files) == _rows(serial)
    again, hit = build(tmp_path / "chats", tokenizer, tmp_path / "c2", num_proc=2)
    assert hit["cache_hit"] and _rows(again) == _rows(parallel)

    rows = _token_rows(tokenizer)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "prepared"))
    prepared, stats = build(tmp_path / "prepared", tokenizer, tmp_path, split="train")
    assert stats["format"] == "pretokenized" and [r[0] for r in _rows(prepared)] == [r["input_ids"] for r in rows]
    with pytest.raises(ValueError, match="no split 'test'"):
        build(tmp_path / "prepared", tokenizer, tmp_path, split="test")


def test_hf_name_through_load_dataset(tokenizer, tmp_path):
    """``hf:`` goes through datasets.load_dataset, the call a hub name takes (a local path here:
    no network); rows are located by row number in errors."""
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [specforge_row(0, TWO_TURNS), {"id": "x", "conversations": [
        {"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}])
    with pytest.raises(DataError, match=r"repo:train, row 1, field 'conversations\[1\]\.role': unknown role 'robot'"):
        build(f"hf:{folder}", tokenizer, tmp_path)
    dataset, stats = build(f"hf:{folder}:train", tokenizer, tmp_path, on_error="skip")
    assert stats["samples"] == 1 and stats["skipped"] == {"unknown_role": 1}


def test_hf_names_parse_with_their_split_and_config():
    assert parse_hf_name("hf:org/data", None, None) == ("org/data", None, "train")
    assert parse_hf_name("hf:org/data:test", None, None) == ("org/data", None, "test")
    assert parse_hf_name("hf:org/data:en:validation", None, None) == ("org/data", "en", "validation")
    assert parse_hf_name("hf:org/data", "test", "fr") == ("org/data", "fr", "test")
    with pytest.raises(ValueError, match="names split 'test', data.split is 'train'"):
        parse_hf_name("hf:org/data:test", "train", None)
    with pytest.raises(ValueError, match="expected hf:org/name"):
        parse_hf_name("hf:", None, None)
