"""One launch of each of linquant's main Triton kernels on an 8192x8192 weight, for Nsight
Compute (fixed configs, no autotuning, so each kernel runs once after its compile):

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:"gemv|mm_kernel|w8a8|quant" \
        python benchmarks/gpu_profile.py

Kernels, in order: weight quantization (int4 g128, then int8 per channel), ``gemv_t`` and
``gemv`` at M = 1 and ``splitk`` at M = 16 on the int4 weight, ``gemv_t`` on the int8 weight,
then W8A8 at M = 1024 (activation quantization, GEMM). Without ncu it just runs them.
"""

from __future__ import annotations

import torch

import linquant as lq
from linquant.kernels import triton_linear as tlin
from linquant.kernels import triton_w8a8 as tw


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    q4 = lq.quantize(w, "int4-sym-g128")
    q8 = lq.quantize(w, "int8-sym-ch0")
    x1 = torch.randn(1, 8192, device=dev, dtype=torch.bfloat16)
    x16 = torch.randn(16, 8192, device=dev, dtype=torch.bfloat16)
    for kind, x, qt in (("gemv_t", x1, q4), ("gemv", x1, q4), ("splitk", x16, q4),
                        ("gemv_t", x1, q8)):
        tlin.linear(x, qt, None, {}, kernel=kind, config=dict(tlin.CONFIGS[kind][0]))
    w8 = q8.codes().to(torch.int8).reshape(8192, 8192)
    x = torch.randn(1024, 8192, device=dev, dtype=torch.bfloat16)
    tw.linear_w8a8(x, w8, q8.scale.float(), None, config=tw.CONFIGS[0])
    torch.cuda.synchronize()
    print("gpu_profile: done")


if __name__ == "__main__":
    main()
