set -uo pipefail
export PYTHONUNBUFFERED=1
root=$PWD
run() { (cd $1 && PYTHONPATH=/tmp/kit/site:$PWD timeout 100 python3 bench/opd_throughput.py --target /tmp/kit/smollm2.gguf --sections ar --ar-tokens 256 --ar-prompts 3 --max-prompt-tokens 256 --num-prompts 8 --draft-vocab 2048 --out /tmp/ar_$2 > /tmp/ar_$2.log 2>&1; echo "$2 rc $?"; grep -h "Autoregressive batch 1\|^| batched" /tmp/ar_$2/opd_throughput.md; cp /tmp/ar_$2/opd_throughput.json $OUT/ar_$2.json); }
run $root/.kit/data/old old1
run $root new1
run $root/.kit/data/old old2
run $root new2
