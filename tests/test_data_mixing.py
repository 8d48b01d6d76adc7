"""Training-only extra sources (``data.extra_sources``) with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.trainer import Trainer, load_datasets
from speculative.config import ConfigError, load_config
from speculative.data import supervised_token_counts
from speculative.data.mixing import TrainingMix, prompt_key
from tests.conftest import write_topic_chats


def write_chats(path, prompts_and_answers) -> str:
    with open(path, "w") as handle:
        for prompt, answer in prompts_and_answers:
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from speculative.target import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A 'regenerated' main file and an extra file answering the same 40 prompts differently,
    plus 20 prompts of its own."""
    root = tmp_path_factory.mktemp("mix")
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(40)]
    main = write_chats(root / "main.jsonl", [(p, f"The target says {2 * i}.") for i, p in enumerate(prompts)])
    extra = write_chats(root / "extra.jsonl",
                        [(p, f"Another model answered {2 * i}, surely.") for i, p in enumerate(prompts)]
                        + [(f"A new question {j}: name a colour.", "Blue.") for j in range(20)])
    return main, extra


def _config(tmp_path, main, *extra):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.source={main}", "data.max_length=64",
                              "data.eval_fraction=0.1", *extra])


def _user_text(tokenizer, item) -> str:
    first = int(np.flatnonzero(item["loss_mask"].numpy())[0])
    return tokenizer.decode(item["input_ids"][:first])


def test_extras_join_training_only_and_never_a_held_out_prompt(tmp_path, tokenizer, sources):
    main, extra = sources
    plain_train, plain_eval, _ = load_datasets(_config(tmp_path, main), tokenizer, tmp_path / "cache")
    train, evaluation, stats = load_datasets(
        _config(tmp_path, main, f"data.extra_sources=[{extra}]"), tokenizer, tmp_path / "cache")

    # The held-out split is the main source's, unchanged by the extras.
    assert len(evaluation) == len(plain_eval) == 4
    for a, b in zip((evaluation[i] for i in range(4)), (plain_eval[i] for i in range(4))):
        assert torch.equal(a["input_ids"], b["input_ids"])

    # The 4 extra answers to held-out prompts are dropped; the other 36 + 20 join the 36 main ones.
    held_out_prompts = {_user_text(tokenizer, evaluation[i]) for i in range(4)}
    assert isinstance(train, TrainingMix)
    assert stats["training_mix"]["dropped_held_out_prompts"] == {extra: 4}
    assert [part["samples"] for part in stats["training_mix"]["parts"]] == [36, 56]
    assert len(train) == 92
    texts = [tokenizer.decode(train[i]["input_ids"]) for i in range(len(train))]
    assert sum("Another model answered" in t for t in texts) == 36
    assert sum("A new question" in t for t in texts) == 20
    assert not held_out_prompts & {_user_text(tokenizer, train[i]) for i in range(len(train))}
    # Every held-out prompt did have an extra answer, so the drop did something.
    extra_prompts = {f"Question number {i}:" for i in range(40)}
    assert all(any(p in text for p in extra_prompts) for text in held_out_prompts)

    # The draft vocabulary ranks the main (served) text only.
    assert torch.equal(supervised_token_counts(train, len(tokenizer)),
                       supervised_token_counts(plain_train, len(tokenizer)))


def test_prompt_key_ignores_the_answer_and_needs_supervision():
    ids = np.array([5, 6, 7, 8, 9])
    assert prompt_key(ids, np.array([0, 0, 1, 1, 1])) == prompt_key(np.array([5, 6, 1, 2]), np.array([0, 0, 1, 1]))
    assert prompt_key(ids, np.array([0, 0, 1, 1, 1])) != prompt_key(ids, np.array([0, 0, 0, 1, 1]))
    assert prompt_key(ids, np.zeros(5, dtype=int)) is None


def test_mix_indexes_through_its_parts(tmp_path, tokenizer, sources):
    main, extra = sources
    train, _, _ = load_datasets(_config(tmp_path, main, f"data.extra_sources=[{extra}]"), tokenizer,
                                tmp_path / "cache")
    first, second = train.parts
    assert torch.equal(train[35]["input_ids"], first[35]["input_ids"])
    assert torch.equal(train[36]["input_ids"], second[0]["input_ids"])
    assert torch.equal(train[91]["input_ids"], second[55]["input_ids"])
    assert (train.part_of(35), train.part_of(36)) == (0, 1)
    assert list(train.lengths) == list(first.lengths) + list(second.lengths)
    with pytest.raises(IndexError):
        train[92]


