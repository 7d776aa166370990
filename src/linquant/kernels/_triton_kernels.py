# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls, allow-untyped-decorators
"""Triton kernel sources for :mod:`linquant.kernels.triton_linear` (see its docstring).

Imported only by that module, lazily, when a kernel is first needed: importing this module
imports Triton, and ``@triton.jit`` reads ``TRITON_INTERPRET`` at decoration time (the
interpreter runs the same kernels on CPU tensors). Kept apart from the launcher because the
kernels and their helpers must be module globals (the interpreter does not see closures).

Literals in the kernels: 0x4B000000 is the fp32 bit pattern of 2**23 (OR-ing a code u < 2**23
into it gives 2**23 + u) and 8388608.0 is 2**23. -2004318072 and -2139062144 are the int32
values of 0x88888888 and 0x80808080. 0x43004300 / 0x64006400 (``_tile_packed``) are two 16-bit
copies of bf16 128.0 / fp16 1024.0.
"""

# ruff: noqa: SIM108  (compile-time if/else blocks read better than ternaries in kernels)

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linquant.kernels.triton_linear import _interpreting

__all__ = ["INTERPRETED", "dequant_kernel", "gemv_kernel", "gemv_t_kernel", "mm_kernel"]

# Whether these functions were decorated for Triton's CPU interpreter.
INTERPRETED = _interpreting()


# 8-bit codes through PTX's byte permute on an NVIDIA GPU; the interpreter cannot run inline
# PTX and takes the shift-and-OR instead (the same bits), as does ROCm (no PTX there). Not yet
# run on a GPU (module docstring of triton_linear); the CUDA tests check it against the oracle.
_PRMT = tl.constexpr(not INTERPRETED and torch.version.hip is None)


@triton.jit
def _byte_into_magic(wq, magic, i: tl.constexpr):
    # byte i of every word into the low byte of magic (0x4B000000): 2**23 + u as fp32 bits in
    # one PRMT instead of a shift and a LOP3. prmt.b32 d, a, b, c: the bytes of {b, a} are
    # numbered 0-7 (a's 0-3); nibble j of c picks d's byte j: 0x765i = a's byte i, then b's
    # bytes 1-3 (0x00, 0x00, 0x4B). The selector is a compile-time constant in a register;
    # ptxas folds it into the instruction.
    return tl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
        [wq, tl.zeros_like(wq) + magic, tl.zeros_like(wq) + (0x7650 + i)],
        dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _piece(wq, hi, magic, i: tl.constexpr, BITS: tl.constexpr, c, s, m,
           SCALE: tl.constexpr, OFFSET: tl.constexpr):
    # code i of every word, exact, as fp32: q = u_i - (c - 2**23), then * s + m.
    # 8 bits: ((u_i | 0x4B000000) as fp32) - c. 4 bits: u_i masked in place in the low (wq)
    # or high (hi = wq >> 16) half, j = i % 4, as in gemv_kernel: f = 2**23 + u * 16**j, and
    # q = f * 16**-j - (c - 2**23 + 2**23 * 16**-j), exact in one FFMA (or FMUL and FADD: the
    # product is a power-of-two scaling) instead of a shift, a bit-field extract and an FADD.
    if BITS == 4:
        if i < 4:
            v = (wq & (15 << (4 * (i % 4)))) | magic
        else:
            v = (hi & (15 << (4 * (i % 4)))) | magic
        f = (v.to(tl.float32, bitcast=True) * (1.0 / (1 << (4 * (i % 4))))
             - (c - (8388608.0 - 8388608.0 / (1 << (4 * (i % 4))))))
    elif _PRMT:  # 8 bits, on a GPU: one byte permute into magic's bytes
        f = _byte_into_magic(wq, magic, i).to(tl.float32, bitcast=True) - c
    else:
        u = (wq >> (BITS * i)) & ((1 << BITS) - 1)
        f = (u | 0x4B000000).to(tl.float32, bitcast=True) - c
    if SCALE:
        f = f * s
    if OFFSET:
        f = f + m
    return f


