"""The one seam for quantized compute: every layer's forward calls one function here.

Each function dispatches to the fastest implementation measured for its inputs (device, dtype,
shape, scheme); :func:`select_path` names the choice and tests assert on it. The formulas are
those of the plain-PyTorch oracle :mod:`linquant.kernels.reference`; the CPU fast paths live in
:mod:`linquant.kernels.cpu` (see its docstring for layouts and tolerances). ``M`` below is the
number of tokens (``x.numel() // K``).

Weight-only linear (:func:`linear_weight_only`) on CPU, first match wins:

1. ``cpu_int4pack``: 4-bit group-wise (group 32/64/128/256, ``N % 16 == 0``), bf16 / fp16
   activations, ``M < INT4PACK_MAX_M`` (64).
2. ``cpu_int8pack``: 8-bit symmetric per-output-channel, ``K % 16 == 0``, bf16 / fp16
   activations, ``M < INT8PACK_MAX_M`` (32).
3. ``cpu_blocked``: fp32 / fp64 activations at every ``M`` (W8A32 etc. keep fp32 math; this
   beat ``cpu_scratch`` and the reference at M = 1..256), or bf16 / fp16 with
   ``M < BLOCKED_MAX_M`` (128).
4. ``cpu_scratch``: bf16 / fp16 activations, ``M >= BLOCKED_MAX_M``.

The thresholds are crossovers measured with benchmarks/bench_linear.py (BENCHMARKS.md).
``torch._weight_int4pack_mm_for_cpu`` and ``torch._weight_int8pack_mm`` need bf16 / fp16
activations. Weights with fewer than ``MIN_FAST_NUMEL`` elements (they fit in L2; dequantize
then matmul costs microseconds) and every other device use ``reference``, bit-identical to
``F.linear(x, qweight.dequantize(x.dtype))``; so do empty inputs and inputs that require
grad while grad is enabled (the fast paths use ``out=`` ops, aten ops without a backward and
reused buffers; a float bias that requires grad is fine: it is added after the product).

W8A8 (:func:`linear_w8a8`): always ``reference`` (:func:`select_w8a8_path`). It is already one
``torch._int_mm`` plus a rescale; an in-place variant measured no faster, so none is kept.

Layers pass a ``cache`` dict they own: repacked kernel layouts are built on first use and kept
there (never in ``state_dict``; the file format stays canonical). The cache key includes the
weight tensors' storage pointers and version counters, so a device move or an in-place load
rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch

from linquant.kernels import cpu, reference
from linquant.kernels.reference import (
    int8_matmul,
    int_mm_supported,
    quantize_activation_per_tensor,
    quantize_activation_per_token,
)
from linquant.tensor import QuantizedTensor

__all__ = [
    "BLOCKED_MAX_M",
    "INT4PACK_MAX_M",
    "INT8PACK_MAX_M",
    "MIN_FAST_NUMEL",
    "PATHS",
    "conv2d_weight_only",
    "embedding_weight_only",
    "int8_matmul",
    "int_mm_supported",
    "linear_w8a8",
    "linear_weight_only",
    "quantize_activation_per_tensor",
    "quantize_activation_per_token",
    "reference",
    "select_path",
    "select_w8a8_path",
]

PATHS = ("reference", "cpu_int4pack", "cpu_int8pack", "cpu_blocked", "cpu_scratch")
INT4PACK_MAX_M = 64
INT8PACK_MAX_M = 32
BLOCKED_MAX_M = 128
MIN_FAST_NUMEL = 1 << 16


def select_path(x: torch.Tensor, qweight: QuantizedTensor) -> str:
    """Which implementation :func:`linear_weight_only` uses for ``x`` and ``qweight``."""
    if (x.device.type != "cpu" or qweight.device.type != "cpu" or len(qweight.shape) != 2
            or x.numel() == 0 or x.dtype not in reference.COMPUTE_DTYPES
            or qweight.numel < MIN_FAST_NUMEL
            or (x.requires_grad and torch.is_grad_enabled())):
        return "reference"
    m = x.numel() // int(qweight.shape[1])
    if cpu.int4pack_supported(qweight, x.dtype) and m < INT4PACK_MAX_M:
        return "cpu_int4pack"
    if cpu.int8pack_supported(qweight, x.dtype) and m < INT8PACK_MAX_M:
        return "cpu_int8pack"
    if x.dtype in (torch.float32, torch.float64) or m < BLOCKED_MAX_M:
        return "cpu_blocked"
    return "cpu_scratch"


def select_w8a8_path(
    x: torch.Tensor, w_int8: torch.Tensor, act_scale: torch.Tensor | None = None
) -> str:
    """Which implementation :func:`linear_w8a8` uses: always ``"reference"`` (see above)."""
    return "reference"


def linear_weight_only(
    x: torch.Tensor,
    qweight: QuantizedTensor,
    bias: torch.Tensor | None = None,
    cache: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Weight-only linear ``x [..., K] -> [..., N]`` in ``x.dtype``; see
    :func:`reference.linear_weight_only` (the formula) and :func:`select_path` (the choice).

    ``cache``: a dict owned by the caller (a layer) where repacked layouts are kept."""
    path = select_path(x, qweight) if isinstance(x, torch.Tensor) else "reference"
    if path == "cpu_int4pack":
        return cpu.linear_int4pack(x, qweight, bias, cache)
    if path == "cpu_int8pack":
        return cpu.linear_int8pack(x, qweight, bias, cache)
    if path == "cpu_blocked":
        return cpu.linear_blocked(x, qweight, bias)
    if path == "cpu_scratch":
        return cpu.linear_scratch(x, qweight, bias)
    return reference.linear_weight_only(x, qweight, bias)


def linear_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 weights x int8 activations; see :func:`reference.linear_w8a8` and
    :func:`select_w8a8_path`."""
    return reference.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point)


def embedding_weight_only(
    ids: torch.Tensor, qweight: QuantizedTensor, dtype: torch.dtype
) -> torch.Tensor:
    """Gather and dequantize rows of a quantized table; see
    :func:`reference.embedding_weight_only`."""
    return reference.embedding_weight_only(ids, qweight, dtype)


def conv2d_weight_only(
    x: torch.Tensor,
    qweight: QuantizedTensor,
    weight_shape: tuple[int, ...],
    bias: torch.Tensor | None,
    stride: tuple[int, ...] | int,
    padding: tuple[int, ...] | int | str,
    dilation: tuple[int, ...] | int,
    groups: int,
) -> torch.Tensor:
    """2-D convolution with a quantized weight; see :func:`reference.conv2d_weight_only`."""
    return reference.conv2d_weight_only(
        x, qweight, weight_shape, bias, stride, padding, dilation, groups
    )
