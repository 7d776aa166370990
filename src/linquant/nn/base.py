"""What every quantized module shares: dtype-safe ``.to()``, error labels, weight buffers.

Quantized weights live in **buffers** named after the :class:`~linquant.tensor.QuantizedTensor`
roles: ``weight_qdata`` (packed uint8 codes), ``weight_scale``, and ``weight_zero_point``
(packed uint8) or ``weight_offset`` when the scheme has one. So ``model.to(device)``,
``state_dict()`` and ``load_state_dict()`` work as for any module.

``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` never change a quantized buffer: codes were
computed with the *stored* scales, so casting an fp32 scale to bf16 would silently change the
weights (and the saved file). :meth:`QuantModule._apply` lets such calls move these buffers to a
new device but keeps their dtype; the float parts (the bias) follow the model as usual, and
``weight_dtype`` (what the weight dequantizes to by default) follows the requested float dtype.
The layers compute in their input's dtype, so after ``model.to(torch.bfloat16)`` a layer runs
W8A16 / W4A16 in bf16 with unchanged codes and scales.

Hugging Face GPT-2 style ``transformers.pytorch_utils.Conv1D`` layers (weight stored transposed,
``[in, out]``) are recognised by their class's module path and name, so transformers is never
imported by linquant.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import nn

from linquant.errors import LinquantError
from linquant.kernels.reference import COMPUTE_DTYPES
from linquant.ops.grouping import granules, scale_shape
from linquant.ops.packing import pack, packed_nbytes, unpack
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor, quantize

__all__ = [
    "COMPUTE_DTYPES",
    "HF_CONV1D",
    "HF_PLAIN_LINEARS",
    "KernelCache",
    "QuantModule",
    "as_scheme",
    "from_float_label",
    "is_hf_conv1d",
    "linear_features",
    "plain_references",
    "qualified_name",
    "quantize_linear_weight",
    "replace_plain_references",
]

HF_CONV1D = "transformers.pytorch_utils.Conv1D"
# nn.Linear subclasses of transformers whose forward is nn.Linear's (``x @ W.T + b``), by name
HF_PLAIN_LINEARS = ("transformers.models.falcon.modeling_falcon.FalconLinear",)
_BLOCK_ELEMS = 1 << 18


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, e.g. ``torch.nn.modules.linear.Linear``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module named ``name`` in ``model`` (``""``: ``model``); None for a name that is not
    a module's (a parameter such as an experts projection, or a missing one)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# what nn.Module.__init__ puts in an instance's __dict__ (hooks, ...): never a model's own
_MODULE_STATE = frozenset(vars(nn.Module()))
PlainRefs = dict[int, list[tuple[nn.Module, str]]]


def _items(value: object, depth: int = 3) -> Iterator[object]:
    """The items of a plain list / tuple / dict (values), nested ones included."""
    if depth and isinstance(value, (list, tuple, dict)):
        for item in (value.values() if isinstance(value, dict) else value):
            yield item
            yield from _items(item, depth - 1)


def plain_references(model: nn.Module) -> PlainRefs:
    """``{id(module): [(holder, attribute)]}`` for the modules of ``model`` that a module also
    holds in a plain list, tuple or dict attribute, beside registering them: Mask2Former's
    ``PredictionBlock`` keeps ``self.layers = [nn.Linear(...), activation]``, registers each
    with ``add_module`` and runs the list. Replacing the registered child alone would leave the
    forward running the old layer; :func:`replace_plain_references` follows the replacement."""
    refs: PlainRefs = {}
    for holder in model.modules():
        for attr, value in vars(holder).items():
            if attr in _MODULE_STATE or not isinstance(value, (list, tuple, dict)):
                continue
            for item in _items(value):
                if isinstance(item, nn.Module) and (holder, attr) not in refs.get(id(item), []):
                    refs.setdefault(id(item), []).append((holder, attr))
    return refs


def _swapped(value: Any, old: nn.Module, new: nn.Module, depth: int = 3) -> Any:
    """``value`` with ``old`` replaced by ``new`` (lists and dicts changed in place)."""
    if not depth:
        return value
    if isinstance(value, list):
        value[:] = [new if v is old else _swapped(v, old, new, depth - 1) for v in value]
    elif isinstance(value, dict):
        for k, v in value.items():
            value[k] = new if v is old else _swapped(v, old, new, depth - 1)
    elif isinstance(value, tuple):
        items = [new if v is old else _swapped(v, old, new, depth - 1) for v in value]
        make: Any = type(value)  # a named tuple takes its fields one by one
        return make(*items) if hasattr(value, "_fields") else make(items)
    return value


def replace_plain_references(refs: PlainRefs, old: nn.Module, new: nn.Module) -> None:
    """Point the plain containers :func:`plain_references` found holding ``old`` at ``new``
    (call it while ``old`` is alive: the keys are object ids)."""
    for holder, attr in refs.get(id(old), ()):
        value = holder.__dict__[attr]
        swapped = _swapped(value, old, new)
        if swapped is not value:
            holder.__dict__[attr] = swapped
    if id(old) in refs:
        refs[id(new)] = refs.pop(id(old))


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _recomputes_weight(hook: object) -> bool:
    """A pre-hook of PyTorch's legacy weight reparametrizations (``weight_norm``,
    ``spectral_norm``, ``prune``), which rebuilds ``weight`` from parameters the quantized
    layer does not have (``weight_g`` ...): carried over, it failed on every call."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` (a quantized layer taking ``old``'s place) runs ``old``'s forward and backward
    hooks, and is in ``old``'s train / eval mode. The hook tables themselves move, so the
    handles ``register_*_hook`` returned still remove them; the pre-hooks of legacy weight
    reparametrizations (``weight_norm``, ``spectral_norm``, ``prune``) are dropped, their effect
    being in the quantized weight. State-dict hooks stay behind: they are written for the float
    layer's tensors."""
    for attr in _HOOK_DICTS:
        table = old.__dict__.get(attr)
        if not table:
            continue
        for key in [k for k, hook in table.items() if _recomputes_weight(hook)]:
            del table[key]  # its effect is in the quantized weight (it rebuilt ``weight``)
        if table:
            new.__dict__[attr] = table
    if old.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    new.train(old.training)


