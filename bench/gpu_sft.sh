#!/usr/bin/env bash
# EAGLE-3 SFT of a SmolLM2 drafter on one GPU (the device machine, offline kit staged under /tmp/kit).
#   bash bench/gpu_sft.sh OUT_DIR MINUTES [extra --set overrides...]
# Data: a 6.5k-conversation ShareGPT slice carried as .kit/data/sharegpt_6k.jsonl.gz
# (made by bench/make_sharegpt_slice.py). Writes the run under /tmp/runs/sft and copies
# metrics, curves and the exported drafter (split into <16 MiB parts) to OUT_DIR.
set -euo pipefail
out=${1:?OUT_DIR}; minutes=${2:?MINUTES}; shift 2
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
[ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
resume=""; [ -f /tmp/runs/sft/checkpoints/latest ] && resume="--resume"
python3 -m pipeline.train --config configs/sft_smollm2.yaml $resume --minutes-this-run "$minutes" \
  --set target.model=/tmp/kit/smollm2.gguf --set data.source=/tmp/sharegpt_6k.jsonl \
  --set output_dir=/tmp/runs/sft "$@"
mkdir -p "$out"
cp /tmp/runs/sft/metrics.jsonl /tmp/runs/sft/curves.png /tmp/runs/sft/config.yaml "$out"/
cp /tmp/runs/sft/drafter/config.json "$out"/drafter_config.json
split -b 15M -d /tmp/runs/sft/drafter/model.safetensors "$out"/drafter.safetensors.part
ls -la "$out"
