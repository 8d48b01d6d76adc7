"""``draftrl regenerate``: rewrite a chat dataset's assistant turns with the target, via vLLM.

EAGLE-3 and SpecForge recommend training a drafter on the target's *own* answers: a drafter
learns to predict what the target says, and human/other-model answers teach it a distribution
the target never produces. This command keeps every system and user turn of each conversation
and replaces each assistant turn by the target's answer *given the regenerated history* (turn 2
is answered after the target's own turn 1, as in serving), in batches through vLLM's chat API
(the target's chat template).

Input: anything :func:`speculative.data.read_conversations` reads (ShareGPT or OpenAI-messages
records in JSON, JSONL or Parquet; ``sharegpt`` = the bundled ShareGPT file), with its slicing
(``offset``, ``max_records``) and ``on_error``. The slice is validated before vLLM starts, so a
malformed record fails fast with its file and record named.

Output directory (resumable)::

    OUT/manifest.json            settings + the committed shards (file, record range, sha256)
    OUT/shards/shard-00000.parquet ...   one per ``shard_size`` file records
    OUT/regenerated.parquet      all shards, written when the last one is committed

Each Parquet file has an OpenAI ``messages`` column (``list<struct<role, content>>``) that
``build_dataset`` reads back (``data.source=OUT/regenerated.parquet``), plus ``source_index``
(the record's 0-based position in the input file), ``finish_reasons`` and ``generated_tokens``
(one per assistant turn; ``length`` = cut at ``max_tokens`` or at ``max_model_len``).

Crash safety: a shard is written to a temporary file, fsynced and renamed into place, *then*
recorded in the manifest (itself replaced atomically). Only shards listed in the manifest with a
matching checksum count as done; a shard file the manifest does not list (killed between the
rename and the manifest update) is regenerated, and leftover temporary files are removed. So a
killed run resumes at its first uncommitted shard and never treats a partial shard as complete.
Shards are slices of the input by file-record position, independent of what was valid, and every
request is seeded by (``seed``, record position, turn), so the resumed output is what an
uninterrupted run would have produced (up to vLLM's own batch-dependent numerics).

Conversations whose prompt no longer fits ``max_model_len`` stop at their last regenerated
assistant turn (dropped, and counted, if that leaves none).

Engines: ``--engine vllm`` (default) batches requests through vLLM's chat API. ``--engine batched``
runs draftrl's own batched engine (``speculative.batch_engine.BatchGenerator``, autoregressive, CUDA
graphs on GPU) where vLLM is not installed, e.g. the GPU machine: same prompts (the target's chat
template), same stop tokens, temperature sampling; it has no top-p/top-k and seeds per shard
rather than per request, so a resumed run samples other (equally valid) answers than an
uninterrupted one would have.

Fault injection for tests: ``DRAFTRL_REGENERATE_FAULT=kill-before-commit:N`` SIGKILLs the process
after the temporary file of the shard that follows N committed shards is written, before it is
renamed (a crash at the worst moment).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
OUTPUT_FILE = "regenerated.parquet"
PARTIAL_FILE = "committed.parquet"  # the committed shards of a run stopped by its time budget
MANIFEST_VERSION = 2  # 2: the source is identified by its sha256, not its mtime
FAULT_ENV = "DRAFTRL_REGENERATE_FAULT"


class RegenerateError(RuntimeError):
    """A regeneration that cannot proceed; the message names the file/record or setting."""


@dataclass
class Sampling:
    """vLLM sampling parameters for every assistant turn (from the command-line flags)."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 1024
    seed: int = 0


