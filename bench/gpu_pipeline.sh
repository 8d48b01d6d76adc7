#!/usr/bin/env bash
# The Ray pipeline on the GPU machine (kit staged under /tmp/kit), GTO and Draft-OPD, sync and async:
#   bash bench/gpu_pipeline.sh colocated OUT MINUTES SFT_DRAFTER [gto,opd]  # one GPU: learner 0.4 + 2 rollout actors 0.3
#   bash bench/gpu_pipeline.sh separate  OUT MINUTES SFT_DRAFTER   # two GPUs: learner on one, rollout actor on the other (NCCL)
# Layout sizes (optional; the defaults are the two layouts above):
#   ACTORS=1 ... colocated ...                       # one rollout actor: its speed alone on the GPU (sync rollouts)
#   LEARNERS=L ACTORS=A ... separate ...             # L learner GPUs + A rollout GPUs, NCCL broadcast
#   LEARNERS=L ACTORS=A ACTORS_PER_GPU=2 ... separate ...  # two actors per rollout GPU (object-store broadcast:
#                                                    # NCCL refuses two ranks on one device); L + A/2 GPUs
# Every run: grad_accum 2 per learner rank (2 x LEARNERS experiences per update), max_staleness 1 in async mode.
set -euo pipefail
layout=${1:?colocated|separate}; out=${2:?OUT_DIR}; minutes=${3:?MINUTES}; start=${4:?SFT_DRAFTER}
learners=${LEARNERS:-1}; per_gpu=${ACTORS_PER_GPU:-1}
runs=(); for objective in $(echo "${5:-gto,opd}" | tr , ' '); do runs+=(--run "$objective=configs/${objective}_smollm2.yaml"); done
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 RAY_DEDUP_LOGS=0 NCCL_NVLS_ENABLE=0
[ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
common=(--set target.model=/tmp/kit/smollm2.gguf --set data.source=/tmp/sharegpt_6k.jsonl
        --set drafter.init_from="$start" --set seed=1 --set training.grad_accum=2
        --set distributed.num_learners="$learners" --set distributed.max_staleness=1 --set distributed.cpus_per_actor=2)
case $layout in
  colocated) actors=${ACTORS:-2}; label=colocated
             case "$learners/$per_gpu/$actors" in 1/1/2) ;; 1/1/1) label=colocated_A1 ;;
               *) echo "colocated: LEARNERS=1, ACTORS=1|2, ACTORS_PER_GPU=1 (one GPU)" >&2; exit 2 ;; esac
             place=(--num-gpus 1 --set distributed.placement=colocated --set distributed.num_rollout_actors="$actors"
                    --set distributed.gpus_per_learner=0.4 --set distributed.gpus_per_rollout_actor=0.3) ;;
  separate)  actors=${ACTORS:-1}
             case $per_gpu in
               1) share=1; backend=auto ;;
               2) share=0.5; backend=object_store ;;
               *) echo "separate: ACTORS_PER_GPU=1|2" >&2; exit 2 ;;
             esac
             gpus=$(( learners + (actors + per_gpu - 1) / per_gpu ))
             label=separate; [ "$learners/$actors/$per_gpu" = 1/1/1 ] || label="separate_L${learners}_A${actors}x${per_gpu}"
             place=(--num-gpus "$gpus" --set distributed.placement=separate --set distributed.num_rollout_actors="$actors"
                    --set distributed.gpus_per_learner=1 --set distributed.gpus_per_rollout_actor="$share"
                    --set distributed.broadcast_backend="$backend") ;;
  *) echo "layout: colocated|separate" >&2; exit 2 ;;
esac
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpus.txt" || true
python3 bench/pipeline_bench.py "${runs[@]}" \
  --out "$out" --modes sync,async --minutes "$minutes" --label "$label" "${common[@]}" "${place[@]}" \
  > "$out/log.txt" 2>&1 || { tail -n 60 "$out/log.txt"; exit 1; }
grep -E "^\[draftrl\] (step|Ray)|^\|" "$out/log.txt" | tail -n 60
