"""Pre-tokenised rows (``input_ids`` + ``loss_mask``): SpecForge's and speculators' prepared data.

Both tools can hand over samples that are already token ids with a loss mask (speculators'
``prepare_data`` writes them with ``datasets.save_to_disk``; SpecForge's ``prompts_path`` is JSONL of
them). They skip draftrl's chat template, so each row is validated instead: both fields present,
integer lists of the same length, ids inside the target's vocabulary, a 0/1 mask. A bad row raises
``DataError`` naming the source, the row and the field (or is skipped and counted by reason).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .render import Encoded
from .sources import TOKEN_FIELDS, DataError


def _as_array(value: Any) -> np.ndarray | None:
    if hasattr(value, "detach"):  # a torch tensor (datasets' torch format)
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    if array.ndim == 2 and array.shape[0] == 1:  # [1, T], as some feature files store it
        array = array[0]
    return array


def validate_tokens(raw: Any, source: str, where: str, vocab_size: int, max_length: int) -> Encoded:
    """One row -> ``Encoded`` (truncated to ``max_length``), or ``DataError`` naming what is wrong."""

    def fail(field: str | None, reason: str, detail: str) -> DataError:
        return DataError(source, where, field, reason, detail)

    if not isinstance(raw, dict):
        raise fail(None, "not_an_object", f"row is a {type(raw).__name__}, not an object")
    arrays = {}
    for name in TOKEN_FIELDS:
        if raw.get(name) is None:
            raise fail(name, "missing_field", f"row has no '{name}'")
        array = _as_array(raw[name])
        if array is None or array.ndim != 1:
            raise fail(name, "bad_tokens", f"'{name}' is not a flat list of integers")
        if array.size and array.dtype.kind not in "iub":
            if array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0):
                array = array.astype(np.int64)  # e.g. JSON numbers written as 1.0
            else:
                raise fail(name, "bad_tokens", f"'{name}' holds {array.dtype} values, not integers")
        arrays[name] = array.astype(np.int64)
    ids, mask = arrays["input_ids"], arrays["loss_mask"]
    if len(ids) != len(mask):
        raise fail("loss_mask", "length_mismatch", f"{len(mask)} loss_mask entries for {len(ids)} input_ids")
    if len(ids) == 0:
        raise fail("input_ids", "empty_conversation", "row has no tokens")
    bad = np.nonzero((ids < 0) | (ids >= vocab_size))[0]
    if len(bad):
        raise fail("input_ids", "token_out_of_range", f"input_ids[{bad[0]}] = {ids[bad[0]]} is outside the target "
                   f"vocabulary of {vocab_size} (tokenised for another model?)")
    bad = np.nonzero((mask != 0) & (mask != 1))[0]
    if len(bad):
        raise fail("loss_mask", "bad_mask", f"loss_mask[{bad[0]}] = {mask[bad[0]]}, not 0 or 1")
    return Encoded(ids[:max_length].tolist(), mask[:max_length].tolist(), len(ids) > max_length)
