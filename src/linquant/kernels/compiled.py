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
are kept on the codes tensor itself (``qdata``, ``w_int8``: an attribute, :class:`OpCache`), and
every cached layout is still checked against the weight's tensors and versions before use.
They live as long as that tensor: the layouts and plans refer to it, a cycle the garbage
collector frees with it. (A registry keyed by ``id(tensor)``, as before, kept every compiled
model's layouts after the model was gone, for the same reason.) ``copy.deepcopy`` and pickling
of the tensor give an empty cache. :func:`linquant.nn.clear_kernel_caches` clears them too.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor

__all__ = ["OpCache", "clear_cache", "linear_w8a8", "linear_weight_only"]

_ATTR = "_linquant_op_cache"


class OpCache(dict[str, Any]):
    """The operators' kernel cache of one codes tensor, kept on the tensor (see the module
    docstring). Never copied: ``copy.deepcopy`` and pickling (``torch.save`` of a model) give
    an empty one."""

    def __deepcopy__(self, memo: dict[int, Any]) -> OpCache:
        return OpCache()

    def __reduce__(self) -> tuple[type[OpCache], tuple[()]]:
        return OpCache, ()


def _cache_for(qdata: torch.Tensor) -> dict[str, Any]:
    cache = qdata.__dict__.get(_ATTR)
    if not isinstance(cache, OpCache):
        cache = OpCache()
        setattr(qdata, _ATTR, cache)
    return cache


def clear_cache(qdata: torch.Tensor) -> int:
    """Drop the operator's kernel cache for the weight whose codes are ``qdata``; returns how
    many layouts it held."""
    cache = qdata.__dict__.pop(_ATTR, None)
    return len(cache) if isinstance(cache, OpCache) else 0


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

    qt = QuantizedTensor._trusted(qdata, scale, zero_point, offset, _scheme(scheme),
                                  tuple(shape), weight_dtype)
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

    w_int8, cache = int8_alias(w_int8)
    return _unaliased(kernels.linear_w8a8(x, w_int8, w_scale, bias, act_scale,
                                          act_zero_point, cache), x)


def int8_alias(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """``w`` as int8 codes, with the operator's cache for ``w``: int8 codes themselves, or
    one int8 alias of uint8 bytes' storage, kept in the cache while those bytes are unchanged
    (an in-place change or a new storage drops the alias and everything made from it)."""
    from linquant.kernels.cpu import _version

    cache = _cache_for(w)
    if w.dtype != torch.uint8:
        return w, cache
    state = (_version(w), w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape),
             w.stride())
    hit = cache.get("int8_codes")
    if hit is None or hit[1] != state:
        cache.clear()  # layouts and plans made from the old bytes
        alias = torch.empty(0, dtype=torch.int8, device=w.device).set_(
            w.untyped_storage(), w.storage_offset(), w.shape, w.stride())
        hit = cache["int8_codes"] = (alias, state)
    return hit[0], cache


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
