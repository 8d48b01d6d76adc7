#!/usr/bin/env bash
# Issue 17 on one GPU (device machine, offline kit staged under /tmp/kit), in one call:
#   bash bench/gpu_issue17.sh OUT_DIR [gto|all|gto-verify|learner|actors|versions|kernels|ab|ar|ar-autotune|ar-fp32|
#                                      opd|tests]
# 1. bench/throughput.py (prefill, warm drafter, GTO, Draft-OPD, SFT[, single, Ray with "all"]);
# 2. bench/gto_throughput.py on the warm drafter: chunkings 32x16 and 32x64 (a torch.profiler table
#    of one batch at the faster one), and the target as FastLlama (gto.target_forward=fast) at 32x64.
# Data: .kit/data/sharegpt_6k.jsonl.gz (bench/make_sharegpt_slice.py). At most 8 files land in OUT_DIR.
# TP_ARGS: more bench/throughput.py flags, e.g. TP_ARGS="--train-batch 8 --grad-accum 2" (the default
# since 2026-12-02 is 32 x 1: rollouts of 32 sequences, each learner step one full micro-batch).
# gto-verify: bench/gto_verify_profile.py only (one GTO batch, 32 sequences x 64 positions a forward, bf16 trees; its
# verification forwards replayed alone with variants and profiles), on the warm drafter of an earlier
# mode on this machine, else on one that bench/throughput.py --parts prefill warms first (~1.5 min).
# GV_ARGS: more bench/gto_verify_profile.py flags, e.g. GV_ARGS="--chunk 32x8 --reps 10".
# learner: bench/gto_learner_step.py only (the GTO learner step on one experience of 32 sequences,
# gto.path_replay ttt vs rooted, timed, checked equal, profiled), on the warm drafter as gto-verify.
# ab: bench/gto_throughput.py at 32x64 on the warm drafter, once per variant: main, each of this
# session's three changes taken back alone, all three taken back (DRAFTRL_ROPE=torch: RoPE as the torch
# expression; DRAFTRL_VOCAB_REDUCTION=torch: torch's top-k/argmax/logsumexp passes, no Triton;
# gto.reference_path_precision=fp32: the reference's path replayed in fp32), and main without cuDNN
# attention (--sdpa-backends=flash,efficient,math); then a table (ab.md). AB_ONLY="main no_cudnn_attention": those
# lines only.
# ar: the target's AR decoding at batch 1 with SDPA (DRAFTRL_DECODE_ATTENTION=torch), then with the
# decode-attention kernel, each as a CUDA graph step and compiled by Inductor (no autotuning); ar-autotune:
# the kernel with Inductor max-autotune, profiled (its own call: about 4 min of compiling); ar-fp32: a float32
# target, SDPA (graph step) and the kernel (graph step, then Inductor), each engine's tokens against
# generate_autoregressive's (fp32 near-ties are far rarer than bf16's). Table: ar_ab.md.
# ar first times the kernel's settings against SDPA alone (bench/decode_attention.py) and runs the AR lines
# with the fastest at batch 1, span 512 (DRAFTRL_DECODE_ATTENTION_SETTINGS; set it for ar-autotune).
# actors: bench/throughput.py --parts ray (async, GTO 32x16) on the warm drafter of an earlier mode, once per
# rollout-side variant: two actors at max_staleness 2 (the defaults: this call's baseline), two at 3, three at
# 3; then a table (actors.md, bench/actor_table.py). ACTOR_VARIANTS="two_s2 three_s3" picks lines; ACTOR_MINUTES
# the training minutes of each (1.25). At max_staleness 2 with one experience an update, admission holds an
# actor back while one experience waits and the learner trains; 3 lets both build.
# versions: the same measurements at an older checkout of this repository (OLD_TREE: a folder holding it, e.g.
# git archive of a commit unpacked under .kit/old and carried) and at this tree, old first, on one machine:
# VERSION_PARTS of "learner" (bench/gto_learner_step.py, rooted replay, sdpa attention, 32x16), "gto"
# (bench/gto_throughput.py at 32x16) and "ray" (bench/throughput.py --parts ray, async, as the actors mode's
# two_s2); default "learner gto". On the warm drafter of an earlier mode, else one warmed first. Table
# (bench/version_table.py): versions.md over every part run on this machine; the raw reports come back for this
# call's parts only (two parts a call at most: at most 8 files come back).
# kernels: bench/vocab_reduction.py (the tree search's vocabulary reduction and top-k at one level's shape; with
# OLD_TREE, also that checkout's top-k kernel on the same blocks) and bench/silu_mul.py (the target MLP's
# silu(gate) * up, torch against the kernel, at a GTO batch's verification and prefill shapes); tables in OUT_DIR.
# opd: the Draft-OPD experience of the batched engine alone (bench/opd_throughput.py, 64 and 128 sequences, chain 7,
# 256 new tokens, prompts of ShareGPT's first user turns cut to 1 024 tokens) on the warm drafter of an earlier
# mode (else one warmed first): where an experience's time goes (rollouts, target forward, assembly, copy), and
# torch.profiler tables of the engine's step, eager and as a CUDA graph, per step (two runs' difference); then
# 64 sequences once per variant: this tree alone ("new"), OLD_TREE's checkout ("old"), the fp32 drafter, attention
# through SDPA (target and drafter), the drafter's picks by torch; a table (opd_ab.md). OPD_ARGS: more flags for the
# main run; OPD_VARIANTS: which lines ("main new old ...").
# tests: the tests that only run on CUDA (the decode-attention kernel against SDPA, the kernel gates' switch, the
# CUDA IPC broadcast, the checksum and experience copies on the GPU) with the CPU ones of the same files, by
# pytest, which the kit must hold where the machine's Python lacks it (make-kit.sh with KIT_EXTRA="pytest
# pluggy iniconfig"); tests.log and tests.xml (JUnit) in OUT_DIR. No data needed.
set -uo pipefail
out=${1:?OUT_DIR}; which=${2:-gto}
export PYTHONPATH=/tmp/kit/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 NCCL_NVLS_ENABLE=0
mkdir -p "$out"
if [ "$which" = tests ]; then
  if ! python3 -c "import pytest" 2>/dev/null; then
    echo "no pytest on this machine: stage a kit built with KIT_EXTRA=\"pytest pluggy iniconfig\"" \
      | tee "$out/tests.log"
    exit 1
  fi
  timeout 500 python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$out/tests.xml" \
    tests/test_triton_kernels.py tests/test_pipeline_throughput.py > "$out/tests.log" 2>&1
  code=$?; echo "pytest exit $code" >> "$out/tests.log"; tail -n 15 "$out/tests.log"
  exit $code
