#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct on the GPU machine, after bench/stage_qwen.sh staged and converted it
# (bench/README.md has the call sequence). From the repo root:
#
#   bash bench/gpu_qwen.sh regen MINUTES [regenerate flags]   # the target's answers to $CODE_MIX
#   bash bench/gpu_qwen.sh sft OUT_DIR MINUTES [--set ...]    # EAGLE-3 SFT on them (resumes), results to OUT_DIR
#   bash bench/gpu_qwen.sh sft-profile OUT_DIR [--steps N] [--set ...]  # where an SFT step's time goes
#   bash bench/gpu_qwen.sh eval OUT_DIR TEMPERATURE MINUTES [draftrl eval flags]  # tau + speed-up
#     e.g. ... eval $OUT/profile 0 0 --bench humaneval --profile 3   # MINUTES 0: profile.md of a cycle only
#   bash bench/gpu_qwen.sh pack-regen OUT_DIR     # the committed shards, as <=15 MB parts to bring back
#   bash bench/gpu_qwen.sh restore-regen DIR      # (next session, DIR carried) the shards back in place
#   bash bench/gpu_qwen.sh pack-drafter OUT_DIR FIRST [COUNT]  # the SFT drafter, 15 MB parts (4 calls: 0, 4, 8, 12)
#   bash bench/gpu_qwen.sh restore-drafter DIR...  # (next session, a call per carried folder) -> /tmp/drafter_prev
#
# All resume where the previous call stopped (regenerate by shard, training by checkpoint), so a
# run longer than one 10-minute call is several calls on the same warm machine. `regen` starts no
# shard after MINUTES; `sft` trains on every shard committed so far (committed.parquet) until the
# regeneration is complete (regenerated.parquet). CODE_MIX defaults to .kit/qdata/code_mix.jsonl.gz.
set -euo pipefail
export DRAFTRL_CACHE=${DRAFTRL_CACHE:-/tmp/draftrl_cache} PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 \
  TQDM_MININTERVAL=30