def keep_bias(old: nn.Module, new: nn.Module) -> None:
    """``new`` (a quantized layer taking ``old``'s place) holds ``old``'s bias Parameter itself,
    not the copy it was built with, where the two match: a bias tied to another module's
    (BERT's ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``) stays tied, and an
    optimizer built before quantizing still updates it."""
    bias, copy = old._parameters.get("bias"), new._parameters.get("bias")
    if isinstance(bias, nn.Parameter) and copy is not None and (
            bias.dtype, bias.shape, bias.device) == (copy.dtype, copy.shape, copy.device):
        new.bias = bias


def is_hf_conv1d(module: object) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` itself (checked without importing it)."""
    return qualified_name(type(module)) == HF_CONV1D


def weight_dims(module: nn.Module, attrs: tuple[str, str]) -> tuple[int, int]:
    """The ``[rows, columns]`` of ``module``'s 2-D weight, which its float forward computes
    with, or else its attributes ``attrs`` (a lazy or meta-less weight has no shape). The two
    disagree when a weight was replaced or tied after the module was built (a transformers head
    tied to an embedding of another vocabulary size keeps the ``out_features`` it was built
    with)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and not isinstance(w, nn.parameter.UninitializedParameter) \
            and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return int(getattr(module, attrs[0])), int(getattr(module, attrs[1]))


def from_float_label(cls: type, name: str) -> str:
    """``QuantLinear 'fc'.from_float`` (the name left out when there is none) for messages."""
    return f"{cls.__name__}{f' {name!r}' if name else ''}.from_float"


def linear_features(module: nn.Module, who: str) -> tuple[int, int, bool]:
    """``(in_features, out_features, transposed)`` of an ``nn.Linear`` or HF ``Conv1D`` (an
    ``nn.Linear``'s from its weight: :func:`weight_dims`)."""
    if isinstance(module, nn.Linear):
        out_f, in_f = weight_dims(module, ("out_features", "in_features"))
        return in_f, out_f, False
    if is_hf_conv1d(module):
        w = module.weight
        assert isinstance(w, torch.Tensor)
        return int(w.shape[0]), int(w.shape[1]), True
    raise LinquantError(
        f"{who}: cannot convert a {type(module).__name__}; expected torch.nn.Linear or "
        "transformers' Conv1D"
    )


def quantize_linear_weight(module: nn.Module, scheme: QuantScheme, name: str) -> QuantizedTensor:
    """The weight of an ``nn.Linear`` or HF ``Conv1D`` quantized as ``[out, in]``.

    A Conv1D stores its weight as ``[in, out]``; the result equals
    ``quantize(weight.t().contiguous(), scheme)`` exactly but never makes that float copy:
    tensor and channel granularities quantize the stored layout with the transposed axis and then
    transpose the (uint8) codes; group granularity (groups run along ``in``, a column of the
    stored layout) quantizes blocks of output rows and joins them. (With ``clip="mse"`` and a
    per-tensor or per-input-channel scheme the MSE search sums errors in the stored order, so a
    floating-point near-tie could in principle pick a neighbouring ratio; not seen in tests.)
    """
    w = module.weight
    assert isinstance(w, torch.Tensor)
    wname = f"{name}.weight" if name else "weight"
    if not is_hf_conv1d(module):
        return quantize(w.detach(), scheme, name=wname)
    return _quantize_transposed(w.detach(), scheme, wname)


def _quantize_transposed(wt: torch.Tensor, scheme: QuantScheme, name: str) -> QuantizedTensor:
    """``quantize(wt.t(), scheme)`` for ``wt [in, out]`` without a full float copy."""
    n_in, n_out = (int(d) for d in wt.shape)
    shape = (n_out, n_in)
    granules(shape, scheme, name)  # validates the group size against in_features
    bits = scheme.bits
    if scheme.granularity != "group":
        # tensor: the same granule; channel on axis a of [out, in] is axis 1-a of [in, out].
        stored = scheme
        if scheme.granularity == "channel":
            stored = scheme.with_(axis=1 - scheme.axis % 2)
        qt = quantize(wt, stored, name=name)
        codes = unpack(qt.qdata, bits, wt.numel()).view(n_in, n_out).t().contiguous()
        sshape = scale_shape(shape, scheme)
        offset = None if qt.offset is None else qt.offset.reshape(sshape)
        return QuantizedTensor(pack(codes, bits), qt.scale.reshape(sshape), qt.zero_point_packed,
                               offset, scheme, shape, wt.dtype)
    # group: rows of the [out, in] weight are independent; quantize blocks of them.
    per_row = n_in // (scheme.group_size or 1)
    codes = torch.empty(n_out, n_in, dtype=torch.uint8, device=wt.device)
    scale = torch.empty(n_out, per_row, dtype=scheme.scale_dtype, device=wt.device)
    zp = torch.empty(n_out, per_row, dtype=torch.uint8, device=wt.device)
    offset_t = torch.empty(n_out, per_row, dtype=scheme.scale_dtype, device=wt.device)
    step = max(1, _BLOCK_ELEMS // max(1, n_in))
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        blk = wt[:, r0:r1].t().contiguous()  # [rows, in]: a block-sized float copy
        qb = quantize(blk, scheme, name=f"{name} (output rows {r0}..{r1 - 1})")
        codes[r0:r1] = unpack(qb.qdata, bits, blk.numel()).view(r1 - r0, n_in)
        scale[r0:r1] = qb.scale
        if qb.zero_point is not None:
            zp[r0:r1] = qb.zero_point
        if qb.offset is not None:
            offset_t[r0:r1] = qb.offset
    return QuantizedTensor(
        pack(codes, bits),
        scale,
        pack(zp, bits) if scheme.has_int_zero_point else None,
        offset_t if scheme.has_offset else None,
        scheme,
        shape,
        wt.dtype,
    )


def as_scheme(scheme: QuantScheme | str, who: str) -> QuantScheme:
    """A QuantScheme from a scheme or its text form (``"int4-sym-g32-fp16"``)."""
    if isinstance(scheme, str):
        return QuantScheme.parse(scheme)
    if not isinstance(scheme, QuantScheme):
        raise LinquantError(f"{who}: scheme must be a QuantScheme or str, got {scheme!r}")
    return scheme


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` would run a float ``nn.Linear`` on ``x`` in, where it is
    on for ``x``'s device and would cast ``x`` (fp32 / fp16 / bf16 other than its dtype);
    None otherwise. Quantized linear layers then take ``x`` in that dtype and run their
    kernels with autocast off: their outputs followed the path taken (fp32 on some, bf16 on
    others) and a kernel's first-use check failed under it."""
    if not _any_autocast():  # (cheaper than asking for x's device: ~0.1 us of ~0.5)
        return None
    device = x.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
    except RuntimeError:  # a device autocast does not know (meta)
        return None
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return dtype


def jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording (``torch.jit.is_tracing`` outside scripting)."""
    # torch.jit.is_tracing, not torch._C._is_tracing: Dynamo folds the former to False
    return bool(torch.jit.is_tracing())  # type: ignore[attr-defined, no-untyped-call]


def eager_only(fn: _Fn) -> _Fn:
    """Run the decorated forward eagerly under ``torch.compile``, outside the traced graph:
    for layers whose kernels (native via ctypes, Triton) and kernel caches need real tensors
    (``W8A8Linear``'s eager forward, which compiled models call where autograd is involved and
    while calibrating; otherwise both linear layers enter graphs as custom operators, see
    :mod:`linquant.kernels.compiled`).
    Traced, Dynamo split ``native._run_avx2`` at the ctypes call and the process aborted
    (tests/nn/test_compile.py).

    ``torch.compiler.disable`` does this, but it imports Dynamo (and with it Triton), which
    took ``import linquant`` from 0.07 to 1.3 s. So the wrapper is built on the first call made
    after Dynamo was imported (no model can be compiled before that); until then the call goes
    straight to ``fn``. ``_torchdynamo_disable`` on the wrapper makes Dynamo run it rather than
    inline it; it then calls the disabled ``fn`` (tracing off for everything below). About
    0.2 us per call, 0.4 once Dynamo is loaded (benchmarks/bench_host.py)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))  # type: ignore[no-untyped-call]
        return disabled[0](*args, **kwargs)

    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    return cast(_Fn, call)