fi
[ -f /tmp/sharegpt_6k.jsonl ] || gunzip -c .kit/data/sharegpt_6k.jsonl.gz > /tmp/sharegpt_6k.jsonl
data=(--target /tmp/kit/smollm2.gguf --data /tmp/sharegpt_6k.jsonl)
# A variant line runs when its name is in the list (names apart by spaces) or the list is empty.
picked() { [ -z "${2:-}" ] || [[ " $2 " == *" $1 "* ]]; }
# A variant's words into the caller's envs (NAME=value), sets (gto.*=value, each after --set) and flags (--*).
split_variant() {
  envs=() sets=() flags=()
  for a in "$@"; do case $a in --*) flags+=("$a");; gto.*=*) sets+=(--set "$a");; *=*) envs+=("$a");; esac; done
}
if [ "$which" = ab ]; then
  [ -d /tmp/tp/warm_drafter ] || python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill \
    --total-minutes 3 > "$out/throughput.log" 2>&1
  ab_line() {  # name, then env assignments and --set flags
    local name=$1; shift; local envs sets flags
    picked "$name" "${AB_ONLY:-}" || return 0
    split_variant "$@"
    env ${envs[@]+"${envs[@]}"} timeout 150 python3 bench/gto_throughput.py "${data[@]}" --drafter /tmp/tp/warm_drafter \
      --max-records 600 --batch-sizes 32 --chunks 32x64 --precisions bf16 --old-batch-size 0 --batches 4 \
      --ceiling-batches 32,64 ${sets[@]+"${sets[@]}"} ${flags[@]+"${flags[@]}"} --out "/tmp/ab/$name" >> "$out/ab.log" 2>&1
    echo "$name exit $?" >> "$out/ab.log"
  }
  ab_line main
  ab_line old_all DRAFTRL_ROPE=torch DRAFTRL_VOCAB_REDUCTION=torch gto.reference_path_precision=fp32
  ab_line torch_rope DRAFTRL_ROPE=torch
  ab_line torch_reductions DRAFTRL_VOCAB_REDUCTION=torch
  ab_line fp32_reference gto.reference_path_precision=fp32
  ab_line no_cudnn_attention --sdpa-backends=flash,efficient,math
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); rows = {}
for path in sorted(pathlib.Path("/tmp/ab").glob("*/gto_throughput.json")):
    report = json.loads(path.read_text())
    best = max((r for r in report["rows"] if r["path"] == "batched"), key=lambda r: r["tok_s"])
    rows[path.parent.name] = dict(tok_s=best["tok_s"], ceiling=report["prefill_ceiling_tok_s"],
                                  ratio=best["ceiling_ratio"], s_batch=best["seconds_per_batch"], peak_gb=best["peak_gb"],
                                  each=best.get("batch_seconds", []))
