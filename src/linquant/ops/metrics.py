"""Error metrics between a reference tensor and its reconstruction (computed in fp64; the ratios
on values scaled by a power of two, so that their sums neither overflow nor underflow).

* ``mse = mean((x - y)^2)``
* ``sqnr = 10 log10(sum(x^2) / sum((x - y)^2))`` in dB (``inf`` when ``y == x``)
* ``max_abs_error = max |x - y|``
* ``cosine_similarity = <x, y> / (|x| |y|)`` over the flattened tensors
"""

from __future__ import annotations

import math

import torch

from linquant.errors import LinquantError

__all__ = ["cosine_similarity", "max_abs_error", "mse", "sqnr", "sqnr_from_sums"]


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LinquantError("metrics need two tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape:
        raise LinquantError(f"metrics need equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0:
        raise LinquantError("metrics need non-empty tensors")
    if x.is_complex() or y.is_complex():  # .double() kept the real part, with only a warning
        raise LinquantError(f"metrics need real tensors, got {x.dtype} and {y.dtype}")
    return x.detach().reshape(-1).double(), y.detach().reshape(-1).double()


def _scaled(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` times one power of two that brings their largest magnitude near 1, for
    the ratios (SQNR, cosine): fp64 sums of squares overflowed for values near 1e200 (NaN) and
    underflowed near 1e-200 (an error taken for an exact match, inf dB)."""
    top = float(torch.maximum(a.abs().max(), b.abs().max()))
    if not math.isfinite(top) or top == 0.0:
        return a, b
    unit = math.ldexp(1.0, min(-math.frexp(top)[1], 1000))  # (a subnormal top: 2^1000 at most)
    return a * unit, b * unit


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    a, b = _pair(x, y)
    return float((a - b).pow(2).mean())


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; ``inf`` for an exact reconstruction."""
    a, b = _scaled(*_pair(x, y))
    return sqnr_from_sums(float(a.pow(2).sum()), float((a - b).pow(2).sum()))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """:func:`sqnr` from ``sum(x^2)`` and ``sum((x - y)^2)`` accumulated elsewhere (over blocks,
    calls or tensors): ``inf`` when the noise is zero, ``-inf`` when the signal is."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs_error(x: torch.Tensor, y: torch.Tensor) -> float:
    a, b = _pair(x, y)
    return float((a - b).abs().max())


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    a, b = _scaled(*_pair(x, y))
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)