class KernelCache(dict[str, Any]):
    """A layer's repacked kernel layouts (see :mod:`linquant.kernels`).

    Derived data only, rebuilt on first use: a copy or pickle of the layer (``copy.deepcopy``,
    ``torch.save(model)``) gets an empty cache, so opaque layouts (oneDNN's packed weight cannot
    be copied at all) never travel and a saved model never carries a second copy of its
    weights."""

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelCache:
        return KernelCache()

    def __reduce__(self) -> tuple[type[KernelCache], tuple[()]]:
        return (KernelCache, ())


def clear_kernel_caches(model: nn.Module) -> int:
    """Drop the repacked kernel layouts of every quantized layer in ``model`` (the layer itself
    when it is one); returns how many layouts were dropped. Each is rebuilt on the layer's next
    forward that needs it.

    The layouts cost memory: a W4A16 layer on the CPU keeps another copy of its int4 codes, and
    a CPU W8A8 layer one copy of its int8 weight per int8 backend it ran on (fbgemm at few
    tokens, oneDNN at more; see :mod:`linquant.kernels`). Useful after a calibration or warm-up
    run at batch sizes the deployment will not see. The caches that ``torch.compile``'d
    models keep per weight (:mod:`linquant.kernels.compiled`) are dropped too, and so are the
    layers' plans (:mod:`linquant.kernels.plans`; not counted): the next call of each input
    signature picks its path again."""
    from linquant.kernels import compiled

    dropped = 0
    for m in model.modules():
        if isinstance(m, QuantModule):
            cache = m.kernel_cache()
            dropped += sum(1 for name in cache if not name.endswith("_plans"))
            cache.clear()
            qdata = m._buffers.get("weight_qdata")
            if qdata is not None:
                dropped += compiled.clear_cache(qdata)
    return dropped


def kernel_cache_nbytes(model: nn.Module) -> int:
    """Bytes of memory the quantized layers of ``model`` hold in their repacked kernel layouts
    (:func:`clear_kernel_caches` frees them): the memory a run costs on top of the model's own
    tensors, which its size and the report count.

    Counted: every tensor reachable in a layer's cache entries (tuples, lists, dicts and plain
    objects, a few levels deep), each storage once, except storages of the layer's own
    parameters and buffers. Not counted: plans (closures over the same layouts and small derived
    tensors) and opaque packed weights that expose no storage (fbgemm's and oneDNN's packed
    int8 weights), nor the per-weight caches of ``torch.compile``'d models."""
    total = 0
    for m in model.modules():
        if not isinstance(m, QuantModule):
            continue
        cache = m.__dict__.get("_kernel_cache")
        if not cache:
            continue
        seen: set[int] = set()
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            ptr = _storage_ptr(t)
            if ptr is not None:
                seen.add(ptr)
        for name, entry in cache.items():
            if not name.endswith("_plans"):
                total += _tensor_bytes(entry, seen, depth=4)
    return total


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # opaque tensors (oneDNN's packed weight)
        return None