base = rows.get("old_all", {}).get("s_batch")
lines = ["| variant | GTO tok/s | ceiling tok/s | of the ceiling | s / batch | each batch, s | speed-up vs old_all | peak GiB |",
         "|---|---|---|---|---|---|---|---|"]
for name, r in rows.items():
    speed = f"{base / r['s_batch']:.3f}x" if base else "-"
    each = ", ".join(f"{t:.3f}" for t in r["each"])
    lines.append(f"| {name} | {r['tok_s']:.0f} | {r['ceiling']:.0f} | {100 * r['ratio']:.2f}% | {r['s_batch']:.3f} | {each} | {speed} | {r['peak_gb']:.1f} |")
(out / "ab.md").write_text("\n".join(lines) + "\n"); (out / "ab.json").write_text(json.dumps(rows, indent=1))
print("\n".join(lines))
PY
  cp /tmp/ab/main/gto_throughput.md "$out/main_gto_throughput.md" 2>/dev/null
  ls -la "$out"
  exit 0
fi
if [ "$which" = ar ] || [ "$which" = ar-autotune ] || [ "$which" = ar-fp32 ]; then
  # the target's AR decoding at batch 1 (bench/opd_throughput.py's ar section, 3 prompts x 256 tokens)
  ar=(--target /tmp/kit/smollm2.gguf --sections ar --max-prompt-tokens 256 --ar-tokens 256 --ar-prompts 3
      --num-prompts 8 --draft-vocab 2048)
  if [ "$which" = ar-fp32 ]; then  # a float32 target: each engine's tokens against generate_autoregressive's
    ar+=(--dtype float32)
    DRAFTRL_DECODE_ATTENTION=torch timeout 200 python3 bench/opd_throughput.py "${ar[@]}" --out /tmp/ar/fp32_sdpa > "$out/ar.log" 2>&1
    echo "fp32 sdpa exit $?" >> "$out/ar.log"
    timeout 240 python3 bench/opd_throughput.py "${ar[@]}" --inductor ar --out /tmp/ar/fp32_kernel >> "$out/ar.log" 2>&1
    echo "fp32 kernel exit $?" >> "$out/ar.log"
  elif [ "$which" = ar ]; then  # SDPA, then the decode-attention kernel: graph and Inductor (no autotuning) rows each
    ar+=(--inductor ar)
    # first the kernel's settings against SDPA alone; the AR runs take the fastest at batch 1, span 512
    timeout 200 python3 bench/decode_attention.py --out "$out" --blocks 64,128,256 --warps 4,8 --splits 1,2,4,8 \
      > "$out/decode_attention.log" 2>&1
    best=$(python3 -c "import json,sys; r=[r for r in json.load(open(sys.argv[1]))['rows'] if r['batch']==1 and r['span']==512][0]['kernel']; print(min((k for k in r if 'us' in r[k]), key=lambda k: r[k]['us']))" "$out/decode_attention.json" 2>/dev/null)
    [ -n "$best" ] && export DRAFTRL_DECODE_ATTENTION_SETTINGS=$best
    echo "decode attention settings: ${DRAFTRL_DECODE_ATTENTION_SETTINGS:-default}" >> "$out/decode_attention.log"
    DRAFTRL_DECODE_ATTENTION=torch timeout 200 python3 bench/opd_throughput.py "${ar[@]}" --out /tmp/ar/sdpa > "$out/ar.log" 2>&1
    echo "sdpa exit $?" >> "$out/ar.log"
    timeout 200 python3 bench/opd_throughput.py "${ar[@]}" --out /tmp/ar/kernel >> "$out/ar.log" 2>&1
    echo "kernel exit $?" >> "$out/ar.log"
  else  # the kernel with Inductor max-autotune (about 4 min of compiling), profiled
    timeout 540 python3 bench/opd_throughput.py "${ar[@]}" --inductor ar --ar-inductor-options max_autotune=true,coordinate_descent_tuning=true \
      --profile --profile-runs ar --no-traces --profile-tokens 64 --out /tmp/ar/kernel_autotune > "$out/ar.log" 2>&1
    echo "kernel_autotune exit $?" >> "$out/ar.log"
    cat /tmp/ar/kernel_autotune/profile*.txt > "$out/profiles.txt" 2>/dev/null
    echo "decode attention settings: ${DRAFTRL_DECODE_ATTENTION_SETTINGS:-default}" >> "$out/ar.log"
  fi
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); rows = {}
lines = ["| run | engine | tok/s | ms/token | setup s | same tokens as generate_autoregressive | same as the run's first row "
         "(first difference) | compile errors |", "|---|---|---|---|---|---|---|---|"]
