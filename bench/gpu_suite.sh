#!/usr/bin/env bash
# Every GPU figure of docs/performance.md ("GPU") in one go, one process per run so each starts on an empty GPU:
#   bash bench/gpu_suite.sh OUTDIR        (about 8 minutes on one H200; each run's JSON lands in OUTDIR)
#   ONLY="gated-xattn-compiled prefix-compiled" bash bench/gpu_suite.sh OUTDIR     (just those runs)
# Runs, most important first: the tiny model's lean-vs-full loss check on this device; xattn on the lean path (with
# a profile) and on the full path (the path before the savings), side by side; gated-xattn; prefix with its cached
# prompt; then each with its decoder layers compiled (the trainer's compile_base: true), xattn at micro-batch 16 and
# 32. A run that fails or times out leaves the others standing.
set -u
out=${1:?usage: bash bench/gpu_suite.sh OUTDIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$here/schemas/src:$here/packages/fusion_trainer/src
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
run() {  # name, time limit in s, then bench/gpu.py's arguments
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: bench/gpu.py $* (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" "$py" "$here/bench/gpu.py" "$@" --json "$out/$name.json" 2>&1 \
    | grep -v -E "^\s*$|UserWarning|warnings.warn|FutureWarning"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
run tiny 60 --tiny --steps 3 --micro-batch 4
run xattn-lean 120 --fusion xattn --path lean --micro-batch 8 16 --profile "$out/xattn-lean-profile.txt"
run xattn-full 90 --fusion xattn --path full --micro-batch 16
run gated-xattn-lean 120 --fusion gated-xattn --path lean --micro-batch 8 16
run prefix-lean 90 --fusion prefix --path lean --micro-batch 16
run xattn-lean-compiled 170 --fusion xattn --path lean --compile --micro-batch 16 --profile "$out/xattn-lean-compiled-profile.txt"
run xattn-lean-compiled-32 130 --fusion xattn --path lean --compile --micro-batch 32
run gated-xattn-compiled 130 --fusion gated-xattn --path lean --compile --micro-batch 16
run prefix-compiled 130 --fusion prefix --path lean --compile --micro-batch 16
