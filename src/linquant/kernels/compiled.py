"""``linquant::linear_weight_only``: the weight-only linear as a PyTorch custom operator, so a
``torch.compile``'d model keeps ``QuantLinear`` inside its graph.

Traced by Dynamo, ``QuantLinear.forward`` calls this operator instead of its eager code: the
graph holds one opaque node per layer (a fake implementation gives the output's shape and
dtype), the compiled code calls it with the layer's real tensors, and its implementation is
:func:`linquant.kernels.linear_weight_only`, the dispatcher and kernels of eager mode, unchanged
and never traced. With ``fullgraph=True`` a model compiles to one graph, and under
``mode="reduce-overhead"`` (CUDA graphs) the layers' Triton launches are captured with the
rest, which removes the host time that limits eager one-token decoding (README,
"Performance").

An operator takes tensors, not a layer, so the kernel caches (repacked layouts, Triton plans)
live in a registry keyed by the codes tensor (``id(qdata)``; the entry is dropped when that
tensor is freed, and every cached layout is still checked against the weight's tensors and
versions before use). :func:`linquant.nn.clear_kernel_caches` clears these entries too.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor

__all__ = ["clear_cache", "linear_weight_only"]

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
    y = kernels.linear_weight_only(x, qt, bias, _cache_for(qdata))
    # an operator's output may not alias its inputs (a reshape of x would, for N == K views)
    return y if y.data_ptr() != x.data_ptr() else y.clone()


def _fake(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor | None, offset: torch.Tensor | None,
          bias: torch.Tensor | None, scheme: str, shape: list[int],
          weight_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], shape[0]))


def _register() -> Any:
    name = "linquant::linear_weight_only"
    try:
        op = torch.library.custom_op(name, mutates_args=())(_impl)
        op.register_fake(_fake)
    except RuntimeError:  # registered already (the module was reloaded)
        pass
    return torch.ops.linquant.linear_weight_only


linear_weight_only = _register()