for path in sorted(pathlib.Path("/tmp/ar").glob("*/opd_throughput.json")):
    report = json.loads(path.read_text())
    for key in ("autoregressive_b1", "autoregressive_b1_inductor"):
        r = report.get(key)
        if r is None:  # not asked for (e.g. no Inductor row for SDPA in ar-fp32)
            continue
        if "error" in r:
            lines.append(f"| {path.parent.name} | {key} | failed: {r['error']} | | | | | |"); continue
        rows[f"{path.parent.name}/{key}"] = r
        same, first = r.get("same_tokens_as_reference"), r.get("same_tokens_as")
        first = "-" if first is None else f"{first['share']} ({first['first_difference']})"
        lines.append(f"| {path.parent.name} | {r['compile']} | {r['batched_tok_s']:.0f} | {r['batched_ms_per_token']:.3f} | "
                     f"{r['setup_seconds']:.1f} | {'-' if same is None else same} | {first} | {len(r.get('compile_errors') or [])} |")
    (out / f"{path.parent.name}_opd_throughput.json").write_text(path.read_text())
(out / "ar_ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
  ls -la "$out"
  exit 0
fi
if [ "$which" = opd ]; then
  [ -d /tmp/tp/warm_drafter ] || python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill \
    --total-minutes 3 > "$out/throughput.log" 2>&1
  opd=(--drafter /tmp/tp/warm_drafter --max-prompt-tokens 1024 --max-new-tokens 256 --chain-length 7 --repeats 2)
  opd_line() {  # name, then env assignments and flags; OLD_TREE's lines run in that checkout
    local name=$1; shift; local envs sets flags tree=$PWD
    picked "$name" "${OPD_VARIANTS:-}" || return 0
    split_variant "$@"
    if [ "$name" = old ]; then [ -n "${OLD_TREE:-}" ] || return 0; tree=$OLD_TREE; fi
    (cd "$tree" && env ${envs[@]+"${envs[@]}"} PYTHONPATH=/tmp/kit/site:$tree timeout 200 \
      python3 bench/opd_throughput.py \
      "${data[@]}" "${opd[@]}" --sections batched --batches 64 ${flags[@]+"${flags[@]}"} --out "/tmp/opd/$name") \
      >> "$out/opd.log" 2>&1
    echo "$name exit $?" >> "$out/opd.log"
  }
  # "main", this tree: 64 and 128 sequences, the prefill ceiling, per-step profiles of the engine
  if picked main "${OPD_VARIANTS:-}"; then
    timeout 300 python3 bench/opd_throughput.py "${data[@]}" "${opd[@]}" --sections prefill,batched --batches 64,128 \
      --profile --profile-runs opd --profile-batch 64 --profile-tokens 64 --no-traces ${OPD_ARGS:-} \
      --out /tmp/opd/main \
      >> "$out/opd.log" 2>&1
    echo "main exit $?" >> "$out/opd.log"
  fi
  opd_line new                                           # this tree at 64 sequences alone, as the lines below
  opd_line old                                           # the older checkout (OLD_TREE), if given
  opd_line fp32_drafter --rollout-precision=fp32         # the learner's fp32 drafter as it is
  opd_line sdpa_attention DRAFTRL_DECODE_ATTENTION=torch # the target's verification and the drafter through SDPA
  opd_line torch_pick DRAFTRL_VOCAB_REDUCTION=torch      # the drafter's picks by topk(log_softmax)
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); rows = {}
for path in sorted(pathlib.Path("/tmp/opd").glob("*/opd_throughput.json")):
    report = json.loads(path.read_text())
    row = report.get("opd_batched_b0064")
    if row is None:
        continue
    phases = [r.get("phase_seconds", {}) for r in row["runs"]]
    rows[path.parent.name] = dict(tok_s=row["tok_s"], on_device=row["tok_s_on_device"], engine=row["engine_new_tok_s"],
                                  tau=row["engine_tau"], steps=row["engine_steps"], engine_s=row["engine_seconds"],
                                  drafter=row.get("drafter_dtype", "float32 (no copy)"),
                                  rollouts_s=[p.get("opd/rollouts") for p in phases],
                                  seconds=[r["seconds_with_cpu_copy"] for r in row["runs"]])
