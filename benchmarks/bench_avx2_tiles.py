"""The AVX2 weight-only kernel's 8-token tile, head to head with the same kernel built without it.

``csrc/wa16_avx2.c`` processes tokens in tiles of 8, 4, 2 and 1 (``MAXT``, the largest tile, is
a compile-time knob). This script builds the library twice in one process, as linquant does
(``-DMAXT=4``: the kernel as it was before the tile of 8) and times both on the same cold
weights, alternating calls between them (``_common.alternate``), per shape, scheme,
activation dtype and token count. Each call takes its next distinct weight (>= 256 MiB of codes
per shape), so the weights come from memory as in a model. Prints the median ms of each and the
speed-up (> 1: the tile of 8 is faster), and checks that both builds' outputs agree within the
tests' tolerance (they are not bit-identical: a token's sum runs in 1 chain instead of 2).

    python benchmarks/bench_avx2_tiles.py [--repeats 21] [--rounds 2] [--ms 16,128,480]

Add the AVX2 caps of ``bench_avx2_crossover.py`` to see a CPU without AVX-512 (the kernel is the
same; only the other libraries change, and this script times none of them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import warnings

import torch
from _common import alternate, cases_arg, machine, rotate, shapes_arg

import linquant as lq
from linquant.kernels import native

SHAPES = ((4096, 4096), (1536, 384), (384, 1536), (384, 384))
CASES = (("int8-sym-ch0-bf16", torch.bfloat16), ("int4-asym-g32-bf16", torch.bfloat16),
         ("int4-sym-g128-bf16", torch.bfloat16), ("int8-sym-ch0", torch.float32),
         ("int4-sym-g128", torch.float32))


def _builds() -> dict[str, dict[str, object]]:
    """The AVX2 library's loader state for each build, keyed "tile 8" / "tile 4"."""
    spec = native._SPECS[native.AVX2]
    out = {}
    for name, extra in (("tile 4", ("-DMAXT=4",)), ("tile 8", ())):
        native._SPECS[native.AVX2] = dataclasses.replace(spec, flags=spec.flags + extra)
        native._state.pop(native.AVX2, None)
        if native._load(native.AVX2) is None:
            raise SystemExit(f"AVX2 kernel ({name}) {native.status(native.AVX2)}")
        out[name] = native._state[native.AVX2]
    native._SPECS[native.AVX2] = spec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; lowest median kept")
    ap.add_argument("--ms", default="16,128,480")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1536x384 (default: four)")
    ap.add_argument("--cases", default=None, help="scheme names, comma-separated (default: all)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {machine()}")
    builds = _builds()
    print(f"AVX2 kernel: {native.status(native.AVX2)} (and the same source with -DMAXT=4)")
    ms = [int(v) for v in args.ms.split(",")]
    shapes = shapes_arg(args.shapes, SHAPES)
    cases = cases_arg(args.cases, CASES)
    g = torch.Generator().manual_seed(0)
    print("ms per call, median of each build's calls (alternating), lowest of the rounds")
    for n, k in shapes:
        for scheme, dt in cases:
            bits = 4 if scheme.startswith("int4") else 8
            count = max(2, math.ceil(256 * 2**20 / (n * k * bits // 8)))
            first = lq.quantize(torch.randn(n, k, generator=g), scheme)
            qts = [first] + [copy.deepcopy(first) for _ in range(count - 1)]
            caches: list[dict[str, object]] = [{} for _ in qts]
            for m in ms:
                x = torch.randn(m, k, generator=g).to(dt)
                fns = [lambda x, q=q, c=c: native.linear_avx2(x, q, None, c)
                       for q, c in zip(qts, caches, strict=True)]
                call = rotate(fns)
                runs = {}
                outs = {}
                for name, st in builds.items():
                    native._state[native.AVX2] = st
                    for f in fns:  # layouts built, pages touched
                        f(x)
                    outs[name] = fns[0](x).double()
                err = (outs["tile 8"] - outs["tile 4"]).abs().max().item()
                tol = (1e-5 if dt == torch.float32 else 2e-2) * outs["tile 4"].abs().max().item()
                assert err <= tol, f"{scheme} M={m}: builds differ by {err:.3g} > {tol:.3g}"

                def timed(name: str, call=call, x=x):  # type: ignore[no-untyped-def]
                    def run() -> None:
                        native._state[native.AVX2] = builds[name]
                        call(x)
                    return run

                with torch.inference_mode():
                    for _ in range(args.rounds):
                        t4, t8 = alternate(timed("tile 4"), timed("tile 8"),
                                           repeats=args.repeats)
                        runs.setdefault("tile 4", []).append(t4)
                        runs.setdefault("tile 8", []).append(t8)
                t4, t8 = min(runs["tile 4"]), min(runs["tile 8"])
                print(f"  {n}x{k} {scheme:<20} {str(dt)[6:]:<9} M={m:<4} tile 4 {t4:8.3f}  "
                      f"tile 8 {t8:8.3f}  {t4 / t8:4.2f}x  ({count} weights)", flush=True)
            del qts, caches


if __name__ == "__main__":
    main()
