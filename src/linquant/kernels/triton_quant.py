"""Weight quantization on CUDA in one Triton kernel: choose-qparams + quantize + pack.

:func:`linquant.quantize` calls :func:`quantize` first for CUDA tensors; it returns None for
anything it does not cover, and the torch-ops path (:mod:`linquant.ops`) runs as before.

Covered: fp32 / fp16 / bf16 tensors; 8 and 4 bits; symmetric, asymmetric with an integer zero
point, asymmetric with a float offset; ``clip="minmax"``; every scale dtype; granularity
``group`` (any rank, group size dividing the last dim) or ``channel`` whose granules are
contiguous rows of the flat tensor (axis 0, or only size-1 dims before the axis); 4 bits needs an
even row length (so no packed byte straddles two granules). Not covered (torch path): other bit
widths, ``clip="mse"``, ``tensor`` granularity, channel axes with strided granules.

One program quantizes ``ROWS`` granules held in registers (a row of up to 16384 elements is read
once; longer rows are read twice): per-row min/max (NaN-propagating), the scale in fp32, rounded
to the scale dtype, the zero point from the *stored* scale, the codes, packed (4 bits: two codes
a byte, low nibble first) and stored. Results are bit-identical to the torch path on the same
device: the formulas and their operation order are those of :mod:`linquant.ops.qparams` and
:mod:`linquant.ops.affine`, divisions are IEEE (``div_rn``), rounding is half to even, and a
division by the Python number ``q_max`` follows torch's device rule (CUDA multiplies by the fp32
reciprocal, CPU divides; see :mod:`linquant.kernels._triton_jit`). Input holding NaN/Inf, or a
scale / offset overflowing its dtype, sets a flag; the call then returns None and the torch path
raises the library's error, with its message. So does a 16-bit input whose reconstruction would
overflow its dtype (values near its maximum): the torch path adjusts those granules
(:func:`linquant.ops.qparams.fit_dtype`).

Verified in Triton's interpreter (CPU, triton 3.9) against the torch path on CPU, and on an
NVIDIA H200 (triton 3.6) against the torch path on that GPU: identical bytes. There the kernel
alone ran at 53-105% of a device-to-device copy's traffic rate for an 8192 x 8192 weight; the
whole ``lq.quantize`` call adds its Python and one host sync, 0.1-0.4 ms
(``benchmarks/bench_quantize.py --device cuda``, BENCHMARKS.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from linquant.kernels import triton_w8a8
from linquant.kernels.triton_w8a8 import (
    interpreting,
    next_pow2,
    on_device,
    triton_available,
)
from linquant.ops.grouping import Granules, granules
from linquant.ops.packing import pack
from linquant.ops.qparams import QParams, overflowing, smallest_scale
from linquant.scheme import QuantScheme

__all__ = ["ENABLED", "MAX_SINGLE_L", "covers", "quantize"]

ENABLED = True  # set False to force the torch-ops path on CUDA (benchmarks compare the two)
MAX_SINGLE_L = 16384  # rows up to this long are held in registers (read once)
_TILE = 8192  # elements per program
_WARPS: int | None = None  # warps per program (None: 8 from 4096 elements, else 4)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(shape: tuple[int, ...], scheme: QuantScheme, g: Granules) -> tuple[int, int] | None:
    """``(R, L)``: the granules as rows of the flat tensor, or None when they are not rows."""
    if g.outer != 1 or g.count == 0 or g.inner == 0:
        return None
    if scheme.granularity == "group" or (scheme.granularity == "channel" and len(shape) >= 1):
        return g.count, g.inner
    return None


def covers(x: torch.Tensor, scheme: QuantScheme, g: Granules | None = None) -> bool:
    """Whether :func:`quantize` handles ``x`` with ``scheme`` here (see the module docstring)."""
    if not (ENABLED and isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES
            and x.numel() > 0):
        return False
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())):
        return False
    if scheme.bits not in (4, 8) or scheme.clip != "minmax" or scheme.granularity == "tensor":
        return False
    shape = tuple(x.shape)
    rl = _rows(shape, scheme, g if g is not None else granules(shape, scheme))
    if rl is None or (scheme.bits == 4 and rl[1] % 2):
        return False
    return triton_available()


def _recip(d: int) -> float:
    # torch on CUDA divides by a Python number as a * (1 / d), 1 / d rounded to fp32
    return float(torch.ones((), dtype=torch.float32) / d)



def launch_keywords(scheme: QuantScheme, r: int, length: int,
                    device: torch.device) -> dict[str, Any]:
    """The constexprs and compile options ``weight_quant_kernel`` is launched with for ``r``
    granules of ``length`` values under ``scheme`` on ``device`` (its grid: ``cdiv(r, ROWS)``
    programs). Also read by ``benchmarks/triton_static.py``, which compiles the kernel with
    them for sm_90."""
    mode = 0 if scheme.symmetric else (1 if scheme.zero_point == "int" else 2)
    block = next_pow2(length)
    if block <= MAX_SINGLE_L:
        rows, single = max(1, min(_TILE // block, next_pow2(r))), True
    else:
        rows, block, single = 1, 4096, False
    qmax = scheme.qmax  # the divisor of the scale: q_max (sym) or 2**b - 1 (asym, q_min = 0)
    return dict(INV=_recip(qmax), QMAX=float(qmax), EPS=smallest_scale(scheme.scale_dtype),
                BITS=scheme.bits, MODE=mode, RECIP=triton_w8a8.divides_by_reciprocal(device),
                ROWS=rows, BLOCK_L=block, SINGLE=single,
                num_warps=_WARPS or (8 if rows * block >= 4096 else 4), enable_fp_fusion=False)

def quantize(
    x: torch.Tensor, scheme: QuantScheme, g: Granules | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(qdata, scale [C], zero_point_packed, offset [C])`` as :func:`linquant.quantize` stores
    them (scale and offset flat, in ``scheme.scale_dtype``), or None: not covered
    (:func:`covers`), or the input / parameters are not finite (the torch path then raises)."""
    shape = tuple(x.shape)
    g = g if g is not None else granules(shape, scheme)
    if not covers(x, scheme, g):
        return None
    from linquant.kernels import _triton_jit as jit

    rl = _rows(shape, scheme, g)
    assert rl is not None
    r, length = rl
    xc = x.detach().contiguous()
    dev = xc.device
    bits = scheme.bits
    mode = 0 if scheme.symmetric else (1 if scheme.zero_point == "int" else 2)
    qdata = torch.empty(math.prod(shape) * bits // 8, dtype=torch.uint8, device=dev)
    scale = torch.empty(r, dtype=scheme.scale_dtype, device=dev)
    zp = torch.empty(r, dtype=torch.uint8, device=dev) if mode == 1 else None
    offset = torch.empty(r, dtype=scheme.scale_dtype, device=dev) if mode == 2 else None
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    kw = launch_keywords(scheme, r, length, dev)
    with on_device(xc):
        jit.weight_quant_kernel[(-(-r // kw["ROWS"]),)](
            xc, qdata, scale, scale if zp is None else zp, scale if offset is None else offset,
            bad, r, length, **kw)
    over = overflowing(QParams(scale, zp, offset), scheme, xc.dtype)
    if over is not None:  # granules near a 16-bit maximum: the torch path adjusts them
        bad += over.any()
    if int(bad.item()):
        return None
    zpp = None if zp is None else (zp if bits == 8 else pack(zp, bits))
    return qdata, scale, zpp, offset