old = rows.get("old")
lines = ["| variant | drafter | experience tok/s | on device | engine new tok/s | tau | steps | engine s | ms a step "
         "| experience s, each | step vs old | experience tok/s vs old |", "|---" * 12 + "|"]
for name, r in rows.items():
    r["ms_step"] = 1e3 * r["engine_s"] / max(r["steps"], 1)
for name, r in rows.items():
    step = f"{old['ms_step'] / r['ms_step']:.3f}x" if old else "-"
    rate = f"{r['tok_s'] / old['tok_s']:.3f}x" if old else "-"
    each = ", ".join(f"{t:.3f}" for t in r["seconds"])
    lines.append(f"| {name} | {r['drafter']} | {r['tok_s']:.0f} | {r['on_device']:.0f} | {r['engine']:.0f} | "
                 f"{r['tau']:.2f} | {r['steps']} | {r['engine_s']:.3f} | {r['ms_step']:.2f} | {each} | "
                 f"{step} | {rate} |")
(out / "opd_ab.md").write_text("\n".join(lines) + "\n"); (out / "opd_ab.json").write_text(json.dumps(rows, indent=1))
print("\n".join(lines))
PY
  for f in opd_throughput.json opd_throughput.md profile_opd_b64_graph_steps.txt profile_opd_b64_static_steps.txt; do
    cp "/tmp/opd/main/$f" "$out/" 2>/dev/null
  done
  ls -la "$out"
  exit 0
