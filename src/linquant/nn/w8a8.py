"""W8A8Linear: int8 weights x int8 activations, int32 accumulation, one fp32 rescale.

Weights: ``int8-sym-ch0`` (symmetric, restricted range ``[-127, 127]``, one fp32 scale per output
row). Activations, read on ``x`` flattened to ``[tokens, in_features]``:

* ``activation="dynamic"`` (default): symmetric, one scale per token, computed every forward.
* ``activation="static"``: one scale (and, with ``act_symmetric=False``, one integer zero point
  in ``[0, 255]``) for the whole tensor, fixed by calibration (:func:`linquant.calibrate.calibrate`)
  or :meth:`W8A8Linear.set_activation_range`. A static layer used before it has a range raises
  :class:`~linquant.errors.LinquantError` naming the layer: it never falls back to a scale of 1.

Formulas: :mod:`linquant.kernels.reference`. Activation parameters follow the library
convention (:func:`linquant.ops.qparams.qparams_from_range` with ``int8-sym-tensor`` or
``int8-asym-tensor``: the asymmetric range is widened to include 0, so 0.0 is exact).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from linquant import kernels
from linquant.errors import LinquantError
from linquant.kernels import compiled, plans, reference
from linquant.nn.base import (
    HF_CONV1D,
    HF_PLAIN_LINEARS,
    QuantModule,
    autocast_dtype,
    eager_only,
    from_float_label,
    jit_tracing,
    linear_features,
    quantize_linear_weight,
)
from linquant.nn.registry import register_qmodule
from linquant.ops.qparams import qparams_from_range
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor

__all__ = ["ACTIVATIONS", "W8A8_WEIGHT", "Activation", "StaticActivations", "W8A8Linear"]

Activation = Literal["dynamic", "static"]
ACTIVATIONS: tuple[str, ...] = ("dynamic", "static")
W8A8_WEIGHT = QuantScheme(bits=8, symmetric=True, granularity="channel", axis=0)


def is_calibrated_scale(scale: torch.Tensor) -> bool:
    """Whether a static layer's ``input_scale`` holds a range: finite and positive (it is NaN
    until calibration)."""
    return bool(torch.isfinite(scale).all() and (scale > 0).all())


class StaticActivations(QuantModule):
    """A quantized layer that may quantize its input to int8 (:class:`W8A8Linear`, a W8A8
    experts projection): ``activation`` is ``"dynamic"`` (one scale per token, computed every
    forward), ``"static"`` (one scale, and one zero point when not ``act_symmetric``, fixed by
    calibration: the buffers ``input_scale``, NaN until then, and ``input_zero_point``), or
    None (weight-only, experts projections only).

    Attributes:
        observing: set by :func:`linquant.calibrate.calibrate`: while True, a static layer
            computes with float activations (int8 weights dequantized), so calibration runs on
            a layer whether or not it already has a range.
    """

    _quant_buffers: tuple[str, ...] = ("weight_qdata", "weight_scale", "weight_zero_point",
                                       "weight_offset", "input_scale", "input_zero_point")
    activation: Activation | None = None
    act_symmetric: bool = True
    observing: bool = False
    _calibrated: bool = False

    def _reset_activation_params(self, device: torch.device | str | None) -> None:
        self.register_buffer(
            "input_scale", torch.full((), float("nan"), dtype=torch.float32, device=device)
        )
        if not self.act_symmetric:
            self.register_buffer(
                "input_zero_point", torch.zeros((), dtype=torch.uint8, device=device)
            )
        self._calibrated = False

    @property
    def act_scheme(self) -> QuantScheme:
        """The activation scheme as a QuantScheme (granularity is per tensor for static layers;
        dynamic layers use one such scale per token)."""
        return QuantScheme(bits=8, symmetric=self.act_symmetric, granularity="tensor")

    @property
    def calibrated(self) -> bool:
        """False only for a static layer without an activation range yet."""
        return self.activation != "static" or self._calibrated

    def set_activation_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        """Fix the static activation parameters from the range ``[lo, hi]`` of the inputs.

        Symmetric: ``s = max(-lo, hi) / 127``. Asymmetric: the range is widened to include 0,
        ``s = (hi - lo) / 255``, ``z = clamp(round(-lo / s), 0, 255)``.
        """
        if self.activation != "static":
            raise LinquantError(
                f"{self._label()}: set_activation_range needs activation='static', this "
                f"layer's is {self.activation!r}"
            )
        lo_t = torch.as_tensor(lo, dtype=torch.float64).float().reshape(-1)
        hi_t = torch.as_tensor(hi, dtype=torch.float64).float().reshape(-1)
        if lo_t.numel() != 1 or hi_t.numel() != 1:
            raise LinquantError(f"{self._label()}: expected scalar lo and hi, got "
                                f"{tuple(lo_t.shape)} and {tuple(hi_t.shape)}")
        lo_f, hi_f = float(lo_t), float(hi_t)
        if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()) or lo_f > hi_f:
            raise LinquantError(
                f"{self._label()}: activation range must be finite with lo <= hi, "
                f"got [{lo_f}, {hi_f}]"
            )
        qp = qparams_from_range(lo_t, hi_t, self.act_scheme, self._label())
        scale = self._buffers["input_scale"]
        assert scale is not None
        scale.copy_(qp.scale.reshape(()))
        if qp.zero_point is not None:
            zp = self._buffers["input_zero_point"]
            assert zp is not None
            zp.copy_(qp.zero_point.reshape(()))
        self._calibrated = True

    def use_dynamic_activations(self) -> None:
        """Turn a static layer into one with dynamic per-token (symmetric) activations: its
        input scale (and zero point) are dropped, each forward computes its own. For a layer
        calibration cannot reach (:func:`linquant.calibrate.calibrate`'s
        ``unreached="dynamic"``)."""
        if self.activation != "static":
            raise LinquantError(f"{self._label()}: use_dynamic_activations needs a static layer, "
                                f"this one's activation is {self.activation!r}")
        for name in ("input_scale", "input_zero_point"):
            self._buffers.pop(name, None)
        self.activation = "dynamic"
        self.act_symmetric = True
        self._calibrated = False
        self.__dict__.get("_kernel_cache", {}).clear()  # plans bound to the static buffers

    def _need_range(self) -> None:
        if not self._calibrated:
            raise LinquantError(
                f"{self._label()}: static activation quantization needs a range first; run "
                "linquant.calibrate(model) over sample batches or call set_activation_range "
                "(a saved folder: linquant calibrate FOLDER -o DST)"
            )

    def _static_params(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(input_scale, input_zero_point)`` of a static layer (calibrated first: else the
        error naming it), ``(None, None)`` for dynamic activations."""
        if self.activation != "static":
            return None, None
        self._need_range()
        return self._buffers["input_scale"], self._buffers.get("input_zero_point")

    def _update_calibrated(self) -> None:
        """After the buffers were loaded: calibrated when the scale is finite and positive."""
        scale = self._buffers.get("input_scale")
        if scale is not None and scale.device.type != "meta":
            self._calibrated = is_calibrated_scale(scale)


