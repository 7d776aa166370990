"""QuantConv2d: weight-only quantized 2-D convolution.

The weight ``[out, in/groups, kh, kw]`` is quantized as its 2-D view
``[out, in/groups * kh * kw]`` (no copy), so ``qweight.shape`` is that 2-D shape:

* ``channel`` on axis 0: one scale per output channel (the usual choice; identical codes to
  quantizing the 4-D weight per channel on axis 0).
* ``group``: groups run along the flattened ``(in, kh, kw)`` row in row-major order, i.e. a group
  of ``group_size`` covers ``group_size / (kh*kw)`` whole input channels when ``kh*kw`` divides
  it; ``group_size`` must divide ``in/groups * kh * kw``.

The forward is ``F.conv2d`` on the dequantized weight (:func:`linquant.kernels.conv2d_weight_only`)
with stride, padding (including ``padding_mode``), dilation and groups kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linquant import kernels
from linquant.errors import LinquantError
from linquant.nn.base import QuantModule, as_scheme
from linquant.nn.registry import register_qmodule
from linquant.scheme import QuantScheme
from linquant.tensor import quantize

__all__ = ["QuantConv2d"]


@register_qmodule(nn.Conv2d)
class QuantConv2d(QuantModule):
    """Conv2d with a quantized weight (stored as its 2-D view) and a float bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        scheme: QuantScheme | str,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        try:  # nn.Conv2d normalises and validates the geometry; a meta one costs nothing
            ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                            padding=padding, dilation=dilation, groups=groups, bias=False,
                            padding_mode=padding_mode,  # type: ignore[arg-type]
                            device="meta")
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
        out, cin, kh, kw = self.weight_shape
        scheme = as_scheme(scheme, self._label())
        self._register_qweight((out, cin * kh * kw), scheme, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out, dtype=self.weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def skeleton(
        cls,
        conv: nn.Module,
        scheme: QuantScheme | str,
        *,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> QuantConv2d:
        """An empty QuantConv2d shaped for ``conv``."""
        if not isinstance(conv, nn.Conv2d):
            raise LinquantError(
                f"{cls.__name__} {name!r}.from_float: cannot convert a {type(conv).__name__}; "
                "expected nn.Conv2d"
            )
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            scheme,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            dtype=conv.weight.dtype,
            device=device,
            name=name,
        )

    @classmethod
    def from_float(
        cls, conv: nn.Module, scheme: QuantScheme | str, *, name: str = ""
    ) -> QuantConv2d:
        """Quantize an ``nn.Conv2d`` (built on the meta device, then filled)."""
        q = cls.skeleton(conv, scheme, name=name, device="meta")
        w = conv.weight
        assert isinstance(w, torch.Tensor)
        w2 = w.detach().reshape(q.qweight_shape)  # [out, in/groups*kh*kw], a view
        q._set_qweight(quantize(w2, q.scheme, name=f"{name}.weight" if name else "weight"))
        bias = conv.bias
        q._set_bias(bias if isinstance(bias, torch.Tensor) else None)
        return q

    def _float_weight_shape(self) -> tuple[int, ...]:
        return self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_float_input(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise LinquantError(
                f"{self._label()}: expected input [N, {self.in_channels}, H, W] or "
                f"[{self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        padding: tuple[int, ...] | str = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return kernels.conv2d_weight_only(x, self.qweight, self.weight_shape, self.bias,
                                          self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text + f", bias={self.bias is not None}, scheme={self.scheme}"