fi
if [ "$which" = actors ]; then
  [ -d /tmp/tp/warm_drafter ] || python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill \
    --total-minutes 3 > "$out/throughput.log" 2>&1
  actor_line() {  # name, then --ray-set overrides
    local name=$1; shift; local sets=()
    picked "$name" "${ACTOR_VARIANTS:-}" || return 0
    for a in "$@"; do sets+=(--ray-set "$a"); done
    timeout 200 python3 bench/throughput.py "${data[@]}" --drafter /tmp/tp/warm_drafter --out "/tmp/actors/$name" \
      --parts ray --ray-modes async --train-minutes ${ACTOR_MINUTES:-1.25} --total-minutes 3.0 \
      ${sets[@]+"${sets[@]}"} >> "$out/actors.log" 2>&1
    echo "$name exit $?" >> "$out/actors.log"
    cp "/tmp/actors/$name/summary.json" "$out/${name}_summary.json" 2>/dev/null
  }
  actor_line two_s2
  actor_line two_s3 distributed.max_staleness=3
  actor_line three_s3 distributed.num_rollout_actors=3 distributed.gpus_per_rollout_actor=0.2 distributed.max_staleness=3
  runs=(); for name in two_s2 two_s3 three_s3; do [ -f "/tmp/actors/$name/summary.json" ] && runs+=("/tmp/actors/$name/summary.json"); done
  python3 bench/actor_table.py "$out" ${runs[@]+"${runs[@]}"}
  ls -la "$out"
  exit 0
fi
if [ "$which" = kernels ]; then
  timeout 200 python3 bench/vocab_reduction.py --groups 16 --warps 4 ${OLD_TREE:+--old-tree "$OLD_TREE"} \
    --out "$out" > "$out/kernels.log" 2>&1
  echo "vocab_reduction exit $?" >> "$out/kernels.log"
  timeout 120 python3 bench/silu_mul.py --out "$out" >> "$out/kernels.log" 2>&1
  echo "silu_mul exit $?" >> "$out/kernels.log"
  ls -la "$out"
  exit 0
fi
if [ "$which" = versions ]; then
  old_tree=${OLD_TREE:?OLD_TREE: a folder holding the older checkout}
  [ -d /tmp/tp/warm_drafter ] || python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill \
    --total-minutes 3 > "$out/throughput.log" 2>&1
  here=$PWD
  for part in ${VERSION_PARTS:-learner gto}; do
    for version in old new; do
      tree=$here; [ "$version" = old ] && tree=$old_tree
      dir=/tmp/versions/${version}_$part
      case $part in
        learner) (cd "$tree" && PYTHONPATH=/tmp/kit/site:$PWD timeout 200 python3 bench/gto_learner_step.py "${data[@]}" \
                    --drafter /tmp/tp/warm_drafter --max-records 600 --batch-size 32 --chunk 32x16 --precision bf16 \
                    --replays rooted --attentions sdpa --warmup 3 --reps 10 --out "$dir") >> "$out/versions.log" 2>&1;;
        gto) (cd "$tree" && PYTHONPATH=/tmp/kit/site:$PWD timeout 200 python3 bench/gto_throughput.py "${data[@]}" \
                --drafter /tmp/tp/warm_drafter --max-records 600 --batch-sizes 32 --chunks 32x16 --precisions bf16 \
                --old-batch-size 0 --batches 4 --ceiling-batches 32,64 --out "$dir") >> "$out/versions.log" 2>&1;;
        ray) (cd "$tree" && PYTHONPATH=/tmp/kit/site:$PWD timeout 200 python3 bench/throughput.py "${data[@]}" \
                --drafter /tmp/tp/warm_drafter --out "$dir" --parts ray --ray-modes async --train-minutes 1.25 \
                --total-minutes 3.0) >> "$out/versions.log" 2>&1;;
      esac
      echo "$version $part exit $?" >> "$out/versions.log"
    done
  done
  reports=()
  for part in learner gto ray; do
    file=gto_learner_step.json; [ $part = gto ] && file=gto_throughput.json; [ $part = ray ] && file=summary.json
    for version in old new; do
      name=${version}_$part; [ $part = ray ] && name=${version}_ray_summary
      [ -f "/tmp/versions/${version}_$part/$file" ] || continue
      cp "/tmp/versions/${version}_$part/$file" "/tmp/versions/$name.json"; reports+=("/tmp/versions/$name.json")
      [[ " ${VERSION_PARTS:-learner gto} " == *" $part "* ]] && cp "/tmp/versions/$name.json" "$out/"
    done
  done
  python3 bench/version_table.py "$out" ${reports[@]+"${reports[@]}"}
  ls -la "$out"
  exit 0
