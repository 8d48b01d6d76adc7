"""Training data for drafters: chat records -> target-tokenised samples with a loss mask.

Ray-free, so it can be used (and tested) on its own:

* :mod:`.sources` streams ShareGPT / OpenAI-messages records from JSON, JSONL or Parquet and
  validates them (:class:`DataError` names the file, record and field);
* :mod:`.render` applies the target's chat template and marks the assistant tokens;
* :mod:`.cache` builds the tokenised Parquet cache and serves it as a torch ``Dataset``;
* :mod:`.mixing` adds training-only extra sources to the main training split;
* :mod:`.batches` orders them into resumable batches (``BatchOrder``: batch ``i`` from the seed).

Typical use::

    dataset, stats = build_dataset("sharegpt", tokenizer, max_records=1000, on_error="skip")
    train, evaluation = split_dataset(dataset, eval_fraction=0.05, seed=0)
    counts = supervised_token_counts(train, len(tokenizer))
    loader = DataLoader(train, batch_size=8, collate_fn=partial(collate, pad_id=pad_id))
"""

from .cache import (
    TokenizedDataset,
    build_dataset,
    cache_key,
    collate,
    split_dataset,
    supervised_token_counts,
)
from .mixing import TrainingMix, mix_training_data
from .render import ChatRenderer, ChatTemplateError, Encoded, RenderError, template_token_ids
from .sources import (
    SHAREGPT_ALIAS,
    Conversation,
    DataError,
    ReadStats,
    read_conversations,
    resolve_source,
)

__all__ = [
    "SHAREGPT_ALIAS",
    "ChatRenderer",
    "ChatTemplateError",
    "Conversation",
    "DataError",
    "Encoded",
    "ReadStats",
    "RenderError",
    "TokenizedDataset",
    "TrainingMix",
    "build_dataset",
    "cache_key",
    "mix_training_data",
    "collate",
    "read_conversations",
    "resolve_source",
    "split_dataset",
    "supervised_token_counts",
    "template_token_ids",
]
