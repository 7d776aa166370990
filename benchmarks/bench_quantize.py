"""Throughput of choose-qparams + quantize + pack on a 4096x4096 fp32 weight.

Compares, in one process, on the same tensor:
  * linquant (`lq.quantize`: blocked, cache-sized working set),
  * a straightforward eager reference (whole-tensor torch ops, what a naive quantizer does),
  * torchao `choose_qparams_affine` + `quantize_affine` when torchao is installed (its time does
    NOT include packing int4 codes into bytes, which linquant's does: the ratio favours torchao).
Prints GB/s of fp32 input and the ratio to torchao, and checks that linquant's codes equal the
eager reference exactly.

With ``--device cuda``: an 8192x8192 fp32 and bf16 weight on the GPU, where ``lq.quantize`` runs
the one-kernel Triton path (linquant.kernels.triton_quant) when triton is installed. Prints, per
case, the time (median of repeats, wall clock between ``torch.cuda.synchronize()`` calls, so
launches and the path's one host sync are included), GB/s of input, GB/s of traffic (input read
+ codes and parameters written), that traffic as a percentage of a device-to-device copy's
(``dst.copy_(src)`` of the same input, read + write) measured in the same run, the torch-ops path
on the same GPU for comparison, and whether both paths give identical bytes.

    python benchmarks/bench_quantize.py [--repeats 15] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import machine, median_ms

import linquant as lq


def eager_reference(w: torch.Tensor, bits: int, group: int | None, symmetric: bool):
    """Naive quantizer: whole-tensor temporaries, same math as linquant."""
    rows = w.reshape(-1, group) if group else w
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        tiny = torch.finfo(torch.float32).tiny
        s = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(tiny)
        q = torch.clamp(torch.round(rows / s), -qmax, qmax).to(torch.int8)
        z = None
    else:
        qmax = 2**bits - 1
        lo = rows.amin(dim=1, keepdim=True).clamp_max(0)
        hi = rows.amax(dim=1, keepdim=True).clamp_min(0)
        s = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        z = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = torch.clamp(torch.round(rows / s) + z, 0, qmax).to(torch.uint8)
    q = q.reshape(-1)
    if bits == 4:
        q = q.view(torch.uint8)
        q = q[0::2] | (q[1::2] << 4)
    return q, s, z


def torchao_fn(w: torch.Tensor, bits: int, group: int | None, symmetric: bool):
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        quantize_affine,
    )

    block = (1, group) if group else (1, w.shape[1])
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        mt, qmin, dt = MappingType.SYMMETRIC, -qmax, torch.int8
    else:
        mt, qmin, qmax, dt = MappingType.ASYMMETRIC, 0, 2**bits - 1, torch.uint8

    def run():
        s, z = choose_qparams_affine(w, mt, block, dt, qmin, qmax)
        return quantize_affine(w, block, s, z, dt, qmin, qmax)

    return run


CASES = [
    ("int8 per-channel sym", "int8-sym-ch0-fp32", 8, None, True),
    ("int4 group 32 asym", "int4-asym-g32-fp32", 4, 32, False),
    ("int4 group 128 asym", "int4-asym-g128-fp32", 4, 128, False),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_median_ms(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 3,
                   device: str = "cuda") -> float:
    """Median wall time of ``fn`` with the GPU drained before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _qt_nbytes(qt: lq.QuantizedTensor) -> int:
    return sum(t.nbytes for t in qt.tensors().values())