@dataclass
class RequestParams:
    """One request's sampling parameters for the batched engine (vLLM's ``SamplingParams`` subset)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None


@dataclass
class RegenerateReport:
    out_dir: str
    output_file: str
    records: int  # file records in the slice (valid or not)
    conversations: int  # rows in the output
    shards: int
    shards_resumed: int  # already committed when this run started
    shards_written: int  # committed by this run
    dropped_too_long: int
    skipped: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0
    complete: bool = True  # False: stopped by max_minutes; output_file holds the committed shards


def _schema() -> Any:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([
        ("messages", pa.list_(message)),
        ("source_index", pa.int64()),
        ("finish_reasons", pa.list_(pa.string())),
        ("generated_tokens", pa.list_(pa.int32())),
    ])


def _sha256(path: Path) -> str:
    from speculative.files import file_sha256

    return file_sha256(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def request_seed(seed: int, source_index: int, turn: int) -> int:
    """A per-request seed, so an answer does not depend on batching or on where a run resumed."""
    digest = hashlib.sha256(f"{seed}:{source_index}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _maybe_inject_fault(committed: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    kind, _, count = spec.partition(":")
    if kind != "kill-before-commit":
        raise RegenerateError(f"{FAULT_ENV}={spec!r}: unknown fault (kill-before-commit:N)")
    if committed >= int(count or 0):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """One conversation being regenerated: the source turns and the regenerated history."""

    conversation: Any  # speculative.data.Conversation
    history: list[dict[str, str]] = field(default_factory=list)
    next_turn: int = 0  # index into conversation.messages of the next turn to copy
    answers: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    done: bool = False

    def advance(self) -> bool:
        """Copy source turns up to the next assistant turn; False when none is left."""
        messages = self.conversation.messages
        while self.next_turn < len(messages) and messages[self.next_turn]["role"] != "assistant":
            self.history.append(dict(messages[self.next_turn]))
            self.next_turn += 1
        return self.next_turn < len(messages)


def _prompt_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def _chat(llm: Any, prompts: list[list[dict[str, str]]], params: list[Any],
          pending: list[_Pending], path: Path) -> list[Any]:
    """``llm.chat`` on a batch; if it fails, find and name the record that makes it fail."""
    try:
        return llm.chat(prompts, params, use_tqdm=False, add_generation_prompt=True)
    except Exception as batch_error:  # noqa: BLE001 - re-raised with the record named
        for prompt, param, item in zip(prompts, params, pending):
            try:
                llm.chat([prompt], [param], use_tqdm=False, add_generation_prompt=True)
            except Exception as error:  # noqa: BLE001
                raise RegenerateError(
                    f"{path}, {item.conversation.where}: vLLM failed on assistant turn "
                    f"{item.answers + 1}: {type(error).__name__}: {error}"
                ) from error
        raise RegenerateError(
            f"{path}: vLLM failed on a batch of {len(prompts)} conversations "
            f"({pending[0].conversation.where} to {pending[-1].conversation.where}): "
            f"{type(batch_error).__name__}: {batch_error}"
        ) from batch_error


def regenerate_conversations(
    llm: Any, conversations: Sequence[Any], sampling: Sampling, max_model_len: int, path: Path,
    max_turns: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Regenerate every assistant turn of ``conversations``, turn by turn across the batch.

    ``max_turns``: answer at most that many assistant turns per conversation (the rest of it is
    dropped). Each turn is one batched round, and the late rounds hold only the few long
    conversations, so a cap trades long-chat data for throughput.

    Returns (output rows, conversations dropped because not even their first prompt fit).
    """
    SamplingParams = getattr(llm, "sampling_params_class", None)
    if SamplingParams is None:
        from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    pending = [_Pending(conv) for conv in conversations]
    while True:
        active, prompts, params = [], [], []
        for item in pending:
            if item.done:
                continue
            if (max_turns is not None and item.answers >= max_turns) or not item.advance():
                item.done = True
                continue
            budget = min(sampling.max_tokens, max_model_len - _prompt_length(tokenizer, item.history))
            if budget < 1:  # the history no longer fits: stop at the last regenerated answer
                item.done = True
                continue
            active.append(item)
            prompts.append(list(item.history))
            params.append(SamplingParams(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_tokens=budget,
                seed=request_seed(sampling.seed, item.conversation.index, item.answers),
            ))
        if not active:
            break
        outputs = _chat(llm, prompts, params, active, path)
        for item, output in zip(active, outputs):
            completion = output.outputs[0]
            item.history.append({"role": "assistant", "content": completion.text})
            item.finish_reasons.append(str(completion.finish_reason))
            item.generated_tokens.append(len(completion.token_ids))
            item.answers += 1
            item.next_turn += 1  # past the source's assistant turn just replaced
    rows, dropped = [], 0
    for item in pending:
        if not item.answers:
            dropped += 1
            continue
        last = max(i for i, m in enumerate(item.history) if m["role"] == "assistant")
        rows.append({
            "messages": item.history[: last + 1],
            "source_index": item.conversation.index,
            "finish_reasons": item.finish_reasons,
            "generated_tokens": item.generated_tokens,
        })
    return rows, dropped


