"""Mixture-of-experts layers: transformers' fused experts, quantized weight-only.

transformers 5 stores the experts of an MoE block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3,
GPT-OSS, ... about 70 architectures) as one module whose projections are 3-D parameters, one
``[out, in]`` matrix per expert: ``gate_up_proj [E, 2I, H]`` (or ``up_proj [E, I, H]`` without a
gate) and ``down_proj [E, H, I]``, stored ``[E, in, out]`` where the class says
``is_transposed``. Its decorator (``transformers.integrations.moe.use_experts_implementation``)
gives every such module the same description: ``num_experts``, ``has_gate``, ``has_bias``
(``gate_up_proj_bias`` / ``down_proj_bias``, ``[E, out]``), ``is_transposed``,
``has_post_expert_norm`` and ``_apply_gate`` (how a gated expert combines its gate and up halves).
transformers' own grouped and batched implementations compute any of them from that description
alone; so does :class:`QuantExperts`, which is how linquant recognises one (by these
attributes, without importing transformers).

* :class:`QuantExpertsProj` holds one projection of all experts as a single quantized weight
  ``[E * out, in]``: expert ``e``'s rows are ``e * out .. (e + 1) * out - 1``, so per-channel
  scales are per expert and row, groups run along ``in`` within an expert, and the codes of one
  expert are one contiguous byte range (projections where they would not be are kept float,
  see :meth:`QuantExpertsProj.cannot_quantize`). Each expert runs through
  :func:`linquant.kernels.linear_weight_only` with its own kernel cache, so every fast path of
  a weight-only linear layer serves the experts too. Stored in files as ``<experts>.<proj>``'s
  ``weight``, like any other quantized layer.
* :class:`QuantExperts` replaces the experts module: it keeps the module's own attributes,
  submodules (the activation, a post-expert norm), biases and any projection left float, and
  routes tokens expert by expert (tokens sorted by expert; only experts that got tokens run).

Llama 4's experts (``Llama4TextExperts``) predate that interface and have a layout of their own:
every expert runs on every token (the block hands them ``[E * T, H]``, each copy already scaled
by its router score) with weights stored ``[E, in, out]``; they are recognised by class
(:data:`DENSE_EXPERTS`) and wrapped the same way.

Under a W8A8 config each projection is stored as the W8A8 weight (``int8-sym-ch0-fp32``: one
scale per expert and output row) and computes with int8 activations through
:func:`linquant.kernels.linear_w8a8` (int8 x int8 -> int32, one rescale): with
``activation="dynamic"`` (the ``w8a8`` preset) every expert's tokens are quantized per token,
exactly as a dynamic :class:`~linquant.nn.w8a8.W8A8Linear` of that expert's shape;
with ``activation="static"`` (``w8a8-static``) the projection has one calibrated input scale
(and zero point) for all its experts, as a static ``W8A8Linear`` has for its input:
:func:`linquant.calibrate.calibrate` observes every token that reaches the projection,
whichever expert it is routed to, so no expert is left without a range.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from linquant import kernels
from linquant.config import W8A8_WEIGHT
from linquant.errors import LinquantError
from linquant.kernels import reference
from linquant.nn.base import (
    _MODULE_STATE,
    KernelCache,
    QuantModule,
    as_scheme,
    eager_only,
    jit_tracing,
    qualified_name,
)
from linquant.nn.w8a8 import StaticActivations
from linquant.ops.grouping import granules, scale_shape
from linquant.ops.packing import packed_nbytes
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor, quantize

__all__ = [
    "DENSE_EXPERTS",
    "QuantExperts",
    "QuantExpertsProj",
    "expert_rows",
    "experts_dims",
    "experts_transposed",
    "is_hf_experts",
    "projection_names",
]

#: experts modules (by ``module.QualName``) whose experts each run on every token, the block
#: having laid the tokens out ``[E * T, H]``, with weights ``[E, in, out]`` and the default gate
DENSE_EXPERTS = ("transformers.models.llama4.modeling_llama4.Llama4TextExperts",)

def projection_names(module: nn.Module) -> tuple[str, str]:
    """The experts' two projections: ``("gate_up_proj", "down_proj")``, or ``("up_proj",
    "down_proj")`` for experts without a gate."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj")


def _is_dense(module: nn.Module) -> bool:
    return qualified_name(type(module)) in DENSE_EXPERTS


