#!/usr/bin/env bash
# The one prepared GPU run: the GPU benchmarks, then the CUDA and Triton tests, logs under $OUT.
#
# Run from the repository root on a machine with an NVIDIA GPU, PyTorch and Triton installed
# (nothing is installed or downloaded; linquant is used from src/ through PYTHONPATH):
#
#     OUT=/tmp/gpu-logs bash benchmarks/gpu_check.sh
#
# Steps, each with its own time limit so one hang cannot eat the others (at most 9 min 20 s in
# all, with SWEEP=1; the order puts what matters most first):
#   1. machine: GPU name, memory, driver, torch / triton versions;
#   2. benchmarks/bench_gpu.py --overhead: weight-only and W8A8 linear against cuBLAS bf16,
#      8192 x 8192, eager and CUDA-graph timings (one-token int4: tinygemm, the dispatcher's
#      choice, and Triton side by side), and the host time per eager call (first, on a quiet
#      machine: the tests compile in parallel on every core);
#   3. the tests marked `cuda` or `triton`: real shapes, the dispatcher's choices, tinygemm's
#      probe and layout (tests/kernels/test_cuda_tinygemm.py), every
#      autotune config, and the Triton kernel tests (odd shapes, every scheme) compiled for the
#      GPU; many small compiles, spread over the cores with pytest-xdist where it is installed;
#   4. benchmarks/bench_quantize.py --device cuda: weight quantization throughput against a
#      device-to-device copy, whole call and kernel alone;
#   5. bench_gpu.py --compiled (one token only): QuantLinear under torch.compile with CUDA
#      graphs (mode="reduce-overhead"), against cuBLAS the same way.
# With SWEEP=1, steps 2 and 4 also time every kernel config / launch shape (about 1.5 minutes
# more); with NCU=1 a last step runs Nsight Compute on benchmarks/gpu_profile.py (one launch
# per kernel) where ncu exists (at most 40 s; leave SWEEP off then, to stay under 10 minutes).
# Triton's compile cache goes to $TRITON_CACHE_DIR (default $out/../triton-cache); set it to a
# kept folder to save the compiles on a later run. Exit status: non-zero if the tests failed
# (the benchmarks only print).
set -uo pipefail
out=${OUT:-/tmp/linquant-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(dirname "$out")/triton-cache}
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/machine.txt"

sweep=()
limit=190
[ "${SWEEP:-0}" = 1 ] && sweep=(--sweep) && limit=230
timeout $limit $py benchmarks/bench_gpu.py --overhead "${sweep[@]}" 2>&1 | tee "$out/bench_gpu.log"

par=()
if $py -c "import xdist" 2>/dev/null; then
  par=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
fi
timeout 190 $py -m pytest -q -p no:cacheprovider --durations=8 "${par[@]}" -m "cuda or triton" \
  tests 2>&1 | tee "$out/tests_gpu.log"
status=${PIPESTATUS[0]}

timeout 50 $py benchmarks/bench_quantize.py --device cuda "${sweep[@]}" 2>&1 \
  | tee "$out/bench_quantize.log"

timeout 90 $py benchmarks/bench_gpu.py --compiled --ms "" --w8a8-ms "" --no-extras 2>&1 \
  | tee "$out/bench_compiled.log"

ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$ncu_bin" ] && [ "${NCU:-0}" = 1 ]; then
  timeout 40 "$ncu_bin" --clock-control none --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats -k regex:"gemv|mm_kernel|w8a8|quant" \
    $py benchmarks/gpu_profile.py > "$out/ncu.log" 2>&1
  tail -n 5 "$out/ncu.log"
fi
[ "$status" -eq 0 ]
