"""Choose scales and zero points (the "choose" half; applying them is :mod:`.affine`).

All functions work on the canonical ``[outer, C, inner]`` view (see :mod:`.grouping`) and return
one value per granule as 1-D tensors of length ``C``.

Formulas (``b`` = bits, ranges per granule, fp32 arithmetic, then cast to ``scale_dtype``):

* symmetric: ``s = max|r| / q_max``, ``q_max = 2**(b-1) - 1``; no zero point.
* asymmetric, integer zero point: ``lo = min(r_min, 0)``, ``hi = max(r_max, 0)``,
  ``s = (hi - lo) / (2**b - 1)``, ``z = clamp(round(-lo / s_stored), 0, 2**b - 1)``.
* asymmetric, float offset: ``m = r_min`` stored in ``scale_dtype`` rounded down (never above
  ``r_min``), ``s = (r_max - m) / (2**b - 1)``, ``r ≈ s q + m``.

Example: symmetric int8 of ``[-1.0, 0.5]`` gives ``s = 1/127``; asymmetric int4 of
``[-1.0, 0.5]`` gives ``s = 1.5/15 = 0.1`` and ``z = round(10.0) = 10``.

A granule whose scale would be 0 (all zeros) gets the smallest positive value of the scale dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from linquant.errors import LinquantError
from linquant.ops.grouping import Granules
from linquant.scheme import QuantScheme

__all__ = ["QParams", "choose_qparams", "fit_dtype", "granule_minmax", "overflowing",
           "qparams_from_range"]

# Clipping ratios tried by clip="mse": 1.0 (no clipping) down to 0.30.
MSE_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 4) for i in range(29))


@dataclass
class QParams:
    """Per-granule parameters, each 1-D of length C (``zero_point``/``offset`` may be None)."""

    scale: torch.Tensor  # scale_dtype
    zero_point: torch.Tensor | None  # uint8 codes, integer-zero-point schemes
    offset: torch.Tensor | None  # scale_dtype, float-offset schemes


def smallest_scale(dtype: torch.dtype) -> float:
    """Smallest positive scale we store for ``dtype`` (exactly representable, never 0)."""
    if dtype == torch.float16:
        return 2.0**-24  # smallest fp16 subnormal
    return float(torch.finfo(dtype).tiny)


def granule_minmax(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule min and max of ``x3 = [outer, C, inner]`` in fp32, no full-size temporaries."""
    outer, _, inner = x3.shape
    # amin + amax (two vectorised passes) beat one torch.aminmax pass by ~4x on CPU.
    if outer == 1:
        lo, hi = x3[0].amin(dim=1), x3[0].amax(dim=1)
    elif inner == 1:
        lo, hi = x3[:, :, 0].amin(dim=0), x3[:, :, 0].amax(dim=0)
    else:
        lo, hi = x3.amin(dim=(0, 2)), x3.amax(dim=(0, 2))
    return lo.float(), hi.float()


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, name: str = "tensor"
) -> QParams:
    """Scales (and zero point / offset) for per-granule ranges ``[lo, hi]`` (fp32, 1-D)."""
    eps = smallest_scale(scheme.scale_dtype)
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / scheme.qmax).clamp_min_(eps)
        stored = _store_scale(scale, scheme, name)
        return QParams(stored, None, None)
    levels = float(scheme.qmax - scheme.qmin)
    if scheme.zero_point == "int":
        lo = lo.clamp_max(0.0)
        hi = hi.clamp_min(0.0)
    if scheme.zero_point == "float":
        # the offset rounded down, and the scale taken from what is left above it: rounded to
        # nearest, a 16-bit offset could land above r_min (by up to 2^-9 |r_min| in bf16, many
        # steps of a narrow group far from zero), clamping the group's smallest values
        offset = _round_down(lo, scheme.scale_dtype)
        if not bool(torch.isfinite(offset).all()):
            raise LinquantError(
                f"{name}: offset {float(lo.min()):.4g} overflows {_dtype_text(scheme)} storage; "
                "use scale_dtype=torch.float32 (--scale-dtype fp32)"
            )
        scale = ((hi - offset.float()) / levels).clamp_min_(eps)
        return QParams(_store_scale(scale, scheme, name), None, offset)
    scale = ((hi - lo) / levels).clamp_min_(eps)
    stored = _store_scale(scale, scheme, name)
    zp = torch.round(scheme.qmin - lo / stored.float()).clamp_(scheme.qmin, scheme.qmax)
    return QParams(stored, zp.to(torch.uint8), None)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded towards -inf: never above ``x``."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)