case "${1:-}" in
  regen)
    minutes=${2:?MINUTES}; shift 2
    [ -f /tmp/code_mix.jsonl ] || gunzip -c "${CODE_MIX:-.kit/qdata/code_mix.jsonl.gz}" > /tmp/code_mix.jsonl
    # No shard starts after MINUTES (--max-minutes); the timeout is only a safety net for a shard
    # that would overrun the call (killed mid-shard, it is redone next time).
    timeout --signal=INT "$(python3 -c "print(int($minutes * 60 + 150))")" \
      python3 -m tools.cli regenerate --engine batched --source /tmp/code_mix.jsonl --out /tmp/regen_qwen \
        --target qwen2.5-coder-1.5b --max-tokens 768 --max-model-len 2048 --max-num-seqs 256 \
        --shard-size 512 --max-turns 3 --temperature 0.7 --max-minutes "$minutes" "$@" && rc=0 || rc=$?
    if [ "$rc" -eq 124 ]; then echo "killed by the safety timeout: the same call resumes at the next shard"
    elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
    mkdir -p "${OUT:-/tmp}/regen"; cp /tmp/regen_qwen/manifest.json "${OUT:-/tmp}/regen/" ;;
  sft)
    out=${2:?OUT_DIR}; minutes=${3:?MINUTES}; shift 3
    data=/tmp/regen_qwen/regenerated.parquet
    [ -f "$data" ] || data=/tmp/regen_qwen/committed.parquet   # a regeneration stopped by its budget
    [ -f "$data" ] || { echo "no regenerated data: run regen first" >&2; exit 1; }
    resume=""; [ -f /tmp/runs/sft_qwen/checkpoints/latest ] && resume="--resume"
    python3 -m pipeline.train --config configs/sft_qwen_coder.yaml $resume --minutes-this-run "$minutes" \
      --set data.source="$data" --set output_dir=/tmp/runs/sft_qwen "$@"
    mkdir -p "$out"
    cp /tmp/runs/sft_qwen/metrics.jsonl /tmp/runs/sft_qwen/config.yaml "$out"/
    cp /tmp/runs/sft_qwen/curves.png "$out"/ 2>/dev/null || true
    # The 1.5B target's drafter is ~210 MB in bf16, more than a call brings back (about 64 MB):
    # `pack-drafter` brings it back over four calls, for the next session's SFT to start from.
    ls -la "$out" ;;
  sft-profile)
    # bench/sft_profile.py on the sft config and data: sft_profile.md/.json to OUT_DIR (no run is
    # touched: a fresh drafter, or --set drafter.init_from=/tmp/drafter_prev)
    out=${2:?OUT_DIR}; shift 2
    data=/tmp/regen_qwen/regenerated.parquet
    [ -f "$data" ] || data=/tmp/regen_qwen/committed.parquet
    [ -f "$data" ] || { echo "no regenerated data: run regen or restore-regen first" >&2; exit 1; }
    python3 bench/sft_profile.py --config configs/sft_qwen_coder.yaml --set data.source="$data" \
      --set output_dir=/tmp/runs/sft_profile --out "$out" "$@" ;;
  eval)
    out=${2:?OUT_DIR}; temperature=${3:?TEMPERATURE}; minutes=${4:?MINUTES}; shift 4
    bash bench/run_tree_bench.sh /tmp/runs/sft_qwen/drafter qwen2.5-coder-1.5b "$out" \
      --temperature "$temperature" --max-minutes "$minutes" "$@"
    [ -s "$out"/generations.jsonl ] || rm -f "$out"/generations.jsonl   # --max-minutes 0 --profile N: none
    rm -f "$out"/generations.jsonl.gz; gzip -f "$out"/generations.jsonl 2>/dev/null || true ;;
  pack-drafter)
    # The SFT drafter in 15 MB parts, COUNT of them from part FIRST on (FIRST 0 adds the config and
    # the sha256). A call brings back about 64 MB in all (files over it are left out), so 4 parts a
    # call: FIRST 0, 4, 8, 12 for a 1.5B target's 14 parts.
    out=${2:?OUT_DIR}; first=${3:-0}; count=${4:-4}; mkdir -p "$out"
    src=/tmp/runs/sft_qwen/drafter
    # split once per drafter: a later SFT call (same machine) rewrites it, and then it is split again
    now=$(cd "$src" && sha256sum model.safetensors)
    if [ ! -f /tmp/drafter_parts/SHA256 ] || [ "$now" != "$(cat /tmp/drafter_parts/SHA256)" ]; then
      rm -rf /tmp/drafter_parts; mkdir -p /tmp/drafter_parts
      split -b 15M -d -a 2 "$src"/model.safetensors /tmp/drafter_parts/model.safetensors.part
      echo "$now" > /tmp/drafter_parts/SHA256
    fi
    if [ "$first" -eq 0 ]; then cp "$src"/config.json "$out"/drafter_config.json; cp /tmp/drafter_parts/SHA256 "$out"/; fi
    parts=(/tmp/drafter_parts/model.safetensors.part*)
    echo "${#parts[@]} parts in all"
    for part in "${parts[@]:$first:$count}"; do cp "$part" "$out"/; done
    ls -la "$out" ;;
  restore-drafter)
    # (next session) one call per carried folder of parts; they accumulate in /tmp/drafter_in, and
    # /tmp/drafter_prev appears once the joined file matches the packed sha256. Then:
    # sft ... --set drafter.init_from=/tmp/drafter_prev (the old weights, a fresh optimiser).
    shift; mkdir -p /tmp/drafter_in
    for dir in "$@"; do cp "$dir"/* /tmp/drafter_in/; done
    rm -rf /tmp/drafter_prev /tmp/drafter_join; mkdir -p /tmp/drafter_join
    cat /tmp/drafter_in/model.safetensors.part* > /tmp/drafter_join/model.safetensors   # the glob sorts
    n=$(ls /tmp/drafter_in/model.safetensors.part* | wc -l)
    if [ -f /tmp/drafter_in/SHA256 ] && (cd /tmp/drafter_join && sha256sum -c --status /tmp/drafter_in/SHA256); then
      cp /tmp/drafter_in/drafter_config.json /tmp/drafter_join/config.json
      mv /tmp/drafter_join /tmp/drafter_prev; echo "drafter restored from $n parts: /tmp/drafter_prev"
    else
      rm -rf /tmp/drafter_join; echo "$n parts in; the sha256 does not match yet (carry the rest)"
    fi ;;
  pack-regen)
    # Shards + manifest (the joined files are derived); a call brings back about 64 MB in all.
    out=${2:?OUT_DIR}; mkdir -p "$out"
    tar -C /tmp -cf - regen_qwen/manifest.json regen_qwen/shards | split -b 15M -d - "$out"/regen_qwen.tar.part
    n=$(ls "$out"/regen_qwen.tar.part* | wc -l)
    [ "$n" -le 4 ] || echo "warning: $n parts; a call brings back about 64 MB (4 parts): copy the rest to \$OUT in later calls" >&2
    ls -la "$out" ;;
  restore-regen)
    # The next `regen` resumes at the first missing shard: the source is matched by content, so
    # the same code_mix.jsonl.gz must be carried again.
    dir=${2:?DIR}; rm -rf /tmp/regen_qwen
    cat "$dir"/regen_qwen.tar.part* | tar -C /tmp -xf -
    # Joined now (sha256 of every shard checked), so `sft` can train on them without a `regen`.
    python3 -c "import json; from tools.regenerate import join_committed; \
joined = join_committed('/tmp/regen_qwen'); m = json.load(open('/tmp/regen_qwen/manifest.json')); \
print(len(m['shards']), 'shards,', sum(s['rows'] for s in m['shards'].values()), 'conversations restored, joined:', joined)" ;;
  *) echo "usage: gpu_qwen.sh regen MINUTES [flags] | sft OUT_DIR MINUTES [--set ...] | sft-profile OUT_DIR [--steps N] [--set ...] | eval OUT_DIR T MINUTES | pack-regen OUT_DIR | restore-regen DIR | pack-drafter OUT_DIR FIRST [COUNT] | restore-drafter DIR..." >&2
     exit 2 ;;
esac