def experts_transposed(module: nn.Module) -> bool:
    """Whether an experts module stores its projections ``[E, in, out]``."""
    if _is_dense(module) or getattr(module, "dense_dispatch", False):
        return True
    return bool(getattr(module, "is_transposed", False))


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a float transformers experts module (see the module docstring):
    the decorator's attributes, an ``_apply_gate`` on its class and two 3-D projections, or
    one of :data:`DENSE_EXPERTS`."""
    if isinstance(module, (QuantModule, QuantExperts)):
        return False
    n = getattr(module, "num_experts", None)
    if _is_dense(module):
        return isinstance(n, int) and all(
            isinstance(w := module._parameters.get(p), torch.Tensor) and w.dim() == 3
            and w.shape[0] == n for p in ("gate_up_proj", "down_proj"))
    flags = ("has_gate", "is_transposed")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return False
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return False
    if not callable(getattr(type(module), "_apply_gate", None)):
        return False
    for p in projection_names(module):
        w = module._parameters.get(p)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != n:
            return False
    return True


def experts_dims(shape: tuple[int, ...] | torch.Size, transposed: bool) -> tuple[int, int, int]:
    """``(E, out, in)`` of a 3-D projection stored ``[E, out, in]`` (``[E, in, out]`` when
    ``transposed``)."""
    e, a, b = (int(d) for d in shape)
    return (e, b, a) if transposed else (e, a, b)


def expert_rows(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The 3-D float projection ``[E, out, in]`` (``[E, in, out]`` when ``transposed``) as the
    ``[E * out, in]`` matrix that :class:`QuantExpertsProj` quantizes (a copy only when
    transposed)."""
    w = weight.transpose(1, 2) if transposed else weight
    return w.reshape(-1, w.shape[-1])