# --------------------------------------------------------------------------------------------
# Shards and manifest
# --------------------------------------------------------------------------------------------
def _settings(path: Path, target_dir: str, *, format: str, offset: int, max_records: int | None,
              on_error: str, shard_size: int, dtype: str, max_model_len: int,
              sampling: Sampling) -> dict[str, Any]:
    """Everything the output depends on; a resumed run must match it exactly.

    The source counts by content (size + sha256), not mtime, so a regeneration carried to a
    fresh machine resumes on a re-extracted copy of the same file.
    """
    return {
        "source": str(path.resolve()), "source_size": path.stat().st_size,
        "source_sha256": _sha256(path), "format": format, "offset": offset,
        "max_records": max_records, "on_error": on_error, "shard_size": shard_size,
        "target": str(target_dir), "dtype": dtype, "max_model_len": max_model_len,
        "sampling": asdict(sampling),
    }


def _load_manifest(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    manifest_path = out_dir / MANIFEST
    fresh = {"version": MANIFEST_VERSION, "settings": settings, "shards": {}, "complete": False}
    if overwrite:  # manifest first: a crash mid-cleanup must not leave it naming lost shards
        manifest_path.unlink(missing_ok=True)
        for shard in (out_dir / SHARDS_DIR).glob("shard-*.parquet"):
            shard.unlink()
        (out_dir / OUTPUT_FILE).unlink(missing_ok=True)
        return fresh
    if not manifest_path.is_file():
        return fresh
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise RegenerateError(f"{manifest_path}: unreadable manifest ({error}); "
                              "pass --overwrite to start over") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise RegenerateError(f"{manifest_path}: manifest version {manifest.get('version')} is "
                              f"not {MANIFEST_VERSION}; pass --overwrite to start over")
    old = manifest.get("settings", {})
    differing = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if differing:
        detail = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in differing.items())
        raise RegenerateError(f"{out_dir} holds a regeneration with other settings ({detail}); "
                              "use another --out, or --overwrite to discard it")
    return manifest


def _committed(out_dir: Path, manifest: dict[str, Any]) -> set[int]:
    """Shards the manifest lists whose file is present and intact."""
    done = set()
    for key, entry in list(manifest["shards"].items()):
        file = out_dir / entry["file"]
        if file.is_file() and _sha256(file) == entry["sha256"]:
            done.add(int(key))
        else:
            print(f"[draftrl] {file}: missing or changed since it was committed; regenerating it",
                  file=sys.stderr)
            del manifest["shards"][key]
    return done


