#!/usr/bin/env bash
# The one speed-up benchmark on the device machine (offline kit under /tmp/kit, as bench/gpu_sft.sh):
# all 80 questions of MT-Bench, HumanEval and GSM8K, T = 0, 3 repeats in one process, tree engine vs
# the fastest batch-1 AR, through speculative.timing.measure_speedup. From the repo root:
#
#   bash bench/one_bench.sh NAME --drafter DIR [--max-minutes 9]
#   bash bench/one_bench.sh NAME --train-steps 600 --train-minutes 3 --max-new-tokens 64 --max-minutes 9.5
#
# --train-steps reads a ShareGPT slice as JSONL (--data, default /tmp/sharegpt_6k.jsonl, unpacked here
# from .kit/data/sharegpt_6k.jsonl.gz when that exists). Writes bench/results/NAME/summary.{json,md}
# (after every repeat) and log.txt; any other flag goes to bench/one_bench.py (see its --help).
set -euo pipefail
name=${1:?NAME}; shift
export PYTHONPATH=/tmp/kit/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
[ -f /tmp/sharegpt_6k.jsonl ] || [ ! -f .kit/data/sharegpt_6k.jsonl.gz ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
out=bench/results/$name; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.version.cuda)"
python3 bench/one_bench.py --name "$name" "$@" 2>&1 | tee "$out/log.txt"
