"""Where linquant's AVX2 weight-only kernel (``cpu_native_avx2``) crosses the other CPU paths:
the dispatcher's ``NATIVE_AVX2_MAX_M`` rules.

Times, per weight scheme and activation dtype, ``cpu_native_avx2`` against the paths the
dispatcher would take without it (``cpu_native_int4`` / ``cpu_native_w8a16`` where they apply
and build, ``cpu_int4pack``, ``cpu_int8split``, ``cpu_int8pack``, ``cpu_blocked``,
``cpu_scratch``) and against fp32 and half-precision ``nn.Linear`` (for fp32 activations both
columns are fp32 ``nn.Linear``), on 4096x4096 and MiniLM's
1536x384 and 384x1536. Each shape rotates through >= 256 MiB of distinct weights; each cell is
the lowest of ``--runs`` medians. Prints ms per call, speed relative to the half-precision
``nn.Linear`` (> 1 = faster) and the path :func:`linquant.kernels.select_path` picks.

To see what a CPU without AVX-512 gets, cap every library at AVX2 (PyTorch's own kernels, oneDNN,
MKL, fbgemm and linquant's native kernels):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 LINQUANT_MAX_CPU_ISA=avx2 \\
    python benchmarks/bench_avx2_crossover.py

    python benchmarks/bench_avx2_crossover.py [--repeats 11] [--runs 2] [--ms 1,16,...]
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Callable

import torch
from _common import cases_arg, cold_ms, machine, shapes_arg
from torch import nn

from linquant import kernels
from linquant.kernels import cpu, native
from linquant.nn import QuantLinear

SHAPES = ((4096, 4096), (1536, 384), (384, 1536))
CASES = (("int4-sym-g128-bf16", torch.bfloat16), ("int4-asym-g32-fp16", torch.float16),
         ("int8-sym-ch0-bf16", torch.bfloat16), ("int8-asym-g128-bf16", torch.bfloat16),
         ("int8-sym-ch0", torch.float32), ("int4-asym-g32", torch.float32))
Fn = Callable[..., torch.Tensor]
PATHS: dict[str, tuple[Fn, Callable[[object, torch.dtype], bool]]] = {
    "avx2": (native.linear_avx2, native.avx2_supported),
    "native": (native.linear_int4, native.supported),
    "native_w8a16": (native.linear_w8a16, native.w8a16_supported),
    "int4pack": (cpu.linear_int4pack, cpu.int4pack_supported),
    "int8split": (cpu.linear_int8split, cpu.int8split_supported),
    "int8pack": (cpu.linear_int8pack, cpu.int8pack_supported),
    "blocked": (lambda x, qw, bias, cache: cpu.linear_blocked(x, qw, bias),
                lambda qw, dt: True),
    "scratch": (lambda x, qw, bias, cache: cpu.linear_scratch(x, qw, bias),
                lambda qw, dt: True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--ms", default="1,4,16,64,128,256,512")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1536x384 (default: three)")
    ap.add_argument("--cases", default=None, help="scheme names, comma-separated (default: all)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {machine()}")
    print(f"native kernels: W4A16 {native.status('w4a16')}; W8A8 {native.status('w8a8')}; "
          f"AVX2 {native.status('avx2')}")
    torch.manual_seed(0)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = shapes_arg(args.shapes, SHAPES)
    cases = cases_arg(args.cases, CASES)
    for n, k in shapes:
        base = nn.Linear(k, n, bias=False)
        fcount = max(2, math.ceil(256 * 2**20 / (n * k * 2)))
        floats = {dt: [copy.deepcopy(base).to(dt) for _ in range(fcount)]
                  for dt in (torch.float32, torch.bfloat16, torch.float16)}
        for scheme, dt in cases:
            bits = 4 if scheme.startswith("int4") else 8
            count = max(2, math.ceil(256 * 2**20 / (n * k * bits // 8)))
            first = QuantLinear.from_float(base, scheme).to(dt)
            qls = [first] + [copy.deepcopy(first) for _ in range(count - 1)]
            print(f"\n{n}x{k} {scheme}, {str(dt)[6:]} activations, {count} copies; ms per call "
                  f"(speed relative to {str(dt)[6:]} nn.Linear), lowest of {args.runs} medians "
                  f"of {args.repeats}")
            for m in ms:
                x = torch.randn(m, k).to(dt)
                fns: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
                    "half": list(floats[dt]), "fp32": list(floats[torch.float32])}
                for name, (fn, ok) in PATHS.items():
                    if not ok(first.qweight, dt):
                        continue
                    if name in ("int4pack", "int8pack") and m > 64:
                        continue  # far slower there
                    if name == "blocked" and m > 64 and dt != torch.float32:
                        continue
                    if name == "int8split" and m > kernels.INT8SPLIT_MAX_M:
                        continue
                    fns[name] = [lambda x, q=q, fn=fn: fn(x, q.qweight, None, q.kernel_cache())
                                 for q in qls]
                with torch.inference_mode():
                    cells = {name: cold_ms(fs, x.float() if name == "fp32" else x,
                                           repeats=args.repeats, runs=args.runs)
                             for name, fs in fns.items()}
                half = cells["half"]
                row = "  ".join(f"{name} {t:.3f} ({half / t:4.2f}x)" for name, t in cells.items()
                                if name != "half")
                print(f"  M={m:<4} {str(dt)[6:]} {half:.3f}  {row}  dispatcher: "
                      f"{kernels.select_path(x, first.qweight)}", flush=True)
            del qls


if __name__ == "__main__":
    main()
