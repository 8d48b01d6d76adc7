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
#
# Resuming on a FRESH machine (the study outlives one machine hold; docs/results.md, "Study v2"):
#   bash bench/gpu_study.sh pack-state "$OUT" RUN FIRST   # RUN's latest checkpoint, parts FIRST..FIRST+3
#       (15 MiB each, <= 60 MiB per call; call again with FIRST+4 until it prints "last part")
#   ... next machine: carry .kit/study.tgz (from `pack`) and .kit/state (parts of one or more runs,
#   <= 64 MiB per call); each call's carried parts are collected under /tmp/state_parts, and a run
#   is restored into the study once all its parts (RUN.state.count) have arrived:
#   bash bench/gpu_study.sh unpack-state
# STUDY_FILE (default experiments/smollm2_study.yaml) and STUDY_DIR (default /tmp/study) select the study.
set -uo pipefail
stage=${1:?train|eval|pack|pack-state|unpack-state}
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
study_dir=${STUDY_DIR:-/tmp/study}
study=(--study "${STUDY_FILE:-experiments/smollm2_study.yaml}" --out "$study_dir" --start /tmp/drafter_sft)
part_mib=15
parts_per_call=4

restore_study() {  # a fresh machine: the study's states and results (no weights) from `pack`
  if [ ! -d "$study_dir" ] && [ -f .kit/study.tgz ]; then
    mkdir -p "$(dirname "$study_dir")" && tar xzf .kit/study.tgz -C "$(dirname "$study_dir")" \
      && echo "[gpu_study] restored $study_dir from .kit/study.tgz"
  fi
}

collect_state() {  # gather this call's carried parts; restore every run whose parts are complete
  mkdir -p /tmp/state_parts
  [ -d .kit/state ] && cp -n .kit/state/* /tmp/state_parts/ 2>/dev/null
  for count in /tmp/state_parts/*.state.count; do
    [ -f "$count" ] || continue
    run=$(basename "$count" .state.count)
    have=$(ls /tmp/state_parts/"$run".state.tar.part-* 2>/dev/null | wc -l)
    need=$(cat "$count")
    if [ "$have" -lt "$need" ]; then echo "[gpu_study] $run: $have of $need state parts so far"; continue; fi
    [ -f "$study_dir/runs/$run/checkpoints/latest" ] && { echo "[gpu_study] $run: checkpoint already here"; continue; }
    mkdir -p "$study_dir/runs/$run"
    if cat /tmp/state_parts/"$run".state.tar.part-* | tar xf - -C "$study_dir/runs/$run"; then
      echo "[gpu_study] $run: checkpoint $(cat "$study_dir/runs/$run/checkpoints/latest") restored"
    else
      echo "[gpu_study] $run: state parts do not form a tar" >&2; exit 1
    fi
  done
}

case $stage in
  train|eval)
    minutes=${2:?MINUTES}; shift 2
    [ -d /tmp/drafter_sft ] || cp -r .kit/drafter_sft /tmp/drafter_sft
    [ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
    restore_study
    collect_state
    python3 -m experiments.study "$stage" "${study[@]}" --minutes "$minutes" "$@"
    code=$?
    python3 -m experiments.study report "${study[@]}" >/dev/null 2>&1 && cat "$study_dir/report/results.md"
    exit $code ;;
  pack)
    out=${2:?OUT}; run=${3:-}
    tar czf "$out/study.tgz" --exclude=checkpoints --exclude='*.safetensors' -C "$(dirname "$study_dir")" "$(basename "$study_dir")"
    if [ -n "$run" ]; then
      tar cf - -C "$study_dir/runs/$run" drafter | split -b ${part_mib}M -d - "$out/$run.drafter.tar.part-"
    fi
    ls -la "$out" ;;
  pack-state)
    out=${2:?OUT}; run=${3:?RUN}; first=${4:-0}
    staged=/tmp/state_out/$run
    if [ "$first" = 0 ] || [ ! -d "$staged" ]; then  # split the latest checkpoint once
      rm -rf "$staged" && mkdir -p "$staged"
      latest=$(cat "$study_dir/runs/$run/checkpoints/latest") || exit 1
      tar cf - -C "$study_dir/runs/$run" checkpoints/latest "checkpoints/$latest" \
        | split -b ${part_mib}M -d -a 3 - "$staged/$run.state.tar.part-"
      ls "$staged"/*.part-* | wc -l > "$staged/$run.state.count"
    fi
    total=$(cat "$staged/$run.state.count")
    cp "$staged/$run.state.count" "$out/"
    for ((i = first; i < first + parts_per_call && i < total; i++)); do
      cp "$staged/$run.state.tar.part-$(printf %03d "$i")" "$out/"
    done
    if [ $((first + parts_per_call)) -ge "$total" ]; then echo "[gpu_study] $run: last part ($total in all)"
    else echo "[gpu_study] $run: parts $first..$((first + parts_per_call - 1)) of $total: call again with $((first + parts_per_call))"; fi
    ls -la "$out" ;;
  unpack-state)
    restore_study
    collect_state ;;
  *) echo "usage: bash bench/gpu_study.sh train|eval MINUTES [--set ...] | pack OUT [RUN] | pack-state OUT RUN [FIRST] | unpack-state" >&2; exit 2 ;;
esac
