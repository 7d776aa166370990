"""This CPU's measured ceilings: streaming bandwidth, warm GEMM peaks, cold 4096x4096 linears.

Measures, in one process, (1) streaming read / copy bandwidth over >= 256 MiB (torch reductions,
and linquant's native int8 GEMV over 16 rotating 16 MiB weights where it builds: it reads faster
than the reductions), (2) warm,
in-cache GEMM throughput for fp32 and bf16 ``torch.mm``, int8 ``torch._int_mm`` and oneDNN
``qlinear_pointwise`` (u8 x s8), at small compute-bound shapes and at M=256, N=K=4096 with a warm
weight, (3) cold-weight fp32 / bf16 ``F.linear`` on 4096x4096 at M = 1, 16, 256, rotating through
>= 256 MiB of distinct weights as ``bench_linear.py`` does, and (4) the speed-up ceilings derived
from them: floor = max(bytes / read bandwidth, 2*M*N*K / measured peak of the math dtype).

    python benchmarks/bench_peak.py [--repeats N] [--runs 3] [--min-mib 256]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from _common import machine, median_ms, rotate

N = K = 4096
MIB = 2**20
Fn = Callable[[], object]
T = TypeVar("T")


def cpu_jiffies() -> tuple[int, int, int]:
    """(busy jiffies of all CPUs, this process's jiffies, steal jiffies); zeros off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
        return sum(v[:3]) + sum(v[5:7]), int(mine[11]) + int(mine[12]), v[7]
    except (OSError, IndexError, ValueError):
        return 0, 0, 0


def section(title: str, fn: Callable[[], T]) -> T:
    """Runs fn; prints how busy *other* processes (and the hypervisor) kept the CPUs meanwhile."""
    (b0, m0, s0), t0 = cpu_jiffies(), time.perf_counter()
    out = fn()
    (b1, m1, s1), dt = cpu_jiffies(), time.perf_counter() - t0
    cap = dt * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1) / 100
    print(f"  [{title}: {dt:.1f} s; other processes used {(b1 - b0 - m1 + m0) / cap:.0f}% of the "
          f"CPUs, steal {(s1 - s0) / cap:.0f}% - more than a few % makes these numbers low]")
    return out


def timed(fn: Fn, repeats: int, runs: int, warmup: int = 3) -> float:
    """Lowest of `runs` medians of `repeats` calls: filters bursts of load from other processes."""
    return min(median_ms(fn, repeats=repeats, warmup=warmup) for _ in range(runs))


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def bandwidth(repeats: int, runs: int, title: str) -> tuple[float, str]:
    x = torch.randn(64 * MIB)  # 256 MiB fp32, 8x the 32 MiB L3
    dst = torch.empty_like(x)
    ops: dict[str, tuple[Fn, float]] = {
        "x.sum()": (lambda: x.sum(), x.nbytes),
        "torch.dot(x, x)": (lambda: torch.dot(x, x), x.nbytes),
        "x.amax()": (lambda: x.amax(), x.nbytes),
        "dst.copy_(x) [rd+wr]": (lambda: dst.copy_(x), 2 * x.nbytes),
    }
    from linquant.kernels import native

    if native.available("w8a8"):  # a kernel that streams: torch's reductions read slower
        ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(16)]
        one, x1 = torch.ones(N, 1), torch.randn(1, K)
        call = rotate([functools.partial(native.linear_w8a8, w_int8=w, w_scale=one, bias=None,
                                         act_scale=None, act_zero_point=None, cache={})
                       for w in ws])
        for _ in ws:  # lay the weights out once
            call(x1)
        ops["native int8 GEMV, 16 MiB"] = (lambda: call(x1), N * K)
    print(f"\n{title}, {x.nbytes // MIB} MiB fp32 tensor, lowest of {runs} medians of {repeats}")
    best, best_op = 0.0, ""
    for name, (fn, nbytes) in ops.items():
        t = timed(fn, repeats, runs)
        print(f"  {name:24} {t:8.2f} ms {gbs(nbytes, t):7.1f} GB/s")
        if "copy" not in name and gbs(nbytes, t) > best:
            best, best_op = gbs(nbytes, t), name
    print(f"  read bandwidth (best reader): {best:.1f} GB/s via {best_op}  "
          "(copy counts src+dst bytes, not the write-allocate read)")
    return best, best_op


