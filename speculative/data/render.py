"""Rendering conversations with the target's chat template into token ids and a loss mask.

The drafter must learn what the *target* generates, so ``loss_mask`` is 1 exactly on assistant
tokens - each answer's content and the end-of-turn token that closes it (``<|im_end|>`` in
ChatML) - and 0 on system/user turns, on any default system prompt the template injects, and on
the assistant header (``<|im_start|>assistant\\n``), which the serving engine writes, not the model.

How the spans are found works for any template that renders history stably, without knowing the
template: for each assistant turn ``i``,

* ``render(messages[:i], add_generation_prompt=True)`` ends exactly where the answer starts
  (the header is part of the generation prompt), and
* ``render(messages[:i+1])`` ends after the turn; within it the answer ends at the content plus
  the special token that follows it (whitespace allowed in between), not at the separator
  (``\\n``) the template appends after that token.

When a template renders a turn differently once later turns follow it (Qwen3 adds an empty
``<think>`` block to the last answer only), the content itself is searched for in the full
rendering instead. The full text is then tokenised once with character offsets, so the ids are
exactly those of ``apply_chat_template(messages, tokenize=True)``, and a token is supervised when
its characters overlap an answer span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

Span = tuple[int, int]  # [start, end) character offsets into the rendered text


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chats the way this pipeline needs."""


class RenderError(ValueError):
    """One conversation could not be rendered (the template raised, or rewrote its answers)."""


@dataclass
class Encoded:
    """One tokenised conversation (already truncated to ``max_length``)."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool

    @property
    def supervised(self) -> int:
        return sum(self.loss_mask)


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def as_token_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list or (transformers 5) a BatchEncoding."""
    if hasattr(encoded, "keys") and "input_ids" in encoded.keys():
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        (encoded,) = encoded
    return [int(t) for t in encoded]


def template_token_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids the tokenizer's own ``apply_chat_template`` produces (a reference for checks)."""
    return as_token_ids(tokenizer.apply_chat_template(list(messages), tokenize=True))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    """Turns normalised messages into (ids, loss mask) with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer '{tokenizer_name(tokenizer)}' has no chat template; refusing to guess "
                "one (set tokenizer.chat_template to the template the target was trained with)"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError(
                f"tokenizer '{tokenizer_name(tokenizer)}' is not a fast tokenizer; the loss mask "
                "needs character offsets (return_offsets_mapping)"
            )
        self.tokenizer = tokenizer
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(token, "special", False):
                specials.add(str(token.content))
        specials.discard("")
        alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        # The end-of-turn token: a special token right after the answer (whitespace allowed).
        self._end_of_turn = re.compile(rf"\s*(?:{alternatives})") if specials else None

    def _render(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _answer_end(self, text: str, content_end: int) -> int:
        match = self._end_of_turn.match(text, content_end) if self._end_of_turn else None
        return match.end() if match else content_end

    def render_text(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans of its answers."""
        try:
            full = self._render(messages)
            spans = []
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                content = message["content"].strip()
                prefix = self._render(messages[:i], generation_prompt=True)
                if full.startswith(prefix):
                    start = len(prefix)
                    turn = self._render(messages[: i + 1])
                    stop = len(turn) if full.startswith(turn) else len(full)
                    found = full.find(content, start, stop)
                    if found >= 0:
                        end = self._answer_end(full, found + len(content))
                    else:  # the template rewrote the answer: supervise the whole turn
                        end = start + len(full[start:stop].rstrip())
                else:
                    found = full.find(content, _common_prefix(prefix, full))
                    if found < 0:
                        raise RenderError(
                            f"assistant turn {i}: the chat template rewrites the answer and its "
                            "generation prompt is not a prefix of the rendered chat"
                        )
                    start, end = found, self._answer_end(full, found + len(content))
                spans.append((start, end))
        except RenderError:
            raise
        except Exception as exc:  # jinja raises for chats it rejects (e.g. roles not alternating)
            raise RenderError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        return full, spans

    def encode_texts(
        self, texts: Sequence[str], spans: Sequence[list[Span]], max_length: int
    ) -> list[Encoded]:
        """Tokenise rendered texts in one (parallel) call and mark tokens inside answer spans."""
        if not texts:
            return []
        batch = self.tokenizer(
            list(texts), add_special_tokens=False, return_offsets_mapping=True
        )
        out = []
        for ids, offsets, answer_spans in zip(batch["input_ids"], batch["offset_mapping"], spans):
            bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(ids), dtype=bool)
            for start, end in answer_spans:  # a token is supervised if it overlaps an answer
                mask |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
            out.append(Encoded(
                list(ids[:max_length]), mask[:max_length].astype(int).tolist(), len(ids) > max_length
            ))
        return out

    def render(self, messages: Sequence[dict[str, str]], max_length: int = 2048) -> Encoded:
        """One conversation, end to end."""
        text, spans = self.render_text(messages)
        return self.encode_texts([text], [spans], max_length)[0]
