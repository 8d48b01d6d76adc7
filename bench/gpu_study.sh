#!/usr/bin/env bash
# The results study (experiments/smollm2_study.yaml) in GPU slots on the device machine, after
# the offline kit is staged under /tmp/kit (see README, "GPU runs"). The study lives in /tmp/study
# for as long as the machine is held; each call brings back what it needs under OUT:
#   bash bench/gpu_study.sh train 9 [--set FIELD=VALUE ...]   # first call: also unpacks data + start
#   bash bench/gpu_study.sh eval 9 [--set ...]                # again until it prints "every drafter is scored"
#   bash bench/gpu_study.sh pack "$OUT" [RUN]                 # results (no weights) + RUN's drafter in parts
# Carry .kit/drafter_sft and .kit/data with the train call (the benchmark prompts ship in the repo).
# A drafter (47 MB) comes back as 15 MiB parts, one drafter per call (8 files, 64 MiB per call);
# rejoin here with: cat RUN.drafter.tar.part-* | tar xf - -C STUDY/runs/RUN
set -uo pipefail
stage=${1:?train|eval|pack}
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
study=(--study experiments/smollm2_study.yaml --out /tmp/study --start /tmp/drafter_sft)
case $stage in
  train|eval)
    minutes=${2:?MINUTES}; shift 2
    [ -d /tmp/drafter_sft ] || cp -r .kit/drafter_sft /tmp/drafter_sft
    [ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
    python3 -m experiments.study "$stage" "${study[@]}" --minutes "$minutes" "$@"
    code=$?
    python3 -m experiments.study report "${study[@]}" >/dev/null 2>&1 && cat /tmp/study/report/results.md
    exit $code ;;
  pack)
    out=${2:?OUT}; run=${3:-}
    tar czf "$out/study.tgz" --exclude=checkpoints --exclude='*.safetensors' -C /tmp study
    if [ -n "$run" ]; then
      tar cf - -C "/tmp/study/runs/$run" drafter | split -b 15M -d - "$out/$run.drafter.tar.part-"
    fi
    ls -la "$out" ;;
  *) echo "usage: bash bench/gpu_study.sh train|eval MINUTES [--set ...] | pack OUT [RUN]" >&2; exit 2 ;;
esac