def gemm_ops(m: int, n: int, k: int) -> dict[str, Fn]:
    """Builds each GEMM once; an op that fails to build or run is reported, not hidden."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    ai = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    bi = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    au = torch.randint(0, 256, (m, k), dtype=torch.uint8)
    ops: dict[str, Fn] = {"fp32 mm": lambda: torch.mm(a, b), "bf16 mm": lambda: torch.mm(ab, bb),
                          "int8 _int_mm": lambda: torch._int_mm(ai, bi)}
    try:
        packed = torch.ops.onednn.qlinear_prepack(bi.t().contiguous(), None)
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int32)
        ops["int8 onednn qlinear"] = lambda: torch.ops.onednn.qlinear_pointwise(
            au, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")
    except Exception as e:
        print(f"  int8 onednn qlinear {m}x{n}x{k}: prepack FAILED ({type(e).__name__}: {e})")
    return ops


def peaks(repeats: int, runs: int) -> dict[str, float]:
    """Best GFLOP/s per op; calls loop the op until one call takes >= 10 ms."""
    shapes = [(256, 512, 512), (512, 512, 512), (384, 768, 768), (512, 1024, 1024),
              (256, N, K)]
    best: dict[str, float] = {}
    print(f"\n2) warm GEMM GFLOP/s (2*M*N*K), lowest of {runs} medians of {repeats}; the last "
          "shape is the real layer with a warm weight (no rotation)")
    print(f"  {'M x N x K':18} " + " ".join(f"{o:>20}" for o in
                                           ("fp32 mm", "bf16 mm", "int8 _int_mm",
                                            "int8 onednn qlinear")))
    for m, n, k in shapes:
        cells = []
        ops = gemm_ops(m, n, k)
        for name in ("fp32 mm", "bf16 mm", "int8 _int_mm", "int8 onednn qlinear"):
            if name not in ops:
                cells.append("FAILED")
                continue
            op = ops[name]
            try:
                op()
                t0 = time.perf_counter()
                op()
                inner = max(1, math.ceil(10.0 / ((time.perf_counter() - t0) * 1e3)))
            except Exception as e:
                print(f"  {name} {m}x{n}x{k}: FAILED ({type(e).__name__}: {str(e)[:100]})")
                cells.append("FAILED")
                continue

            def loop(op: Fn = op, inner: int = inner) -> None:
                for _ in range(inner):
                    op()

            t = timed(loop, repeats, runs) / inner
            g = 2 * m * n * k / t / 1e6
            best[name] = max(best.get(name, 0.0), g)
            cells.append(f"{g:7.1f} ({t:7.3f} ms)")
        print(f"  {f'{m} x {n} x {k}':18} " + " ".join(f"{c:>20}" for c in cells), flush=True)
    return best


def cold(repeats: int, runs: int, min_mib: int) -> dict[tuple[str, int], float]:
    """fp32 / bf16 F.linear on 4096x4096, rotating >= min_mib MiB of weights (bench_linear)."""
    out: dict[tuple[str, int], float] = {}
    base = torch.randn(N, K) / 64
    print(f"\n3) cold F.linear {N}x{K}, rotating >= {min_mib} MiB of distinct weights, "
          f"lowest of {runs} medians of {repeats} after one pass over every copy")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        w0 = base.to(dtype)
        ws = [w0] + [w0.clone() for _ in range(max(2, math.ceil(min_mib * MIB / w0.nbytes)) - 1)]
        call = rotate([functools.partial(F.linear, weight=w) for w in ws])
        cells = []
        with torch.inference_mode():
            for m in (1, 16, 256):
                x = torch.randn(m, K).to(dtype)
                for w in ws:  # warm-up pass, as bench_linear does
                    F.linear(x, w)
                t = timed(functools.partial(call, x), repeats, runs, warmup=0)
                out[(name, m)] = t
                cells.append(f"M={m}: {t:8.3f} ms ({gbs(w0.nbytes, t):5.1f} GB/s weight, "
                             f"{2 * m * N * K / t / 1e6:6.1f} GFLOP/s)")
        print(f"  {name} x{len(ws)} copies  " + "  ".join(cells), flush=True)
        del ws
    return out


def ceilings(bw: float, pk: dict[str, float], cl: dict[tuple[str, int], float]) -> None:
    groups = N * K // 128, N * K // 32
    # (format, weight bytes incl. scales/zeros, activation+output element bytes, math dtype)
    fmts = [("fp32", N * K * 4, 4, "fp32"), ("bf16", N * K * 2, 2, "bf16"),
            ("W8A16 int8 per-channel", N * K + N * 4, 2, "bf16"),
            ("W4A16 int4 g128", N * K // 2 + groups[0] * 4, 2, "bf16"),
            ("W4A16 int4 g32", N * K // 2 + groups[1] * 4, 2, "bf16"),
            ("W8A8 int8 x int8", N * K + N * 4, 4, "int8")]
    fl256 = 2 * 256 * N * K  # a cold M=256 F.linear that beat the warm mm raises the peak
    peak = {"fp32": max(pk.get("fp32 mm", 0.0), fl256 / cl[("fp32", 256)] / 1e6),
            "bf16": max(pk.get("bf16 mm", 0.0), fl256 / cl[("bf16", 256)] / 1e6),
            "int8": max(pk.get("int8 _int_mm", 0.0), pk.get("int8 onednn qlinear", 0.0))}
    print("\n4) CEILINGS derived from the measured numbers above (not measurements of any kernel)")
    print(f"  read bandwidth {bw:.1f} GB/s; peaks GFLOP/s (best of sections 2 and 3): "
          + ", ".join(f"{d} {p:.0f}" for d, p in peak.items())
          + f"  => int8/fp32 {peak['int8'] / peak['fp32']:.2f}x, "
          f"bf16/fp32 {peak['bf16'] / peak['fp32']:.2f}x, "
          f"int8/bf16 {peak['int8'] / peak['bf16']:.2f}x")
    print("  floor = max(memory floor = (weight + activation + output bytes) / read bandwidth,\n"
          "                compute floor = 2*M*N*K / that peak of the math dtype);\n"
          "  W8A16/W4A16 assume bf16 math at the bf16 peak and free dequantization; W8A8\n"
          "  assumes int8 math at the int8 peak and free activation quantization; scales:\n"
          "  int8 per-channel fp32 (4 B/row), int4 bf16 scale + bf16 zero (4 B/group).\n"
          "  'x fp32' / 'x bf16' = measured cold F.linear time / floor = best possible speed-up.")
    print(f"  {'M':>3} {'format':24} {'MiB':>6} {'mem ms':>8} {'comp ms':>8} {'floor ms':>9} "
          f"{'bound':>7} {'x fp32':>7} {'x bf16':>7}")
    floors: dict[tuple[str, int], float] = {}
    for m in (1, 16, 256):
        for name, wbytes, ebytes, dt in fmts:
            nbytes = wbytes + m * (N + K) * ebytes
            mem = nbytes / bw / 1e6
            comp = 2 * m * N * K / peak[dt] / 1e6 if peak[dt] else float("nan")
            floor = floors[(name, m)] = max(mem, comp)
            print(f"  {m:>3} {name:24} {wbytes / MIB:6.2f} {mem:8.3f} {comp:8.3f} {floor:9.3f} "
                  f"{'memory' if mem >= comp else 'compute':>7} "
                  f"{cl[('fp32', m)] / floor:6.2f}x {cl[('bf16', m)] / floor:6.2f}x")
        print()
    print("  issue targets vs these ceilings (need = measured cold float time / target ratio):")
    targets = [("W8A8 int8 x int8", 256, "fp32", 8.0)]
    for name in ("W4A16 int4 g128", "W4A16 int4 g32", "W8A16 int8 per-channel"):
        targets += [(name, 1, "fp32", 8.0), (name, 1, "bf16", 4.0), (name, 16, "bf16", 1.0)]
    for name, m, ref, ratio in targets:
        need, floor = cl[(ref, m)] / ratio, floors[(name, m)]
        print(f"    {name:24} M={m:<3} >= {ratio:g}x {ref}: need <= {need:7.3f} ms, floor "
              f"{floor:7.3f} ms -> {'reachable in principle' if floor <= need else 'NOT reachable'}"
              f" (best possible {cl[(ref, m)] / floor:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--min-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3, help="keep the lowest of this many medians")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()}")
    bw, _ = section("bandwidth", lambda: bandwidth(args.repeats, args.runs,
                                                   "1) streaming bandwidth"))
    pk = section("peaks", lambda: peaks(args.repeats, args.runs))
    cl = section("cold", lambda: cold(args.repeats, args.runs, args.min_mib))
    bw2, _ = section("bandwidth again", lambda: bandwidth(args.repeats, args.runs,
                                                          "1b) bandwidth again, after 2) and 3)"))
    print(f"  read bandwidth {min(bw, bw2):.1f} .. {max(bw, bw2):.1f} GB/s in this run (the VM's "
          "DRAM bandwidth drifts with the host's load); the ceilings use the higher, so memory "
          f"floors are {max(bw, bw2) / min(bw, bw2):.2f}x longer at the lower")
    ceilings(max(bw, bw2), pk, cl)
    print(f"load average after: {os.getloadavg()}; total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