class QuantExpertsProj(StaticActivations):
    """One projection of ``num_experts`` experts, each ``[out_features, in_features]``, as one
    quantized weight ``[num_experts * out_features, in_features]`` (buffers as any
    :class:`~linquant.nn.base.QuantModule`). ``layer(x, e)`` is ``x @ W_e^T`` in ``x``'s dtype.

    ``stored_transposed``: the float parameter was ``[E, in, out]``; :attr:`weight` gives it
    back in that layout.

    ``activation``: ``None`` (weight-only: :func:`linquant.kernels.linear_weight_only`),
    ``"dynamic"`` or ``"static"`` (W8A8, see :class:`~linquant.nn.w8a8.StaticActivations`: the
    scheme must be ``int8-sym-ch0-fp32``; each expert's input is quantized to int8, per token
    or with the projection's calibrated ``input_scale``, and multiplied in int8 by
    :func:`linquant.kernels.linear_w8a8`)."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        scheme: QuantScheme | str,
        *,
        transposed: bool = False,
        activation: Literal["dynamic", "static"] | None = None,
        act_symmetric: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_experts = self._size(num_experts, "num_experts")
        self.in_features = self._size(in_features, "in_features")
        self.out_features = self._size(out_features, "out_features")
        self.stored_transposed = bool(transposed)
        scheme = as_scheme(scheme, self._label())
        if activation not in (None, "dynamic", "static"):
            raise LinquantError(f"{self._label()}: activation must be None (weight-only), "
                                f"'dynamic' or 'static', got {activation!r}")
        if activation is not None and scheme != W8A8_WEIGHT:
            raise LinquantError(f"{self._label()}: int8 activations need the weight scheme "
                                f"{W8A8_WEIGHT}, got {scheme}")
        if not isinstance(act_symmetric, bool) or (activation == "dynamic" and not act_symmetric):
            raise LinquantError(f"{self._label()}: act_symmetric must be a bool (True for "
                                f"dynamic activations), got {act_symmetric!r}")
        self.activation = activation
        self.act_symmetric = act_symmetric
        self.observing = False
        why = self.cannot_quantize((self.num_experts, self.out_features, self.in_features),
                                   scheme)
        if why is not None:
            raise LinquantError(f"{self._label()}: {why}")
        self._register_qweight((self.num_experts * self.out_features, self.in_features), scheme,
                               device)
        if activation == "static":
            self._reset_activation_params(device)

    @staticmethod
    def cannot_quantize(shape: tuple[int, int, int], scheme: QuantScheme) -> str | None:
        """Why experts of ``shape`` ``[E, out, in]`` cannot be stored under ``scheme`` with each
        expert's codes (and packed zero points) on whole bytes, or None."""
        e, out, k = shape
        per_expert = out * k
        if e > 1 and (per_expert * scheme.bits) % 8:
            return (f"one expert's {out}x{k} codes at {scheme.bits} bits do not fill whole bytes "
                    "(experts are stored back to back)")
        sshape = scale_shape((e * out, k), scheme)
        if e > 1 and scheme.has_int_zero_point and sshape and sshape[0] == e * out:
            per_expert = granules((out, k), scheme).count  # zero points sliced per expert
            if (per_expert * scheme.bits) % 8:
                return (f"one expert's {per_expert} zero points at {scheme.bits} bits do not "
                        "fill whole bytes")
        return None

    @classmethod
    def skeleton(
        cls,
        weight: torch.Tensor,
        scheme: QuantScheme | str,
        *,
        transposed: bool,
        activation: Literal["dynamic", "static"] | None = None,
        act_symmetric: bool = True,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> QuantExpertsProj:
        """An empty projection shaped for the 3-D float ``weight`` (may be on the meta device)."""
        if weight.dim() != 3:
            raise LinquantError(f"{cls.__name__} {name!r}: expected a 3-D experts weight, got "
                                f"shape {tuple(weight.shape)}")
        e, out, k = experts_dims(weight.shape, transposed)
        return cls(e, k, out, scheme, transposed=transposed, activation=activation,
                   act_symmetric=act_symmetric, dtype=weight.dtype, device=device, name=name)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, scheme: QuantScheme | str, *, transposed: bool,
        activation: Literal["dynamic", "static"] | None = None, act_symmetric: bool = True,
        name: str = "",
    ) -> QuantExpertsProj:
        """Quantize the 3-D float projection ``weight`` (``[E, out, in]``, or ``[E, in, out]``
        when ``transposed``); ``activation="dynamic"`` or ``"static"`` for int8 activations
        (the scheme must be ``int8-sym-ch0-fp32``; a static projection needs calibrating)."""
        q = cls.skeleton(weight, scheme, transposed=transposed, activation=activation,
                         act_symmetric=act_symmetric, name=name, device="meta")
        wname = f"{name}.weight" if name else "weight"
        qt = quantize(expert_rows(weight.detach(), transposed), q.scheme, name=wname)
        q._set_qweight(qt)
        if activation == "static":
            q._reset_activation_params(qt.qdata.device)
        return q

    def _float_weight_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """All experts' weights **dequantized** to ``weight_dtype``, in the float parameter's
        layout (``[E, out, in]``, or ``[E, in, out]``); a new tensor on every access."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:attr:`weight` in ``dtype`` (default ``weight_dtype``)."""
        w = self.qweight.dequantize(dtype or self.weight_dtype).reshape(
            self._float_weight_shape())
        return w.transpose(1, 2) if self.stored_transposed else w

    def expert(self, e: int) -> tuple[QuantizedTensor, KernelCache]:
        """Expert ``e``'s weight ``[out, in]`` (views of the buffers) and its kernel cache."""
        cache = self.kernel_cache()
        views = cache.get("expert_views")
        qdata = self._buffers["weight_qdata"]
        if views is None or views[0] is not qdata:
            cache.clear()
            views = cache["expert_views"] = (qdata, [self._slice(i) for i in
                                                     range(self.num_experts)])
            cache["expert_caches"] = [KernelCache() for _ in range(self.num_experts)]
        return views[1][e], cache["expert_caches"][e]

    def _slice(self, e: int) -> QuantizedTensor:
        n_exp, out, k = self.num_experts, self.out_features, self.in_features
        scheme = self.scheme
        qdata, scale, zp, offset = self._stored_weight()
        assert qdata is not None and scale is not None
        nb = packed_nbytes(out * k, scheme.bits)
        rows = slice(e * out, (e + 1) * out)

        def per_row(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.dim() == 0 or t.shape[0] == 1:
                return t  # one value for every expert (per tensor, per input channel)
            return t[rows]

        zp_e = zp
        if zp is not None and scale.dim() and scale.shape[0] == n_exp * out:
            count = scale.numel() // n_exp
            zb = packed_nbytes(count, scheme.bits)
            zp_e = zp[e * zb:(e + 1) * zb]
        scale_e = per_row(scale)
        assert scale_e is not None
        return QuantizedTensor._trusted(qdata[e * nb:(e + 1) * nb], scale_e, zp_e,
                                        per_row(offset), scheme, (out, k), self.weight_dtype)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``x [..., in] @ W_expert^T`` in ``x``'s dtype."""
        self._refuse_jit_trace()
        x = self._check_last_dim(x, self.in_features)
        if not 0 <= expert < self.num_experts:
            raise LinquantError(f"{self._label()}: expert {expert} out of range "
                                f"0..{self.num_experts - 1}")
        qt, cache = self.expert(expert)
        if reference.functorch_active():  # grad / jacrev ...: the reference's PyTorch ops
            if self.activation is None or self.observing:
                return reference.linear_weight_only(x, qt, None)
            return kernels.linear_w8a8_functional(
                x, qt.qdata.view(torch.int8).view(self.out_features, self.in_features),
                qt.scale, None, *self._static_params())
        if self.activation is None or self.observing:  # observing: float activations
            return kernels.linear_weight_only(x, qt, None, cache)
        codes = cache.get("w8a8_codes")  # one view object, so the W8A8 plans find it again
        if codes is None:
            with torch.inference_mode(False):  # not an inference tensor: see W8A8Linear
                codes = cache["w8a8_codes"] = qt.qdata.view(torch.int8).view(
                    self.out_features, self.in_features)
        if self.activation == "dynamic":
            return kernels.linear_w8a8(x, codes, qt.scale, None, cache=cache)
        self._need_range()
        return kernels.linear_w8a8(x, codes, qt.scale, None, self._buffers["input_scale"],
                                   self._buffers.get("input_zero_point"), cache)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.kernel_cache().clear()  # buffers changed in place
        self._update_calibrated()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, scheme={self.scheme}"
                + (f", activation={self.activation}" if self.activation else "")
                + (", stored_transposed=True" if self.stored_transposed else ""))


