#!/usr/bin/env bash
# Equal-compute comparison from one SFT drafter on one GPU (device machine, kit under /tmp/kit):
#   bash bench/gpu_rl_compare.sh train OUT_DIR MINUTES SFT_DRAFTER   # three arms, MINUTES each
#   bash bench/gpu_rl_compare.sh eval OUT_DIR NUM_PROMPTS SFT_DRAFTER  # tau of start + arms, T=0
# Arms: sft (EAGLE-3 loss continued), gto (configs/gto_smollm2.yaml), opd (configs/opd_smollm2.yaml);
# the same lr, warm-up and data for all, each trained for the same wall-clock minutes.
set -euo pipefail
stage=${1:?train|eval}; out=${2:?OUT_DIR}; arg=${3:?}; start=${4:?SFT_DRAFTER}
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
mkdir -p "$out"
[ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
common=(--set target.model=/tmp/kit/smollm2.gguf --set data.source=/tmp/sharegpt_6k.jsonl
        --set drafter.init_from="$start" --set seed=1)
if [ "$stage" = train ]; then
  for arm in sft gto opd; do
    case $arm in
      sft) config=configs/gto_smollm2.yaml; extra=(--set training.objective=sft) ;;
      gto) config=configs/gto_smollm2.yaml; extra=() ;;
      opd) config=configs/opd_smollm2.yaml; extra=() ;;
    esac
    python3 -m pipeline.train --config "$config" --minutes-this-run "$arg" "${common[@]}" \
      --set output_dir=/tmp/runs/$arm "${extra[@]}" 2>&1 | tail -n 25 | tee "$out/train_$arm.log"
    cp /tmp/runs/$arm/metrics.jsonl "$out/metrics_$arm.jsonl"
  done
else
  python3 bench/compare_drafters.py --target /tmp/kit/smollm2.gguf --out "$out" --num-prompts "$arg" \
    start="$start" sft=/tmp/runs/sft/drafter gto=/tmp/runs/gto/drafter \
    opd=/tmp/runs/opd/drafter 2>&1 | tee "$out/compare.log"
fi