def _exporting() -> bool:
    """``torch.compiler.is_exporting()`` (PyTorch 2.5+; before, only Dynamo traced: False)."""
    probe = getattr(torch.compiler, "is_exporting", None)
    return bool(probe()) if callable(probe) else False


@register_qmodule(nn.Linear, HF_CONV1D, *HF_PLAIN_LINEARS, mode="w8a8")
class W8A8Linear(StaticActivations):
    """Linear layer computing int8 x int8 -> int32.

    Buffers: ``weight_qdata`` int8 ``[out, in]`` (in ``state_dict()`` and pickles as its uint8
    bytes; ``load_state_dict`` takes either), ``weight_scale`` fp32 ``[out, 1]``; static
    layers add ``input_scale`` (fp32, 0-d; NaN until calibrated) and, when asymmetric,
    ``input_zero_point`` (uint8, 0-d). ``bias`` is a float ``nn.Parameter`` or None.
    ``observing``: see :class:`StaticActivations`.
    """

    _quant_buffers = ("weight_qdata", "weight_scale", "input_scale", "input_zero_point")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        activation: Activation = "dynamic",
        act_symmetric: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        if activation not in ACTIVATIONS:
            raise LinquantError(
                f"{self._label()}: activation must be one of {', '.join(ACTIVATIONS)}; "
                f"got {activation!r}"
            )
        if not isinstance(act_symmetric, bool):
            raise LinquantError(
                f"{self._label()}: act_symmetric must be a bool, got {act_symmetric!r}"
            )
        self.in_features = self._size(in_features, "in_features")
        self.out_features = self._size(out_features, "out_features")
        self.activation = activation
        self.act_symmetric = act_symmetric
        self.scheme = W8A8_WEIGHT
        self.qweight_shape = (self.out_features, self.in_features)
        self.observing = False
        self._calibrated = False
        self.register_buffer(
            "weight_qdata",
            torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device),
        )
        self.register_buffer(
            "weight_scale", torch.empty(self.out_features, 1, dtype=torch.float32, device=device)
        )
        if activation == "static":
            self._reset_activation_params(device)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.out_features, dtype=self.weight_dtype, device=device)
            )
        else:
            self.register_parameter("bias", None)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def skeleton(
        cls,
        linear: nn.Module,
        *,
        activation: Activation = "dynamic",
        act_symmetric: bool = True,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> W8A8Linear:
        """An empty W8A8Linear shaped for ``linear`` (``nn.Linear`` or HF ``Conv1D``)."""
        in_f, out_f, transposed = linear_features(linear, from_float_label(cls, name))
        w = linear.weight
        assert isinstance(w, torch.Tensor)
        q = cls(in_f, out_f, bias=linear.bias is not None, activation=activation,
                act_symmetric=act_symmetric, dtype=w.dtype, device=device, name=name)
        q.stored_transposed = transposed
        q.float_class = type(linear)
        return q

    @classmethod
    def from_float(
        cls,
        linear: nn.Module,
        *,
        activation: Activation = "dynamic",
        act_symmetric: bool = True,
        name: str = "",
    ) -> W8A8Linear:
        """Quantize an ``nn.Linear`` or transformers ``Conv1D`` weight to ``int8-sym-ch0``.

        Built on the meta device, then filled: no second float copy of the weight.
        """
        q = cls.skeleton(linear, activation=activation, act_symmetric=act_symmetric, name=name,
                         device="meta")
        qt = quantize_linear_weight(linear, W8A8_WEIGHT, name)
        q._set_qweight(qt)
        bias = linear.bias
        q._set_bias(bias if isinstance(bias, torch.Tensor) else None)
        if activation == "static":
            q._reset_activation_params(qt.qdata.device)
        return q

    def _set_qweight(self, qt: QuantizedTensor) -> None:
        if tuple(qt.shape) != self.qweight_shape or qt.scheme != W8A8_WEIGHT:
            raise LinquantError(
                f"{self._label()}: quantized weight {tuple(qt.shape)} {qt.scheme} does not match "
                f"the layer's {self.qweight_shape} {W8A8_WEIGHT}"
            )
        # 8-bit symmetric codes: the packed bytes are exactly the int8 codes, row-major. (A
        # dtype view made under inference_mode is an inference tensor, without the version
        # counter that lets a loaded model release the mapped codes: io.mapped.release.)
        with torch.inference_mode(False):
            self.weight_qdata = qt.qdata.view(torch.int8).view(self.qweight_shape)
        self.weight_scale = qt.scale
        self.weight_dtype = qt.dtype

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a :class:`~linquant.tensor.QuantizedTensor` (``int8-sym-ch0``, views)."""
        return QuantizedTensor._trusted(
            self.weight_qdata.view(torch.uint8).reshape(-1),
            self.weight_scale,
            None,
            None,
            W8A8_WEIGHT,
            self.qweight_shape,
            self.weight_dtype,
        )

    def _int8_codes(self) -> torch.Tensor:
        """The codes as int8: the buffer itself, or a view of uint8 bytes put in its place
        (``torch.func.functional_call`` with a ``state_dict()``, ``torch.export`` on PyTorch
        2.4, which takes the buffers from the state_dict)."""
        codes = self._buffers["weight_qdata"]
        assert codes is not None
        if codes.dtype == torch.int8:
            return codes
        if torch.compiler.is_compiling() or jit_tracing():
            return codes.view(torch.int8)
        return compiled.int8_alias(codes)[0]  # eager: one alias per tensor (plans, layouts)

    # The int8 codes leave the layer as their uint8 bytes (the stored form, as QuantLinear's):
    # a head tied to a quantized embedding holds an int8 view of the embedding's uint8 codes,
    # and torch.save refuses one storage seen as two dtypes ("Cannot save multiple tensors or
    # storages that view the same data as different types"), for the state_dict and the module.
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        codes = destination.get(prefix + "weight_qdata")
        if isinstance(codes, torch.Tensor) and codes.dtype == torch.int8:
            destination[prefix + "weight_qdata"] = codes.view(torch.uint8)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        codes = self._buffers.get("weight_qdata")
        if isinstance(codes, torch.Tensor) and codes.dtype == torch.int8:
            state["_buffers"] = {**self._buffers, "weight_qdata": codes.view(torch.uint8)}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        codes = self._buffers.get("weight_qdata")
        if isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8:
            self._buffers["weight_qdata"] = codes.view(torch.int8)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # uint8 bytes (what state_dict gives) or int8 codes; state_dict is load_state_dict's
        # own copy of the caller's
        codes = state_dict.get(prefix + "weight_qdata")
        if isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8:
            state_dict[prefix + "weight_qdata"] = codes.view(torch.int8)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.kernel_cache().clear()  # buffers may have changed in place
        self._update_calibrated()

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference.functorch_active() and not self.observing:  # vmap / grad / jacrev ...
            x = self._check_last_dim(x, self.in_features)
            return kernels.linear_w8a8_functional(x, self._int8_codes(), self.weight_scale,
                                                  self.bias, *self._static_params())
        if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling() and (
                cast := autocast_dtype(x)) is not None:
            with torch.autocast(x.device.type, enabled=False):  # as nn.Linear under autocast
                return self.forward(x.to(cast))
        if torch.compiler.is_compiling():
            if not self.observing:
                return self._traced_forward(x)
        elif jit_tracing() and not self.observing:
            # torch.jit.trace records the custom operator (the kernels' ctypes calls would be
            # recorded as their outputs: constants); a traced module is for inference
            with torch.no_grad():
                return self._traced_forward(x)
        else:
            cache = self.__dict__.get("_kernel_cache")
            if cache and "w8a8_plans" in cache and type(x) is torch.Tensor and not self.observing:
                # an eager repeat call: the plan kept by kernels.linear_w8a8 for this input
                # signature, looked up on the buffers themselves, before the eager_only wrapper
                # (Dynamo's disable wrapper once Dynamo is imported) and the checks
                b = self._buffers
                static = self.activation != "dynamic"
                y = plans.replay(x, (b["weight_qdata"], b["weight_scale"],
                                     b.get("input_scale") if static else None,
                                     b.get("input_zero_point") if static else None),
                                 self._parameters.get("bias"), cache, "w8a8_plans")
                if y is not None:
                    return y
        return self._eager_forward(x)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as ``torch.compile`` / ``torch.export`` trace it: one opaque
        ``linquant::linear_w8a8`` node (:mod:`linquant.kernels.compiled`), whose implementation
        is the eager dispatcher; a bias that needs a gradient is added after the node, where
        autograd sees it (as the eager kernels add it). Where autograd needs the input's
        gradient, and while observing for calibration, the eager forward runs between graphs
        instead; ``torch.export``, which has no "between graphs", traces the reference's
        PyTorch ops there (the same outputs; their rounding passes no gradient)."""
        x = self._check_last_dim(x, self.in_features)
        bias = self.bias
        grad = torch.is_grad_enabled()
        act_scale, act_zero_point = self._static_params()
        if grad and x.requires_grad:
            if _exporting():
                return reference.linear_w8a8(x, self._int8_codes(), self.weight_scale, bias,
                                             act_scale, act_zero_point)
            return self._eager_forward(x)
        bias_after = bias is not None and grad and bias.requires_grad
        # the buffer as it is (the operator takes uint8 bytes too): a view made here would be a
        # new tensor, and so a new operator cache, on every call
        y: torch.Tensor = compiled.linear_w8a8(x, self._buffers["weight_qdata"], self.weight_scale,
                                               None if bias_after else bias, act_scale,
                                               act_zero_point)
        return y + bias if bias_after and bias is not None else y

    @eager_only  # between torch.compile's graphs (see eager_only)
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_last_dim(x, self.in_features)
        if self.activation == "dynamic":
            return kernels.linear_w8a8(x, self._int8_codes(), self.weight_scale, self.bias,
                                       cache=self.kernel_cache())
        if self.observing:
            return kernels.linear_weight_only(x, self.qweight, self.bias)
        self._need_range()
        return kernels.linear_w8a8(
            x,
            self._int8_codes(),
            self.weight_scale,
            self.bias,
            self._buffers["input_scale"],
            self._buffers.get("input_zero_point"),
            self.kernel_cache(),
        )

    def extra_repr(self) -> str:
        act = "dynamic" if self.activation == "dynamic" else (
            "static-sym" if self.act_symmetric else "static-asym")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight={W8A8_WEIGHT}, activation={act}"
        )
