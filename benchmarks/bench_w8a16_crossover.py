"""Where the W8A16 paths cross over: the weight-only dispatcher's ``INT8SPLIT_*`` thresholds.

Times linquant's CPU paths for 8-bit symmetric per-channel weights with bf16 activations
(``cpu_native_w8a16``: the same two-digit scheme in one native VNNI call, where it builds;
``cpu_int8split``: fbgemm's int8 GEMM on activations split into two int8 digits;
``cpu_int8pack``: ``torch._weight_int8pack_mm``; ``cpu_blocked`` / ``cpu_scratch``: dequantize
to bf16 and multiply) against bf16 ``nn.Linear``, on 4096x4096, MiniLM's 1536x384 and
384x1536, and 4096x11008, for M = 1..128 tokens. Each shape rotates through >= 256 MiB of
distinct weights (of the quantized layers; the bf16 layers rotate through twice that); each
cell is the lowest of ``--runs`` medians. Prints ms per call, each path's speed relative to
bf16 (> 1 = faster) and the path :func:`linquant.kernels.select_path` picks.

    python benchmarks/bench_w8a16_crossover.py [--repeats 21] [--runs 2] [--ms 1,2,4,...]
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable

import torch
from _common import cold_ms, machine, shapes_arg
from torch import nn

from linquant import kernels
from linquant.kernels import cpu, native
from linquant.nn import QuantLinear

SHAPES = ((4096, 4096), (1536, 384), (384, 1536), (4096, 11008))
PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "native": native.linear_w8a16,
    "int8split": cpu.linear_int8split,
    "int8pack": cpu.linear_int8pack,
    "blocked": lambda x, qw, bias, cache: cpu.linear_blocked(x, qw, bias),
    "scratch": lambda x, qw, bias, cache: cpu.linear_scratch(x, qw, bias),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--ms", default="1,2,4,8,16,24,32,48,64,96,128")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1536x384 (default: all four)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not cpu.fbgemm_available():
        print("fbgemm's exact int8 GEMM is unavailable here (needs an x86 CPU with VNNI)")
        return
    torch.manual_seed(0)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = shapes_arg(args.shapes, SHAPES)
    for n, k in shapes:
        count = max(2, math.ceil(256 * 2**20 / (n * k)))
        base = nn.Linear(k, n, bias=False)
        first = QuantLinear.from_float(base, "int8-sym-ch0").to(torch.bfloat16)
        qls = [first] + [copy.deepcopy(first) for _ in range(count - 1)]
        floats = [copy.deepcopy(base).bfloat16() for _ in range(count)]
        print(f"\n{n}x{k}, {count} copies; ms per call (speed relative to bf16 nn.Linear), "
              f"lowest of {args.runs} medians of {args.repeats}")
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            fns: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
                "bf16": list(floats)}
            for name, fn in PATHS.items():
                if name == "int8pack" and (m >= 64 or k % 16):
                    continue  # far slower there (and unsupported for K % 16 != 0)
                if name == "native" and not native.available("w8a8"):
                    continue
                fns[name] = [lambda x, q=q, fn=fn: fn(x, q.qweight, None, q.kernel_cache())
                             for q in qls]
            with torch.inference_mode():
                cells = {name: cold_ms(fs, x, repeats=args.repeats, runs=args.runs)
                         for name, fs in fns.items()}
            bf = cells["bf16"]
            row = "  ".join(f"{name} {t:.3f} ({bf / t:4.2f}x)" for name, t in cells.items()
                            if name != "bf16")
            print(f"  M={m:<4} bf16 {bf:.3f}  {row}  dispatcher: "
                  f"{kernels.select_path(x, qls[0].qweight)}", flush=True)
        del qls, floats


if __name__ == "__main__":
    main()
