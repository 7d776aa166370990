#!/usr/bin/env bash
# The one prepared GPU run: the CUDA tests, then the GPU benchmarks, logs under $OUT.
#
# Run from the repository root on a machine with an NVIDIA GPU, PyTorch and Triton installed
# (nothing is installed or downloaded; linquant is used from src/ through PYTHONPATH):
#
#     OUT=/tmp/gpu-logs bash benchmarks/gpu_check.sh
#
# Steps, each with its own time limit so one hang cannot eat the others (at most 9 minutes in
# all; the order puts what matters most first):
#   1. machine: GPU name, memory, driver, torch / triton versions;
#   2. the tests marked `cuda`: real shapes, the dispatcher's choices, every autotune config;
#   3. benchmarks/bench_gpu.py: weight-only and W8A8 linear against cuBLAS bf16, 8192 x 8192;
#   4. benchmarks/bench_quantize.py --device cuda: weight quantization throughput against a
#      device-to-device copy;
#   5. the other Triton kernel tests (odd shapes, every scheme), compiled for the GPU: many
#      small compiles, so they come last.
# Exit status: non-zero if either test step failed (the benchmarks only print).
set -uo pipefail
out=${OUT:-/tmp/linquant-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/machine.txt"

timeout 180 $py -m pytest -q -p no:cacheprovider --durations=5 -m cuda tests 2>&1 \
  | tee "$out/tests_cuda.log"
status=${PIPESTATUS[0]}

timeout 150 $py benchmarks/bench_gpu.py 2>&1 | tee "$out/bench_gpu.log"
timeout 60 $py benchmarks/bench_quantize.py --device cuda 2>&1 | tee "$out/bench_quantize.log"

timeout 150 $py -m pytest -q -p no:cacheprovider --durations=5 -m "triton and not cuda" tests \
  2>&1 | tee "$out/tests_triton.log"
status2=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && [ "$status2" -eq 0 ]
