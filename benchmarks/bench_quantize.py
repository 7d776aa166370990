"""Throughput of choose-qparams + quantize + pack on a 4096x4096 fp32 weight.

Compares, in one process, on the same tensor:
  * linquant (`lq.quantize`: blocked, cache-sized working set),
  * a straightforward eager reference (whole-tensor torch ops, what a naive quantizer does),
  * torchao `choose_qparams_affine` + `quantize_affine` when torchao is installed (its time does
    NOT include packing int4 codes into bytes, which linquant's does: the ratio favours torchao).
Prints GB/s of fp32 input and the ratio to torchao, and checks that linquant's codes equal the
eager reference exactly.

    python benchmarks/bench_quantize.py [--repeats 15]
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
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
