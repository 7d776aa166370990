"""Two builds of a native kernel side by side: this tree's and another source's or flags'.

For tuning ``csrc/w4a16_bf16.c`` (``--kernel w4a16``, bf16 activations) or
``csrc/wa16_avx2.c`` (``--kernel avx2``, ``--dtype float32`` or ``bfloat16`` activations;
``--kernel dequant``, its ``lq_dequant_rows`` writing whole weights in ``--dtype``, 512 rows per
call, with the AVX-512 code where the CPU has it and with the AVX2 code):
compiles the baseline (``--old-rev``, a git revision of this repository, or ``--old-source``, a
file; else this tree's source) with the flags linquant uses, or with ``--old-opt`` in place of
``-O3`` (``--old-opt O2``), and times both on the same weights and inputs through the same
Python wrapper (``native._run`` / ``native._run_avx2`` / ``native._dequantizer``), calls
alternating so that drift of a shared machine hits both alike. Per shape and M: warm (one
weight, in cache) and cold (rotating through >= 256 MiB of distinct weights) medians, the new
build's speed-up (> 1 = the tree's build is faster), and the weight bytes per second of the cold
call. Outputs of the two builds are
compared on every cell (max |difference|, in bf16 units of the output's largest value), since a
tuning change may reorder sums but must not change results beyond rounding.

The layout comes from this tree's ``native.repack`` / ``native.repack_avx2``. A source whose
compact zero points are int16 (``(const int16_t*)ob`` in it: sources before uint8 zero points)
gets them converted; an AVX2 source without center codes (no ``OREC`` in it: sources before
them, whose fp32 sums centered every code at ``2^(bits - 1)``) gets plain fp32 offsets,
centered there.

    python benchmarks/bench_native_ab.py --old-rev 6fae271 [--schemes int4-sym-g128-fp16,...]
        [--shapes 4096x4096,2048x2048] [--ms 1,2,4,16] [--repeats 15]
    python benchmarks/bench_native_ab.py --kernel avx2 --old-opt O2 [--dtype float32]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import alternate, machine, rotate, shapes_arg

import linquant as lq
from linquant.kernels import native

KERNELS = {  # --kernel -> (spec key, source, entry point)
    "w4a16": (native.W4A16, "w4a16_bf16.c", "lq_w4a16_bf16"),
    "avx2": (native.AVX2, "wa16_avx2.c", "lq_wa16_avx2"),
    "dequant": (native.AVX2, "wa16_avx2.c", "lq_dequant_rows"),
}


def _centerless_layout(layout: native.Avx2Layout, bits: int) -> tuple[Any, ...]:
    """``layout`` as AVX2 sources before center codes read it: a compact flag, and for fp32
    scales plain fp32 offsets centered at ``2^(bits - 1)`` (``o_c + (h - c) s``)."""
    codes, scales, params, fmt = layout
    if fmt == native.AVX2_FMT_COMPACT:
        return codes, scales, params, True
    if fmt == native.AVX2_FMT_OFFSET:
        offsets = params[..., :32].contiguous().view(torch.float32).double()
        centers = params[..., 32:].double()
    else:
        offsets, centers = torch.zeros(params.shape, dtype=torch.float64), params.double()
    h = float(1 << (bits - 1))
    return codes, scales, (offsets + (h - centers) * scales.double()).float(), False


def _build_old(args: argparse.Namespace, where: Path) -> tuple[ctypes.CDLL, bool]:
    key, name, _ = KERNELS[args.kernel]
    spec = native._SPECS[key]
    if args.old_source:
        text = Path(args.old_source).read_text()
    elif args.old_rev:
        text = subprocess.run(["git", "show", f"{args.old_rev}:src/linquant/kernels/csrc/{name}"],
                              check=True, capture_output=True, text=True).stdout
    else:
        text = (Path(native.__file__).parent / "csrc" / name).read_text()
    src = where / f"old_{name}"
    src.write_text(text)
    out = where / f"old_{name[:-2]}.so"
    flags = spec.flags if args.old_opt is None else tuple(
        f"-{args.old_opt.lstrip('-')}" if f == "-O3" else f for f in spec.flags)
    compiler = shutil.which("cc")
    assert compiler is not None, "needs a C compiler (cc)"
    native._compile(compiler, flags, src, out)
    lib = ctypes.CDLL(str(out))
    for symbol, argtypes in spec.symbols.items():
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int64
    print(f"baseline: {args.old_source or args.old_rev or 'this tree'}'s {name}, flags "
          f"{' '.join(flags)}")
    # whether the source reads an older layout: int16 zero points (w4a16), or no center codes
    legacy = "OREC" not in text if args.kernel == "avx2" else "(const int16_t*)ob" in text
    return lib, legacy


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="w4a16")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--old-rev", help="git revision whose source is the baseline")
    src.add_argument("--old-source", help="a source file as the baseline")
    ap.add_argument("--old-opt", default=None,
                    help="the baseline's optimization level in place of O3 (O2, Os, ...)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="activations (the avx2 kernel takes both; w4a16 only bfloat16)")
    ap.add_argument("--schemes", default="int4-sym-g128-fp16,int4-asym-g32-fp16")
    ap.add_argument("--shapes", default=None, help="N x K pairs (default 4096x4096,2048x2048)")
    ap.add_argument("--ms", default="1,2,4,16")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if not (args.old_rev or args.old_source or args.old_opt):
        ap.error("nothing to compare: give --old-rev, --old-source or --old-opt")
    if args.kernel == "w4a16" and args.dtype != "bfloat16":
        ap.error("the w4a16 kernel takes bfloat16 activations only")
    key = KERNELS[args.kernel][0]
    new = native._load(key)
    if new is None:
        print(f"the native {key} kernel is unavailable here: {native.status(key)}")
        return
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        old, legacy = _build_old(args, Path(tmp))
        torch.manual_seed(0)
        for scheme in args.schemes.split(","):
            for n, k in shapes_arg(args.shapes, ((4096, 4096), (2048, 2048))):
                if args.kernel == "dequant":
                    _dequant_shape(scheme, n, k, new, old, args)
                else:
                    _shape(scheme, n, k, new, old, legacy, args)


def _shape(scheme: str, n: int, k: int, new: ctypes.CDLL, old: ctypes.CDLL, legacy: bool,
           args: argparse.Namespace) -> None:
    bits = lq.QuantScheme.parse(scheme).bits
    count = max(2, math.ceil(256 * 2**20 / (n * k * bits // 8)))
    qts = [lq.quantize(torch.randn(n, k), scheme) for _ in range(count)]
    avx2 = args.kernel == "avx2"
    layouts = [native.repack_avx2(qt) if avx2 else native.repack(qt) for qt in qts]
    olds: list[Any]
    if avx2:
        olds = [_centerless_layout(lay, bits) if legacy else lay for lay in layouts]
    else:
        olds = [(c, s, o.to(torch.int16) if legacy and comp else o, comp)
                for c, s, o, comp in layouts]
    nbytes = sum(t.nbytes for t in layouts[0][:3])
    print(f"\n{scheme} {n}x{k}: {count} copies of {nbytes / 2**20:.2f} MiB (codes, scales, "
          f"zero points); ms per call, median of {args.repeats} alternating rounds")
    run = native._run_avx2 if avx2 else native._run
    fns = [[_call(run, lib, q, lay) for q, lay in zip(qts, lays, strict=True)]
           for lib, lays in ((old, olds), (new, layouts))]
    dtype = getattr(torch, args.dtype)
    for m in (int(v) for v in args.ms.split(",")):
        _cell(m, k, nbytes, fns[0], fns[1], args.repeats, dtype)


def _dequant_shape(scheme: str, n: int, k: int, new: ctypes.CDLL, old: ctypes.CDLL,
                   args: argparse.Namespace) -> None:
    qts = [lq.quantize(torch.randn(n, k), scheme) for _ in range(2)]
    nbytes = sum(t.nbytes for t in qts[0].tensors().values())
    count = max(2, math.ceil(256 * 2**20 / nbytes))
    qts += [lq.quantize(torch.randn(n, k), scheme) for _ in range(count - 2)]
    dtype = getattr(torch, args.dtype)
    rows = min(n, 512)
    out = torch.empty(rows, k, dtype=dtype)
    print(f"\n{scheme} {n}x{k} -> {args.dtype}: {count} copies of {nbytes / 2**20:.2f} MiB; ms "
          f"per weight ({rows} rows a call), median of {args.repeats} alternating rounds")
    for wide in (True, False) if native.wide_dequant() else (False,):
        fns = []
        for lib in (old, new):
            runs = [native._dequantizer(qt, lib, wide) for qt in qts]
            assert all(r is not None for r in runs), f"{scheme}: lq_dequant_rows does not take it"
            fns.append([_whole(r, out, n) for r in runs if r is not None])
        _dequant_cell(fns[0], fns[1], out, wide, args.repeats)


def _dequant_cell(a: list[Callable[[], torch.Tensor]], b: list[Callable[[], torch.Tensor]],
                  out: torch.Tensor, wide: bool, repeats: int) -> None:
    same = torch.equal(a[0]().clone(), b[0]())
    warm_old, warm_new = alternate(a[0], b[0], repeats=repeats)
    ra, rb = rotate([lambda _x, f=f: f() for f in a]), rotate([lambda _x, f=f: f() for f in b])
    cold_old, cold_new = alternate(lambda: ra(out), lambda: rb(out), repeats=repeats)
    print(f"  {'AVX-512' if wide else 'AVX2':<7} warm old {warm_old:.3f} new {warm_new:.3f} "
          f"({warm_old / warm_new:.2f}x)  cold old {cold_old:.3f} new {cold_new:.3f} "
          f"({cold_old / cold_new:.2f}x)  same output: {same}", flush=True)


def _whole(run: Callable[[torch.Tensor, int, int], bool], out: torch.Tensor, n: int
           ) -> Callable[[], torch.Tensor]:
    rows = int(out.shape[0])

    def call() -> torch.Tensor:
        for r in range(0, n, rows):
            r1 = min(n, r + rows)
            assert run(out[: r1 - r], r, r1)
        return out

    return call


Call = Callable[[torch.Tensor], torch.Tensor]


def _call(run: Callable[..., torch.Tensor | None], lib: ctypes.CDLL, qt: lq.QuantizedTensor,
          layout: Any) -> Call:
    return lambda x: _checked(run(lib, x, qt, layout, None))


def _cell(m: int, k: int, nbytes: int, a: list[Call], b: list[Call], repeats: int,
          dtype: torch.dtype) -> None:
    x = torch.randn(m, k).to(dtype)
    ya, yb = a[0](x).float(), b[0](x).float()
    diff = (ya - yb).abs().max().item() / (ya.abs().max().item() * 2**-8)
    warm_old, warm_new = alternate(lambda: a[0](x), lambda: b[0](x), repeats=repeats)
    ra, rb = rotate(a), rotate(b)
    for f in a + b:
        f(x)
    cold_old, cold_new = alternate(lambda: ra(x), lambda: rb(x), repeats=repeats)
    print(f"  M={m:<3} warm old {warm_old:.3f} new {warm_new:.3f} ({warm_old / warm_new:.2f}x)"
          f"  cold old {cold_old:.3f} new {cold_new:.3f} ({cold_old / cold_new:.2f}x, new "
          f"{nbytes / cold_new / 1e6:.1f} GB/s)  max |new - old| {diff:.2f} bf16 ulps of max",
          flush=True)


def _checked(y: torch.Tensor | None) -> torch.Tensor:
    assert y is not None, "the kernel found a non-finite group sum"
    return y


if __name__ == "__main__":
    main()
