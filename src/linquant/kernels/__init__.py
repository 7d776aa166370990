"""The one seam for quantized compute: every layer's forward calls one function here.

Each function dispatches to the fastest implementation available for its inputs; today that is
always the plain-PyTorch oracle in :mod:`linquant.kernels.reference` (which also documents the
formulas). Fast paths (CPU, CUDA/Triton) are added behind these same signatures and tested
against the reference.
"""

from __future__ import annotations

import torch

from linquant.kernels import reference
from linquant.kernels.reference import (
    int8_matmul,
    int_mm_supported,
    quantize_activation_per_tensor,
    quantize_activation_per_token,
)
from linquant.tensor import QuantizedTensor

__all__ = [
    "conv2d_weight_only",
    "embedding_weight_only",
    "int8_matmul",
    "int_mm_supported",
    "linear_w8a8",
    "linear_weight_only",
    "quantize_activation_per_tensor",
    "quantize_activation_per_token",
    "reference",
]


def linear_weight_only(
    x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only linear ``x [..., K] -> [..., N]`` in ``x.dtype``; see
    :func:`reference.linear_weight_only`."""
    return reference.linear_weight_only(x, qweight, bias)


def linear_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 weights x int8 activations; see :func:`reference.linear_w8a8`."""
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
