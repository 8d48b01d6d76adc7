"""The training-data pipeline against the real SmolLM2 tokenizer (ChatML with a default system prompt)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from speculative.data import (
    ChatRenderer,
    ChatTemplateError,
    DataError,
    build_dataset,
    collate,
    read_conversations,
    split_dataset,
    supervised_token_counts,
    template_token_ids,
)
from speculative.data import sources
from speculative.vocab import DraftVocab

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(scope="module")
def tokenizer():
    from speculative.target import load_tokenizer

    return load_tokenizer("smollm2")


def sharegpt(messages: list[dict]) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]}


def openai(messages: list[dict]) -> dict:
    return {"messages": messages}


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for position, text in (raw_lines or {}).items():
        lines.insert(position, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def build(path, tokenizer, tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return build_dataset(path, tokenizer, progress=False, **kwargs)


def answers(tokenizer, sample) -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    runs, current = [], []
    for token, flag in zip(sample["input_ids"].tolist(), sample["loss_mask"].tolist()):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_all_formats_give_the_template_ids(tokenizer, tmp_path):
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    convs = [TWO_TURNS, other]
    files = {
        "sharegpt.json": lambda p: p.write_text(json.dumps([sharegpt(c) for c in convs], indent=1)),
        "sharegpt.jsonl": lambda p: write_jsonl(p, [sharegpt(c) for c in convs]),
        "openai.jsonl": lambda p: write_jsonl(p, [openai(c) for c in convs]),
        "openai.parquet": lambda p: pq.write_table(pa.table({"messages": convs}), p),
        "sharegpt.parquet": lambda p: pq.write_table(
            pa.table({"conversations": [sharegpt(c)["conversations"] for c in convs]}), p),
    }
    results = {}
    for name, write in files.items():
        write(tmp_path / name)
        dataset, stats = build(tmp_path / name, tokenizer, tmp_path)
        assert stats["samples"] == 2 and stats["records"] == 2 and not stats["skipped"]
        results[name] = [(d["input_ids"].tolist(), d["loss_mask"].tolist()) for d in dataset]
    reference = results.pop("sharegpt.json")
    for name, result in results.items():
        assert result == reference, name
    # Identical to the tokenizer's own apply_chat_template(tokenize=True) (a BatchEncoding in v5).
    assert [ids for ids, _ in reference] == [template_token_ids(tokenizer, c) for c in convs]


def test_loss_mask_is_the_answer_and_end_token_only(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    encoded = ChatRenderer(tokenizer).render(messages)
    ids, mask = encoded.input_ids, encoded.loss_mask
    first = mask.index(1)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Hello there<|im_end|>"
    assert sum(mask) == len(mask) - first - 1  # one contiguous run; only the final "\n" is after it
    prompt = tokenizer.decode(ids[:first])
    # SmolLM2's template injects its default system prompt; it and the header stay unsupervised.
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids[len(ids) - 1 :]) == "\n"


def test_multi_turn_with_system_message(tokenizer):
    encoded = ChatRenderer(tokenizer).render(TWO_TURNS)
    sample = {"input_ids": torch.tensor(encoded.input_ids), "loss_mask": torch.tensor(encoded.loss_mask)}
    assert answers(tokenizer, sample) == ["4.<|im_end|>", "6, of course.<|im_end|>"]
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "SmolLM" not in text  # an explicit system message replaces the default one


@pytest.mark.parametrize(
    "template, expected",
    [
        # Plain-text headers; the end-of-turn token is <|endoftext|>, followed by a separator.
        ("{% for m in messages %}{% if m.role == 'assistant' %}### Assistant:\n{{ m.content }}"
         "<|endoftext|>\n\n{% else %}### {{ m.role }}:\n{{ m.content }}\n\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}### Assistant:\n{% endif %}",
         ["4.<|endoftext|>", "6, of course.<|endoftext|>"]),
        # Qwen3-style: only the final answer gets an (empty) think block, so rendering
        # messages[:i+1] does not prefix the whole chat; the think block is model output.
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}"
         "<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
         ["4.<|im_end|>", "<think>\n\n</think>\n\n6, of course.<|im_end|>"]),
        # The generation prompt is not how history is rendered (history answers get a "[reply] "
        # label, the prompt opens a think block): the answer is located by its content.
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}[reply] "
         "{% endif %}{{ m.content | trim }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
         ["4.<|im_end|>", "6, of course.<|im_end|>"]),
    ],
    ids=["plain-headers", "last-turn-think", "prompt-not-prefix"],
)
def test_other_templates(tokenizer, template, expected):
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = template
    encoded = ChatRenderer(custom).render(TWO_TURNS)
    assert encoded.input_ids == template_token_ids(custom, TWO_TURNS)
    sample = {"input_ids": torch.tensor(encoded.input_ids), "loss_mask": torch.tensor(encoded.loss_mask)}
    assert answers(tokenizer, sample) == expected


def test_template_errors_name_the_record(tokenizer, tmp_path):
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = (
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}"
        "{% endif %}{{ m.content }}<|im_end|>{% endfor %}"
    )
    bad = [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]
    path = write_jsonl(tmp_path / "t.jsonl", [openai(TWO_TURNS), openai(bad)])
    with pytest.raises(DataError, match=r"t\.jsonl, line 2: .*no boom"):
        build(path, custom, tmp_path)
    dataset, stats = build(path, custom, tmp_path, on_error="skip")
    assert len(dataset) == 1 and stats["skipped"] == {"template_error": 1}


def test_tokenizer_without_chat_template_is_refused(tokenizer, tmp_path):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "a.jsonl", [openai(TWO_TURNS)])
    with pytest.raises(ChatTemplateError, match="smollm2.*no chat template"):
        build(path, bare, tmp_path)


def test_truncation_and_dropping(tokenizer, tmp_path):
    long_answer = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two " * 100}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "long.jsonl", [openai(long_answer), openai(long_prompt), openai(TWO_TURNS)])
    dataset, stats = build(path, tokenizer, tmp_path, max_length=64)
    assert (stats["records"], stats["samples"], stats["truncated"], stats["dropped"]) == (3, 2, 1, 1)
    assert [d["source_index"] for d in dataset] == [0, 2]
    cut = dataset[0]
    assert len(cut["input_ids"]) == 64 and cut["loss_mask"][-1] == 1
    assert cut["input_ids"].tolist() == template_token_ids(tokenizer, long_answer)[:64]


MALFORMED = {
    # name: (JSONL line, expected reason, field named in the message)
    "invalid_json": ('{"conversations": [', "invalid_json", None),
    "missing_list": ('{"id": "x"}', "missing_field", "conversations"),
    "turn_without_role": ('{"conversations": [{"value": "hi"}]}', "bad_turn", "conversations[0].from"),
    "turn_without_content": ('{"conversations": [{"from": "human"}]}', "bad_turn", "conversations[0].value"),
    "non_string_content": ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}',
                           "bad_turn", "conversations[1].value"),
    "unknown_role": ('{"conversations": [{"from": "robot", "value": "hi"}]}', "unknown_role",
                     "conversations[0].from"),
    "empty_conversation": ('{"conversations": []}', "empty_conversation", "conversations"),
    "no_assistant_turn": ('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}',
                          "no_assistant_turn", "conversations"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_record_raises_with_location(tokenizer, tmp_path, kind):
    line, reason, field = MALFORMED[kind]
    good = sharegpt(TWO_TURNS)
    # A blank line first: JSONL errors name the physical line (here line 4).
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good], raw_lines={0: "", 3: line})
    with pytest.raises(DataError) as info:
        build(path, tokenizer, tmp_path)
    message = str(info.value)
    assert str(path) in message and "line 4" in message and info.value.reason == reason
    if field:
        assert f"field '{field}'" in message


def test_malformed_record_index_in_json_and_parquet(tokenizer, tmp_path):
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([sharegpt(TWO_TURNS), {"conversations": [{"from": "human", "value": 1}]}]))
    with pytest.raises(DataError, match=r"bad\.json, record 1, field 'conversations\[0\]\.value'"):
        build(array, tokenizer, tmp_path)
    table = pa.table({"messages": [TWO_TURNS, [{"role": "user", "content": None}]]})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet, record 1, field 'messages\[0\]\.content'"):
        build(tmp_path / "bad.parquet", tokenizer, tmp_path)
    # forced format: role/content turns are looked for under 'conversations' too (SpecForge's name)
    with pytest.raises(DataError, match=r"record 0, field 'conversations\[0\]\.role'"):
        build(array, tokenizer, tmp_path, format="openai")


def test_skip_mode_counts_by_reason(tokenizer, tmp_path):
    lines = [line for line, _, _ in MALFORMED.values()]
    good = json.dumps(sharegpt(TWO_TURNS))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, *lines, good]) + "\n")
    dataset, stats = build(path, tokenizer, tmp_path, on_error="skip")
    expected: dict[str, int] = {}
    for _, reason, _ in MALFORMED.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["skipped"] == expected
    assert stats["records"] == len(lines) + 2 and stats["samples"] == 2
    assert [d["source_index"] for d in dataset] == [0, len(lines) + 1]
    # A strict caller must not be handed the lenient cache: it rebuilds and raises.
    with pytest.raises(DataError, match="line 2"):
        build(path, tokenizer, tmp_path)


def test_truncated_json_array_streams_its_complete_records(tmp_path):
    records = [sharegpt(TWO_TURNS) for _ in range(5)]
    text = json.dumps(records, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - 40])  # ends inside the last record
    # A tiny chunk exercises refilling the buffer mid-record.
    parsed = [obj for _, _, obj in sources._iter_json_array(path, chunk=7)]
    assert parsed[:4] == records[:4] and isinstance(parsed[4], json.JSONDecodeError)
    with pytest.raises(DataError, match="end of file: the JSON array is truncated"):
        read_conversations(path)  # raised up front, before any tokenising
    assert len(list(read_conversations(path, max_records=4))) == 4
    stats = sources.ReadStats()
    assert len(list(read_conversations(path, on_error="skip", stats=stats))) == 4
    assert stats.skipped == {"invalid_json": 1}


def test_cache_hit_does_not_retokenise(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [openai(TWO_TURNS)] * 3)
    first, stats = build(path, tokenizer, tmp_path)
    assert not stats["cache_hit"] and Path(stats["cache_path"]).is_file()

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenised despite a valid cache")

    monkeypatch.setattr(ChatRenderer, "render_text", fail)
    monkeypatch.setattr(ChatRenderer, "encode_texts", fail)
    second, again = build(path, tokenizer, tmp_path)
    assert again["cache_hit"] and again["cache_path"] == stats["cache_path"]
    assert {k: v for k, v in again.items() if k != "cache_hit"} == {k: v for k, v in stats.items() if k != "cache_hit"}
    assert [d["input_ids"].tolist() for d in second] == [d["input_ids"].tolist() for d in first]


def test_cache_invalidation(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [openai(TWO_TURNS)])
    _, base = build(path, tokenizer, tmp_path, max_length=2048)
    _, shorter = build(path, tokenizer, tmp_path, max_length=40)
    assert not shorter["cache_hit"] and shorter["cache_path"] != base["cache_path"]
    _, sliced = build(path, tokenizer, tmp_path, max_records=1)
    assert not sliced["cache_hit"] and sliced["cache_path"] != base["cache_path"]
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("helpful", "kind")
    _, retemplated = build(path, other, tmp_path)
    assert not retemplated["cache_hit"] and retemplated["cache_path"] != base["cache_path"]
    os.utime(path, ns=(1, 1))  # the source changed (mtime)
    _, touched = build(path, tokenizer, tmp_path)
    assert not touched["cache_hit"] and touched["cache_path"] != base["cache_path"]
    _, again = build(path, tokenizer, tmp_path)
    assert again["cache_hit"]


def test_interrupted_build_leaves_no_cache(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [openai(TWO_TURNS)] * 4)
    real = ChatRenderer.encode_texts
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two row groups are already written when this fails
            raise RuntimeError("injected crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ChatRenderer, "encode_texts", flaky)
    with pytest.raises(RuntimeError, match="injected crash"):
        build(path, tokenizer, tmp_path, batch_size=1)
    assert list((tmp_path / "cache").iterdir()) == []  # neither a parquet nor a temp file
    monkeypatch.setattr(ChatRenderer, "encode_texts", real)
    dataset, stats = build(path, tokenizer, tmp_path, batch_size=1)
    assert not stats["cache_hit"] and len(dataset) == 4


def test_collate_split_and_counts(tokenizer, tmp_path):
    convs = [TWO_TURNS[1:3], TWO_TURNS, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    path = write_jsonl(tmp_path / "a.jsonl", [openai(c) for c in convs * 4])
    dataset, _ = build(path, tokenizer, tmp_path)
    batch = collate([dataset[0], dataset[1]], pad_id=tokenizer.pad_token_id)
    lengths = [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, min(lengths):] == tokenizer.pad_token_id).all()
    assert (batch["loss_mask"][short, min(lengths):] == 0).all()
    assert batch["loss_mask"][short, : min(lengths)].tolist() == dataset[short]["loss_mask"].tolist()

    train, evaluation = split_dataset(dataset, eval_fraction=0.25, seed=3)
    again, _ = split_dataset(dataset, eval_fraction=0.25, seed=3)
    other, _ = split_dataset(dataset, eval_fraction=0.25, seed=4)
    assert (len(train), len(evaluation)) == (9, 3)
    assert train.indices.tolist() == again.indices.tolist() != other.indices.tolist()
    assert sorted(train.indices.tolist() + evaluation.indices.tolist()) == list(range(12))

    counts = supervised_token_counts(train, len(tokenizer))
    expected = torch.zeros(len(tokenizer), dtype=torch.long)
    for sample in train:
        for token in sample["input_ids"][sample["loss_mask"].bool()].tolist():
            expected[token] += 1
    assert counts.shape == (len(tokenizer),) and torch.equal(counts, expected)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert counts[end_of_turn] == sum(len(answers(tokenizer, s)) for s in train)  # one per answer
    vocab = DraftVocab.from_counts(counts, 16)
    assert vocab.coverage(counts) == 1.0  # these few answers use fewer than 16 distinct tokens


def test_real_sharegpt_slice(tokenizer, tmp_path):
    dataset, stats = build("sharegpt", tokenizer, tmp_path, max_records=20, max_length=512)
    assert stats["records"] == 20 and stats["samples"] + stats["dropped"] + sum(stats["skipped"].values()) == 20
    assert len(dataset) >= 15
    with sources.resolve_source("sharegpt") as path, open(path, encoding="utf-8") as handle:
        head = handle.read(200_000)
    first = json.JSONDecoder().raw_decode(head, head.index("{"))[0]
    answer = next(t["value"] for t in first["conversations"] if t["from"] == "gpt")
    assert dataset[0]["source_index"] == 0
    assert answers(tokenizer, dataset[0])[0].startswith(answer.strip()[:100])
    for sample in dataset:
        assert 0 < int(sample["loss_mask"].sum()) and len(sample["input_ids"]) <= 512
    window, _ = build("sharegpt", tokenizer, tmp_path, offset=5, max_records=3)
    assert all(5 <= d["source_index"] < 8 for d in window)
