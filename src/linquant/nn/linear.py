"""QuantLinear: weight-only quantized linear layer (W8A32, W8A16, W4A16, any scheme).

``y = x · dequantize(W_q)^T + b`` computed in the input's dtype by
:func:`linquant.kernels.linear_weight_only` (which picks a fast path by device, dtype and
shape; a repacked layout, if the path needs one, is cached on the layer). The weight
``[out, in]`` is quantized with any :class:`~linquant.scheme.QuantScheme` (groups run along
``in``).

Example::

    >>> lin = nn.Linear(64, 32)
    >>> q = QuantLinear.from_float(lin, QuantScheme.parse("int4-sym-g32-fp16"), name="fc")
    >>> q(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linquant import kernels
from linquant.kernels import compiled, plans, reference, triton_linear
from linquant.nn.base import (
    HF_CONV1D,
    HF_PLAIN_LINEARS,
    QuantModule,
    as_scheme,
    autocast_dtype,
    from_float_label,
    jit_tracing,
    linear_features,
    quantize_linear_weight,
)
from linquant.nn.registry import register_qmodule
from linquant.scheme import QuantScheme

__all__ = ["QuantLinear"]


@register_qmodule(nn.Linear, HF_CONV1D, *HF_PLAIN_LINEARS)
class QuantLinear(QuantModule):
    """Linear layer with a quantized weight ``[out_features, in_features]`` and a float bias.

    Buffers: ``weight_qdata``, ``weight_scale`` and ``weight_zero_point`` / ``weight_offset``
    (see :mod:`linquant.nn.base`); ``bias`` is an ``nn.Parameter`` or None.
    The constructor builds an empty layer (for ``load_state_dict``); use :meth:`from_float`
    to quantize a float layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme | str,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.in_features = self._size(in_features, "in_features")
        self.out_features = self._size(out_features, "out_features")
        scheme = as_scheme(scheme, self._label())
        self._register_qweight((self.out_features, self.in_features), scheme, device)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.out_features, dtype=self.weight_dtype, device=device)
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def skeleton(
        cls,
        linear: nn.Module,
        scheme: QuantScheme | str,
        *,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """An empty QuantLinear shaped for ``linear`` (``nn.Linear`` or HF ``Conv1D``)."""
        in_f, out_f, transposed = linear_features(linear, from_float_label(cls, name))
        w = linear.weight
        assert isinstance(w, torch.Tensor)
        q = cls(in_f, out_f, scheme, bias=linear.bias is not None, dtype=w.dtype,
                device=device, name=name)
        q.stored_transposed = transposed
        q.float_class = type(linear)
        return q

    @classmethod
    def from_float(
        cls, linear: nn.Module, scheme: QuantScheme | str, *, name: str = ""
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` or transformers ``Conv1D`` (weight ``[in, out]``).

        The layer is built on the meta device and its buffers filled with the quantized weight,
        so no second float copy of the weight is ever made.
        """
        q = cls.skeleton(linear, scheme, name=name, device="meta")
        q._set_qweight(quantize_linear_weight(linear, q.scheme, name))
        bias = linear.bias
        q._set_bias(bias if isinstance(bias, torch.Tensor) else None)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        if reference.functorch_active():  # vmap / grad / jacrev ...: the reference's PyTorch ops
            x = self._check_last_dim(x, self.in_features)
            return reference.linear_weight_only(x, self.qweight, self.bias)
        if isinstance(x, torch.Tensor) and (cast := autocast_dtype(x)) is not None:
            with torch.autocast(x.device.type, enabled=False):  # as nn.Linear under autocast
                return self.forward(x.to(cast))
        if jit_tracing():  # record the custom operator (a traced module is for
            with torch.no_grad():  # inference), not the kernels' outputs as constants
                return self._traced_forward(x)
        cache = self.__dict__.get("_kernel_cache")
        if cache and type(x) is torch.Tensor:
            # an eager repeat call: the plan kept by the first call for this input signature,
            # checked against the buffers themselves (no QuantizedTensor built, no checks
            # again; see kernels.plans): on CUDA the host's time per call is what limits
            # one-token decoding, on the CPU the checks cost most right after a large matmul
            for entry in ("cpu_plans", "cuda_plans"):  # CPU paths; CUDA's tinygemm
                if entry in cache:
                    y = plans.replay(x, self._stored_weight(), self._parameters.get("bias"),
                                     cache, entry)
                    if y is not None:
                        return y
            if "triton_plans" in cache:
                y = triton_linear.replay(x, self._stored_weight(), self._parameters.get("bias"),
                                         cache)
                if y is not None:
                    return y
        x = self._check_last_dim(x, self.in_features)
        return kernels.linear_weight_only(x, self.qweight, self.bias, self.kernel_cache())

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as ``torch.compile`` / ``torch.export`` (and, without autograd,
        ``torch.jit.trace``, which would otherwise record the kernels' outputs as constants)
        trace it: one opaque
        ``linquant::linear_weight_only`` node (:mod:`linquant.kernels.compiled`), whose
        implementation is the eager dispatcher, so no kernel code is traced. Where autograd
        needs the input's gradient, the reference's PyTorch ops are traced instead; a bias that
        needs one is added after the node, where autograd sees it."""
        x = self._check_last_dim(x, self.in_features)
        bias = self.bias
        grad = torch.is_grad_enabled()
        if grad and x.requires_grad:
            return reference.linear_weight_only(x, self.qweight, bias)
        bias_after = bias is not None and grad and bias.requires_grad
        spec = getattr(self, "_scheme_spec", None) or str(self.scheme)
        y: torch.Tensor = compiled.linear_weight_only(
            x, *self._stored_weight(), None if bias_after else bias, spec,
            list(self.qweight_shape), self.weight_dtype)
        if bias_after:
            assert bias is not None
            y = y + bias.to(y.dtype)
        return y

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.kernel_cache().clear()  # buffers changed in place

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme}"
        )
