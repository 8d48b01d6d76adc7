"""Write the first N valid ShareGPT conversations as gzipped OpenAI-messages JSONL.

The GPU machine has no network and takes 64 MiB per call, so training data travels as this
slice (``python bench/make_sharegpt_slice.py .kit/data/sharegpt_6k.jsonl.gz 6600``).
"""

import gzip
import json
import sys

from speculative.data import ReadStats, read_conversations, resolve_source


def main(out_path: str, max_records: int) -> None:
    stats = ReadStats()
    with resolve_source("sharegpt") as path, gzip.open(out_path, "wt") as out:
        for conversation in read_conversations(path, max_records=max_records, on_error="skip", stats=stats):
            out.write(json.dumps({"messages": conversation.messages}) + "\n")
    print(f"{out_path}: {stats}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
