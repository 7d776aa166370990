"""Two builds of the native W4A16 kernel side by side: this tree's and another source's.

For tuning ``csrc/w4a16_bf16.c``: compiles the other source (``--old-rev``, a git revision of
this repository, or ``--old-source``, a file) with the flags linquant uses, and times both on the
same weights and inputs through the same Python wrapper (``native._run``), calls alternating so
that drift of a shared machine hits both alike. Per shape and M: warm (one weight, in cache) and
cold (rotating through >= 256 MiB of distinct weights) medians, the new build's speed-up
(> 1 = the tree's build is faster), and the weight bytes per second of the cold call. Outputs of
the two builds are compared on every cell (max |difference|, in bf16 units of the output's
largest value), since a tuning change may reorder sums but must not change results beyond
rounding.

The layout comes from this tree's ``native.repack``. A source whose compact zero points are
int16 (``(const int16_t*)ob`` in it: sources before uint8 zero points) gets them converted.

    python benchmarks/bench_w4a16_ab.py --old-rev 6fae271 [--schemes int4-sym-g128-fp16,...]
        [--shapes 4096x4096,2048x2048] [--ms 1,2,4,16] [--repeats 15]
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

import torch
from _common import alternate, machine, rotate, shapes_arg

import linquant as lq
from linquant.kernels import native

SOURCE = "src/linquant/kernels/csrc/w4a16_bf16.c"


def _build_old(args: argparse.Namespace, where: Path) -> tuple[ctypes.CDLL, bool]:
    if args.old_source:
        text = Path(args.old_source).read_text()
    else:
        text = subprocess.run(["git", "show", f"{args.old_rev}:{SOURCE}"], check=True,
                              capture_output=True, text=True).stdout
    src = where / "old_w4a16_bf16.c"
    src.write_text(text)
    out = where / "old_w4a16_bf16.so"
    spec = native._SPECS[native.W4A16]
    compiler = shutil.which("cc")
    assert compiler is not None, "needs a C compiler (cc)"
    native._compile(compiler, spec.flags, src, out)
    lib = ctypes.CDLL(str(out))
    fn = lib.lq_w4a16_bf16
    fn.argtypes, fn.restype = spec.symbols["lq_w4a16_bf16"], ctypes.c_int64
    return lib, "(const int16_t*)ob" in text


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--old-rev", help="git revision whose w4a16_bf16.c is the baseline")
    src.add_argument("--old-source", help="a w4a16_bf16.c file as the baseline")
    ap.add_argument("--schemes", default="int4-sym-g128-fp16,int4-asym-g32-fp16")
    ap.add_argument("--shapes", default=None, help="N x K pairs (default 4096x4096,2048x2048)")
    ap.add_argument("--ms", default="1,2,4,16")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    new = native._load(native.W4A16)
    if new is None:
        print(f"the native W4A16 kernel is unavailable here: {native.status()}")
        return
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        old, int16 = _build_old(args, Path(tmp))
        torch.manual_seed(0)
        for scheme in args.schemes.split(","):
            for n, k in shapes_arg(args.shapes, ((4096, 4096), (2048, 2048))):
                _shape(scheme, n, k, new, old, int16, args)


def _shape(scheme: str, n: int, k: int, new: ctypes.CDLL, old: ctypes.CDLL, int16: bool,
           args: argparse.Namespace) -> None:
    count = max(2, math.ceil(256 * 2**20 / (n * k // 2)))
    qts = [lq.quantize(torch.randn(n, k), scheme) for _ in range(count)]
    layouts = [native.repack(qt) for qt in qts]
    olds = [(c, s, o.to(torch.int16) if int16 and comp else o, comp)
            for c, s, o, comp in layouts]
    nbytes = sum(t.nbytes for t in layouts[0][:3])
    print(f"\n{scheme} {n}x{k}: {count} copies of {nbytes / 2**20:.2f} MiB (codes, scales, "
          f"zero points); ms per call, median of {args.repeats} alternating rounds")
    fns = [[_call(lib, q, lay) for q, lay in zip(qts, lays, strict=True)]
           for lib, lays in ((old, olds), (new, layouts))]
    for m in (int(v) for v in args.ms.split(",")):
        _cell(m, k, nbytes, fns[0], fns[1], args.repeats)


Call = Callable[[torch.Tensor], torch.Tensor]


def _call(lib: ctypes.CDLL, qt: lq.QuantizedTensor, layout: native.Layout) -> Call:
    return lambda x: _checked(native._run(lib, x, qt, layout, None))


def _cell(m: int, k: int, nbytes: int, a: list[Call], b: list[Call], repeats: int) -> None:
    x = torch.randn(m, k).bfloat16()
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
