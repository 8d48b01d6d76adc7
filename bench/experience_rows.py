"""How much of an SFT/GTO experience's teacher-forced logits an actor ships (CPU, no model).

    python bench/experience_rows.py --data /tmp/sharegpt_6k.jsonl [--max-length 1024] [--batch-sizes 8,32]

Packs the bench's own batches (``bench.gto_throughput.sample_batches``, seed 0) the way a rollout
actor does (``SFTExperience.packed``: the rows training-time test reads, the position before each
supervised token) and prints, per batch size, the shipped share of the [B, T] logit rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench.gto_throughput import sample_batches  # noqa: E402
from speculative.data import build_dataset  # noqa: E402
from speculative.experience import SFTExperience  # noqa: E402
from speculative.target import default_cache_dir, load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ShareGPT/OpenAI chat JSONL")
    parser.add_argument("--target", default="smollm2", help="whose tokenizer and chat template")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-records", type=int, default=600)
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    cache = default_cache_dir()
    tokenizer = load_tokenizer(args.target, cache)
    dataset, _ = build_dataset(args.data, tokenizer, max_length=args.max_length, max_records=args.max_records,
                               on_error="skip", cache_dir=cache / "data", progress=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for size in (int(b) for b in args.batch_sizes.split(",")):
        shares = []
        for batch in sample_batches(dataset, pad, size, args.batches, seed=0):
            rows, length = batch["input_ids"].shape
            empty = torch.zeros(rows, length, 0)
            experience = SFTExperience(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                       empty, empty, batch["input_ids"])
            shares.append(int(experience.rows_read().sum()) / (rows * length))
        print(f"batch {size}: shipped share of logit rows per batch "
              f"{', '.join(f'{x:.3f}' for x in shares)} (mean {sum(shares) / len(shares):.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
