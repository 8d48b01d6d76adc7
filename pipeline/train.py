"""``python -m pipeline.train --config ...``: the job entry point (what ``ray job submit`` runs)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
