#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct on the GPU machine, after bench/stage_qwen.sh staged and converted it
# (bench/README.md has the call sequence). From the repo root:
#
#   bash bench/gpu_qwen.sh regen MINUTES [regenerate flags]   # the target's answers to .kit/data/code_mix.jsonl.gz
#   bash bench/gpu_qwen.sh sft OUT_DIR MINUTES [--set ...]    # EAGLE-3 SFT on them (resumes), results to OUT_DIR
#
# Both resume where the previous call stopped (regenerate by shard, training by checkpoint), so a
# run longer than one 10-minute call is several calls on the same warm machine.
set -euo pipefail
export DRAFTRL_CACHE=${DRAFTRL_CACHE:-/tmp/draftrl_cache} PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 \
  TQDM_MININTERVAL=30
case "${1:-}" in
  regen)
    minutes=${2:?MINUTES}; shift 2
    [ -f /tmp/code_mix.jsonl ] || gunzip -c .kit/data/code_mix.jsonl.gz > /tmp/code_mix.jsonl
    timeout --signal=INT "$(python3 -c "print(int($minutes * 60))")" \
      python3 -m tools.cli regenerate --engine batched --source /tmp/code_mix.jsonl --out /tmp/regen_qwen \
        --target qwen2.5-coder-1.5b --max-tokens 768 --max-model-len 2048 --max-num-seqs 128 \
        --shard-size 256 --temperature 0.7 "$@" && rc=0 || rc=$?
    if [ "$rc" -eq 124 ]; then echo "stopped after $minutes min: the same call resumes at the next shard"
    elif [ "$rc" -ne 0 ]; then exit "$rc"; fi ;;
  sft)
    out=${2:?OUT_DIR}; minutes=${3:?MINUTES}; shift 3
    [ -f /tmp/regen_qwen/regenerated.parquet ] || { echo "no regenerated data: run regen first" >&2; exit 1; }
    resume=""; [ -f /tmp/runs/sft_qwen/checkpoints/latest ] && resume="--resume"
    python3 -m pipeline.train --config configs/sft_qwen_coder.yaml $resume --minutes-this-run "$minutes" \
      --set data.source=/tmp/regen_qwen/regenerated.parquet --set output_dir=/tmp/runs/sft_qwen "$@"
    mkdir -p "$out"
    cp /tmp/runs/sft_qwen/metrics.jsonl /tmp/runs/sft_qwen/config.yaml "$out"/
    cp /tmp/runs/sft_qwen/curves.png "$out"/ 2>/dev/null || true
    if [ -f /tmp/runs/sft_qwen/drafter/model.safetensors ]; then
      cp /tmp/runs/sft_qwen/drafter/config.json "$out"/drafter_config.json
      split -b 15M -d /tmp/runs/sft_qwen/drafter/model.safetensors "$out"/drafter.safetensors.part
    fi
    ls -la "$out" ;;
  *) echo "usage: gpu_qwen.sh regen MINUTES [flags] | sft OUT_DIR MINUTES [--set ...]" >&2; exit 2 ;;
esac