class QuantExperts(nn.Module):
    """A transformers experts module whose projections are :class:`QuantExpertsProj` (or stay
    float 3-D parameters, when excluded). Built from the float module with :meth:`wrap`; the
    projections are then set with :meth:`set_projection`.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` as the float
    module's: for each token, the sum over its ``k`` experts of the routing weight times the
    expert's output ``down(gate(up(x)))`` (``_apply_gate`` of the float class, or its
    activation for experts without a gate; biases and the post-expert norm as the float module
    has them)."""

    float_class: type
    num_experts: int
    has_gate: bool
    is_transposed: bool
    #: one of :data:`DENSE_EXPERTS`: ``forward(hidden_states [E * T, H])``, every expert on its
    #: ``T`` rows
    dense_dispatch: bool = False
    #: attributes :meth:`wrap` set that the float module did not have (dense dispatch)
    added_attributes: tuple[str, ...] = ()
    #: the float module's parameter names in its order (dequantizing restores it)
    param_order: tuple[str, ...] = ()

    @classmethod
    def wrap(cls, experts: nn.Module) -> QuantExperts:
        """A QuantExperts holding everything of ``experts`` (attributes, parameters, buffers,
        submodules: the same objects); its projections are still the float parameters."""
        if not is_hf_experts(experts):
            raise LinquantError(f"{type(experts).__name__} is not a transformers experts module "
                                "(expected num_experts, has_gate, is_transposed, _apply_gate and "
                                "3-D projections)")
        new = cls()
        for k, v in vars(experts).items():
            if k not in _MODULE_STATE and k != "float_class":
                new.__dict__[k] = v
        new.training = experts.training
        new._parameters.update(experts._parameters)
        new._buffers.update(experts._buffers)
        new._non_persistent_buffers_set.update(experts._non_persistent_buffers_set)
        new._modules.update(experts._modules)
        new.float_class = type(experts)
        new.param_order = tuple(experts._parameters)
        if _is_dense(experts):
            new.dense_dispatch = True
            new.added_attributes = tuple(k for k in ("has_gate", "is_transposed", "has_bias")
                                         if k not in vars(experts))
            new.has_gate, new.is_transposed = True, True
            new.__dict__["has_bias"] = False
        return new

    @classmethod
    def cannot_convert(cls, experts: nn.Module) -> str | None:
        """Why ``experts`` cannot be quantized (kept float with this reason), or None."""
        if getattr(experts, "_is_expert_parallel", False):
            return "expert-parallel experts (this process holds a shard of them)"
        return None

    def set_projection(self, part: str, proj: QuantExpertsProj) -> None:
        """Replace the float projection ``part`` by ``proj`` (the float parameter is dropped)."""
        if part not in projection_names(self):
            raise LinquantError(f"QuantExperts: no projection {part!r} (has "
                                f"{', '.join(projection_names(self))})")
        self._parameters.pop(part, None)
        self._modules[part] = proj

    @property
    def num_quantized(self) -> int:
        return sum(isinstance(self._modules.get(p), QuantExpertsProj)
                   for p in projection_names(self))

    def _project(self, part: str, e: int, x: torch.Tensor) -> torch.Tensor:
        proj = self._modules.get(part)
        if isinstance(proj, QuantExpertsProj):
            y: torch.Tensor = proj(x, e)
        else:
            w = self._parameters[part]
            assert w is not None
            we = w[e]
            y = x.to(we.dtype) @ we if self.is_transposed else F.linear(x.to(we.dtype), we)
        if getattr(self, "has_bias", False):
            bias = getattr(self, f"{part}_bias", None)
            if isinstance(bias, torch.Tensor):
                y = y + bias[e].to(y.dtype)
        return y

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        first, second = projection_names(self)
        h = self._project(first, e, x)
        if self.has_gate:
            gate_fn = getattr(self.float_class, "_apply_gate", None)
            if gate_fn is not None:
                h = gate_fn(self, h)
            else:  # the default gate (Llama 4's)
                gate, up = h.chunk(2, dim=-1)
                act_fn: Any = self._modules["act_fn"]
                h = up * act_fn(gate)
        else:
            act: Any = self._modules["act_fn"]
            h = act(h)
        y = self._project(second, e, h)
        if getattr(self, "has_post_expert_norm", False):
            norm: Any = self._modules["post_expert_norm"]
            y = norm(y)
        return y

    @eager_only
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if jit_tracing():  # the routing is data-dependent; the kernels' outputs would
            raise LinquantError(  # be recorded as constants
                f"QuantExperts ({self.float_class.__name__}): torch.jit.trace cannot record "
                f"quantized experts; use torch.compile or torch.export")
        if self.dense_dispatch:
            return self._dense_forward(hidden_states)
        if top_k_index is None or top_k_weights is None:
            raise LinquantError(f"QuantExperts ({self.float_class.__name__}): expected "
                                "forward(hidden_states, top_k_index, top_k_weights)")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        k = int(top_k_index.shape[-1])
        ids = top_k_index.reshape(-1)
        n_exp = int(self.num_experts)
        if ids.numel() and int(ids.min()) < 0:  # (the float module's indexing raises too)
            raise LinquantError(f"QuantExperts ({self.float_class.__name__}): expert ids must "
                                f"be >= 0, got {int(ids.min())}")
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids.clamp(0, n_exp), minlength=n_exp + 1)[:n_exp].tolist()
        xs = x[order // k]
        out: torch.Tensor | None = None
        start = 0
        for e, c in enumerate(counts):  # ids >= num_experts (expert-parallel sentinels) sort last
            if not c:
                continue
            y = self._expert(e, xs[start:start + c])
            if out is None:
                out = y.new_zeros(ids.numel(), y.shape[-1])
            out[start:start + c] = y
            start += c
        if out is None:
            return torch.zeros_like(hidden_states)
        out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(-1, k, out.shape[-1]).sum(dim=1).to(hidden_states.dtype).reshape(
            shape)

    def _dense_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every expert on its rows of ``hidden_states [E * T, H]`` (Llama 4's layout)."""
        n_exp = int(self.num_experts)
        x = hidden_states.reshape(n_exp, -1, hidden_states.shape[-1])
        outs = [self._expert(e, x[e]) for e in range(n_exp)]
        return torch.stack(outs).reshape(-1, outs[0].shape[-1])

    def extra_repr(self) -> str:
        return (f"float_class={qualified_name(self.float_class)}, num_experts={self.num_experts}"
                + (", dense_dispatch=True" if self.dense_dispatch else ""))
