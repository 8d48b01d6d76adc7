"""Tools, the top layer: the ``draftrl`` CLI, the tau/speed-up benchmark, the vLLM check and
agreement tools, and dataset regeneration through vLLM.

They use the core, the workers and the pipeline; none of those imports them, except the job
entry point ``pipeline/train.py``, which parses its flags with the CLI.
"""
