"""Hugging Face ``datasets`` as a data source: ``hf:org/name[:config][:split]`` or a local directory.

``hf:`` names go through ``datasets.load_dataset`` (the hub, or a local path after ``hf:``); a
directory written by ``Dataset.save_to_disk`` (speculators' ``prepare_data`` output) through
``load_from_disk``; any other directory of data files through ``load_dataset(path)``. The rows are
then validated and tokenised like a file's, with the row number as their location.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

HF_PREFIX = "hf:"


def is_dataset_source(source: str | Path) -> bool:
    """An ``hf:`` name or a directory (files are read by ``.sources`` directly)."""
    return str(source).startswith(HF_PREFIX) or Path(str(source)).expanduser().is_dir()


def parse_hf_name(source: str, split: str | None, subset: str | None) -> tuple[str, str | None, str]:
    """``hf:org/name[:config][:split]`` -> (name, config, split); the fields fill what it omits."""
    parts = source[len(HF_PREFIX):].split(":")
    name = parts[0]
    if not name or len(parts) > 3 or any(not part for part in parts):
        raise ValueError(f"data.source {source!r}: expected hf:org/name, hf:org/name:split or "
                         "hf:org/name:config:split")
    named_subset = parts[1] if len(parts) == 3 else None
    named_split = parts[-1] if len(parts) >= 2 else None
    for what, named, given in (("split", named_split, split), ("subset", named_subset, subset)):
        if named and given and named != given:
            raise ValueError(f"data.source {source!r} names {what} {named!r}, data.{what} is {given!r}")
    return name, named_subset or subset, named_split or split or "train"


def load_hf_dataset(source: str | Path, split: str | None = None, subset: str | None = None):
    """(a ``datasets.Dataset``, the name errors use for it)."""
    try:
        import datasets
    except ImportError as exc:  # a dependency; kept lazy because it is heavy to import
        raise ImportError("Hugging Face data sources need the datasets package: pip install datasets") from exc
    text = str(source)
    if text.startswith(HF_PREFIX):
        name, config, split_name = parse_hf_name(text, split, subset)
        dataset = datasets.load_dataset(name, config, split=split_name)
        return dataset, f"{text if text.count(':') > 1 else text + ':' + split_name}"
    path = Path(text).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split_name = split or "train"
            if split_name not in loaded:
                raise ValueError(f"{path}: no split {split_name!r} (has {sorted(loaded)})")
            return loaded[split_name], f"{path}[{split_name}]"
        if split:
            raise ValueError(f"{path}: a single saved dataset has no splits; unset data.split")
        return loaded, str(path)
    split_name = split or "train"
    return datasets.load_dataset(str(path), subset, split=split_name), f"{path}[{split_name}]"


def iter_rows(dataset: Any, offset: int = 0, max_records: int | None = None) -> Iterator[tuple[int, str, Any]]:
    """(row number, "row N", row dict) for rows ``[offset, offset + max_records)``."""
    stop = len(dataset) if max_records is None else min(len(dataset), offset + max_records)
    for start in range(offset, stop, 512):
        batch = dataset[start:min(stop, start + 512)]
        for i in range(min(512, stop - start)):
            yield start + i, f"row {start + i}", {key: values[i] for key, values in batch.items()}