def overflowing(qp: QParams, scheme: QuantScheme, dtype: torch.dtype) -> torch.Tensor | None:
    """Per granule, whether dequantizing to ``dtype`` can give +-inf: its reconstructions'
    largest magnitude is past ``dtype``'s maximum. None for a ``dtype`` other than fp16 / bf16,
    where nothing can overflow (the range check saw to it)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    top = float(torch.finfo(dtype).max)
    s = qp.scale.float()
    if scheme.symmetric:
        return s * scheme.qmax > top
    if qp.offset is not None:
        m = qp.offset.float()
        return (m < -top) | (m + s * (scheme.qmax - scheme.qmin) > top)
    assert qp.zero_point is not None
    z = qp.zero_point.float()
    return ((scheme.qmax - z) * s > top) | ((scheme.qmin - z) * s < -top)


def fit_dtype(qp: QParams, scheme: QuantScheme, dtype: torch.dtype) -> QParams:
    """``qp`` with each granule's reconstruction inside ``dtype``'s finite range (the dtype of
    the tensor quantized, which dequantizes back to it). A granule holding values near a
    16-bit dtype's maximum could dequantize to +-inf: its scale, rounded to nearest into the
    scale dtype, can be a little larger than exact (fp16 65504 / 7 = 9357.7 is stored as 9360,
    and 7 * 9360 = 65520 is inf in fp16), as can an integer zero point's rounding or a float
    offset rounded down past the negative maximum. Such an offset is taken one step higher,
    such a zero point one code further from the overflowing end; a scale that still overflows
    (a granule spanning both maxima) is lowered to the largest that fits, rounded down."""
    bad = overflowing(qp, scheme, dtype)
    if bad is None or not bool(bad.any()):
        return qp
    top = float(torch.finfo(dtype).max)
    if qp.offset is not None:  # an offset below the maximum's negative: one step up
        m = qp.offset
        m = torch.where(m.float() < -top, torch.nextafter(m, torch.full_like(m, math.inf)), m)
        qp = QParams(qp.scale, None, m)
    elif qp.zero_point is not None:
        z = qp.zero_point.float()
        up = bad & ((scheme.qmax - z) * qp.scale.float() > top)
        z = torch.where(up, z + 1, torch.where(bad, z - 1, z)).clamp_(scheme.qmin, scheme.qmax)
        qp = QParams(qp.scale, z.to(torch.uint8), None)
    for _ in range(2):
        bad = overflowing(qp, scheme, dtype)
        assert bad is not None
        if not bool(bad.any()):
            return qp
        if qp.offset is not None:
            span = (top - qp.offset.float()) / (scheme.qmax - scheme.qmin)
        elif qp.zero_point is not None:
            z = qp.zero_point.float()
            span = top / torch.maximum(scheme.qmax - z, z - scheme.qmin).clamp_min(1.0)
        else:
            span = torch.full_like(qp.scale, top / scheme.qmax, dtype=torch.float32)
        fit = torch.minimum(_round_down(span, scheme.scale_dtype),
                            torch.nextafter(qp.scale, torch.zeros_like(qp.scale)))
        qp = QParams(torch.where(bad, fit, qp.scale), qp.zero_point, qp.offset)
    return qp


def _dtype_text(scheme: QuantScheme) -> str:
    return str(scheme.scale_dtype).replace("torch.", "")


def _store_scale(scale: torch.Tensor, scheme: QuantScheme, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(scale).all()):
        raise LinquantError(
            f"{name}: the value range is too wide for a float32 scale (max - min overflows); "
            "values this large cannot be quantized"
        )
    stored = scale.to(scheme.scale_dtype)
    if not bool(torch.isfinite(stored).all()):
        bad = int((~torch.isfinite(stored)).sum())
        biggest = float(scale.max())
        raise LinquantError(
            f"{name}: {bad} scale(s) overflow {_dtype_text(scheme)} storage (largest scale "
            f"{biggest:.4g}); use scale_dtype=torch.float32 (--scale-dtype fp32)"
        )
    return stored


def check_finite_range(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    name: str,
    shape: tuple[int, ...] | None = None,
) -> None:
    """Raise if the per-granule ranges show NaN/Inf; the message gives count and first index.

    ``x`` is the contiguous (possibly lowered) tensor; ``shape`` the user's shape, in which the
    first bad index is reported.
    """
    if bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all()):
        return
    _raise_nonfinite(x, name, shape if shape is not None else tuple(x.shape))


def check_finite(x: torch.Tensor, name: str, block: int = 1 << 24) -> tuple[float, float]:
    """Raise, as :func:`check_finite_range` does, if ``x`` holds NaN or Inf (one pass, no
    ranges: :func:`linquant.quantize_model` checks every weight before it changes anything);
    else return ``x``'s ``(min, max)``. Views of about ``block`` elements at a time, so the
    check never allocates a mask the size of a large embedding table."""
    if not x.numel():
        return 0.0, 0.0
    rows = max(1, block // max(1, math.prod(x.shape[1:]))) if x.dim() > 1 else max(1, x.numel())
    parts = torch.split(x, rows) if x.dim() > 0 else (x,)
    lo, hi = math.inf, -math.inf
    for part in parts:
        a, b = (float(v) for v in torch.aminmax(part))  # NaN if any is NaN
        if not (math.isfinite(a) and math.isfinite(b)):
            _raise_nonfinite(x, name, tuple(x.shape))
        lo, hi = min(lo, a), max(hi, b)
    return lo, hi


def may_overflow(lo: float, hi: float, scheme: QuantScheme) -> bool:
    """Whether some granule of a tensor whose values lie in ``[lo, hi]`` could get a scale (or a
    float offset) past its storage dtype's range under ``scheme``: False means none can (each
    granule's range lies inside the tensor's; clipping only shrinks scales)."""
    top = float(torch.finfo(scheme.scale_dtype).max)
    if scheme.symmetric:
        return max(-lo, hi) / scheme.qmax > top
    levels = float(scheme.qmax - scheme.qmin)
    if scheme.zero_point == "float":
        return (hi - lo) / levels > top or -lo > top or hi > top
    return (max(hi, 0.0) - min(lo, 0.0)) / levels > top


def _raise_nonfinite(x: torch.Tensor, name: str, dims: tuple[int, ...]) -> None:
    bad = ~torch.isfinite(x.reshape(-1))
    count = int(bad.sum())
    flat = int(bad.nonzero()[0, 0])
    first = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), dims)) if dims else ()
    raise LinquantError(
        f"{name}: input holds {count} NaN/Inf value(s), first at index {first}; "
        "quantization needs finite values"
    )


def choose_qparams(
    x3: torch.Tensor,
    g: Granules,
    scheme: QuantScheme,
    name: str = "tensor",
    shape: tuple[int, ...] | None = None,
) -> QParams:
    """Choose per-granule parameters for ``x3 = [outer, C, inner]`` (the lowered tensor).

    ``shape`` (the tensor's own shape) is only used to report where bad values are.
    """
    lo, hi = granule_minmax(x3)
    check_finite_range(x3, lo, hi, name, shape)
    if scheme.clip == "minmax":
        qp = qparams_from_range(lo, hi, scheme, name)
    else:
        qp = _mse_search(x3, lo, hi, scheme, name)
    return fit_dtype(qp, scheme, x3.dtype)


def fake_quantize_rows(rows: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
    """Quantize then dequantize ``rows = [C, n]`` (fp32) with per-row parameters."""
    s = qp.scale.float().unsqueeze(1)
    if qp.offset is not None:
        m = qp.offset.float().unsqueeze(1)
        q = torch.round((rows - m) / s).clamp_(scheme.qmin, scheme.qmax)
        return q.mul_(s).add_(m)
    q = torch.round(rows / s)
    if qp.zero_point is not None:
        z = qp.zero_point.float().unsqueeze(1)
        return q.add_(z).clamp_(scheme.qmin, scheme.qmax).sub_(z).mul_(s)
    return q.clamp_(scheme.qmin, scheme.qmax).mul_(s)


def _shrink(
    lo: torch.Tensor, hi: torch.Tensor, ratio: float, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip a range by ``ratio``: towards 0 when 0 must stay inside, else towards its middle."""
    if scheme.has_offset:
        mid, half = (lo + hi) * 0.5, (hi - lo) * (0.5 * ratio)
        return mid - half, mid + half
    return lo * ratio, hi * ratio


def _mse_search(
    x3: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme, name: str
) -> QParams:
    """Per granule, the clipping ratio in :data:`MSE_RATIOS` with the least reconstruction MSE.

    Vectorised over granules (one pass over the tensor per ratio), processed in blocks of
    granules so temporaries stay small. Ties keep the larger ratio (less clipping).
    """
    outer, count, inner = x3.shape
    rows_all = x3.permute(1, 0, 2).reshape(count, outer * inner)  # [C, granule size]
    block = max(1, (1 << 18) // max(1, outer * inner))
    scales, zps, offsets = [], [], []
    for c0 in range(0, count, block):
        rows = rows_all[c0 : c0 + block].float()
        blo, bhi = lo[c0 : c0 + block], hi[c0 : c0 + block]
        # errors in units of each granule's magnitude, a power of two: exactly the same
        # comparisons, without the squares overflowing (|w| ~ 1e20) or underflowing (~ 1e-25)
        _, exp = torch.frexp(torch.maximum(blo.abs(), bhi.abs()).float())
        unit = torch.ldexp(torch.ones_like(blo, dtype=torch.float32),
                           -exp.clamp(-126, 126)).unsqueeze(1)
        best = qparams_from_range(blo, bhi, scheme, name)
        best_err = ((fake_quantize_rows(rows, best, scheme) - rows) * unit).pow_(2).sum(dim=1)
        for ratio in MSE_RATIOS[1:]:
            clo, chi = _shrink(blo, bhi, ratio, scheme)
            cand = qparams_from_range(clo, chi, scheme, name)
            err = ((fake_quantize_rows(rows, cand, scheme) - rows) * unit).pow_(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.scale = torch.where(better, cand.scale, best.scale)
            if best.zero_point is not None and cand.zero_point is not None:
                best.zero_point = torch.where(better, cand.zero_point, best.zero_point)
            if best.offset is not None and cand.offset is not None:
                best.offset = torch.where(better, cand.offset, best.offset)
        scales.append(best.scale)
        zps.append(best.zero_point)
        offsets.append(best.offset)
    return QParams(
        torch.cat(scales),
        torch.cat(zps) if zps[0] is not None else None,  # type: ignore[arg-type]
        torch.cat(offsets) if offsets[0] is not None else None,  # type: ignore[arg-type]
    )