def _write_shard(out_dir: Path, index: int, rows: list[dict[str, Any]], committed: int) -> Path:
    """Write a shard atomically (temporary file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = out_dir / SHARDS_DIR
    final = shards / f"shard-{index:05d}.parquet"
    tmp = shards / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    _maybe_inject_fault(committed)
    os.replace(tmp, final)
    _fsync_dir(shards)
    return final


def _merge(out_dir: Path, manifest: dict[str, Any], indices: Sequence[int], name: str = OUTPUT_FILE) -> Path:
    """Join the shards ``indices`` (in that order) into ``out_dir/name``, atomically."""
    import pyarrow.parquet as pq

    final = out_dir / name
    tmp = out_dir / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with pq.ParquetWriter(tmp, _schema()) as writer:
            for index in indices:
                writer.write_table(pq.read_table(out_dir / manifest["shards"][str(index)]["file"]))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def join_committed(out_dir: str | Path) -> Path:
    """Join the intact committed shards of ``out_dir`` into the file ``data.source`` reads, without
    loading a model: ``committed.parquet``, or ``regenerated.parquet`` once the manifest says the
    regeneration is complete. For shards brought back from another machine (``restore-regen``)."""
    out_dir = Path(out_dir)
    manifest_file = out_dir / MANIFEST
    if not manifest_file.is_file():
        raise RegenerateError(f"{manifest_file}: no manifest, so no committed shards to join")
    manifest = json.loads(manifest_file.read_text())
    listed = len(manifest["shards"])
    done = sorted(_committed(out_dir, manifest))
    if len(done) != listed:
        raise RegenerateError(f"{out_dir}: {listed - len(done)} of the {listed} shards the manifest lists are "
                              "missing or changed (see above); restore them again")
    if not done:
        raise RegenerateError(f"{manifest_file} lists no committed shard")
    return _merge(out_dir, manifest, done, OUTPUT_FILE if manifest.get("complete") else PARTIAL_FILE)


class BatchedChat:
    """The part of vLLM's ``LLM`` that regeneration uses, on draftrl's batched engine (no vLLM).

    ``chat`` renders each history with the target's chat template (as vLLM's chat API does),
    decodes the batch with ``BatchGenerator`` (``max_num_seqs`` rows at a time) until a stop token
    or the request's ``max_tokens``, and returns vLLM-shaped outputs (``.outputs[0].text``,
    ``.finish_reason``, ``.token_ids``).
    """

    sampling_params_class = RequestParams

    def __init__(self, target_dir: str, *, dtype: str, max_model_len: int, seed: int, max_num_seqs: int,
                 device: str | None = None):
        import torch
        from transformers import AutoTokenizer

        from speculative.target import TargetModel, stop_token_ids

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.target = TargetModel.load(target_dir, dtype=getattr(torch, dtype), device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(target_dir)
        self.stop = stop_token_ids(self.target.model, self.tokenizer)
        self.seed, self.max_num_seqs, self.max_model_len = seed, max_num_seqs, max_model_len
        self.engines: dict[float, Any] = {}
        self.calls = 0

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def _engine(self, temperature: float) -> Any:
        from speculative.batch_engine import BatchGenerator

        if temperature not in self.engines:
            self.engines[temperature] = BatchGenerator(
                self.target, None, 0, temperature=temperature, seed=self.seed, max_batch=self.max_num_seqs,
                max_len=self.max_model_len)
        return self.engines[temperature]

    def chat(self, prompts: list[list[dict[str, str]]], params: list[RequestParams], use_tqdm: bool = False,
             add_generation_prompt: bool = True) -> list[Any]:
        from types import SimpleNamespace

        if len({p.temperature for p in params}) > 1:
            raise RegenerateError("the batched engine samples one batch at one temperature")
        if any(p.top_p != 1.0 or p.top_k not in (0, -1) for p in params):
            raise RegenerateError("the batched engine has no top-p/top-k sampling: use --engine vllm")
        ids = []
        for messages in prompts:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            ids.append(self.tokenizer.encode(text, add_special_tokens=False))
        engine = self._engine(params[0].temperature)
        result = engine.generate(ids, max(p.max_tokens for p in params), self.stop)
        self.calls += 1
        outputs = []
        for tokens, param in zip(result.tokens, params):
            tokens = tokens[: param.max_tokens]
            stopped = bool(tokens) and tokens[-1] in self.stop
            text = self.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(
                text=text, token_ids=list(tokens), finish_reason="stop" if stopped else "length")]))
        return outputs


def _engine(target_dir: str, *, dtype: str, max_model_len: int, seed: int, max_num_seqs: int,
            enforce_eager: bool | None, engine: str = "vllm") -> Any:
    if engine == "batched":
        return BatchedChat(target_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                           max_num_seqs=max_num_seqs)
    if engine != "vllm":
        raise RegenerateError(f"unknown engine {engine!r} (vllm or batched)")
    from actors.vllm_engine import CPU_ENGINE_ENV

    for key, value in CPU_ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    from vllm import LLM

    if enforce_eager is None:  # CPU: skip torch.compile warm-up; GPU: vLLM's default
        enforce_eager = not torch.cuda.is_available()
    return LLM(model=target_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
               max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)


def regenerate(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: str = "smollm2",
    format: str = "auto",
    offset: int = 0,
    max_records: int | None = None,
    on_error: str = "raise",
    shard_size: int = 256,
    sampling: Sampling | None = None,
    dtype: str = "bfloat16",
    max_model_len: int = 2048,
    max_num_seqs: int = 32,
    enforce_eager: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "vllm",
    max_minutes: float | None = None,
    max_turns: int | None = None,
) -> RegenerateReport:
    """Regenerate ``source`` into ``out_dir`` (resuming what a previous run committed).

    ``max_minutes``: start no shard after that long (a GPU slot of fixed length); the shards
    committed so far are then joined into ``out_dir/committed.parquet`` for training now, and the
    next run resumes at the first missing shard.
    """
    from tqdm.auto import tqdm

    from speculative.data import ReadStats, read_conversations, resolve_source
    from speculative.target import resolve_target

    sampling = sampling or Sampling()
    if shard_size < 1:
        raise RegenerateError(f"shard_size must be positive, not {shard_size}")
    if offset < 0 or (max_records is not None and max_records < 0):
        raise RegenerateError("offset and max_records must be non-negative")
    if max_turns is not None and max_turns < 1:
        raise RegenerateError(f"max_turns must be >= 1, not {max_turns}")
    if sampling.max_tokens < 1 or max_model_len < 2:
        raise RegenerateError("max_tokens must be >= 1 and max_model_len >= 2")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    target_dir = str(resolve_target(target))
    with resolve_source(source) as path:
        # Validate the whole slice first: a bad record fails now, naming itself, not mid-run.
        scan = ReadStats()
        for _ in read_conversations(path, format, offset=offset, max_records=max_records,
                                    on_error=on_error, stats=scan):
            pass
        total = scan.records
        count = math.ceil(total / shard_size)
        settings = _settings(path, target_dir, format=format, offset=offset,
                             max_records=max_records, on_error=on_error, shard_size=shard_size,
                             dtype=dtype, max_model_len=max_model_len, sampling=sampling)
        if engine != "vllm":  # recorded only when not the default: older manifests stay valid
            settings["engine"] = engine
        if max_turns is not None:
            settings["max_turns"] = max_turns
        (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / SHARDS_DIR).glob(".shard-*.tmp"):
            stale.unlink()  # a killed run's uncommitted shard
        manifest = _load_manifest(out_dir, settings, overwrite)
        done = _committed(out_dir, manifest)
        resumed = len(done)
        todo = [i for i in range(count) if i not in done]
        written = 0
        if todo:
            llm = _engine(target_dir, dtype=dtype, max_model_len=max_model_len,
                          seed=sampling.seed, max_num_seqs=max_num_seqs,
                          enforce_eager=enforce_eager, engine=engine)
            done_records = sum(manifest["shards"][str(i)]["records"] for i in done)
            bar = tqdm(total=total, initial=done_records, unit="conv", disable=not progress,
                       desc=f"regenerating {path.name}")
            try:
                for index in todo:
                    if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                        break  # out of time: what is committed stays, the next run resumes here
                    start = offset + index * shard_size
                    size = min(shard_size, offset + total - start)
                    read = ReadStats()
                    conversations = list(read_conversations(
                        path, format, offset=start, max_records=size, on_error=on_error,
                        stats=read,
                    ))
                    rows, dropped = regenerate_conversations(
                        llm, conversations, sampling, max_model_len, path, max_turns
                    )
                    file = _write_shard(out_dir, index, rows, committed=len(done))
                    manifest["shards"][str(index)] = {
                        "file": str(file.relative_to(out_dir)), "sha256": _sha256(file),
                        "first_record": start, "records": read.records, "rows": len(rows),
                        "dropped_too_long": dropped, "skipped": dict(read.skipped),
                        "generated_tokens": sum(sum(r["generated_tokens"]) for r in rows),
                    }
                    manifest["complete"] = False
                    _write_json_atomic(out_dir / MANIFEST, manifest)
                    done.add(index)
                    written += 1
                    bar.update(read.records)
                    bar.set_postfix(shards=f"{len(done)}/{count}")
            finally:
                bar.close()
                if engine == "vllm":
                    from actors.vllm_engine import _shutdown

                    _shutdown(llm)
        complete = len(done) == count
        if not complete:
            output = _merge(out_dir, manifest, sorted(done), PARTIAL_FILE)
        else:
            output = out_dir / OUTPUT_FILE
            if not manifest.get("complete") or not output.is_file():
                _merge(out_dir, manifest, range(count))
                manifest["complete"] = True
                _write_json_atomic(out_dir / MANIFEST, manifest)
            (out_dir / PARTIAL_FILE).unlink(missing_ok=True)
    shards = [manifest["shards"][str(i)] for i in sorted(done)]
    skipped: dict[str, int] = {}
    for shard in shards:
        for reason, n in shard["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return RegenerateReport(
        out_dir=str(out_dir), output_file=str(output), records=total,
        conversations=sum(s["rows"] for s in shards), shards=count, shards_resumed=resumed,
        shards_written=written, dropped_too_long=sum(s["dropped_too_long"] for s in shards),
        skipped=skipped, generated_tokens=sum(s["generated_tokens"] for s in shards),
        seconds=time.perf_counter() - started, complete=complete,
    )


# --------------------------------------------------------------------------------------------
# Command line (``draftrl regenerate``)
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``regenerate`` flags (kept here so tools/cli.py stays a thin dispatcher)."""
    parser.add_argument("--source", required=True,
                        help="chat data: 'sharegpt' or a ShareGPT/OpenAI JSON, JSONL or Parquet file")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (shards, manifest, regenerated.parquet); resumed if present")
    parser.add_argument("--target", default="smollm2", help="target model (as target.model)")
    parser.add_argument("--format", default="auto", choices=["auto", "sharegpt", "openai"])
    parser.add_argument("--max-records", type=int, default=None, metavar="N")
    parser.add_argument("--offset", type=int, default=0, metavar="N")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    parser.add_argument("--temperature", type=float, default=Sampling.temperature)
    parser.add_argument("--top-p", type=float, default=Sampling.top_p)
    parser.add_argument("--top-k", type=int, default=Sampling.top_k, help="0 = off")
    parser.add_argument("--max-tokens", type=int, default=Sampling.max_tokens,
                        help="per assistant turn")
    parser.add_argument("--seed", type=int, default=Sampling.seed)
    parser.add_argument("--shard-size", type=int, default=256, metavar="N",
                        help="input records per shard (the unit of resumption)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "batched"],
                        help="vllm, or draftrl's batched engine (no vLLM needed; no top-p/top-k)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a previous regeneration in --out (default: resume it)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--max-turns", type=int, default=None, metavar="N",
                        help="answer at most N assistant turns per conversation (default: all); "
                             "fewer, fuller batched rounds")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="start no shard after M minutes; the committed shards go to "
                             "OUT/committed.parquet and a later run resumes (fixed GPU slots)")


def run_cli(args: argparse.Namespace) -> int:
    from speculative.data import DataError

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_tokens=args.max_tokens, seed=args.seed)
    try:
        report = regenerate(
            args.source, args.out, target=args.target, format=args.format, offset=args.offset,
            max_records=args.max_records, on_error=args.on_error, shard_size=args.shard_size,
            sampling=sampling, dtype=args.dtype, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, overwrite=args.overwrite,
            progress=not args.no_progress, engine=args.engine, max_minutes=args.max_minutes,
            max_turns=args.max_turns,
        )
    except (DataError, RegenerateError, FileNotFoundError) as error:
        print(f"draftrl: {error}", file=sys.stderr)
        return 2
    if not report.complete:
        print(f"[draftrl] stopped after {args.max_minutes} min: {report.shards_resumed + report.shards_written}"
              f" of {report.shards} shards committed, joined in {report.output_file}; run again to resume")
    else:
        print(f"[draftrl] regenerated: {report.output_file}")
    print(f"[draftrl] report: {json.dumps(asdict(report))}")
    return 0
