"""Dense sub-byte packing of unsigned codes, every width 2..8.

Bit order (one rule for every width): the codes form a little-endian bit stream. Code ``i``
occupies stream bits ``[i*bits, (i+1)*bits)``, and stream bit ``j`` is bit ``j % 8``
(0 = least significant) of byte ``j // 8``. So for 4 bits byte ``k`` holds code ``2k`` in its low
nibble and code ``2k+1`` in its high nibble; for 2 bits byte ``k`` holds codes ``4k..4k+3`` from
the low bits up; a 3-bit code may straddle two bytes. ``n`` codes take ``ceil(n*bits/8)`` bytes:
odd lengths are fine, the unused high bits of the last byte are zero.

Every 8 codes fill exactly ``bits`` bytes, so a run of codes whose length is a multiple of 8
packs independently of its neighbours (the blocked quantizer relies on this).

Codes are ``uint8`` values already reduced to ``bits`` bits (signed codes are stored as
``bits``-bit two's complement, see :mod:`linquant.ops.affine`). The implementation reinterprets
code bytes as wider integers and so assumes a little-endian host (x86-64, ARM64), checked at
import; the stored format itself is byte-defined and does not depend on the host.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["pack", "pack_into", "packed_nbytes", "unpack"]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("linquant's bit packing needs a little-endian host")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    rem = x.numel() % multiple
    if rem == 0:
        return x
    return torch.cat([x, x.new_zeros(multiple - rem)])


def pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack 1-D uint8 ``codes`` into ``out`` (uint8, ``packed_nbytes(codes.numel(), bits)`` long).

    Works on wide integer views of the code bytes (little-endian hosts: x86, ARM), which keeps
    every op contiguous and vectorised; strided uint8 element ops are far slower.
    """
    n = codes.numel()
    if n == 0:
        return
    if bits == 8:
        out.copy_(codes)
        return
    if bits == 4:
        v = _pad_to(codes, 2).view(torch.int16)  # c0 | c1 << 8
        t = torch.bitwise_right_shift(v, 4).bitwise_and_(0xF0).bitwise_or_(v)
        out.copy_(t)  # int16 -> uint8 keeps the low byte: c0 | c1 << 4
        return
    if bits == 2:
        v = _pad_to(codes, 4).view(torch.int32)  # c0 | c1 << 8 | c2 << 16 | c3 << 24
        t = v & 0x3
        t.bitwise_or_(torch.bitwise_right_shift(v, 6).bitwise_and_(0xC))
        t.bitwise_or_(torch.bitwise_right_shift(v, 12).bitwise_and_(0x30))
        t.bitwise_or_(torch.bitwise_right_shift(v, 18).bitwise_and_(0xC0))
        out.copy_(t)
        return
    # 3, 5, 6, 7 bits: 8 codes (one int64 of bytes) -> one word with code j at bit j*bits,
    # whose low `bits` bytes are the packed bytes.
    v = _pad_to(codes, 8).view(torch.int64)  # code j in byte j
    word = v & 0xFF
    for j in range(1, 8):
        word.bitwise_or_(torch.bitwise_right_shift(v, 8 * j).bitwise_and_(0xFF) << (j * bits))
    packed = word.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)  # [n/8 * bits]
    out.copy_(packed[: packed_nbytes(n, bits)])


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, flattened in row-major order) into a 1-D uint8 tensor."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8, device=codes.device)
    pack_into(flat, bits, out)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes as a 1-D uint8 tensor."""
    p = packed.reshape(-1)
    if bits == 8 or n == 0:
        return p[:n]
    if bits == 4:
        v = p.to(torch.int16)
        t = (v << 4).bitwise_and_(0xF00).bitwise_or_(v & 0xF)  # lo | hi << 8
        return t.view(torch.uint8)[:n]
    if bits == 2:
        v = p.to(torch.int32)
        t = v & 0x3
        t.bitwise_or_((v << 6).bitwise_and_(0x300))
        t.bitwise_or_((v << 12).bitwise_and_(0x30000))
        t.bitwise_or_((v << 18).bitwise_and_(0x3000000))
        return t.view(torch.uint8)[:n]
    n8 = (n + 7) // 8
    b = p[: n8 * bits]
    if b.numel() < n8 * bits:
        b = torch.cat([b, b.new_zeros(n8 * bits - b.numel())])
    wide = torch.zeros(n8, 8, dtype=torch.uint8, device=p.device)
    wide[:, :bits] = b.view(n8, bits)
    word = wide.view(torch.int64)  # [n8, 1], packed bytes little-endian
    mask = (1 << bits) - 1
    out = word & mask
    for j in range(1, 8):
        out.bitwise_or_(torch.bitwise_right_shift(word, j * bits).bitwise_and_(mask) << (8 * j))
    return out.view(torch.uint8).reshape(-1)[:n]