def _tensor_bytes(obj: Any, seen: set[int], depth: int) -> int:
    if isinstance(obj, torch.Tensor):
        ptr = _storage_ptr(obj)
        if ptr is None or ptr in seen or obj.device.type == "meta":
            return 0
        seen.add(ptr)
        return int(obj.untyped_storage().nbytes())
    if depth == 0:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in obj.values())
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and not callable(obj):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in attrs.values())
    return 0


def _memory_key(t: torch.Tensor) -> object:
    """What identifies ``t``'s bytes: device, start and size, so that views of one buffer under
    another dtype or shape (a tied W8A8Linear's int8 ``[N, K]`` codes and an embedding's uint8
    stream) are one; the object itself for meta, empty and storage-less tensors."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    try:
        return (t.device, t.data_ptr(), t.numel() * t.element_size())
    except RuntimeError:  # tensors without storage (fake, functional)
        return id(t)


# fn of a running ``Module._apply`` -> {old buffer's memory: (old buffer, converted weakly)}
_TIED_MEMO: weakref.WeakKeyDictionary[
    Any, dict[object, tuple[torch.Tensor, weakref.ref[torch.Tensor]]]] = (
    weakref.WeakKeyDictionary())


def _memoizable(fn: object) -> bool:
    try:
        weakref.ref(fn)
    except TypeError:
        return False
    return True


def _normal(value: Any) -> Any:
    """``value``, or where it is an inference tensor (made under ``torch.inference_mode``), a
    normal copy of it. An inference tensor keeps no version counter, so a kernel layout or plan
    made from it could not see it changed in place later (a recalibrated input scale ran with the
    old one), and a parameter made from one raises when asked for its version once ``.to()``
    has replaced its data. A layer's tensors are therefore always normal tensors: one copy, made
    only when the layer is built (or converted) under ``inference_mode``."""
    if not isinstance(value, torch.Tensor) or not value.is_inference():
        return value
    with torch.inference_mode(False), torch.no_grad():
        copy = value.detach().clone()
        if isinstance(value, nn.Parameter):
            return nn.Parameter(copy, requires_grad=value.requires_grad)
        return copy


class QuantModule(nn.Module):
    """Base of the quantized modules: labels for errors, dtype-safe ``_apply``, weight buffers.

    Attributes:
        name: the layer's name in its model (used in error messages; may be empty).
        weight_dtype: float dtype the weight dequantizes to by default; follows ``.to(dtype)``.
    """

    _quant_buffers: tuple[str, ...] = ("weight_qdata", "weight_scale", "weight_zero_point",
                                       "weight_offset")
    name: str
    weight_dtype: torch.dtype
    weight_qdata: torch.Tensor
    weight_scale: torch.Tensor
    scheme: QuantScheme
    qweight_shape: tuple[int, ...]

    def __init__(self, *, name: str = "", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.name = name
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in COMPUTE_DTYPES:
            raise LinquantError(f"{self._label()}: weight dtype must be a float dtype, got {dtype}")
        self.weight_dtype = dtype

    @classmethod
    def cannot_convert(cls, module: nn.Module) -> str | None:
        """Why ``module`` (of a float type this class replaces) cannot become one, or None:
        :func:`linquant.quantize_model` keeps such a layer float with this reason, and
        ``from_float`` raises it."""
        return None

    def kernel_cache(self) -> KernelCache:
        """This layer's :class:`KernelCache` (created on first use; layers unpickled from older
        versions have none yet)."""
        cache = self.__dict__.get("_kernel_cache")
        if not isinstance(cache, KernelCache):
            cache = self.__dict__["_kernel_cache"] = KernelCache()
        return cache

    # ---- errors ------------------------------------------------------------------------------
    def _refuse_jit_trace(self) -> None:
        """Raise under ``torch.jit.trace`` (deprecated in PyTorch): it would record the eager
        kernels' outputs as constants, and the reference's ops view tensors as other dtypes,
        which TorchScript rejects. ``QuantLinear`` and ``W8A8Linear`` record their custom
        operators instead and are traced."""
        if jit_tracing():
            raise LinquantError(
                f"{self._label()}: torch.jit.trace cannot record a {type(self).__name__}; use "
                f"torch.compile or torch.export (only QuantLinear and W8A8Linear layers trace)")

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script``, which calls this on each module before compiling: it
        cannot compile the kernels' Python dispatch and failed with "Unknown type annotation"."""
        raise LinquantError(
            f"{self._label()}: torch.jit.script cannot compile linquant layers; use "
            f"torch.compile or torch.export (or torch.jit.trace for QuantLinear and W8A8Linear)")

    def _label(self) -> str:
        name = getattr(self, "name", "")
        return f"{type(self).__name__} {name!r}" if name else type(self).__name__

    def _size(self, value: object, what: str) -> int:
        """``value`` as a layer size (``in_features``, ...): a positive int, else a
        :class:`LinquantError` naming the layer (``5.5`` became 5, ``-1`` a torch error)."""
        import numbers

        if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                or int(value) < 1):
            raise LinquantError(f"{self._label()}: {what} must be a positive int, got {value!r}")
        return int(value)

    def _check_float_input(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise LinquantError(f"{self._label()}: expected a tensor input, got {type(x).__name__}")
        if x.dtype not in COMPUTE_DTYPES:
            raise LinquantError(f"{self._label()}: expected a float input, got {x.dtype}")
        if x.layout != torch.strided:  # sparse: the kernels need the values laid out
            return x.to_dense()
        return x

    def _check_last_dim(self, x: object, features: int) -> torch.Tensor:
        x = self._check_float_input(x)
        if x.dim() == 0 or x.shape[-1] != features:
            raise LinquantError(
                f"{self._label()}: expected input of shape [..., {features}], "
                f"got {tuple(x.shape)}"
            )
        return x

    # ---- buffers -------------------------------------------------------------------------------
    def _register_qweight(
        self, shape: tuple[int, ...], scheme: QuantScheme, device: torch.device | str | None
    ) -> None:
        """Empty buffers for a weight of ``shape`` under ``scheme`` (validated, naming the
        layer)."""
        g = granules(shape, scheme, self._label())
        self.scheme = scheme
        self._scheme_spec = str(scheme)  # a plain str for torch.compile (2.4 cannot trace str())
        self.qweight_shape = tuple(int(d) for d in shape)
        numel, n_params = g.outer * g.count * g.inner, g.count
        sshape = scale_shape(shape, scheme)
        self.register_buffer(
            "weight_qdata",
            torch.empty(packed_nbytes(numel, scheme.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_scale", torch.empty(sshape, dtype=scheme.scale_dtype, device=device)
        )
        if scheme.has_int_zero_point:
            self.register_buffer(
                "weight_zero_point",
                torch.empty(packed_nbytes(n_params, scheme.bits), dtype=torch.uint8,
                            device=device),
            )
        if scheme.has_offset:
            self.register_buffer(
                "weight_offset", torch.empty(sshape, dtype=scheme.scale_dtype, device=device)
            )

    def _set_qweight(self, qt: QuantizedTensor) -> None:
        """Fill the buffers with ``qt``'s tensors (no copy)."""
        if tuple(qt.shape) != self.qweight_shape or qt.scheme != self.scheme:
            raise LinquantError(
                f"{self._label()}: quantized weight {tuple(qt.shape)} {qt.scheme} does not match "
                f"the layer's {self.qweight_shape} {self.scheme}"
            )
        for role, t in qt.tensors().items():
            setattr(self, f"weight_{role}", t)
        self.weight_dtype = qt.dtype

    def _stored_weight(self) -> tuple[torch.Tensor | None, ...]:
        """The weight's buffers (codes, scale, packed zero point, offset), in the order of
        :attr:`_quant_buffers` and ``QuantizedTensor``'s, without building one (hot paths)."""
        b = self._buffers
        return (b["weight_qdata"], b["weight_scale"], b.get("weight_zero_point"),
                b.get("weight_offset"))

    #: set by ``skeleton`` for a layer made from a transformers ``Conv1D``, whose float weight
    #: is stored ``[in, out]``: :attr:`weight` gives it back in that layout
    stored_transposed: bool = False
    #: the float layer's class, where ``skeleton`` knows it (linear layers: ``nn.Linear``,
    #: transformers' ``Conv1D`` or ``FalconLinear``); :func:`linquant.dequantize_model` builds
    #: one again
    float_class: type | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight **dequantized** to ``weight_dtype``, in the layout of the float layer it
        replaced (``[out, in]``, a Conv1D's ``[in, out]``, a convolution's 4-D shape): a new
        tensor on every access, for code that reads ``layer.weight`` (transformers' CLIP /
        SigLIP embeddings cast their input to ``patch_embedding.weight.dtype``). Read-only:
        assigning to it raises, and changing the tensor changes nothing."""
        return self.dequantized_weight()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:attr:`weight` in ``dtype`` (default ``weight_dtype``): the codes dequantized
        straight to it, in the float layer's layout."""
        w = self.qweight.dequantize(dtype or self.weight_dtype).reshape(
            self._float_weight_shape())
        return w.t() if self.stored_transposed else w

    def _float_weight_shape(self) -> tuple[int, ...]:
        return self.qweight_shape

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise LinquantError(
                f"{self._label()}: weight is read-only (it dequantizes the stored codes); a "
                "quantized layer's weight changes only through its buffers or load_state_dict")
        super().__setattr__(name, _normal(value))

    def register_buffer(self, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        super().register_buffer(name, _normal(tensor), persistent)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, _normal(param))

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a :class:`~linquant.tensor.QuantizedTensor` (views of the buffers)."""
        return QuantizedTensor._trusted(
            self.weight_qdata,
            self.weight_scale,
            self._buffers.get("weight_zero_point"),
            self._buffers.get("weight_offset"),
            self.scheme,
            self.qweight_shape,
            self.weight_dtype,
        )

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    # ---- .to(), .half(), .cuda() ---------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # converted tensors are normal tensors, also under inference_mode (see _normal)
        with torch.inference_mode(False):
            return self._apply_outside_inference_mode(fn, recurse)

    def _apply_outside_inference_mode(self, fn: Callable[[torch.Tensor], torch.Tensor],
                                      recurse: bool) -> Any:
        saved = {n: b for n in self._quant_buffers if (b := self._buffers.get(n)) is not None}
        # Quantized weights tied between layers (an embedding and its output head) are one
        # buffer, or views of one: PyTorch converts each module's buffers separately, which
        # would leave one copy per layer on the new device. The first layer a conversion
        # reaches converts the tensor; later ones take views of its result (``fn`` is one
        # object per ``.to()`` / ``.cuda()`` call, so the memo lives as long as the call). The
        # memo holds each old tensor, so that no other tensor can take its address while its
        # entry exists, and the converted one weakly: an entry whose result is gone (a later
        # conversion with a kept ``fn``) is dropped.
        memo = _TIED_MEMO.setdefault(fn, {}) if _memoizable(fn) else {}
        for key in [k for k, (_, ref) in memo.items() if ref() is None]:
            del memo[key]
        reused: dict[str, torch.Tensor] = {}
        for n, old in saved.items():
            entry = memo.get(_memory_key(old))
            done = None if entry is None else entry[1]()
            if done is not None and done.element_size() == old.element_size():
                reused[n] = done if (done.dtype, done.shape) == (old.dtype, old.shape) else (
                    done.view(old.dtype).view(old.shape))
                self._buffers[n] = old.new_empty(0)  # nothing to convert here

        def state(t: torch.Tensor | None) -> tuple[object, ...] | None:
            return None if t is None else (id(t), t.data_ptr(), t.dtype, t.device)

        params = {n: state(p) for n, p in self._parameters.items()}
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for n, old in saved.items():
            new = self._buffers[n]
            if n in reused:
                self._buffers[n] = reused[n]
            elif new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)  # moved, never cast
            now = self._buffers[n]
            if now is not None and now is not old and n not in reused:
                memo[_memory_key(old)] = (old, weakref.ref(now))
        if any(self._buffers.get(n) is not b for n, b in saved.items()) or any(
                state(self._parameters.get(n)) != p for n, p in params.items()):
            # moved or cast: layouts and plans made for the old tensors would keep them alive
            # (a model moved to the GPU would hold its CPU codes), and a parameter cast in
            # place (``.data`` replaced: same object, same version) would leave a plan's
            # prepared bias stale
            self.__dict__.get("_kernel_cache", {}).clear()
        probe = fn(torch.empty(0, dtype=self.weight_dtype))
        if probe.dtype in COMPUTE_DTYPES and probe.dtype != self.weight_dtype:
            self.weight_dtype = probe.dtype
            self.__dict__.get("_kernel_cache", {}).clear()  # plans made for the old dtype
        return self
