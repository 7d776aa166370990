"""Apply scales and zero points: quantize to packed codes and back (the "apply" half).

``x3 = [outer, C, inner]`` is the lowered tensor (see :mod:`.grouping`), parameters are 1-D of
length C. Formulas (fp32 arithmetic, round half to even, ``s`` the *stored* scale)::

    symmetric       q = clamp(round(r / s), -q_max, q_max)          r ≈ s q
    asym, int zp    q = clamp(round(r / s) + z, 0, 2**b - 1)        r ≈ s (q - z)
    asym, float m   q = clamp(round((r - m) / s), 0, 2**b - 1)      r ≈ s q + m

Storage: codes in row-major order of the original tensor, packed densely (see
:mod:`.packing`). Symmetric codes are stored as ``b``-bit two's complement (for 8 bits the bytes
are exactly an ``int8`` tensor); asymmetric codes are unsigned.

The work runs through the tensor in cache-sized blocks: every temporary is about one block
(256K elements), never a full-size float copy. Large fresh temporaries are what makes eager
quantizers slow (glibc maps and zeroes them again on every call).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from linquant.ops.packing import pack_into, packed_nbytes, unpack
from linquant.ops.qparams import QParams
from linquant.scheme import QuantScheme

__all__ = ["dequantize_packed", "quantize_packed", "sign_extend"]

BLOCK_ELEMS = 1 << 18


def _blocks(shape3: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """Yield ``(dim, start, stop)`` slices of ``[outer, C, inner]`` of about BLOCK_ELEMS elements.

    Slices along dim 0 when ``outer > 1`` (then C*inner elements per step), else along dim 1.
    Every block but the last holds a multiple of 8 elements, so blocks pack independently.
    """
    outer, count, inner = shape3
    dim, length, step_elems = (0, outer, count * inner) if outer > 1 else (1, count, inner)
    align = 8 // math.gcd(step_elems, 8) if step_elems else 1
    step = max(1, BLOCK_ELEMS // max(1, step_elems))
    step = max(align, step // align * align)
    for start in range(0, length, step):
        yield dim, start, min(length, start + step)


def _param_views(
    qp: QParams, dim: int, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scale / zero point / offset shaped to broadcast against a block of ``[outer, C, inner]``."""

    def view(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t if dim == 0 else t[start:stop]
        return t.float().view(1, -1, 1)

    s = view(qp.scale)
    assert s is not None
    return s, view(qp.zero_point), view(qp.offset)


def quantize_packed(x3: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
    """Quantize the contiguous ``x3 = [outer, C, inner]`` to a 1-D uint8 packed code stream."""
    bits = scheme.bits
    numel = x3.numel()
    out = torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8, device=x3.device)
    # float -> int8 conversion is vectorised, float -> uint8 is not (5x slower): codes that fit
    # int8 go through int8; unsigned 8-bit codes through int16.
    wide = not scheme.symmetric and bits == 8
    code_dtype = torch.int16 if wide else torch.int8
    buf = torch.empty(0, dtype=torch.float32, device=x3.device)
    codes_buf = torch.empty(0, dtype=code_dtype, device=x3.device)
    mask = (1 << bits) - 1
    done = 0
    for dim, start, stop in _blocks(tuple(x3.shape)):  # type: ignore[arg-type]
        xb = x3.narrow(dim, start, stop - start)
        n = xb.numel()
        if buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=x3.device)
            codes_buf = torch.empty(n, dtype=code_dtype, device=x3.device)
        t = buf[:n].view(xb.shape)
        s, z, m = _param_views(qp, dim, start, stop)
        if m is not None:
            torch.sub(xb, m, out=t)
            t.div_(s)
        else:
            torch.div(xb, s, out=t)
        t.round_()
        if z is not None:
            t.add_(z)
        t.clamp_(scheme.qmin, scheme.qmax)
        nbytes = packed_nbytes(n, bits)
        target = out[done // 8 * bits : done // 8 * bits + nbytes]
        if bits == 8 and not wide:
            target.view(torch.int8).copy_(t.view(-1))
        elif wide:
            c16 = codes_buf[:n]
            c16.copy_(t.view(-1))
            target.copy_(c16)
        else:
            c = codes_buf[:n]
            c.copy_(t.view(-1))
            u = c.view(torch.uint8)
            if scheme.symmetric:
                u.bitwise_and_(mask)  # b-bit two's complement
            pack_into(u, bits, target)
        done += n
    return out


def sign_extend(u: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits``-bit two's complement codes (uint8) to int8 values."""
    if bits == 8:
        return u.view(torch.int8)
    shift = 8 - bits
    return (u << shift).view(torch.int8) >> shift


def dequantize_packed(
    packed: torch.Tensor,
    qp: QParams,
    scheme: QuantScheme,
    shape3: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`quantize_packed`: a contiguous ``[outer, C, inner]`` ``dtype`` tensor."""
    bits = scheme.bits
    out = torch.empty(shape3, dtype=dtype, device=packed.device)
    traced = torch.compiler.is_compiling()
    done = 0
    for dim, start, stop in _blocks(shape3):
        ob = out.narrow(dim, start, stop - start)
        n = ob.numel()
        off = done // 8 * bits
        u = unpack(packed[off : off + packed_nbytes(n, bits)], bits, n)
        codes = sign_extend(u, bits) if scheme.symmetric else u
        t = codes.to(torch.float32).view(ob.shape)
        s, z, m = _param_views(qp, dim, start, stop)
        if traced:  # the same operations, out of place (torch.export 2.4 cannot mutate them)
            t = (t if z is None else t - z) * s
            t = t if m is None else t + m
        else:
            if z is not None:
                t.sub_(z)
            t.mul_(s)
            if m is not None:
                t.add_(m)
        ob.copy_(t)
        done += n
    return out


def codes_unpacked(packed: torch.Tensor, scheme: QuantScheme, numel: int) -> torch.Tensor:
    """All codes as a 1-D tensor: int8 (symmetric) or uint8 (asymmetric)."""
    u = unpack(packed, scheme.bits, numel)
    return sign_extend(u, scheme.bits) if scheme.symmetric else u