def _same_bytes(a: lq.QuantizedTensor, b: lq.QuantizedTensor) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def kernel_ms(fn: Callable[[], object], name: str, reps: int = 10) -> float | None:
    """GPU time per call of the kernels whose name contains ``name``, from PyTorch's profiler
    (no Python, launch or host-sync time); None where the profiler records no such kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.key_averages():
        if name in e.key:
            total += float(getattr(e, "device_time_total", 0.0)
                           or getattr(e, "cuda_time_total", 0.0))
    return total / reps / 1e3 if total else None


def main_cuda(args: argparse.Namespace, device: str = "cuda") -> None:
    """The GPU section (``device="cpu"`` under ``TRITON_INTERPRET=1`` only smoke-tests it)."""
    from linquant.kernels import triton_quant

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"device: {name}, torch {torch.__version__}, "
          f"triton path: {lq.kernels.triton_status()}")
    n = args.size
    print(f"input: {n}x{n}; median of {args.repeats} after warm-up")
    print("ms: the whole lq.quantize call (wall clock, Python and the host sync included); "
          "kernel ms: the Triton kernel alone (profiler)")
    print(f"{'case':34} {'ms':>8} {'in GB/s':>9} {'traffic':>9} {'% copy':>7} "
          f"{'kernel ms':>9} {'% copy':>7} {'torch ms':>9} {'speedup':>8}  bytes")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        w = torch.randn(n, n, device=device).to(dtype)
        dst = torch.empty_like(w)
        t_copy = cuda_median_ms(lambda w=w, dst=dst: dst.copy_(w), repeats=args.repeats,
                                device=device)
        copy_gbs = 2 * w.nbytes / t_copy / 1e6
        dname = str(dtype).replace("torch.", "")
        print(f"{'device-to-device copy ' + dname:34} {t_copy:8.3f} {w.nbytes / t_copy / 1e6:9.1f} "
              f"{copy_gbs:9.1f} {100.0:6.0f}%")
        for label, text, _, _, _ in CASES:
            scheme = lq.QuantScheme.parse(text)
            t_lq = cuda_median_ms(lambda s=scheme, w=w: lq.quantize(w, s), repeats=args.repeats,
                                  device=device)
            qt = lq.quantize(w, scheme)
            triton_quant.ENABLED = False
            try:
                t_torch = cuda_median_ms(lambda s=scheme, w=w: lq.quantize(w, s),
                                         repeats=args.repeats, device=device)
                ref = lq.quantize(w, scheme)
            finally:
                triton_quant.ENABLED = True
            traffic = (w.nbytes + _qt_nbytes(qt)) / t_lq / 1e6
            t_k = (kernel_ms(lambda s=scheme, w=w: lq.quantize(w, s), "weight_quant_kernel")
                   if device == "cuda" else None)
            k_txt = (f"{t_k:9.3f} {100 * (w.nbytes + _qt_nbytes(qt)) / t_k / 1e6 / copy_gbs:6.0f}%"
                     if t_k else f"{'n/a':>9} {'':>7}")
            print(f"{label + ' ' + dname:34} {t_lq:8.3f} {w.nbytes / t_lq / 1e6:9.1f} "
                  f"{traffic:9.1f} {100 * traffic / copy_gbs:6.0f}% {k_txt} {t_torch:9.3f} "
                  f"{t_torch / t_lq:7.1f}x  {'identical' if _same_bytes(qt, ref) else 'DIFFER'}")
        if args.sweep and device == "cuda" and dtype == torch.float32:
            print(f"  sweep ({dname}): kernel ms by elements per program x warps")
            for label, text, _, _, _ in CASES:
                scheme = lq.QuantScheme.parse(text)
                cells = []
                for tile in (4096, 8192, 16384):
                    for warps in (4, 8):
                        triton_quant._TILE, triton_quant._WARPS = tile, warps
                        try:
                            t = kernel_ms(lambda s=scheme, w=w: lq.quantize(w, s),
                                          "weight_quant_kernel", reps=5)
                            cells.append(f"{tile}x{warps}:{t:.3f}" if t else f"{tile}x{warps}:-")
                        except Exception as e:
                            cells.append(f"{tile}x{warps}:{type(e).__name__}")
                triton_quant._TILE, triton_quant._WARPS = 8192, None
                print(f"  {label:32} " + " ".join(cells))
        del w, dst
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=8192, help="--device cuda: weight side")
    ap.add_argument("--sweep", action="store_true",
                    help="--device cuda: also time the kernel per launch shape")
    args = ap.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    gb = w.nbytes / 1e9
    try:
        import torchao  # noqa: F401

        have_ao = True
    except ImportError:
        have_ao = False
    print(f"machine: {machine()}")
    mib = w.nbytes / 2**20
    print(f"input: 4096x4096 fp32 ({mib:.0f} MiB); median of {args.repeats} after warm-up")
    header = (f"{'case':24} {'linquant':>14} {'eager ref':>14} {'torchao':>14} "
              f"{'vs torchao':>11} {'vs eager':>9}  codes")
    print(header)
    for label, text, bits, group, sym in CASES:
        scheme = lq.QuantScheme.parse(text)
        t_lq = median_ms(lambda s=scheme: lq.quantize(w, s), repeats=args.repeats)
        t_ref = median_ms(lambda b=bits, g=group, y=sym: eager_reference(w, b, g, y),
                          repeats=args.repeats)
        qt = lq.quantize(w, scheme)
        ref_q, _, _ = eager_reference(w, bits, group, sym)
        same = torch.equal(qt.qdata, ref_q.view(torch.uint8).reshape(-1))
        if have_ao:
            t_ao = median_ms(torchao_fn(w, bits, group, sym), repeats=args.repeats)
            ao = f"{gb / t_ao * 1e3:8.2f} GB/s"
            ratio = f"{t_ao / t_lq:10.1f}x"
        else:
            ao, ratio = f"{'n/a':>14}", f"{'n/a':>11}"
        print(f"{label:24} {gb / t_lq * 1e3:8.2f} GB/s {gb / t_ref * 1e3:8.2f} GB/s {ao} {ratio} "
              f"{t_ref / t_lq:8.1f}x  {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
