#!/usr/bin/env bash
# Issue 17 on one GPU (device machine, offline kit staged under /tmp/kit), in one call:
#   bash bench/gpu_issue17.sh OUT_DIR [gto|all]
# 1. bench/throughput.py (prefill, warm drafter, GTO, Draft-OPD, SFT[, single, Ray with "all"]);
# 2. bench/gto_throughput.py on the warm drafter: the target as FusedLlama (default) vs FastLlama
#    (gto.target_forward=fast, the forward before 2026-12-01), two chunkings, and a torch.profiler
#    table of one batch.
# Data: .kit/data/sharegpt_6k.jsonl.gz (bench/make_sharegpt_slice.py). At most 8 files land in OUT_DIR.
# TP_ARGS: more bench/throughput.py flags, e.g. TP_ARGS="--train-batch 32 --grad-accum 1" (rollouts of
# 32 sequences: the standalone GTO bench builds 32 in about the time an actor builds 8 while sharing).
set -uo pipefail
out=${1:?OUT_DIR}; which=${2:-gto}
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 NCCL_NVLS_ENABLE=0
mkdir -p "$out"
[ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
data=(--target /tmp/kit/smollm2.gguf --data /tmp/sharegpt_6k.jsonl)
if [ "$which" = all ]; then
  python3 bench/throughput.py "${data[@]}" --out /tmp/tp --total-minutes 6.5 --ray-modes async ${TP_ARGS:-} > "$out/throughput.log" 2>&1
else
  python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill,gto,opd,sft --total-minutes 3 ${TP_ARGS:-} > "$out/throughput.log" 2>&1
fi
cp /tmp/tp/summary.json "$out/throughput_summary.json"; cp /tmp/tp/README.md "$out/throughput_README.md"
python3 bench/gto_throughput.py "${data[@]}" --drafter /tmp/tp/warm_drafter --max-records 600 --batch-sizes 32 \
  --chunks 32x8,32x16 --precisions bf16 --old-batch-size 0 --profile --out /tmp/gto > "$out/gto.log" 2>&1
python3 bench/gto_throughput.py "${data[@]}" --drafter /tmp/tp/warm_drafter --max-records 600 --batch-sizes 32 \
  --chunks 32x16 --precisions bf16 --old-batch-size 0 --set gto.target_forward=fast --out /tmp/gto_fast >> "$out/gto.log" 2>&1
cp /tmp/gto/gto_throughput.json "$out/"; cp /tmp/gto/gto_throughput.md "$out/"
cp /tmp/gto_fast/gto_throughput.json "$out/gto_throughput_fast_target.json"
cp /tmp/gto/*profile*.txt "$out/" 2>/dev/null
ls -la "$out"
