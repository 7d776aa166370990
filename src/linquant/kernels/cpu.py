"""CPU fast paths for the quantized linear layers (tested against :mod:`.reference`).

Every function here computes exactly the reference's formula; they differ only in how the
work is laid out. Paths (names as returned by :func:`linquant.kernels.select_path`):

``cpu_int4pack``   W4A16. ``torch._weight_int4pack_mm_for_cpu`` on a one-time repack of the
                   codes into its layout (:func:`repack_int4`). Needs bf16/fp16 activations,
                   4-bit group-wise weights with group 32/64/128/256 and ``out_features % 16``.
                   The op computes ``w = scale * (q - 8) + zero`` with unsigned codes ``q``
                   and per-group ``(scale, zero)`` in the activation dtype; from our
                   parameters: symmetric ``q = c + 8, zero = 0``; asymmetric integer zero
                   point ``q = u, zero = s * (8 - z)``; float offset ``q = u, zero = 8 s + m``.
``cpu_int8pack``   W8A16. ``torch._weight_int8pack_mm`` (int8 symmetric per-output-channel
                   weights, bf16/fp16 activations, ``K % 16 == 0``: torch 2.13 crashes on bf16
                   input otherwise; scales cast once to the activation dtype).
``cpu_int8split``  W8A16 on large weights. Each bf16/fp16 activation is split into two int8
                   digits, ``x ~= 2**p (d1 + d2 / 128)`` per token (:func:`split_digits`), and
                   both digit rows go through fbgemm's int8 GEMM with the int8 weight
                   prepacked once (:func:`linear_int8split`): int8 products at twice bf16's
                   rate, over half the bytes of a bf16 weight. 8-bit symmetric per-channel or
                   per-tensor weights.
``cpu_blocked``    Any weight-only scheme, small ``M``: dequantize ``BLOCK_ROWS`` output rows at
                   a time into a reused buffer and multiply block by block, so no full-size
                   float copy of the weight is made (fp32 math for fp32 inputs). At ``M == 1``
                   each block's product is a multiply + row sum, not a gemv (see the code).
``cpu_fbgemm``     W8A8, ``2 <= M <= 8`` (32 for small weights): fbgemm's int8 GEMM on a
                   weight prepacked once (:func:`linear_w8a8_fbgemm`); bit-identical to the
                   reference.
``cpu_onednn``     W8A8, more tokens: oneDNN's int8 GEMM on a weight prepacked once
                   (:func:`linear_w8a8_onednn`); bit-identical to the reference.
``cpu_scratch``    Any weight-only scheme, large ``M``: dequantize the whole weight (row block
                   by row block) into a per-thread scratch buffer that is reused across calls
                   and layers (its size is the largest weight seen, in the compute dtype), then
                   one matmul. Avoids glibc mapping and zeroing a fresh >= 32 MiB tensor.

Tolerances (what tests/kernels/test_cpu.py asserts): the int4/int8 pack paths round the
scales (and int4's zeros) to the activation dtype and accumulate in a different order, so
they match the reference within half-precision tolerance (max error <= 2e-2 of the output's
max magnitude); the blocked / scratch paths match it to float rounding of the accumulation
order (fp32: 1e-5 relative of the output's max magnitude). ``cpu_int8split`` is within the
same half-precision tolerance of the reference, and closer than the reference to the exact
product ``x @ dequantize(W)^T``: its activations are off by at most ``max|x| / 16256`` per
element of a token (nothing for bf16 elements within a factor 127 of the token's max), the
products are exact in int32, and it rounds once to ``x.dtype`` at the end; the reference rounds
the dequantized weight to bf16 first (tests assert an elementwise bound and exact cases).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from linquant.io import mapped
from linquant.kernels import _cpuinfo
from linquant.kernels.reference import _TINY, ACT_QMAX, eager_probe
from linquant.kernels.reference import linear_weight_only as _reference_linear
from linquant.ops.affine import sign_extend
from linquant.ops.packing import unpack
from linquant.tensor import QuantizedTensor

__all__ = [
    "BLOCK_ROWS",
    "INT4PACK_GROUPS",
    "ONEDNN_MAX_K",
    "fbgemm_available",
    "fbgemm_supported",
    "int4pack_supported",
    "int8pack_supported",
    "int8split_supported",
    "linear_blocked",
    "linear_int4pack",
    "linear_int8pack",
    "linear_int8split",
    "linear_scratch",
    "linear_w8a8_fbgemm",
    "linear_w8a8_onednn",
    "onednn_available",
    "onednn_supported",
    "release_scratch",
    "repack_int4",
    "repack_int8",
    "repack_onednn",
    "split_digits",
]

INT4PACK_GROUPS = (32, 64, 128, 256)
HALF_DTYPES = (torch.bfloat16, torch.float16)
# ~1-4 MiB of fp32 per block: stays in L2 while it is multiplied. A multiple of 8 so a block
# of sub-byte codes starts on a byte boundary.
BLOCK_ROWS = 256

Cache = dict[str, Any]


# ---- support predicates ----------------------------------------------------------------------


# PyTorch 2.6 and later: the CPU's own int4 ops. PyTorch 2.4 and 2.5 have one op for both
# devices, which on the CPU takes 2, 4 or 8 inner K tiles of 16 (codes: shared_int4pack_format).
_INT4PACK_FOR_CPU = all(hasattr(torch, op) for op in ("_weight_int4pack_mm_for_cpu",
                                                      "_convert_weight_to_int4pack_for_cpu"))
_INT4PACK_SHARED = not _INT4PACK_FOR_CPU and all(
    hasattr(torch, op) for op in ("_weight_int4pack_mm", "_convert_weight_to_int4pack"))


def _inner_k_tiles(k: int) -> int:
    """PyTorch 2.4 / 2.5's CPU int4 layout: the most inner K tiles of 16 (of 8, 4, 2) that
    divide ``K``; 0 where none does."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), 0)


