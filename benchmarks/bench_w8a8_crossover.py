"""Where fbgemm's and oneDNN's int8 GEMMs cross over: the W8A8 dispatcher's ``M`` thresholds.

Times linquant's CPU W8A8 paths (``cpu.linear_w8a8_fbgemm``, ``cpu.linear_w8a8_onednn`` and,
where it builds, the native ``native.linear_w8a8``; all bit-identical to the reference, dynamic
per-token activations) on the same cold int8
weights for M = 1..32 tokens, on 4096x4096, MiniLM's 1536x384 and 384x1536, and an LLM-sized
4096x11008; plus the reference (one ``torch._int_mm``) at M = 1. Each shape rotates through
>= 256 MiB of distinct weights; each cell is the lowest of ``--runs`` medians. Prints the ratio
oneDNN / fbgemm (> 1 = fbgemm faster) and the path :func:`linquant.kernels.select_w8a8_path`
picks.

    python benchmarks/bench_w8a8_crossover.py [--repeats 41] [--runs 2] [--ms 1,2,4,8,12,16,24,32]
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from _common import machine, median_ms, rotate

from linquant import kernels
from linquant.kernels import cpu, native, reference

SHAPES = ((4096, 4096), (1536, 384), (384, 1536), (4096, 11008))
Path = Callable[..., torch.Tensor]


def time_path(fn: Path, x: torch.Tensor, ws: list[torch.Tensor], scale: torch.Tensor,
              caches: list[dict[str, Any]], repeats: int, runs: int) -> float:
    """Lowest of ``runs`` medians of ``fn`` on ``x``, each call on the next cold weight."""
    if fn is reference.linear_w8a8:
        calls = [functools.partial(fn, w_int8=w, w_scale=scale) for w in ws]
    else:
        calls = [functools.partial(fn, w_int8=w, w_scale=scale, bias=None, act_scale=None,
                                   act_zero_point=None, cache=c)
                 for w, c in zip(ws, caches, strict=True)]
    call = rotate(calls)

    def one() -> None:
        call(x)

    for _ in ws:  # warm-up pass: prepacks
        one()
    return min(median_ms(one, repeats=repeats, warmup=0) for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--ms", default="1,2,4,8,12,16,24,32")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not (cpu.fbgemm_available() and cpu.onednn_available()):
        print("fbgemm or oneDNN int8 path unavailable here (needs an x86 CPU with VNNI)")
        return
    torch.manual_seed(0)
    ms = [int(v) for v in args.ms.split(",")]
    for n, k in SHAPES:
        count = max(2, math.ceil(256 * 2**20 / (n * k)))
        ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
        scale = torch.rand(n, 1) * 0.01
        caches: list[dict[str, Any]] = [{} for _ in ws]
        print(f"\n{n}x{k} int8 weight, {count} copies; ms per call, lowest of {args.runs} "
              f"medians of {args.repeats}")
        for m in ms:
            x = torch.randn(m, k)
            names: dict[str, Path] = {"fbgemm": cpu.linear_w8a8_fbgemm,
                                      "onednn": cpu.linear_w8a8_onednn}
            if m == 1:
                names["_int_mm"] = reference.linear_w8a8
            if native.available("w8a8"):
                names["native"] = native.linear_w8a8
            cells = {name: time_path(fn, x, ws, scale, caches, args.repeats, args.runs)
                     for name, fn in names.items()}
            extra = f"  _int_mm {cells['_int_mm']:.3f}" if "_int_mm" in cells else ""
            if "native" in cells:
                best = min(t for name, t in cells.items() if name != "native")
                extra += (f"  native {cells['native']:.3f} "
                          f"(best other / native {best / cells['native']:.2f})")
            print(f"  M={m:<3} fbgemm {cells['fbgemm']:.3f}  onednn {cells['onednn']:.3f}  "
                  f"onednn/fbgemm {cells['onednn'] / cells['fbgemm']:.2f}{extra}  "
                  f"dispatcher: {kernels.select_w8a8_path(x, ws[0])}", flush=True)
        del ws, caches


if __name__ == "__main__":
    main()
