"""``python -m pipeline.train --config ...``: the job entry point (what ``ray job submit`` runs).

It is ``draftrl train`` (``tools.cli``) under the module name the cluster manifests and job
commands use; nothing imports this module.
"""

import sys

from tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
