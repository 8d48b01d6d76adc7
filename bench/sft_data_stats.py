"""What an SFT config trains on, measured on CPU without a GPU: the training mix (``data.extra_sources``)
and how much of its right-padded batches is real tokens, in the plain shuffled order and grouped by
length (``training.group_by_length``), over one epoch.

    DRAFTRL_CACHE=/tmp/qwcache python bench/sft_data_stats.py --config configs/sft_qwen_coder.yaml \
        --set data.source=/tmp/regen_qwen/committed.parquet --set 'data.extra_sources=[/tmp/code_mix.jsonl]'

Tokenising is cached (``DRAFTRL_CACHE/data``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.trainer import load_datasets  # noqa: E402
from speculative.config import load_config  # noqa: E402
from speculative.data.batches import BatchOrder  # noqa: E402
from speculative.target import default_cache_dir, load_tokenizer  # noqa: E402


def padding(lengths: np.ndarray, batch_size: int, seed: int, grouped: bool) -> dict[str, float]:
    """Real tokens and padded slots (batch size x the longest sample) of one epoch's batches."""
    order = BatchOrder(len(lengths), batch_size, seed, lengths=lengths if grouped else None)
    batches = [lengths[order.indices(i)] for i in range(order.batches_per_epoch)]
    real, slots = sum(int(b.sum()) for b in batches), sum(batch_size * int(b.max()) for b in batches)
    return {"batches": len(batches), "real_tokens": real, "slots": slots, "real_share": round(real / slots, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="config override, as in draftrl train")
    args = parser.parse_args(argv)
    config = load_config(args.config, [f"output_dir={tempfile.mkdtemp()}", *args.set])
    with contextlib.redirect_stdout(sys.stderr):  # the loader's progress lines; stdout is the JSON
        train, evaluation, stats = load_datasets(config, load_tokenizer(config.target.model), default_cache_dir())
    lengths = np.asarray(train.lengths)
    report = {
        "training_mix": stats.get("training_mix"),
        "train_samples": len(train), "held_out_samples": len(evaluation),
        "padding": {name: padding(lengths, config.training.batch_size, config.seed, grouped)
                    for name, grouped in (("shuffled", False), ("grouped_by_length", True))},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
