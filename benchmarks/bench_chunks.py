"""The native GEMM kernels' token chunks, head to head with the same kernels built without them.

The native GEMM kernels' threads split the weight's row blocks, and each thread ran every block
over all M tokens. Once the prepared activations of M tokens outgrow a core's L2 (K = 4096: a
few hundred tokens), every row block streamed all of them from memory again. ``w8a8.c``,
``w8a8_avx2.c`` and ``wa16_avx2.c`` now take the tokens in chunks of about ``CHUNK_BYTES`` of
prepared activations (a compile-time knob): each thread runs its row blocks over one chunk
(then held in its L2), then the next. (The AVX512-BF16 W4A16 kernel runs up to 256 tokens only
and has no chunks.) This script builds each library twice in one process, as linquant builds
it and with ``-DCHUNK_BYTES=0`` (one pass over all tokens: the kernels before the chunks), and
times both on the same cold weights, alternating calls between them (``_common.alternate``).
Each call takes its next distinct weight (>= 256 MiB per shape), so the weights come from
memory as in a model. Prints the median ms of each and the speed-up (> 1: the chunks are
faster), and checks that both builds give the same bits (the chunks change which thread runs
what, not the sums).

    python benchmarks/bench_chunks.py [--repeats 9] [--rounds 2] [--ms 64,256,1024,2048]
        [--kernels w8a8,w8a16,w8a8_avx2,avx2] [--shapes 4096x4096,1536x384]

``avx2`` and ``w8a8_avx2`` are the kernels of CPUs without AVX-512 (any x86-64 CPU with AVX2
runs them; here they are timed directly, whatever the dispatcher would pick on this CPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _common import alternate, machine, rotate, shapes_arg

import linquant as lq
from linquant.kernels import native

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (1536, 384), (384, 1536))
# name -> (library, scheme, activation dtype, function(x, qt, cache))
KERNELS: dict[str, tuple[str, str, torch.dtype, Callable[..., torch.Tensor]]] = {
    "w8a8": (native.W8A8, "int8-sym-ch0", torch.float32,
             lambda x, qt, c: native.linear_w8a8(x, _int8(qt, c), qt.scale, None, None, None,
                                                 c)),
    "w8a16": (native.W8A8, "int8-sym-ch0-bf16", torch.bfloat16,
              lambda x, qt, c: native.linear_w8a16(x, qt, None, c)),
    "avx2": (native.AVX2, "int4-asym-g32-bf16", torch.bfloat16,
             lambda x, qt, c: native.linear_avx2(x, qt, None, c)),
    "w8a8_avx2": (native.W8A8_AVX2, "int8-sym-ch0", torch.float32,
                  lambda x, qt, c: native.linear_w8a8(x, _int8(qt, c), qt.scale, None, None,
                                                      None, c, kernel=native.W8A8_AVX2)),
}


def _int8(qt: lq.QuantizedTensor, cache: dict[str, Any]) -> torch.Tensor:
    """The int8 ``[N, K]`` view of ``qt``'s codes, one object per weight (the layout cache
    is keyed by the tensor object, as a ``W8A8Linear`` keeps it)."""
    if "bench_int8" not in cache:
        n, k = (int(d) for d in qt.shape)
        cache["bench_int8"] = qt.qdata.view(torch.int8).view(n, k)
    return cache["bench_int8"]


def _builds(lib: str, chunk: str | None) -> dict[str, Any]:
    """The library's loader state for each build, keyed "one pass" / "chunks" (``chunk``:
    another ``CHUNK_BYTES`` than the source's, to try one)."""
    spec = native._SPECS[lib]
    out = {}
    other = () if chunk is None else (f"-DCHUNK_BYTES={chunk}",)
    for name, extra in (("one pass", ("-DCHUNK_BYTES=0",)), ("chunks", other)):
        native._SPECS[lib] = dataclasses.replace(spec, flags=spec.flags + extra)
        native._state.pop(lib, None)
        if native._load(lib) is None:
            raise SystemExit(f"{lib} kernel ({name}): {native.status(lib)}")
        out[name] = native._state[lib]
    native._SPECS[lib] = spec
    return out


def _timed(lib: str, builds: dict[str, Any], call: Callable[[torch.Tensor], torch.Tensor],
           x: torch.Tensor, repeats: int, rounds: int) -> tuple[float, float]:
    """Lowest over ``rounds`` of the median ms of "one pass" and "chunks", alternating."""
    def run(name: str) -> Callable[[], None]:
        def go() -> None:
            native._state[lib] = builds[name]
            call(x)
        return go

    best = [math.inf, math.inf]
    with torch.inference_mode():
        for _ in range(rounds):
            times = alternate(run("one pass"), run("chunks"), repeats=repeats)
            best = [min(b, t) for b, t in zip(best, times, strict=True)]
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; lowest median kept")
    ap.add_argument("--ms", default="64,256,1024,2048")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1536x384 (default: five)")
    ap.add_argument("--kernels", default="w8a8,w8a16,w8a8_avx2,avx2",
                    help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--chunk-bytes", default=None,
                    help="build the chunked kernels with this CHUNK_BYTES (default: the source's)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {machine()}")
    ms = [int(v) for v in args.ms.split(",")]
    shapes = shapes_arg(args.shapes, SHAPES)
    g = torch.Generator().manual_seed(0)
    print("ms per call, median of each build's calls (alternating), lowest of the rounds")
    for kname in args.kernels.split(","):
        lib, scheme, dt, fn = KERNELS[kname]
        builds = _builds(lib, args.chunk_bytes)
        print(f"{kname}: {native.status(lib)} (and the same source with -DCHUNK_BYTES=0)")
        for n, k in shapes:
            bits = 4 if scheme.startswith("int4") else 8
            count = max(2, math.ceil(256 * 2**20 / (n * k * bits // 8)))
            first = lq.quantize(torch.randn(n, k, generator=g), scheme)
            qts = [first] + [copy.deepcopy(first) for _ in range(count - 1)]
            caches: list[dict[str, object]] = [{} for _ in qts]
            fns = [lambda x, q=q, c=c, fn=fn: fn(x, q, c)
                   for q, c in zip(qts, caches, strict=True)]
            call = rotate(fns)
            for m in ms:
                x = torch.randn(m, k, generator=g).to(dt)
                outs = {}
                with torch.inference_mode():
                    for name, st in builds.items():
                        native._state[lib] = st
                        for f in fns:  # layouts built (they do not depend on M)
                            f(x[:1])
                        outs[name] = fns[0](x)
                assert torch.equal(outs["chunks"], outs["one pass"]), f"{kname} M={m}: differ"

                t0, t1 = _timed(lib, builds, call, x, args.repeats, args.rounds)
                print(f"  {kname:<9} {n}x{k} M={m:<5} one pass {t0:9.3f}  chunks {t1:9.3f}  "
                      f"{t0 / t1:4.2f}x  ({count} weights)", flush=True)
            del qts, caches, fns, call


if __name__ == "__main__":
    main()
