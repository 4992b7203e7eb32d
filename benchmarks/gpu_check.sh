#!/usr/bin/env bash
# The GPU checks, as one short script for one call of a lent GPU machine (its own python3 and
# torch; bpfm runs from the source tree, without Ray, MLflow or Optuna):
#   1. the large model's bf16 training throughput and MFU (benchmarks/train_throughput.py
#      --device cuda): at batch 1024 eager, with SDPA forced, with the paper code's explicit
#      attention and compiled; at 256 eager and compiled; small at 1024 eager, SDPA, compiled;
#   2. bpfm data synth/shard, then `bpfm train` and `bpfm evaluate` on CUDA (device auto, bf16
#      autocast), and `bpfm pretrain` on CUDA;
#   3. small trials packed onto the one GPU (benchmarks/gpu_packing.py: 1, 2 and 4 processes
#      at once, as the paper profile's 0.25-GPU resources pack them) and the compiled large
#      model with CUDA graphs (`reduce-overhead`);
#   4. with AUTOTUNE=1 only, the compiled variant again in max-autotune mode (Triton GEMM
#      templates with fused epilogues; several minutes of compile, so not in the default run).
# Each step is bounded and reported on its own, so one failure does not hide the others.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh       # logs and JSON under $OUT
#   AUTOTUNE=1 bash benchmarks/gpu_check.sh                # plus step 4
#   ONLY=bench_autotune AUTOTUNE=1 bash benchmarks/gpu_check.sh   # just the named steps
# The bounds add up to 24 minutes (33 with AUTOTUNE=1), more than one device call's 10: a call
# names the steps it needs in ONLY (comma-separated); step 4 alone fits one call.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()

step() {  # step NAME SECONDS COMMAND...: runs it, logs to $OUT/NAME.log, remembers a failure
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return
    fi
    echo "== $name: $*"
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 4 "$OUT/$name.log"
    echo "== $name: rc $rc in $((SECONDS - started)) s"
    [ $rc -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

step bench_b1024 300 $PY benchmarks/train_throughput.py --device cuda --iters 10 --json
step bench_b256 200 $PY benchmarks/train_throughput.py --device cuda --batch 256 --iters 20 \
    --variants model,compiled --json
# small: is the length-only attention rule right for a launch-bound model too?
step bench_small 120 $PY benchmarks/train_throughput.py --device cuda --sizes small --iters 20 \
    --variants model,sdpa,compiled --json
step synth 60 $PY -m bpfm.cli data synth --out "$work/pulsedb" --subjects 12 \
    --segments-per-subject 8
step shard 60 $PY -m bpfm.cli data shard "$work/pulsedb" --out "$work/shards"
step train 120 $PY -m bpfm.cli train --data "$work/shards" --source mimic --size small \
    --epochs 3 --batch-size 16 --out "$work/run" --json
step evaluate 60 $PY -m bpfm.cli evaluate --model "$work/run" --json
step pretrain 60 $PY -m bpfm.cli pretrain --out "$work/backbone.ckpt" --size small --synthetic \
    --steps 40 --json
step packing 240 $PY benchmarks/gpu_packing.py --device cuda --procs 1,2,4 --json
step bench_cudagraphs 240 $PY benchmarks/train_throughput.py --device cuda --iters 10 \
    --variants model,compiled --compile-mode reduce-overhead --json
if [ "${AUTOTUNE:-0}" = 1 ]; then
    step bench_autotune 540 $PY benchmarks/train_throughput.py --device cuda --iters 10 \
        --variants model,compiled --compile-mode max-autotune-no-cudagraphs --json
fi
echo "== failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