def test_extra_source_settings(tmp_path):
    config = _config(tmp_path, "main.jsonl", "data.extra_sources=[a.jsonl, {source: b.parquet, max_records: 5}]")
    assert [(e.source, e.max_records) for e in config.data.extra_sources] == [("a.jsonl", None), ("b.parquet", 5)]
    with pytest.raises(ConfigError, match=r"data.extra_sources.0.records"):
        _config(tmp_path, "main.jsonl", "data.extra_sources=[{source: a.jsonl, records: 5}]")


def test_a_missing_extra_source_fails_before_training(tmp_path, tokenizer, sources):
    main, _ = sources
    with pytest.raises(Exception, match="no_such_extra.jsonl"):
        load_datasets(_config(tmp_path, main, f"data.extra_sources=[{tmp_path / 'no_such_extra.jsonl'}]"),
                      tokenizer, tmp_path / "cache")


def test_trainer_trains_on_a_grouped_mix_and_resumes_exactly(tmp_path, tiny_target_dir):
    main = write_topic_chats(tmp_path / "main.jsonl", 24)
    extra = write_topic_chats(tmp_path / "extra.jsonl", 40)  # 24 of its prompts are the main file's

    def config(run):
        return load_config(None, [
            f"output_dir={tmp_path / run}", f"cache_dir={tmp_path / 'cache'}", f"target.model={tiny_target_dir}",
            f"data.source={main}", f"data.extra_sources=[{extra}]", "data.max_length=64",
            "data.eval_fraction=0.25", "drafter.draft_vocab_size=512", "training.ttt_steps=2",
            "training.batch_size=4", "training.group_by_length=true", "training.max_steps=4",
            "training.log_every=2", "training.eval_every=4", "training.save_every=2", "training.device=cpu",
        ])

    straight = Trainer(config("a")).run()
    assert straight.final_step == 4
    mix = json.loads((straight.output_dir / "data_stats.json").read_text())["training_mix"]
    assert mix["dropped_held_out_prompts"] == {str(extra): 6}
    assert [part["samples"] for part in mix["parts"]] == [18, 34]
    Trainer(config("b"), steps_this_run=2).run()
    resumed = Trainer(config("b"), resume=True).run()
    a = load_file(straight.drafter_dir / "model.safetensors")
    b = load_file(resumed.drafter_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_held_out_split_evaluation_falls_back_to_the_main_text_only(tmp_path, tokenizer, sources):
    """eval_fraction=0: the evaluation falls back to the training text, the main source's alone
    (the extras never enter what the held-out metrics measure, as with a held-out split)."""
    main, extra = sources
    config = load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.source={main}", "data.max_length=64",
                                "data.eval_fraction=0", f"data.extra_sources=[{extra}]"])
    train, evaluation, stats = load_datasets(config, tokenizer, tmp_path / "cache")
    assert isinstance(train, TrainingMix) and len(train) == 40 + 60
    assert stats["training_mix"]["dropped_held_out_prompts"] == {extra: 0}
    assert len(evaluation) == 40
    assert all("The target says" in tokenizer.decode(evaluation[i]["input_ids"]) for i in range(40))


def test_two_slices_of_one_extra_file_keep_their_own_statistics(tmp_path, tokenizer, sources):
    """The same file twice (two offsets): each slice keeps its own stats and drop count."""
    main, extra = sources
    train, _, stats = load_datasets(
        _config(tmp_path, main, f"data.extra_sources=[{{source: {extra}, max_records: 30}}, "
                                f"{{source: {extra}, offset: 30}}]"), tokenizer, tmp_path / "cache")
    parts = stats["training_mix"]["parts"]
    assert [part["samples"] for part in parts[1:]] == [len(train.parts[1]), len(train.parts[2])]
    names = [part["source"] for part in parts[1:]]
    assert len(set(names)) == 2
    dropped = stats["training_mix"]["dropped_held_out_prompts"]
    assert set(dropped) == set(names) and sum(dropped.values()) == 4
    assert len(train.parts[1]) + len(train.parts[2]) == 56
    assert set(stats["extra_source_stats"]) == set(names)
    assert [s["samples"] for s in stats["extra_source_stats"].values()] == [30, 30]