# The code formats of PyTorch's int4 layouts: ``torch._convert_weight_to_int4pack`` has taken
# uint8 codes with the even code in either nibble, and (PyTorch 2.4) int32 ones.
FORMATS = ("hi", "lo", "int32")


def pack_codes(q: torch.Tensor, order: str) -> torch.Tensor:
    """Unsigned 4-bit codes uint8 ``[N, K]`` as an int4 operator takes them: ``"lo"`` puts code
    ``2j`` in the low nibble of byte ``j`` of uint8 ``[N, K / 2]`` (linquant's stream), ``"hi"``
    in the high; ``"int32"``: int32 ``[N, K]``, one code each (PyTorch 2.4)."""
    if order == "int32":
        return q.to(torch.int32).contiguous()
    even, odd = q[:, 0::2], q[:, 1::2]
    if order == "hi":
        even, odd = odd, even
    return (even | (odd << 4)).contiguous()


def find_int4_format(convert: Callable[[torch.Tensor, int], torch.Tensor],
                     mm: Callable[..., torch.Tensor], device: torch.device,
                     inner_k_tiles: int) -> tuple[str | None, list[Exception]]:
    """The first code format (:data:`FORMATS`) in which ``convert`` (an
    ``_convert_weight_to_int4pack``) and ``mm`` (its ``_weight_int4pack_mm``) compute
    ``scale * (q - 8) + zero`` on ``device`` for a small weight (16 x 256, groups of 32, bf16),
    and the errors the formats it rejected raised (None: no format did)."""
    gen = torch.Generator().manual_seed(0)
    n, k, g = 16, 256, 32
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, k // g, generator=gen) + 0.5).bfloat16()
    zero = torch.randn(n, k // g, generator=gen).bfloat16()
    x = torch.randn(3, k, generator=gen).bfloat16()
    w = ((q.float() - 8) * scale.float().repeat_interleave(g, 1)
         + zero.float().repeat_interleave(g, 1))
    want = x.float() @ w.t()
    sz = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(device)
    errors: list[Exception] = []
    for fmt in FORMATS:
        try:
            packed = convert(pack_codes(q, fmt).to(device), inner_k_tiles)
            got = mm(x.to(device), packed, g, sz).float().cpu()
        except Exception as e:  # a format this version rejects, an operator missing from it
            errors.append(e)
            continue
        if (got - want).abs().max().item() <= 1e-2 * want.abs().max().item():
            return fmt, errors
    return None, errors


@eager_probe
def shared_int4pack_format() -> str | None:
    """The code format in which PyTorch 2.4 / 2.5's shared int4 op works on the CPU
    (:func:`find_int4_format`; PyTorch 2.4.1: ``"int32"``, 2.5.1: ``"hi"``), or None: no
    format works, or the op is missing (PyTorch 2.6 and later have ops of the CPU's own)."""
    if not _INT4PACK_SHARED:
        return None
    return find_int4_format(torch._convert_weight_to_int4pack, torch._weight_int4pack_mm,
                            torch.device("cpu"), _inner_k_tiles(256))[0]


HAS_INT4PACK = _INT4PACK_FOR_CPU or shared_int4pack_format() is not None


def int4pack_supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    s = qt.scheme
    return (
        HAS_INT4PACK
        and (_INT4PACK_FOR_CPU or _inner_k_tiles(int(qt.shape[1])) > 0)
        and qt.device.type == "cpu"
        and dtype in HALF_DTYPES
        and len(qt.shape) == 2
        and s.bits == 4
        and s.granularity == "group"
        and s.group_size in INT4PACK_GROUPS
        and qt.shape[0] % 16 == 0
        and qt.shape[1] % (s.group_size or 1) == 0
    )


def int8pack_supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    s = qt.scheme
    return (
        qt.device.type == "cpu"
        and dtype in HALF_DTYPES
        and len(qt.shape) == 2
        and s.bits == 8
        and s.symmetric
        and s.granularity == "channel"
        and s.axis % 2 == 0
        and qt.shape[1] % 16 == 0  # torch 2.13 segfaults on bf16 with K % 16 != 0 (measured)
    )


# ---- repacking (cached) ----------------------------------------------------------------------


def _version(t: torch.Tensor) -> tuple[int, int] | None:
    """``t``'s version counter and data address, or None for an inference-mode tensor, which
    keeps no counter (asked first: reading ``_version`` of one raises, and the exception cost
    about 10 us). linquant's layers hold no inference tensors (``nn.base._normal``); a caller's
    input or bias may be one. So may a parameter created under ``inference_mode`` whose data
    ``.to()`` replaced outside it: it no longer says it is one, yet keeps no version counter.
    The address: ``share_memory_()`` (``model.share_memory()``, or handing the model to a
    ``torch.multiprocessing`` child) moves a tensor's bytes without a new version, and layouts
    and plans that read the old address in place read freed memory (garbage, or a crash)."""
    if t.is_inference():
        return None
    try:
        return int(t._version), t.data_ptr()
    except RuntimeError:
        return None


def _key(qt: QuantizedTensor, dtype: torch.dtype) -> tuple[object, ...]:
    """Identity of the stored weight: the tensor objects themselves (a device move or a new
    buffer replaces them) and their version counters (an in-place load bumps them)."""
    parts: list[object] = [dtype]
    for t in (qt.qdata, qt.scale, qt.zero_point_packed, qt.offset):
        parts.append(None if t is None else (t, _version(t)))
    return tuple(parts)


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    if len(a) != len(b) or a[0] != b[0]:
        return False
    for x, y in zip(a[1:], b[1:], strict=True):
        if x is None or y is None:
            if x is not y:
                return False
            continue
        assert isinstance(x, tuple) and isinstance(y, tuple)
        if x[0] is not y[0] or x[1] != y[1]:
            return False
    return True


def _cached(cache: Cache | None, name: str, key: tuple[object, ...],
            build: Any) -> Any:
    """``build()``, kept in ``cache[name]`` while the weight tensors are the same objects and
    unmodified (the entry holds references to them, so a freed address cannot be mistaken)."""
    if cache is None:
        return build()
    hit = cache.get(name)
    if hit is not None and _same(hit[0], key):
        return hit[1]
    cache.pop(name, None)  # free the stale layout before building the new one
    value = build()
    cache[name] = (key, value)
    held = HOLDS.get(name, 0)
    for part in key[1:1 + held]:  # the weight's tensors, mapped from a checkpoint: leave memory
        if isinstance(part, tuple) and isinstance(part[0], torch.Tensor):
            mapped.held_by_layout(part[0])
    return value


#: Layout names (cache entries) whose layout holds the weight's codes (1: the first tensor of
#: the key), or everything (4: codes, scales, zero points and offsets): once one is built, those
#: tensors, where they are views of a mapped checkpoint file, leave memory
#: (:mod:`linquant.io.mapped`). Not ``int8pack``: its "layout" is the canonical int8 codes
#: themselves; the int8 layouts take the scales separately on each call.
HOLDS = {"native_int4": 4, "native_avx2": 4, "int4pack": 4, "native_w8a8": 1, "onednn": 1,
         "fbgemm": 1}


def int4_codes(qt: QuantizedTensor) -> torch.Tensor:
    """The 4-bit codes of a 2-D weight as unsigned ``q`` in ``[0, 15]``, uint8 ``[N, K]``
    (symmetric codes ``c`` become ``c + 8``)."""
    n, k = (int(d) for d in qt.shape)
    u = unpack(qt.qdata, 4, n * k).view(n, k)
    if qt.scheme.symmetric:
        return sign_extend(u, 4).to(torch.int16).add_(8).to(torch.uint8)
    return u.to(torch.uint8)


def int4_scale_zero(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(scale, zero)`` ``[N, K / g]`` with ``w = scale * (q - 8) + zero`` for the codes
    ``q`` of :func:`int4_codes` (exact in fp32 for integer zero points and symmetric codes)."""
    n, k = (int(d) for d in qt.shape)
    g = int(qt.scheme.group_size or k)
    scale = qt.scale.float().reshape(n, k // g)
    if qt.zero_point_packed is not None:
        z = qt.zero_point
        assert z is not None
        zero = scale * (8.0 - z.float().reshape(n, k // g))
    elif qt.offset is not None:
        zero = scale * 8.0 + qt.offset.float().reshape(n, k // g)
    else:
        zero = torch.zeros_like(scale)
    return scale, zero


def repack_int4(qt: QuantizedTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scales_and_zeros)`` for ``torch._weight_int4pack_mm_for_cpu`` (PyTorch 2.6+),
    or for PyTorch 2.4 / 2.5's ``torch._weight_int4pack_mm``, in the code format
    :func:`shared_int4pack_format` found."""
    codes = int4_codes(qt)
    if _INT4PACK_FOR_CPU:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    else:
        fmt = shared_int4pack_format()
        assert fmt is not None
        packed = torch._convert_weight_to_int4pack(pack_codes(codes, fmt),
                                                   _inner_k_tiles(int(qt.shape[1])))
    scale, zero = int4_scale_zero(qt)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [K/g, N, 2]
    return packed, sz


def repack_int8(qt: QuantizedTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [N, K], scales [N] in dtype)`` for ``torch._weight_int8pack_mm``."""
    n, k = (int(d) for d in qt.shape)
    w = qt.qdata.view(torch.int8).view(n, k)
    if w.data_ptr() % 64:  # the aten kernel crashes on int8 weights not 64-byte aligned
        w = w.clone()
        mapped.held_by_layout(qt.qdata)  # codes mapped from a checkpoint: leave memory
    scale = qt.scale.reshape(n).to(dtype)
    if scale.data_ptr() % 64:  # mapped from a checkpoint: at any offset its dtype allows
        scale = scale.clone()
    return w, scale


def _bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y


def linear_int4pack(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                    cache: Cache | None = None) -> torch.Tensor:
    n, k = (int(d) for d in qt.shape)
    packed, sz = _cached(cache, "int4pack", _key(qt, x.dtype),
                         lambda: repack_int4(qt, x.dtype))
    x2 = x.reshape(-1, k).contiguous()
    mm = torch._weight_int4pack_mm_for_cpu if _INT4PACK_FOR_CPU else torch._weight_int4pack_mm
    y = mm(x2, packed, int(qt.scheme.group_size or k), sz)
    return _bias(y, bias).reshape(*x.shape[:-1], n)


def linear_int8pack(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                    cache: Cache | None = None) -> torch.Tensor:
    n, k = (int(d) for d in qt.shape)
    w, sc = _cached(cache, "int8pack", _key(qt, x.dtype), lambda: repack_int8(qt, x.dtype))
    x2 = x.reshape(-1, k).contiguous()
    if x2.data_ptr() % 64:  # the aten kernel also crashes on activations 2 or 16 bytes off
        x2 = x2.clone()  # (a view at an odd element, a row of a [T, K] with K % 16 != 0)
    y = torch._weight_int8pack_mm(x2, w, sc)
    return _bias(y, bias).reshape(*x.shape[:-1], n)


# ---- row-block dequantization ----------------------------------------------------------------


class _RowDequant:
    """Dequantize rows ``[r0, r1)`` of a 2-D weight into a given buffer (``r0 % 8 == 0``)."""

    def __init__(self, qt: QuantizedTensor, native: bool = True) -> None:
        self.qt = qt
        self.n, self.k = (int(d) for d in qt.shape)
        self.bits = qt.scheme.bits
        self.symmetric = qt.scheme.symmetric
        # linquant's AVX2 dequantizer where it is built: the same bits, read from the stored
        # tensors in place (native=False: always the PyTorch ops, which the native probe and
        # tests compare it against); the PyTorch ops' fp32 parameters are then made only if a
        # buffer needs them
        self.fast = None
        if native:
            from linquant.kernels import native as nat  # (native imports this module)

            self.fast = nat._dequantizer(qt)  # None without the AVX2 library
        self.prepared = False
        if self.fast is None:
            self._prepare()

    def _prepare(self) -> None:
        qt, s = self.qt, self.qt.scheme
        n, k = self.n, self.k
        scale = qt.scale.float()
        zp = qt.zero_point
        zpf = None if zp is None else zp.float()
        off = None if qt.offset is None else qt.offset.float()
        self.group = 0
        shape: tuple[int, ...]
        self.per_row = s.granularity == "group" or (s.granularity == "channel"
                                                    and s.axis % 2 == 0)
        if s.granularity == "group":
            self.group = int(s.group_size or k)
            shape = (n, k // self.group, 1)
        elif s.granularity == "channel" and s.axis % 2 == 0:
            shape = (n, 1)
        elif s.granularity == "channel":
            shape = (1, k)
        else:
            shape = (1, 1)
        self.scale = scale.reshape(shape)
        self.zp = None if zpf is None else zpf.reshape(shape)
        self.off = None if off is None else off.reshape(shape)
        self.prepared = True

    def _rows(self, p: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor | None:
        if p is None:
            return None
        return p[r0:r1] if self.per_row else p

    def into(self, out: torch.Tensor, r0: int, r1: int) -> None:
        """Write the dequantized rows into ``out`` (``[r1 - r0, K]``, any float dtype)."""
        if self.fast is not None and self.fast(out, r0, r1):
            return
        if not self.prepared:
            self._prepare()
        k, bits = self.k, self.bits
        nel = (r1 - r0) * k
        lo = r0 * k * bits // 8
        u = unpack(self.qt.qdata[lo : lo + (nel * bits + 7) // 8], bits, nel)
        c = sign_extend(u, bits) if self.symmetric else u
        t = out if out.dtype == torch.float32 else self._buf(nel).view(r1 - r0, k)
        t.copy_(c.view(r1 - r0, k))
        tv = t.view(r1 - r0, k // self.group, self.group) if self.group else t
        z = self._rows(self.zp, r0, r1)
        if z is not None:
            tv.sub_(z)
        s = self._rows(self.scale, r0, r1)
        assert s is not None
        tv.mul_(s)
        m = self._rows(self.off, r0, r1)
        if m is not None:
            tv.add_(m)
        if t is not out:
            out.copy_(t)

    def _buf(self, nel: int) -> torch.Tensor:
        # this thread's: one dequantizer is shared by every thread that calls its layer (plans)
        return _scratch(nel, torch.float32, "codes")


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, role: str = "weight") -> torch.Tensor:
    """A per-thread, reused float buffer of at least ``numel`` elements, one per ``role`` and
    dtype."""
    bufs: dict[tuple[str, torch.dtype], torch.Tensor] = getattr(_local, "bufs", None) or {}
    _local.bufs = bufs
    b = bufs.get((role, dtype))
    if b is None or b.numel() < numel:
        bufs.pop((role, dtype), None)
        # A normal tensor even under inference_mode: an inference tensor could not be written
        # in place later, outside inference_mode.
        with torch.inference_mode(False):
            b = torch.empty(numel, dtype=dtype)
        bufs[(role, dtype)] = b
    return b[:numel]


def release_scratch() -> None:
    """Drop this thread's scratch buffers (they are otherwise kept for reuse)."""
    _local.bufs = {}


def linear_blocked(x: torch.Tensor, qt: QuantizedTensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize ``BLOCK_ROWS`` rows at a time into a reused buffer; multiply per block."""
    return _blocked(x, _RowDequant(qt), bias)


def blocked_runner(qt: QuantizedTensor, bias: torch.Tensor | None
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`linear_blocked` for ``qt`` and ``bias`` as a function of ``x`` alone (the
    dequantizer bound; see :mod:`linquant.kernels.plans`)."""
    deq = _RowDequant(qt)
    return lambda x: _blocked(x, deq, bias)


def _blocked(x: torch.Tensor, deq: _RowDequant, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = deq.n, deq.k
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    rows = min(BLOCK_ROWS, n)
    buf = _scratch(rows * k, x.dtype)
    yt = torch.empty(n, m, dtype=x.dtype)  # y^T: each block's product is a contiguous slice
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        wb = buf[: (r1 - r0) * k].view(r1 - r0, k)
        deq.into(wb, r0, r1)
        if m == 1:
            # A gemv per block hands the cores from OpenMP (dequantize) to MKL and back; with
            # spinning worker threads that measured 14 ms instead of 2.4 on 2 cores. The
            # product as multiply + row sum stays in one thread pool.
            torch.sum(wb.mul_(x2), dim=1, out=yt[r0:r1, 0])
        else:
            torch.mm(wb, x2.t(), out=yt[r0:r1])
    _release_held(deq.qt)
    y = yt.t() if m > 1 else yt.view(1, n)
    y = _bias(y.contiguous(), bias)
    return y.reshape(*x.shape[:-1], n)


def linear_scratch(x: torch.Tensor, qt: QuantizedTensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize the whole weight into the reused scratch buffer, then one ``F.linear``."""
    w = _whole(_RowDequant(qt), x.dtype)
    if bias is None or not (bias.requires_grad and torch.is_grad_enabled()):
        # the reference's own call on the same dequantized weight: the same bits
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return _bias(F.linear(x, w), bias)  # bias after: autograd never saves the scratch weight


def scratch_runner(qt: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`linear_scratch` for ``qt``, ``bias`` and ``dtype`` activations as a function of
    ``x`` alone (the dequantizer and the bias in ``dtype`` bound), for calls where autograd
    needs no gradient (plans)."""
    deq = _RowDequant(qt)
    b = None if bias is None else bias.detach().to(dtype)
    return lambda x: F.linear(x, _whole(deq, x.dtype), b)


def _release_held(qt: QuantizedTensor) -> None:
    """After a whole-weight read of ``qt``: its tensors mapped from a checkpoint, which a layout
    holds too, leave memory again (nothing to do, at no cost, when nothing is mapped)."""
    if mapped.active():
        for t in qt.tensors().values():
            mapped.release_if_held(t)


def _whole(deq: _RowDequant, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight dequantized into this thread's scratch buffer, ``[N, K]`` ``dtype``."""
    n, k = deq.n, deq.k
    w = _scratch(n * k, dtype).view(n, k)
    if deq.fast is not None:
        deq.into(w, 0, n)  # the native dequantizer splits the rows over the threads itself
    else:
        for r0 in range(0, n, BLOCK_ROWS):
            r1 = min(n, r0 + BLOCK_ROWS)
            deq.into(w[r0:r1], r0, r1)
    _release_held(deq.qt)
    return w


# ---- W8A8 through oneDNN ---------------------------------------------------------------------

# u8 x s8 products summed in int32: the raw sum before the zero-point correction reaches
# 255 * 127 * K, so K is capped where that still fits.
ONEDNN_MAX_K = (2**31 - 1) // (255 * 127)


@eager_probe
def onednn_available() -> bool:
    """oneDNN's int8 linear (``torch.ops.onednn.qlinear_pointwise``) is present and exact here.

    Needs a CPU with VNNI: without it oneDNN computes u8 x s8 with ``vpmaddubsw``, whose int16
    pair sums saturate (its documented workaround halves the weights), so results would no
    longer be the exact int32 products the reference computes. Checked once on extreme codes
    as well (:func:`_onednn_exact`): ``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN take that path
    on a CPU that has VNNI."""
    try:
        op = torch.ops.onednn.qlinear_pointwise
        prepack = torch.ops.onednn.qlinear_prepack
    except (AttributeError, RuntimeError):
        return False
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return (op is not None and prepack is not None and mkldnn and _cpuinfo.has("vnni")
            and _onednn_exact())


def _onednn_exact() -> bool:
    """oneDNN's u8 x s8 product is exact here, on the codes that saturate int16 pair sums."""
    a = torch.tensor([[127.0] * 64, [-127.0] * 64, [127.0, -127.0] * 32])
    w = torch.tensor([[127] * 64, [-127] * 64, [127, -127] * 32], dtype=torch.int8)
    try:
        packed, ones, zeros = repack_onednn(w)
        acc = torch.ops.onednn.qlinear_pointwise(
            (a + 128).to(torch.uint8), 1.0, 128, packed, ones, zeros, None, 1.0, 0,
            torch.float32, "none", [], "")
    except Exception:  # a probe: a build without the op just lacks the path
        return False
    return bool(torch.equal(acc, (a.double() @ w.double().T).float()))


def onednn_supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether :func:`linear_w8a8_onednn` handles ``x`` and the int8 weight ``[N, K]``."""
    return (
        onednn_available()
        and x.device.type == "cpu"
        and w_int8.device.type == "cpu"
        and w_int8.dtype == torch.int8
        and w_int8.dim() == 2
        and 2 <= int(w_int8.shape[1]) <= ONEDNN_MAX_K
        and int(w_int8.shape[0]) >= 1
    )


def _w8a8_key(w_int8: torch.Tensor) -> tuple[object, ...]:
    return (torch.int8, (w_int8, _version(w_int8)))


def repack_onednn(w_int8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, ones [N], zeros [N] int32)``: oneDNN's blocked int8 weight plus unit weight
    scales and zero weight zero points, so the op's fp32 output is the raw int32 product."""
    n = int(w_int8.shape[0])
    packed = torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)
    return packed, torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int32)


def _float_codes(x2: torch.Tensor, scale: torch.Tensor | None,
                 zero_point: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's activation codes, as exact integers in an fp32 scratch buffer ``[M, K]``.

    ``scale is None``: :func:`linquant.kernels.reference.quantize_activation_per_token` (codes
    in ``[-127, 127]``; also returns the per-token scales). Else
    :func:`~linquant.kernels.reference.quantize_activation_per_tensor`: symmetric codes in
    ``[-127, 127]``, or asymmetric codes in ``[0, 255]`` when ``zero_point`` is given. Same ops
    in the same order as the reference, so the same codes; computed in this thread's reused
    buffer instead of fresh ``[M, K]`` temporaries: glibc can hand such blocks of a few MiB back
    to the OS and fault them in again on every call (measured here: 10x slower quantization in
    some processes).

    Per token, when every scale is finite, ``nan_to_num`` and the clamp are skipped: they
    cannot change a code (``|x| <= max|x|`` and ``s = max|x| / 127`` rounded, or the smallest
    normal when that is smaller, give ``|x / s| <= 127.00002``, which rounds into range). Each
    op saved matters at few tokens, where these small ops are a visible share of the layer's
    time. (The rounding cannot be left to fbgemm: it adds the zero point before rounding, so
    ``0.50000006 + 128`` ties to 128.)"""
    m, k = x2.shape
    xf = x2.float()
    buf = _scratch(m * k, torch.float32, "activations").view(m, k)
    if scale is None:
        tok = torch.abs(xf, out=buf).amax(dim=-1, keepdim=True).div_(ACT_QMAX).clamp_min_(_TINY)
        torch.div(xf, tok, out=buf)
        buf.round_()
        if not math.isfinite(float(tok.max())):  # a NaN / Inf token: the reference's zeroed codes
            buf.nan_to_num_(0.0).clamp_(-ACT_QMAX, ACT_QMAX)
        return buf, tok
    t = torch.div(xf, scale.float(), out=buf).round_().nan_to_num_(0.0)
    if zero_point is None:
        t.clamp_(-ACT_QMAX, ACT_QMAX)
    else:
        t.add_(zero_point.float()).clamp_(0, 255)
    return t, None


def _u8_codes(codes: torch.Tensor, asymmetric: bool) -> torch.Tensor:
    """Float codes from :func:`_float_codes` as the uint8 codes oneDNN takes: symmetric ``c``
    as ``c + 128`` (zero point 128), asymmetric ``q`` as they are. Both go through int8 as
    ``code - 128`` (float -> int8 converts faster than float -> uint8), then one XOR."""
    if asymmetric:
        codes = codes.sub_(128)
    m, k = codes.shape
    out = _scratch(m * k, torch.int8, "activations").view(m, k).copy_(codes)
    return out.view(torch.uint8).bitwise_xor_(128)


def _rescale(acc: torch.Tensor, a_s: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, dynamic: bool, x: torch.Tensor) -> torch.Tensor:
    """``acc`` (fp32 ``[M, N]`` holding ``int32 acc .float()``) rescaled in the reference's
    order: dynamic ``(acc * a_s) * ws``, static ``acc * (a_s * ws)``; then bias and dtype."""
    n = int(acc.shape[-1])
    ws = w_scale.reshape(1, n).float()
    y = acc.mul_(a_s).mul_(ws) if dynamic else acc.mul_(a_s * ws)
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _w8a8_inputs(x: torch.Tensor, k: int, act_scale: torch.Tensor | None,
                 act_zero_point: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``(float codes [M, K], the activation scale to rescale with, static zero point)``."""
    codes, tok = _float_codes(x.reshape(-1, k), act_scale, act_zero_point)
    if act_scale is None:
        assert tok is not None
        return codes, tok, None
    zp = None if act_zero_point is None else int(act_zero_point.reshape(()).item())
    return codes, act_scale.reshape(1, 1).float(), zp


def linear_w8a8_onednn(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    cache: Cache | None = None,
) -> torch.Tensor:
    """:func:`linquant.kernels.reference.linear_w8a8` with the int8 product done by oneDNN.

    Activations are quantized with the reference's formulas and operation order (same codes),
    in reused per-thread buffers (:func:`_float_codes`), as the unsigned codes oneDNN takes: a
    symmetric int8 code ``c`` becomes ``c + 128`` with zero point 128 (one XOR of the sign bit);
    static asymmetric codes are already uint8 with their own zero point. oneDNN subtracts the
    zero point's contribution in int32, so with unit weight scales its fp32 output is exactly
    ``acc.float()``; the rescale then runs in the reference's order, and the result is
    bit-identical to the reference (tests assert it)."""
    k = int(w_int8.shape[1])
    packed, ones, zeros = _cached(cache, "onednn", _w8a8_key(w_int8),
                                  lambda: repack_onednn(w_int8))
    codes, a_s, zp = _w8a8_inputs(x, k, act_scale, act_zero_point)
    a_u = _u8_codes(codes, zp is not None)
    acc: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
        a_u, 1.0, 128 if zp is None else zp, packed, ones, zeros, None, 1.0, 0, torch.float32,
        "none", [], ""
    )
    return _rescale(acc, a_s, w_scale, bias, act_scale is None, x)


# ---- W8A8 through fbgemm (few tokens) --------------------------------------------------------


def _fbgemm_prepack(w_int8: torch.Tensor) -> Any:
    """fbgemm's packed int8 weight with scale 1 and zero point 0. Per tensor: the real weight
    scales are applied afterwards, and fbgemm's per-tensor output stage measured 3-4% faster
    than its per-channel one (4096 x 4096, M = 1 and 16)."""
    with warnings.catch_warnings():  # quantized tensor constructors are deprecated in torch 2.10+
        warnings.simplefilter("ignore")
        qw = torch._make_per_tensor_quantized_tensor(w_int8.contiguous(), 1.0, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_matmul(codes: torch.Tensor, zp: int, packed: Any) -> torch.Tensor:
    """``float(codes @ W^T)`` exactly: fbgemm quantizes the float codes with scale 1 and zero
    point ``zp`` (``round(c) + zp``, exact for integers), multiplies u8 x s8 in int32, removes
    the zero point's contribution and converts to fp32 with unit scales."""
    out: torch.Tensor = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        codes, 1.0, zp, packed)
    return out


@eager_probe
def _fbgemm_exact() -> bool:
    """fbgemm's int8 linear is present and gives exact int32 products here (checked once on
    the extreme codes: without VNNI, fbgemm's u8 x s8 pair sums saturate int16, as oneDNN's
    do)."""
    try:
        a = torch.tensor([[127.0] * 64, [-127.0] * 64, [127.0, -127.0] * 32])
        w = torch.tensor([[127] * 64, [-127] * 64, [127, -127] * 32], dtype=torch.int8)
        got = _fbgemm_matmul(a, 128, _fbgemm_prepack(w))
    except Exception:  # a probe: a torch without these (deprecated) ops just lacks the path
        return False
    want = (a.double() @ w.double().T).float()
    return bool(torch.equal(got, want))


def fbgemm_available() -> bool:
    """:func:`linear_w8a8_fbgemm` works here: a CPU with VNNI (as for oneDNN), PyTorch's
    quantized engine is ``x86`` or ``fbgemm`` (the default on x86; ``linear_prepack`` packs for
    the current engine) and fbgemm's product is exact (:func:`_fbgemm_exact`)."""
    return (onednn_available() and torch.backends.quantized.engine in ("x86", "fbgemm")
            and _fbgemm_exact())


def fbgemm_supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether :func:`linear_w8a8_fbgemm` handles ``x`` and the int8 weight ``[N, K]``."""
    return onednn_supported(x, w_int8) and fbgemm_available()


def linear_w8a8_fbgemm(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    cache: Cache | None = None,
) -> torch.Tensor:
    """:func:`linquant.kernels.reference.linear_w8a8` with the int8 product done by fbgemm
    (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``, the GEMM behind
    ``torch.ao.quantization.quantize_dynamic``), on a weight prepacked once.

    The reference's codes (:func:`_float_codes`) are handed over as floats with scale 1, so
    fbgemm's own quantization (``round(c + zp)``, clamped to ``[0, 255]``) keeps them exactly:
    symmetric codes get zero point 128, static asymmetric codes ``q`` are passed as ``q - z``
    with zero point ``z``. With unit weight scales the fp32 output is ``acc.float()``, rescaled
    in the reference's order: bit-identical to the reference (tests assert it)."""
    k = int(w_int8.shape[1])
    packed = _cached(cache, "fbgemm", _w8a8_key(w_int8), lambda: _fbgemm_prepack(w_int8))
    codes, a_s, zp = _w8a8_inputs(x, k, act_scale, act_zero_point)
    if zp is not None:
        codes = codes.sub_(zp)
    acc = _fbgemm_matmul(codes, 128 if zp is None else zp, packed)
    return _rescale(acc, a_s, w_scale, bias, act_scale is None, x)


# ---- W8A16 through an int8 GEMM: each activation split into two int8 digits ------------------

# Per-token exponents are clamped here (tokens whose max is below 127 * 2**SPLIT_MIN_EXP have
# their digits rounded at 2**(SPLIT_MIN_EXP - 8), about 1e-33): it keeps 2**p and 2**-p normal.
SPLIT_MIN_EXP = -100
SPLIT_RADIX = 128  # the second digit's weight is 2**p / 128


def int8split_supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether :func:`linear_int8split` handles ``qt`` with ``dtype`` activations: 8-bit
    symmetric weights, per output channel or per tensor, bf16 / fp16 activations, and fbgemm's
    exact int8 GEMM here (:func:`fbgemm_available`)."""
    s = qt.scheme
    return (
        qt.device.type == "cpu"
        and dtype in HALF_DTYPES
        and len(qt.shape) == 2
        and s.bits == 8
        and s.symmetric
        and (s.granularity == "tensor" or (s.granularity == "channel" and s.axis % 2 == 0))
        and 1 <= int(qt.shape[1]) <= ONEDNN_MAX_K
        and fbgemm_available()
    )


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** e`` in fp32, exactly, for int32 ``e`` in ``[-126, 127]`` (built from the bits)."""
    return e.add(127).bitwise_left_shift_(23).view(torch.float32)


def split_digits(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each token (row) of ``x2 [M, K]`` as two int8 digits: ``(digits [2M, K], 2**p [M, 1])``.

    Per token, ``p`` is the smallest exponent with ``max|x| <= 127 * 2**p`` (clamped below at
    :data:`SPLIT_MIN_EXP`); ``t = x * 2**-p`` is exact, ``d1 = round(t)`` lies in
    ``[-127, 127]`` and ``d2 = round(128 * (t - d1))`` in ``[-64, 64]`` (rows ``[:M]`` and
    ``[M:]``, as exact integers in fp32). So ``x = 2**p * (d1 + d2 / 128) + e`` with
    ``|e| <= 2**(p - 8) < max|x| / 16256``, and ``e == 0`` for every bf16 element with
    ``|x| >= 2**p`` (fp16: ``|x| >= 2**(p + 3)``): their significand fits in the two digits.
    Returns None when a token holds Inf or NaN. The digits live in this thread's reused
    buffer."""
    m, k = x2.shape
    xf = x2.float()
    buf = _scratch(2 * m * k, torch.float32).view(2 * m, k)
    hi, lo = buf[:m], buf[m:]
    amax = torch.abs(xf, out=hi).amax(dim=-1, keepdim=True)
    if not math.isfinite(float(amax.max())):
        return None
    # frexp: amax / 127 (rounded) = f * 2**p with f in [0.5, 1), so amax / 127 <= 2**p also
    # before rounding (rounding is monotonic and 2**p is representable); frexp(0) gives p = 0.
    p = torch.frexp(amax.div_(ACT_QMAX)).exponent.clamp_(min=SPLIT_MIN_EXP)
    torch.mul(xf, _pow2(p.neg()), out=hi)
    lo.copy_(hi)
    hi.round_()
    lo.sub_(hi).mul_(SPLIT_RADIX).round_()  # t - d1 is exact, |t - d1| <= 1/2
    return buf, _pow2(p)


def linear_int8split(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                     cache: Cache | None = None) -> torch.Tensor:
    """W8A16 (:func:`linquant.kernels.reference.linear_weight_only` with bf16 / fp16
    activations) on fbgemm's int8 GEMM: the activations are split into two int8 digits per
    element (:func:`split_digits`) and both digit rows go through one product with the int8
    weight, prepacked once (the same layout as W8A8's ``cpu_fbgemm``):

        ``y = s_w * 2**p * (d1 @ W^T + (d2 @ W^T) / 128)``

    with exact int32 dot products, summed and rescaled in fp32, bias added in fp32, then cast
    to ``x.dtype``. The activations' representation error is at most ``max|x| / 16256`` per
    element of a token (zero for bf16 elements within a factor 127 of the token's max), far
    below the reference's own rounding of the dequantized weight to bf16 (relative
    ``2**-9``). A token holding Inf or NaN sends the call to the reference (IEEE semantics)."""
    n, k = (int(d) for d in qt.shape)
    x2 = x.reshape(-1, k)
    m = int(x2.shape[0])
    split = split_digits(x2)
    if split is None:
        return _reference_linear(x, qt, bias)
    digits, scale = split
    w = qt.qdata.view(torch.int8).view(n, k)
    packed = _cached(cache, "fbgemm", _key(qt, torch.int8), lambda: _fbgemm_prepack(w))
    acc = _fbgemm_matmul(digits, 128, packed)
    y = acc[:m].add_(acc[m:], alpha=1.0 / SPLIT_RADIX).mul_(scale)
    y = y.mul_(qt.scale.float().reshape(1, -1))
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
