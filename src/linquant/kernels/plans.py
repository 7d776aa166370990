"""Plans: what a layer's first eager call for an input signature decided, kept for the next.

An eager call of a quantized layer checks its input, picks a path (``select_path``), looks up
or builds the path's prepared weight layout and only then runs the kernel. For a layer called
again and again with inputs of the same signature (shape, dtype, device, bias object), all of
that decides the same thing every time. So the first automatic call keeps a plan in the layer's
kernel cache: the weight tensors it was built for (the objects and their version counters), the
bias, and a closure that runs the chosen path with everything weight-dependent bound. Later
calls check the plan still applies (the same tensor objects, unmodified; no autograd) and run
the closure. Both devices keep plans, in separate cache entries: ``"triton_plans"`` (CUDA,
:mod:`linquant.kernels.triton_linear`), ``"cuda_plans"`` (CUDA's tinygemm path,
:mod:`linquant.kernels.cuda`), ``"cpu_plans"`` (weight-only layers on the CPU,
:func:`linquant.kernels.linear_weight_only`), ``"w8a8_plans"`` (W8A8 layers on the CPU, and on
CUDA the Triton path, :func:`linquant.kernels.linear_w8a8`) and ``"gather_plans"``
(``QuantEmbedding``, eager, any device: :func:`linquant.kernels.embedding_runner`).

Where the time goes without plans: on CUDA, 60-90 us of checks and lookups around a 30 us
Triton launch (BENCHMARKS.md, "Host time per eager call"); on the CPU, ``select_path`` alone
took 10 us in a tight loop and 70-95 us right after a large matmul had evicted Python's objects
from the caches, which is how a model calls it (BENCHMARKS.md, "Plans on the CPU").

What a plan cannot see: a tensor whose ``.data`` is replaced keeps its object and its version
counter. Layers clear their cache when ``model.to(...)`` / ``.half()`` and the like move or cast
their tensors (``QuantModule._apply``); after assigning ``.data`` by hand, call
``clear_kernel_caches``, as for the repacked layouts.

A plan fixes the path chosen on its first call. What that choice read besides the input and the
weight (``LINQUANT_MAX_CPU_ISA``, ``LINQUANT_NATIVE``, the dispatcher's thresholds) is read again
only for new signatures: ``linquant.nn.clear_kernel_caches(model)`` drops the plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from linquant.kernels.cpu import _version
from linquant.tensor import QuantizedTensor

__all__ = ["MAX_PLANS", "Plan", "find", "keep", "replay", "weight_tensors"]

MAX_PLANS = 64  # input signatures kept per layer (a new one beyond that clears them)


@dataclass(frozen=True)
class Plan:
    tensors: tuple[torch.Tensor | None, ...]  # the weight's qdata, scale, zero point, offset
    versions: tuple[tuple[int, int] | None, ...]  # ... their version counters and addresses
    bias: torch.Tensor | None
    bias_version: tuple[int, int] | None
    n: int
    k: int
    run: Callable[[torch.Tensor], torch.Tensor]  # see the entry's user (CUDA: x2 -> y2)
    path: str = ""  # the path it runs (CPU plans)


def weight_tensors(qt: QuantizedTensor) -> tuple[torch.Tensor | None, ...]:
    """``qt``'s stored tensors in the order plans keep them."""
    return (qt.qdata, qt.scale, qt.zero_point_packed, qt.offset)


def _versions(tensors: tuple[torch.Tensor | None, ...]) -> tuple[tuple[int, int] | None, ...]:
    return tuple(None if t is None else _version(t) for t in tensors)


def unchanged(p: Plan, tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether ``tensors`` are the plan's weight tensors, unmodified."""
    for t, u, v in zip(tensors, p.tensors, p.versions, strict=True):
        if t is not u or (t is not None and _version(t) != v):
            return False
    return True


def key(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[object, ...]:
    # strides and alignment are not in it: every plan's closure takes any layout of x
    return (x.shape, x.dtype, x.device, None if bias is None else id(bias))


def find(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], bias: torch.Tensor | None,
         cache: dict[str, Any], entry: str) -> Plan | None:
    """The plan in ``cache[entry]`` for ``x``'s signature that still applies to ``tensors``
    and ``bias`` (the same objects, unmodified), or None; never one where autograd needs the
    input's or the bias's gradient."""
    plans = cache.get(entry)
    if not plans or x.layout is not torch.strided:  # (a sparse input: densified by the layer)
        return None
    if torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    p: Plan | None = plans.get(key(x, bias))
    if p is None or not unchanged(p, tensors):
        return None
    if bias is not None and (bias is not p.bias or _version(bias) != p.bias_version):
        return None
    return p


def replay(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], bias: torch.Tensor | None,
           cache: dict[str, Any], entry: str) -> torch.Tensor | None:
    """Run the plan :func:`find` gives, or None where there is none. With autograd on and a
    bias that needs its gradient (a quantized layer's bias is a trainable parameter, so any
    call outside ``torch.no_grad`` / ``torch.inference_mode``) but an input that needs none,
    the native kernels' calls are planned without the bias, which the dispatcher then adds
    where autograd sees it: that plan runs here, and the bias is added the same way."""
    p = find(x, tensors, bias, cache, entry)
    if p is not None:
        return p.run(x)
    if (bias is None or not bias.requires_grad or x.requires_grad
            or not torch.is_grad_enabled()):
        return None
    p = find(x, tensors, None, cache, entry)
    if p is None or not p.path.startswith("cpu_native"):
        return None
    return p.run(x) + bias.to(x.dtype)


def keep(cache: dict[str, Any], entry: str, x: torch.Tensor, weight: QuantizedTensor | tuple[
        tuple[torch.Tensor | None, ...], int, int], bias: torch.Tensor | None,
         run: Callable[[torch.Tensor], torch.Tensor], path: str = "") -> Plan:
    """Keep a plan for ``x``'s signature in ``cache[entry]`` (clearing the entry first when it
    is full or holds plans for other, or modified, weight tensors). ``weight``: a quantized
    weight, or ``(tensors, N, K)``: the tensors the plan depends on (an int8 weight, its
    scales, static activation parameters) and the product's shape."""
    if isinstance(weight, QuantizedTensor):
        tensors = weight_tensors(weight)
        n, k = (int(d) for d in weight.shape)
    else:
        tensors, n, k = weight
    plans = cache.setdefault(entry, {})
    if len(plans) >= MAX_PLANS or not all(unchanged(p, tensors) for p in list(plans.values())):
        plans.clear()
    p = Plan(tensors, _versions(tensors), bias, None if bias is None else _version(bias), n, k,
             run, path)
    plans[key(x, bias)] = p
    return p
