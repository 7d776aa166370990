"""``linquant::linear_weight_only`` and ``linquant::linear_w8a8``: the quantized linear layers
as PyTorch custom operators, so a ``torch.compile``'d model keeps ``QuantLinear`` and
``W8A8Linear`` inside its graph.

Traced by Dynamo, the layers' forwards call these operators instead of their eager code: the
graph holds one opaque node per layer (a fake implementation gives the output's shape and
dtype), the compiled code calls it with the layer's real tensors, and its implementation is
:func:`linquant.kernels.linear_weight_only` / :func:`linquant.kernels.linear_w8a8`, the
dispatchers and kernels of eager mode, unchanged and never traced. With ``fullgraph=True`` a
model compiles to one graph, and under ``mode="reduce-overhead"`` (CUDA graphs) the layers'
Triton launches are captured with the rest, which removes the host time that limits eager
one-token decoding (README, "Performance"; not yet measured on a GPU).

An operator takes tensors, not a layer, so the kernel caches (repacked layouts, Triton plans)
live in a registry keyed by the codes tensor (``id(qdata)``, ``id(w_int8)``; the entry is
dropped when that tensor is freed, and every cached layout is still checked against the
weight's tensors and versions before use). :func:`linquant.nn.clear_kernel_caches` clears
these entries too.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor

__all__ = ["clear_cache", "linear_w8a8", "linear_weight_only"]

_CACHES: dict[int, dict[str, Any]] = {}


def _cache_for(qdata: torch.Tensor) -> dict[str, Any]:
    key = id(qdata)
    cache = _CACHES.get(key)
    if cache is None:
        cache = _CACHES[key] = {}
        weakref.finalize(qdata, _CACHES.pop, key, None)
    return cache


def clear_cache(qdata: torch.Tensor) -> int:
    """Drop the operator's kernel cache for the weight whose codes are ``qdata``; returns how
    many layouts it held."""
    return len(_CACHES.pop(id(qdata), {}))


def _unaliased(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # an operator's output may not alias its inputs (the kernels allocate theirs; a defence)
    return y if y.data_ptr() != x.data_ptr() else y.clone()


@functools.lru_cache(maxsize=256)
def _scheme(text: str) -> QuantScheme:
    return QuantScheme.parse(text)


def _impl(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor | None, offset: torch.Tensor | None,
          bias: torch.Tensor | None, scheme: str, shape: list[int],
          weight_dtype: torch.dtype) -> torch.Tensor:
    from linquant import kernels

    qt = QuantizedTensor(qdata, scale, zero_point, offset, _scheme(scheme), tuple(shape),
                         weight_dtype)
    return _unaliased(kernels.linear_weight_only(x, qt, bias, _cache_for(qdata)), x)


def _fake(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor | None, offset: torch.Tensor | None,
          bias: torch.Tensor | None, scheme: str, shape: list[int],
          weight_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], shape[0]))


def _impl_w8a8(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act_scale: torch.Tensor | None,
               act_zero_point: torch.Tensor | None) -> torch.Tensor:
    from linquant import kernels

    cache = _cache_for(w_int8)
    if w_int8.dtype == torch.uint8:
        # the codes' bytes, as a state_dict holds them: torch.export on PyTorch 2.4 runs the
        # program with the state_dict's tensors. One int8 alias of their storage per tensor,
        # kept in its cache (an alias, not a view: a view would keep the tensor, and so the
        # cache, alive for good), so that its layouts and plans are made once.
        codes = cache.get("int8_codes")
        if codes is None:
            codes = cache["int8_codes"] = torch.empty(0, dtype=torch.int8,
                                                      device=w_int8.device).set_(
                w_int8.untyped_storage(), w_int8.storage_offset(), w_int8.shape,
                w_int8.stride())
        w_int8 = codes
    return _unaliased(kernels.linear_w8a8(x, w_int8, w_scale, bias, act_scale,
                                          act_zero_point, cache), x)


def _fake_w8a8(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act_scale: torch.Tensor | None,
               act_zero_point: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


_SCHEMAS = {
    "linear_weight_only": "linear_weight_only(Tensor x, Tensor qdata, Tensor scale, "
                          "Tensor? zero_point, Tensor? offset, Tensor? bias, str scheme, "
                          "int[] shape, ScalarType weight_dtype) -> Tensor",
    "linear_w8a8": "linear_w8a8(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, "
                   "Tensor? act_scale, Tensor? act_zero_point) -> Tensor",
}
# Defined with torch.library.Library, not the custom_op decorator: with these arguments the
# decorator's dispatch cost about 32 us per call on a 2-core VM, this about 17
# (benchmarks/bench_host.py), and compiled graphs without CUDA graphs pay it on every call.
# No autograd formula: the layers call these only where no gradient is needed (they trace
# the reference, or run eagerly, otherwise).
_LIB: Any = None


def _register(name: str, impl: Any, fake: Any) -> Any:
    global _LIB
    if not hasattr(torch.ops.linquant, name):  # (a reload finds them registered)
        if _LIB is None:
            _LIB = torch.library.Library("linquant", "DEF")  # type: ignore[no-untyped-call]
        _LIB.define(_SCHEMAS[name])
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"linquant::{name}", fake, lib=_LIB)
    return getattr(torch.ops.linquant, name)


linear_weight_only = _register("linear_weight_only", _impl, _fake)
linear_w8a8 = _register("linear_w8a8", _impl_w8a8, _fake_w8a8)
