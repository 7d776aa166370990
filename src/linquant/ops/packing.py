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
``bits``-bit two's complement, see :mod:`linquant.ops.affine`).
"""

from __future__ import annotations

import torch

__all__ = ["pack", "pack_into", "packed_nbytes", "unpack"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    rem = x.numel() % multiple
    if rem == 0:
        return x
    return torch.cat([x, x.new_zeros(multiple - rem)])


def pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack 1-D uint8 ``codes`` into ``out`` (uint8, ``packed_nbytes(codes.numel(), bits)`` long)."""
    n = codes.numel()
    if bits == 8:
        out.copy_(codes)
        return
    if bits == 4:
        c = _pad_to(codes, 2).view(-1, 2)  # [n/2, 2]: (low nibble, high nibble)
        torch.bitwise_left_shift(c[:, 1], 4, out=out[: c.shape[0]])
        out[: c.shape[0]].bitwise_or_(c[:, 0])
        return
    if bits == 2:
        c = _pad_to(codes, 4).view(-1, 4)  # [n/4, 4]
        o = out[: c.shape[0]]
        torch.bitwise_left_shift(c[:, 3], 6, out=o)
        o.bitwise_or_(c[:, 2] << 4).bitwise_or_(c[:, 1] << 2).bitwise_or_(c[:, 0])
        return
    # 3, 5, 6, 7 bits: 8 codes -> one 64-bit word (bits*8 <= 56 bits used) -> `bits` bytes.
    c = _pad_to(codes, 8).view(-1, 8).to(torch.int64)  # [n/8, 8]
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=1, keepdim=True)  # fields do not overlap: sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # [n/8 * bits]
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
    if bits == 8:
        return p[:n]
    if bits == 4:
        return torch.stack((p & 0xF, p >> 4), dim=1).reshape(-1)[:n]
    if bits == 2:
        return torch.stack((p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6), dim=1).reshape(-1)[:n]
    n8 = (n + 7) // 8
    need = n8 * bits
    if p.numel() < need:
        p = torch.cat([p, p.new_zeros(need - p.numel())])
    b = p[:need].view(-1, bits).to(torch.int64)  # [n/8, bits]
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    return ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)[:n]
