#!/usr/bin/env bash
# Tree-engine benchmark (tau, tokens/s, speed-up over autoregressive) on one GPU: the device
# machine, offline kit staged under /tmp/kit (see bench/gpu_sft.sh). From the repo root:
#
#   bash bench/run_tree_bench.sh DRAFTER_DIR TARGET OUT_DIR --check          # ~1-2 min self-check
#   bash bench/run_tree_bench.sh DRAFTER_DIR TARGET OUT_DIR [draftrl eval flags...]
#
# --check: 2 prompts x 32 tokens at T=0 through the eager, static and CUDA-graph paths, in
# float32 (asserted equal to eager greedy; exit 1 otherwise) and bfloat16 (agreement reported);
# a path that fell back (a failed graph capture) fails it in any dtype; --check-dtypes bfloat16,float32
# picks the dtypes and their order.
# Otherwise a full `draftrl eval` (MT-Bench, HumanEval, GSM8K; T=0 and T=1; 256 new tokens;
# bf16; CUDA graphs); add e.g. --max-minutes 6 to fit a 10-minute slot, --num-prompts N,
# --compile inductor (torch.compile + graphs: faster, minutes of compiling), --dtype float32.
# Timing: speculative.timing.measure_speedup (as the study and bench/one_bench.sh): AR baseline
# --ar-engine batch (default; or static, or batch,static), --repeats R for a spread; see
# docs/benchmarking.md. For all 80 questions x 3 repeats in one call, use bench/one_bench.sh.
# Benchmarks: $DRAFTRL_BENCH_DIR, else the copies shipped in speculative/data/bench.
# Writes OUT_DIR/{results.json,results.md,results.png,generations.jsonl,log.txt} (or check.json).
set -euo pipefail
drafter=${1:?DRAFTER_DIR}; target=${2:?TARGET}; out=${3:?OUT_DIR}; shift 3
export PYTHONPATH=/tmp/kit/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.version.cuda)"
python3 -m tools.cli eval --drafter "$drafter" --target "$target" --out "$out" "$@" 2>&1 | tee "$out/log.txt"
