#!/usr/bin/env bash
# The one prepared GPU run: the CUDA tests, then the GPU benchmarks, logs under $OUT.
#
# Run from the repository root on a machine with an NVIDIA GPU, PyTorch and Triton installed
# (nothing is installed or downloaded; linquant is used from src/ through PYTHONPATH):
#
#     OUT=/tmp/gpu-logs bash benchmarks/gpu_check.sh
#
# Steps, each with its own time limit so one hang cannot eat the others (about 6 minutes in all
# at most; expect 2-3):
#   1. machine: GPU name, memory, driver, torch / triton versions;
#   2. tests: every test marked `cuda`, plus the Triton kernel tests run for real on the GPU;
#   3. benchmarks/bench_gpu.py: weight-only and W8A8 linear against cuBLAS bf16, 8192 x 8192;
#   4. benchmarks/bench_quantize.py --device cuda: weight quantization throughput against a
#      device-to-device copy.
# Exit status: that of the tests (the benchmarks only print).
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

timeout 240 $py -m pytest -q -p no:cacheprovider -m "cuda or triton" tests 2>&1 \
  | tee "$out/tests.log"
status=${PIPESTATUS[0]}

timeout 150 $py benchmarks/bench_gpu.py 2>&1 | tee "$out/bench_gpu.log"
timeout 60 $py benchmarks/bench_quantize.py --device cuda 2>&1 | tee "$out/bench_quantize.log"
exit "$status"