@triton.jit
def _tile(wq, magic, c, s, m, BITS: tl.constexpr, SCALE: tl.constexpr,
          OFFSET: tl.constexpr, DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # [BN, BK / codes_per_word] words -> [BN, BK] weights in DT, in K order (codes of a
    # word are interleaved back with joins on a new last axis, then merged by reshape)
    if BITS == 4:
        hi = wq >> 16
        p0 = _piece(wq, hi, magic, 0, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p1 = _piece(wq, hi, magic, 1, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p2 = _piece(wq, hi, magic, 2, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p3 = _piece(wq, hi, magic, 3, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p4 = _piece(wq, hi, magic, 4, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p5 = _piece(wq, hi, magic, 5, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p6 = _piece(wq, hi, magic, 6, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p7 = _piece(wq, hi, magic, 7, BITS, c, s, m, SCALE, OFFSET).to(DT)
        w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)),
                    tl.join(tl.join(p1, p5), tl.join(p3, p7)))  # [.., x, y, z]: 4x+2y+z
    else:
        hi = wq
        p0 = _piece(wq, hi, magic, 0, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p1 = _piece(wq, hi, magic, 1, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p2 = _piece(wq, hi, magic, 2, BITS, c, s, m, SCALE, OFFSET).to(DT)
        p3 = _piece(wq, hi, magic, 3, BITS, c, s, m, SCALE, OFFSET).to(DT)
        w = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # [.., x, z]: 2x+z
    return tl.reshape(w, (BN, BK))


@triton.jit
def _halves(wq, magic, j: tl.constexpr, DT: tl.constexpr):
    # codes j and j + 4 of every word as two DT values BASE + u (see _tile_packed)
    if j == 0:
        t = (wq & 0x000F000F) | magic
    else:
        t = ((wq >> (4 * j)) & 0x000F000F) | magic
    return (t.to(tl.int16).to(DT, bitcast=True), (t >> 16).to(tl.int16).to(DT, bitcast=True))


@triton.jit
def _per_code(p, BN: tl.constexpr, BK: tl.constexpr):
    # a tile's parameters, [BN, 1] (one set per row) or [BN, BK / 8] (one per word), as a
    # [BN, 1] / [BN, BK] operand of the [BN, BK] tile
    if p.shape[1] == 1:
        out = p
    else:
        out = tl.reshape(tl.broadcast_to(p[:, :, None], (BN, BK // 8, 8)), (BN, BK))
    return out


@triton.jit
def _tile_packed(wq, magic, zc, s, m, SCALE: tl.constexpr, OFFSET: tl.constexpr,
                 DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr):
    # 4-bit codes only: [BN, BK / 8] words -> [BN, BK] weights computed in DT (bf16 / fp16),
    # two codes per instruction. Code j of the low half and code j of the high half of a word
    # (codes j and j + 4) are shifted down together, masked with 0x000F000F and OR-ed with
    # magic (0x43004300 for bf16, 0x64006400 for fp16: two copies of 128.0 / 1024.0, whose
    # last mantissa bit is worth 1), so each 16-bit half reads as BASE + u, exact.
    # Subtracting BASE + zc (zc: the code offset, a small integer) leaves q exactly
    # (|q| <= 15); with SCALE, q * s (+ m) is rounded to DT. ptxas pairs K-adjacent codes'
    # arithmetic into one HADD2 / HMUL2 (sm_90). (fp16 with a scale above 65504: s rounds to
    # Inf and q = 0 gives NaN where the fp32 decode gives 0; that group's other weights are
    # Inf in fp16 either way.)
    if DT == tl.bfloat16:  # noqa: SIM300 (DT is a dtype, not a constant)
        base = (zc + 128.0).to(DT)
    else:
        base = (zc + 1024.0).to(DT)
    p0, p4 = _halves(wq, magic, 0, DT)
    p1, p5 = _halves(wq, magic, 1, DT)
    p2, p6 = _halves(wq, magic, 2, DT)
    p3, p7 = _halves(wq, magic, 3, DT)
    w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)),
                tl.join(tl.join(p1, p5), tl.join(p3, p7)))  # K order, as in _tile
    w = tl.reshape(w, (BN, BK))
    # the arithmetic on the K-ordered tile: pairs (k, k + 1) are what the MMA operand (and
    # its trip through shared memory) packs into one register, so ptxas builds each pair with
    # one PRMT before the HADD2 / HMUL2 (about 0.5 PRMT per code) instead of re-pairing the
    # results (1.0 per code when the arithmetic ran on the (j, j + 4) halves; sm_90 SASS)
    if INTERP and DT == tl.bfloat16:  # noqa: SIM300
        # the interpreter's (3.6, 3.9) bf16 arithmetic on bitcast values gives NaN: via fp32
        # there; its fp16 arithmetic works, so fp16 tests run the GPU's code
        w = w.to(tl.float32) - _per_code(base, BN, BK).to(tl.float32)
        if SCALE:
            w = w * _per_code(s, BN, BK).to(DT).to(tl.float32)
            if OFFSET:
                w = w + _per_code(m, BN, BK).to(DT).to(tl.float32)
        w = w.to(DT)
    else:
        w = w - _per_code(base, BN, BK)
        if SCALE:
            w = w * _per_code(s.to(DT), BN, BK)
            if OFFSET:
                w = w + _per_code(m.to(DT), BN, BK)
    return w


@triton.jit
def _wtile(wq, magic, c, s, m, BITS: tl.constexpr, SCALE: tl.constexpr, OFFSET: tl.constexpr,
           DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PACKED: tl.constexpr,
           INTERP: tl.constexpr):
    # the dot kernels' weight tile: _tile_packed (PACKED, 4-bit codes; magic is its pair
    # pattern) or _tile (fp32 arithmetic); c is 2**23 + the code offset, as _tile takes it
    if PACKED and BITS == 4:
        w = _tile_packed(wq, magic, c - 8388608.0, s, m, SCALE, OFFSET, DT, BN, BK, INTERP)
    else:
        w = _tile(wq, magic, c, s, m, BITS, SCALE, OFFSET, DT, BN, BK)
    return w


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    if INTERP:  # the 3.9 interpreter mis-computes bf16 dots; fp32 copies are exact
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _row_params(s_ptr, z_ptr, m_ptr, offs_n, n_mask, BLOCK_N: tl.constexpr, HALF: tl.constexpr,
                HAS_Z: tl.constexpr, SYM: tl.constexpr, HAS_M: tl.constexpr):
    """Row ``offs_n``'s scale, code offset ``c`` (``2**23`` + zero point, ``+ HALF`` for
    symmetric codes, see :func:`_piece`) and float offset ``m``, in fp32 (first parameter set
    of each row: all of them for per-channel weights)."""
    s_row = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        c_row = tl.load(z_ptr + offs_n, mask=n_mask, other=0).to(tl.float32) + 8388608.0
    elif SYM:
        c_row = tl.zeros((BLOCK_N,), tl.float32) + (8388608.0 + HALF)
    else:
        c_row = tl.zeros((BLOCK_N,), tl.float32) + 8388608.0
    if HAS_M:
        m_row = tl.load(m_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        m_row = tl.zeros((BLOCK_N,), tl.float32)
    return s_row, c_row, m_row


@triton.jit
def _code_term(wq, hi, magic, xi, zc, i: tl.constexpr, BITS: tl.constexpr,
               X_AXIS: tl.constexpr):
    """``x_i * (u_i - zc)`` for code ``i`` of every word of ``wq`` (the one-token kernels):
    ``xi`` is the activation vector of code ``i``, broadcast along the words' axis ``X_AXIS``
    (0 for ``[rows, words]`` tiles, 1 for ``[words, rows]``), ``zc`` the code offset. 4-bit
    codes are masked in place in the low (``wq``) or high (``hi = wq >> 16``) half, OR-ed with
    ``magic`` (0x4B000000 in a register), and the power of two ``16**j`` left in them is
    folded into ``xi`` (exact); see :func:`gemv_kernel`."""
    if BITS == 8:
        if _PRMT:
            v = _byte_into_magic(wq, magic, i)
        else:
            v = ((wq >> (8 * i)) & 255) | 0x4B000000
        xs = xi
        f = v.to(tl.float32, bitcast=True) - (zc + 8388608.0)
    else:
        if i < 4:
            v = (wq & (15 << (4 * (i % 4)))) | magic
        else:
            v = (hi & (15 << (4 * (i % 4)))) | magic
        if i % 4 == 0:
            xs = xi
            f = v.to(tl.float32, bitcast=True) - (zc + 8388608.0)
        else:
            xs = xi * (1.0 / (1 << (4 * (i % 4))))
            f = v.to(tl.float32, bitcast=True) - (zc * (1 << (4 * (i % 4))) + 8388608.0)
    if X_AXIS == 0:
        t = xs[None, :] * f
    else:
        t = xs[:, None] * f
    return t


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, m_ptr, b_ptr, y_ptr,
                N, K, KW, SPLIT_K,
                BITS: tl.constexpr, SYM: tl.constexpr, HAS_Z: tl.constexpr, HAS_M: tl.constexpr,
                HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP: tl.constexpr,
                ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[0, n] = sum_k x[0, k] w[n, k] (+ bias)`` for one token (see the launcher's doc).

    Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``; each program reduces ``BLOCK_N`` rows over its share
    of K tiles. ``ATOMIC``: ``y`` is a zeroed fp32 buffer and the splits add into it.
    """
    CPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // CPW
    HALF: tl.constexpr = 1 << (BITS - 1)
    XOR: tl.constexpr = -2004318072 if BITS == 4 else -2139062144  # 0x88888888 / 0x80808080
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BKW)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    w_rows = w_ptr + offs_n[:, None] * KW

    # per-row parameters, for per-channel weights (constant over K)
    s_row, c_row, m_row = _row_params(s_ptr, z_ptr, m_ptr, offs_n, n_mask, BLOCK_N, HALF,
                                      HAS_Z, SYM, HAS_M)

    acc = tl.zeros((BLOCK_N, BKW), tl.float32)
    xs = tl.zeros((BKW,), tl.float32)  # running sum of x (per-channel float offset)
    w_end = tl.minimum(KW, t1 * BKW)  # this split's words end here
    wcol = t0 * BKW + offs_w
    wq_next = tl.load(w_rows + wcol[None, :], mask=n_mask[:, None] & (wcol < w_end)[None, :],
                      other=0)
    for t in range(t0, t1):
        wq = wq_next
        wcol = t * BKW + offs_w
        w_in = wcol < KW
        ncol = wcol + BKW  # prefetch the next tile while this one is reduced
        wq_next = tl.load(w_rows + ncol[None, :],
                          mask=n_mask[:, None] & (ncol < w_end)[None, :], other=0)
        if SYM:
            wq = wq ^ XOR
        # (c, s, m) of this tile: per row, per row and tile, or per row and word
        # zc: the code offset as a small integer (zero point, or HALF for symmetric codes)
        if PER_CHANNEL:
            zc = c_row[:, None] - 8388608.0
            s = s_row[:, None]
            m = m_row[:, None]
        elif GROUP % BLOCK_K == 0:
            g_off = (t * BLOCK_K // GROUP) * N + offs_n
            s = tl.load(s_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if HAS_Z:
                zc = tl.load(z_ptr + g_off, mask=n_mask, other=0).to(tl.float32)[:, None]
            else:
                zc = c_row[:, None] - 8388608.0
            if HAS_M:
                m = tl.load(m_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            else:
                m = m_row[:, None]
        else:
            g_off = ((wcol * CPW) // GROUP)[None, :] * N + offs_n[:, None]
            p_mask = n_mask[:, None] & w_in[None, :]
            s = tl.load(s_ptr + g_off, mask=p_mask, other=0.0).to(tl.float32)
            if HAS_Z:
                zc = tl.load(z_ptr + g_off, mask=p_mask, other=0).to(tl.float32)
            else:
                zc = c_row[:, None] - 8388608.0
            if HAS_M:
                m = tl.load(m_ptr + g_off, mask=p_mask, other=0.0).to(tl.float32)
            else:
                m = m_row[:, None]
        # 4-bit decoding without shifting each code down: code i sits at bits [4j, 4j + 4) of
        # the low (i < 4) or the high (wq >> 16) half of its word, j = i % 4 (compile time).
        # Masked in place and OR-ed into 2**23's bits it reads as 2**23 + u * 16**j (exact:
        # u * 16**j < 2**16); subtracting 2**23 + zc * 16**j leaves (u - zc) * 16**j exactly,
        # and x is pre-scaled by 16**-j (a power of two: exact). ``magic`` is 0x4B000000
        # (KW >= 0) but not a compile-time constant: in a register, ptxas fuses the AND and the
        # OR into one LOP3 (with two immediates it emits two). Compiled for sm_90 (triton 3.6,
        # SASS counted): 5.4 loop instructions per code, 2.0 of them on the integer pipe,
        # against 6.5 and 3.1 for shift-and-extract. 8-bit codes: one PRMT per code on a GPU
        # (_byte_into_magic: 5.4 -> 4.6 per code), shift-and-OR in the interpreter.
        if BITS == 4:
            magic = 0x4B000000 + (KW >> 31)
            hi = wq >> 16
        else:  # 8-bit codes: magic only for the PRMT (the shift-and-OR takes an immediate)
            magic = 0x4B000000 + (KW >> 31)
            hi = wq
        part = tl.zeros((BLOCK_N, BKW), tl.float32)
        xt = tl.zeros((BKW,), tl.float32)
        for i in tl.static_range(CPW):
            xi = tl.load(x_ptr + wcol * CPW + i, mask=w_in, other=0.0).to(tl.float32)
            if HAS_M:
                xt += xi
            part += _code_term(wq, hi, magic, xi, zc, i, BITS, 0)
        if PER_CHANNEL:
            acc += part
            if HAS_M:
                xs += xt
        else:
            acc += part * s
            if HAS_M:
                acc += m * xt[None, :]
    y = tl.sum(acc, axis=1)
    if PER_CHANNEL:
        y = y * s_row
        if HAS_M:
            y += m_row * tl.sum(xs, axis=0)
    if HAS_BIAS:  # added once: by the first K split
        b_end = N - N * tl.minimum(pid_k, 1)  # N for the first split, else 0
        y += tl.load(b_ptr + offs_n, mask=offs_n < b_end, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask)
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gemv_t_kernel(x_ptr, w_ptr, s_ptr, z_ptr, m_ptr, b_ptr, y_ptr,
                  N, K, KW,
                  BITS: tl.constexpr, SYM: tl.constexpr, HAS_Z: tl.constexpr,
                  HAS_M: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                  GROUP: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_KW: tl.constexpr):
    """One token against the transposed words ``w [KW, N]`` (``N`` contiguous): the same
    result as :func:`gemv_kernel`, with the rows of ``W`` spread over the threads (coalesced,
    16-byte loads along ``N``) and ``K`` walked in ``BLOCK_KW`` words, so each ``x`` value is a
    broadcast load shared by every thread and no data crosses threads until the final sum.

    Grid ``(cdiv(N, BLOCK_N), splits)`` (the splits of K: the grid's second size, chosen per
    config by the launcher); ``ATOMIC``: ``y`` is a zeroed fp32 buffer.
    """
    CPW: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = 1 << (BITS - 1)
    XOR: tl.constexpr = -2004318072 if BITS == 4 else -2139062144
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    n_tiles = tl.cdiv(KW, BLOCK_KW)
    per_split = tl.cdiv(n_tiles, tl.num_programs(1))
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    s_row, c_row, m_row = _row_params(s_ptr, z_ptr, m_ptr, offs_n, n_mask, BLOCK_N, HALF,
                                      HAS_Z, SYM, HAS_M)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    xs = tl.zeros((BLOCK_KW,), tl.float32)
    magic = 0x4B000000 + (KW >> 31)  # in a register (see gemv_kernel)
    for t in range(t0, t1):
        kw = t * BLOCK_KW + offs_w
        w_in = kw < KW
        wq = tl.load(w_ptr + kw[:, None] * N + offs_n[None, :],
                     mask=w_in[:, None] & n_mask[None, :], other=0)
        if SYM:
            wq = wq ^ XOR
        if PER_CHANNEL:
            zc = c_row[None, :] - 8388608.0
            s = s_row[None, :]
            m = m_row[None, :]
        elif GROUP % (BLOCK_KW * CPW) == 0:
            g_off = (t * BLOCK_KW * CPW // GROUP) * N + offs_n
            s = tl.load(s_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_Z:
                zc = tl.load(z_ptr + g_off, mask=n_mask, other=0).to(tl.float32)[None, :]
            else:
                zc = c_row[None, :] - 8388608.0
            if HAS_M:
                m = tl.load(m_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            else:
                m = m_row[None, :]
        else:
            g_off = ((kw * CPW) // GROUP)[:, None] * N + offs_n[None, :]
            p_mask = w_in[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + g_off, mask=p_mask, other=0.0).to(tl.float32)
            if HAS_Z:
                zc = tl.load(z_ptr + g_off, mask=p_mask, other=0).to(tl.float32)
            else:
                zc = c_row[None, :] - 8388608.0
            if HAS_M:
                m = tl.load(m_ptr + g_off, mask=p_mask, other=0.0).to(tl.float32)
            else:
                m = m_row[None, :]
        hi = wq >> 16 if BITS == 4 else wq
        part = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
        xt = tl.zeros((BLOCK_KW,), tl.float32)
        for i in tl.static_range(CPW):
            xi = tl.load(x_ptr + kw * CPW + i, mask=w_in, other=0.0).to(tl.float32)
            if HAS_M:
                xt += xi
            part += _code_term(wq, hi, magic, xi, zc, i, BITS, 1)
        # the BLOCK_KW words of a column sit in one thread: these sums stay in registers
        if PER_CHANNEL:
            acc += tl.sum(part, axis=0)
            if HAS_M:
                xs += xt
        elif GROUP % (BLOCK_KW * CPW) == 0:
            acc += tl.sum(part, axis=0) * tl.sum(s, axis=0)
            if HAS_M:
                acc += tl.sum(m, axis=0) * tl.sum(xt, axis=0)
        else:
            acc += tl.sum(part * s, axis=0)
            if HAS_M:
                acc += tl.sum(m * xt[:, None], axis=0)
    y = acc
    if PER_CHANNEL:
        y = y * s_row
        if HAS_M:
            y += m_row * tl.sum(xs, axis=0)
    if HAS_BIAS:  # added once: by the first K split
        b_end = N - N * tl.minimum(pid_k, 1)
        y += tl.load(b_ptr + offs_n, mask=offs_n < b_end, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask)
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _load_tiles(x_ptr, w_rows, offs_m, m_mask, n_mask, offs_w, offs_k, t, K, KW, stride_xm,
                BKW: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr):
    # mm_kernel's K tile t: the words [BN, BKW] and the activations ([BK, BM] when SWAP, else
    # [BM, BK]); zeros from code K / word KW on (a prefetch past the last tile loads nothing)
    wcol = t * BKW + offs_w
    wq = tl.load(w_rows + wcol[None, :], mask=n_mask[:, None] & (wcol < KW)[None, :], other=0)
    kk = t * BLOCK_K + offs_k
    k_in = kk < K
    if SWAP:
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                     mask=k_in[:, None] & m_mask[None, :], other=0.0)
    else:
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=m_mask[:, None] & k_in[None, :], other=0.0)
    return wq, xt


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every M (fewer compiles)
def mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, m_ptr, b_ptr, xs_ptr, y_ptr,
              M, N, K, KW, stride_xm, M_BUCKET,
              BITS: tl.constexpr, SYM: tl.constexpr, HAS_Z: tl.constexpr, HAS_M: tl.constexpr,
              HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP: tl.constexpr,
              ATOMIC: tl.constexpr, INTERP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              SPLIT_K: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr,
              PACKED: tl.constexpr = 0, PREFETCH: tl.constexpr = 0):
    """``y = x @ w.T (+ bias)`` with ``tl.dot``, tiles ``[BLOCK_M, BLOCK_N]`` (the split-K and
    the tiled kernel; see the launcher's doc).

    Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``, programs grouped by ``GROUP_M``
    rows of tiles. ``SWAP``: compute ``y^T = w @ x^T`` (the weight tile is the left operand).
    ``ATOMIC``: ``y`` is a zeroed fp32 buffer and the K splits add into it. ``M_BUCKET`` is
    only an autotuning key (``M`` rounded up to a power of two). ``xs_ptr``: fp32 ``sum_k x[m,
    k]`` per token, read only for per-channel float offsets (``m * sum(x)`` in the epilogue;
    summing the dot's pipelined operand in the loop gave wrong rows on an H200, Triton 3.6).
    ``PREFETCH`` (with ``num_stages=1``): the loop loads tile ``t + 1``'s words and activations
    into registers before it decodes tile ``t``, software pipelining without Triton's
    pipeliner. With the weight as the MMA's register operand (``SWAP``) and ``num_stages >=
    2``, ptxas often serializes the wgmma (C7515: it waits for each before the next; Triton 3.6
    and 3.9, depending on tile and scheme); without the pipeliner it never did.
    """
    CPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // CPW
    HALF: tl.constexpr = 1 << (BITS - 1)
    XOR: tl.constexpr = -2004318072 if BITS == 4 else -2139062144
    # group-wise with one group per K tile and a small BLOCK_M: integer codes go into the
    # dot and the tile's scale multiplies the [BLOCK_M, BLOCK_N] partial product instead
    # of every weight; per-channel: the scale is applied once, after the loop
    TILE_SCALE: tl.constexpr = ((not PER_CHANNEL) and BLOCK_M <= 32) and GROUP % BLOCK_K == 0
    DT = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_w = tl.arange(0, BKW)
    offs_k = tl.arange(0, BLOCK_K)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    w_rows = w_ptr + offs_n[:, None] * KW

    s_row, c_row, m_row = _row_params(s_ptr, z_ptr, m_ptr, offs_n, n_mask, BLOCK_N, HALF,
                                      HAS_Z, SYM, HAS_M)

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # 0x4B000000 (KW >= 0) in a register: ptxas fuses each 4-bit code's AND and OR (gemv_kernel);
    # PACKED: the pair pattern of _tile_packed (two 16-bit copies of 128.0 or 1024.0)
    if PACKED and BITS == 4:
        if DT == tl.bfloat16:  # noqa: SIM300
            magic = 0x43004300 + (KW >> 31)
        else:
            magic = 0x64006400 + (KW >> 31)
    else:
        magic = 0x4B000000 + (KW >> 31)
    if PREFETCH:  # this split's K range ends here: the prefetch past its last tile is masked
        k_end = tl.minimum(K, t1 * BLOCK_K)
        w_end = tl.minimum(KW, t1 * BKW)
        wq_next, xt_next = _load_tiles(x_ptr, w_rows, offs_m, m_mask, n_mask, offs_w, offs_k,
                                       t0, k_end, w_end, stride_xm, BKW, BLOCK_K, SWAP)
    for t in range(t0, t1):
        wcol = t * BKW + offs_w
        w_in = wcol < KW
        if PREFETCH:  # tile t + 1 is in flight while tile t is decoded and multiplied
            wq = wq_next
            xt = xt_next
            wq_next, xt_next = _load_tiles(x_ptr, w_rows, offs_m, m_mask, n_mask, offs_w, offs_k,
                                           t + 1, k_end, w_end, stride_xm, BKW, BLOCK_K, SWAP)
        else:
            wq, xt = _load_tiles(x_ptr, w_rows, offs_m, m_mask, n_mask, offs_w, offs_k, t, K,
                                 KW, stride_xm, BKW, BLOCK_K, SWAP)
        if SYM:
            wq = wq ^ XOR
        if PER_CHANNEL:
            w = _wtile(wq, magic, c_row[:, None], 0.0, 0.0, BITS, False, False, DT, BLOCK_N,
                       BLOCK_K, PACKED, INTERP)
            if SWAP:
                acc = _dot(w, xt, acc, INTERP)
            else:
                acc = _dot(xt, tl.trans(w), acc, INTERP)
        elif GROUP % BLOCK_K == 0:  # the whole tile is in one group
            g_off = (t * BLOCK_K // GROUP) * N + offs_n
            s = tl.load(s_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_Z:
                c = tl.load(z_ptr + g_off, mask=n_mask, other=0).to(tl.float32) + 8388608.0
            else:
                c = c_row
            if HAS_M:
                m = tl.load(m_ptr + g_off, mask=n_mask, other=0.0).to(tl.float32)
            else:
                m = m_row
            if TILE_SCALE:
                w = _wtile(wq, magic, c[:, None], 0.0, 0.0, BITS, False, False, DT, BLOCK_N,
                           BLOCK_K, PACKED, INTERP)
                if SWAP:
                    part = _dot(w, xt, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), INTERP)
                    acc += part * s[:, None]
                    if HAS_M:
                        acc += m[:, None] * tl.sum(xt.to(tl.float32), axis=0)[None, :]
                else:
                    part = _dot(xt, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                                INTERP)
                    acc += part * s[None, :]
                    if HAS_M:
                        acc += tl.sum(xt.to(tl.float32), axis=1)[:, None] * m[None, :]
            else:
                w = _wtile(wq, magic, c[:, None], s[:, None], m[:, None], BITS, True, HAS_M, DT,
                           BLOCK_N, BLOCK_K, PACKED, INTERP)
                if SWAP:
                    acc = _dot(w, xt, acc, INTERP)
                else:
                    acc = _dot(xt, tl.trans(w), acc, INTERP)
        else:  # groups smaller than (or straddling) the tile: parameters per word
            g_off = ((wcol * CPW) // GROUP)[None, :] * N + offs_n[:, None]
            p_mask = n_mask[:, None] & w_in[None, :]
            s = tl.load(s_ptr + g_off, mask=p_mask, other=0.0).to(tl.float32)
            if HAS_Z:
                c = tl.load(z_ptr + g_off, mask=p_mask, other=0).to(tl.float32) + 8388608.0
            else:
                c = c_row[:, None] + tl.zeros((BLOCK_N, BKW), tl.float32)
            if HAS_M:
                m = tl.load(m_ptr + g_off, mask=p_mask, other=0.0).to(tl.float32)
            else:
                m = s
            w = _wtile(wq, magic, c, s, m, BITS, True, HAS_M, DT, BLOCK_N, BLOCK_K, PACKED,
                       INTERP)
            if SWAP:
                acc = _dot(w, xt, acc, INTERP)
            else:
                acc = _dot(xt, tl.trans(w), acc, INTERP)

    b_end = N - N * tl.minimum(pid_k, 1)  # bias: added by the first K split only
    if PER_CHANNEL and HAS_M:  # sum_k x, added once (by the first K split)
        xs = tl.load(xs_ptr + offs_m, mask=offs_m < M - M * tl.minimum(pid_k, 1), other=0.0)
    if SWAP:  # acc is y^T: [BLOCK_N, BLOCK_M]
        if PER_CHANNEL:
            acc = acc * s_row[:, None]
            if HAS_M:
                acc += m_row[:, None] * xs[None, :]
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < b_end, other=0.0)
            acc += bias.to(tl.float32)[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * N + offs_n[:, None]
        y_mask = n_mask[:, None] & m_mask[None, :]
    else:
        if PER_CHANNEL:
            acc = acc * s_row[None, :]
            if HAS_M:
                acc += xs[:, None] * m_row[None, :]
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < b_end, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, m_ptr, out_ptr, N, K, KW,
                   BITS: tl.constexpr, SYM: tl.constexpr, HAS_Z: tl.constexpr,
                   HAS_M: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[n, k]`` = the dequantized weight in ``out``'s dtype, ``[N, K]`` row-major: the
    integer ``q`` exactly (:func:`_piece`), then ``q * s`` and ``+ m`` in fp32, rounded once to
    the output dtype: the reference's operations in its order, so with FMA fusion off the same
    bits as ``QuantizedTensor.dequantize``. Grid ``(cdiv(N, BLOCK_N), cdiv(KW, BLOCK_K / CPW))``.
    """
    CPW: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // CPW
    HALF: tl.constexpr = 1 << (BITS - 1)
    XOR: tl.constexpr = -2004318072 if BITS == 4 else -2139062144  # 0x88888888 / 0x80808080
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    wcol = pid_k * BKW + tl.arange(0, BKW)
    mask = n_mask[:, None] & (wcol < KW)[None, :]
    wq = tl.load(w_ptr + offs_n[:, None] * KW + wcol[None, :], mask=mask, other=0)
    if SYM:
        wq = wq ^ XOR
    s_row, c_row, m_row = _row_params(s_ptr, z_ptr, m_ptr, offs_n, n_mask, BLOCK_N, HALF,
                                      HAS_Z, SYM, HAS_M)
    if PER_CHANNEL:
        s = s_row[:, None]
        c = c_row[:, None]
        m = m_row[:, None]
    else:  # one parameter set per word (a group is whole words)
        g_off = ((wcol * CPW) // GROUP)[None, :] * N + offs_n[:, None]
        s = tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            c = tl.load(z_ptr + g_off, mask=mask, other=0).to(tl.float32) + 8388608.0
        else:
            c = c_row[:, None]
        if HAS_M:
            m = tl.load(m_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        else:
            m = m_row[:, None]
    magic = 0x4B000000 + (KW >> 31)
    w = _tile(wq, magic, c, s, m, BITS, True, HAS_M, out_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w,
             mask=n_mask[:, None] & (offs_k < K)[None, :])