fi
if [ "$which" = gto-verify ] || [ "$which" = learner ]; then
  if [ ! -d /tmp/tp/warm_drafter ]; then
    python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill --total-minutes 3 > "$out/throughput.log" 2>&1
  fi
  drafter=(); [ -d /tmp/tp/warm_drafter ] && drafter=(--drafter /tmp/tp/warm_drafter)
  if [ "$which" = learner ]; then
    timeout 420 python3 bench/gto_learner_step.py "${data[@]}" ${drafter[@]+"${drafter[@]}"} --max-records 600 \
      --batch-size 32 --chunk 32x64 --precision bf16 --profile ${GL_ARGS:-} --out /tmp/gl > "$out/gto_learner_step.log" 2>&1
    echo "gto_learner_step exit $?" >> "$out/gto_learner_step.log"
    cp /tmp/gl/gto_learner_step.json /tmp/gl/gto_learner_step.md "$out/" 2>/dev/null
    ls -la "$out"
    exit 0
  fi
  ceiling=$(python3 -c "import json; print(json.load(open('/tmp/tp/summary.json')).get('prefill_ceiling_tok_s') or '')" 2>/dev/null)
  timeout 420 python3 bench/gto_verify_profile.py "${data[@]}" ${drafter[@]+"${drafter[@]}"} --max-records 600 --batch-size 32 \
    --chunk 32x64 --precision bf16 --self-check --profile ${ceiling:+--ceiling $ceiling} ${GV_ARGS:-} --out /tmp/gv \
    > "$out/gto_verify.log" 2>&1
  echo "gto_verify_profile exit $?" >> "$out/gto_verify.log"
  cp /tmp/gv/gto_verify.json /tmp/gv/gto_verify.md "$out/" 2>/dev/null
  [ -f /tmp/tp/summary.json ] && cp /tmp/tp/summary.json "$out/throughput_summary.json"
  ls -la "$out"
  exit 0
fi
if [ "$which" = all ]; then
  python3 bench/throughput.py "${data[@]}" --out /tmp/tp --total-minutes 6.5 --ray-modes async ${TP_ARGS:-} > "$out/throughput.log" 2>&1
else
  python3 bench/throughput.py "${data[@]}" --out /tmp/tp --parts prefill,gto,opd,sft --total-minutes 3 ${TP_ARGS:-} > "$out/throughput.log" 2>&1
fi
cp /tmp/tp/summary.json "$out/throughput_summary.json"; cp /tmp/tp/README.md "$out/throughput_README.md"
python3 bench/gto_throughput.py "${data[@]}" --drafter /tmp/tp/warm_drafter --max-records 600 --batch-sizes 32 \
  --chunks 32x16,32x64 --precisions bf16 --old-batch-size 0 --profile --out /tmp/gto > "$out/gto.log" 2>&1
python3 bench/gto_throughput.py "${data[@]}" --drafter /tmp/tp/warm_drafter --max-records 600 --batch-sizes 32 \
  --chunks 32x64 --precisions bf16 --old-batch-size 0 --set gto.target_forward=fast --out /tmp/gto_fast >> "$out/gto.log" 2>&1
cp /tmp/gto/gto_throughput.json "$out/"; cp /tmp/gto/gto_throughput.md "$out/"
cp /tmp/gto_fast/gto_throughput.json "$out/gto_throughput_fast_target.json"
cp /tmp/gto/*profile*.txt "$out/" 2>/dev/null
ls -la "$out"
