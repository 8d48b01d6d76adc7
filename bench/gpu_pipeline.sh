#!/usr/bin/env bash
# The Ray pipeline on the GPU machine (kit staged under /tmp/kit), GTO and Draft-OPD, sync and async:
#   bash bench/gpu_pipeline.sh colocated OUT MINUTES SFT_DRAFTER [gto,opd]  # one GPU: learner 0.4 + 2 rollout actors 0.3
#   bash bench/gpu_pipeline.sh separate  OUT MINUTES SFT_DRAFTER   # two GPUs: learner on one, rollout actor on the other (NCCL)
# Every run: 1 learner rank, grad_accum 2 (two experiences per update), max_staleness 1 in async mode.
set -euo pipefail
layout=${1:?colocated|separate}; out=${2:?OUT_DIR}; minutes=${3:?MINUTES}; start=${4:?SFT_DRAFTER}
runs=(); for objective in $(echo "${5:-gto,opd}" | tr , ' '); do runs+=(--run "$objective=configs/${objective}_smollm2.yaml"); done
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 RAY_DEDUP_LOGS=0 NCCL_NVLS_ENABLE=0
[ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
common=(--set target.model=/tmp/kit/smollm2.gguf --set data.source=/tmp/sharegpt_6k.jsonl
        --set drafter.init_from="$start" --set seed=1 --set training.grad_accum=2
        --set distributed.num_learners=1 --set distributed.max_staleness=1 --set distributed.cpus_per_actor=2)
case $layout in
  colocated) place=(--num-gpus 1 --set distributed.placement=colocated --set distributed.num_rollout_actors=2
                    --set distributed.gpus_per_learner=0.4 --set distributed.gpus_per_rollout_actor=0.3) ;;
  separate)  place=(--num-gpus 2 --set distributed.placement=separate --set distributed.num_rollout_actors=1
                    --set distributed.gpus_per_learner=1 --set distributed.gpus_per_rollout_actor=1) ;;
  *) echo "layout: colocated|separate" >&2; exit 2 ;;
esac
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpus.txt" || true
python3 bench/pipeline_bench.py "${runs[@]}" \
  --out "$out" --modes sync,async --minutes "$minutes" --label "$layout" "${common[@]}" "${place[@]}" \
  > "$out/log.txt" 2>&1 || { tail -n 60 "$out/log.txt"; exit 1; }
grep -E "^\[draftrl\] (step|Ray)|^\|" "$out/log.txt" | tail -n 60
