"""QuantConv1d and QuantConv2d: weight-only quantized 1-D and 2-D convolutions.

The weight ``[out, in/groups, *kernel]`` is quantized as its 2-D view
``[out, in/groups * prod(kernel)]`` (no copy), so ``qweight.shape`` is that 2-D shape:

* ``channel`` on axis 0: one scale per output channel (the usual choice; identical codes to
  quantizing the full weight per channel on axis 0).
* ``group``: groups run along the flattened ``(in, *kernel)`` row in row-major order, i.e. a
  group of ``group_size`` covers ``group_size / prod(kernel)`` whole input channels when
  ``prod(kernel)`` divides it; ``group_size`` must divide ``in/groups * prod(kernel)``.

The forward is ``F.conv1d`` / ``F.conv2d`` on the dequantized weight
(:func:`linquant.kernels.conv_weight_only`) with stride, padding (including ``padding_mode``),
dilation and groups kept.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from linquant import kernels
from linquant.errors import LinquantError
from linquant.nn.base import QuantModule, as_scheme, from_float_label
from linquant.nn.registry import register_qmodule
from linquant.scheme import QuantScheme
from linquant.tensor import quantize

__all__ = ["QuantConv1d", "QuantConv2d"]

_C = TypeVar("_C", bound="_QuantConv")


class _QuantConv(QuantModule):
    """What QuantConv1d and QuantConv2d share; ``_float_type`` picks the rank."""

    _float_type: ClassVar[type[nn.Module]]
    _input: ClassVar[str]  # the spatial dimensions' names, for errors: "L" or "H, W"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        scheme: QuantScheme | str,
        *,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        try:  # nn.ConvNd normalises and validates the geometry; a meta one costs nothing
            ref: Any = self._float_type(in_channels, out_channels, kernel_size, stride=stride,
                                        padding=padding, dilation=dilation, groups=groups,
                                        bias=False, padding_mode=padding_mode, device="meta")
        except (ValueError, TypeError, RuntimeError) as e:
            raise LinquantError(f"{self._label()}: invalid convolution: {e}") from None
        self.in_channels = ref.in_channels
        self.out_channels = ref.out_channels
        self.kernel_size = ref.kernel_size
        self.stride = ref.stride
        self.padding = ref.padding
        self.dilation = ref.dilation
        self.groups = ref.groups
        self.padding_mode = ref.padding_mode
        self._reversed_padding_repeated_twice = list(ref._reversed_padding_repeated_twice)
        self.weight_shape: tuple[int, ...] = tuple(ref.weight.shape)
        out = self.weight_shape[0]
        scheme = as_scheme(scheme, self._label())
        self._register_qweight((out, math.prod(self.weight_shape[1:])), scheme, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out, dtype=self.weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def skeleton(
        cls: type[_C],
        conv: nn.Module,
        scheme: QuantScheme | str,
        *,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> _C:
        """An empty layer shaped for ``conv``."""
        if not isinstance(conv, cls._float_type):
            raise LinquantError(
                f"{from_float_label(cls, name)}: cannot convert a {type(conv).__name__}; "
                f"expected nn.{cls._float_type.__name__}"
            )
        c: Any = conv
        return cls(c.in_channels, c.out_channels, c.kernel_size, scheme, stride=c.stride,
                   padding=c.padding, dilation=c.dilation, groups=c.groups,
                   bias=c.bias is not None, padding_mode=c.padding_mode,
                   dtype=c.weight.dtype, device=device, name=name)

    @classmethod
    def from_float(
        cls: type[_C], conv: nn.Module, scheme: QuantScheme | str, *, name: str = ""
    ) -> _C:
        """Quantize a float convolution (built on the meta device, then filled)."""
        q = cls.skeleton(conv, scheme, name=name, device="meta")
        w = conv.weight
        assert isinstance(w, torch.Tensor)
        w2 = w.detach().reshape(q.qweight_shape)  # [out, in/groups * prod(kernel)], a view
        q._set_qweight(quantize(w2, q.scheme, name=f"{name}.weight" if name else "weight"))
        bias = conv.bias
        q._set_bias(bias if isinstance(bias, torch.Tensor) else None)
        return q

    def _float_weight_shape(self) -> tuple[int, ...]:
        return self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_jit_trace()
        x = self._check_float_input(x)
        rank = len(self.weight_shape) - 2
        if x.dim() not in (rank + 1, rank + 2) or x.shape[-rank - 1] != self.in_channels:
            raise LinquantError(
                f"{self._label()}: expected input [N, {self.in_channels}, {self._input}] or "
                f"[{self.in_channels}, {self._input}], got {tuple(x.shape)}"
            )
        padding: tuple[int, ...] | str = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * rank
        return kernels.conv_weight_only(x, self.qweight, self.weight_shape, self.bias,
                                         self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        rank = len(self.weight_shape) - 2
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0,) * rank:
            text += f", padding={self.padding}"
        if self.dilation != (1,) * rank:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text + f", bias={self.bias is not None}, scheme={self.scheme}"


@register_qmodule(nn.Conv1d)
class QuantConv1d(_QuantConv):
    """Conv1d with a quantized weight (stored as its 2-D view) and a float bias."""

    _float_type = nn.Conv1d
    _input = "L"


@register_qmodule(nn.Conv2d)
class QuantConv2d(_QuantConv):
    """Conv2d with a quantized weight (stored as its 2-D view) and a float bias."""

    _float_type = nn.Conv2d
    _input = "H, W"
