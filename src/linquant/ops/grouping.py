"""Lower every granularity to one internal shape, so the math is written once.

Every granularity is a view of the (contiguous) tensor as ``[outer, C, inner]`` with one scale
per index of ``C`` (the *granules*)::

    granularity       outer                 C                    inner
    tensor            1                     1                    numel
    channel, axis k   prod(shape[:k])       shape[k]             prod(shape[k+1:])
    group, size g     1                     numel // g           g

A weight ``[out, in]`` per-channel on axis 0 is ``[1, out, in]``; on axis 1 it is
``[out, in, 1]``; group 32 is ``[1, out*in/32, 32]``. The public scale shape keeps the rank of
the tensor (see :func:`scale_shape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from linquant.errors import LinquantError
from linquant.scheme import QuantScheme

__all__ = ["Granules", "granules", "normalize_axis", "scale_shape"]


@dataclass(frozen=True)
class Granules:
    """The ``[outer, C, inner]`` lowering of a tensor shape under a scheme."""

    outer: int
    count: int  # C: number of scales
    inner: int

    @property
    def shape3(self) -> tuple[int, int, int]:
        return (self.outer, self.count, self.inner)

    @property
    def size(self) -> int:
        """Elements per granule."""
        return self.outer * self.inner


def normalize_axis(axis: int, ndim: int, name: str = "tensor") -> int:
    if not -ndim <= axis < ndim:
        raise LinquantError(
            f"{name}: axis {axis} is out of range for a {ndim}-D tensor "
            f"(expected {-ndim} <= axis < {ndim})"
        )
    return axis % ndim


def granules(shape: tuple[int, ...], scheme: QuantScheme, name: str = "tensor") -> Granules:
    """Lower ``shape`` to ``[outer, C, inner]`` for ``scheme``; validates axis and group size."""
    numel = math.prod(shape)
    if scheme.granularity == "tensor":
        return Granules(1, 1, numel)
    if len(shape) == 0:
        raise LinquantError(
            f"{name}: granularity {scheme.granularity!r} needs at least a 1-D tensor, got a scalar"
        )
    if scheme.granularity == "channel":
        k = normalize_axis(scheme.axis, len(shape), name)
        return Granules(math.prod(shape[:k]), shape[k], math.prod(shape[k + 1 :]))
    g = scheme.group_size
    assert g is not None  # guaranteed by QuantScheme validation
    last = shape[-1]
    if last % g != 0:
        raise LinquantError(
            f"{name}: group_size {g} does not divide the last dimension {last} "
            f"(shape {tuple(shape)}); pick a group size that divides {last}"
        )
    return Granules(1, numel // g, g)


def scale_shape(shape: tuple[int, ...], scheme: QuantScheme) -> tuple[int, ...]:
    """Public shape of scales and zero points, broadcastable against the tensor shape.

    tensor: ``()``; channel on axis k: ``shape`` with every dim but k set to 1;
    group: ``(*shape[:-1], shape[-1] // group_size)``.
    """
    if scheme.granularity == "tensor":
        return ()
    if scheme.granularity == "channel":
        k = scheme.axis % len(shape)
        return tuple(n if i == k else 1 for i, n in enumerate(shape))
    assert scheme.group_size is not None
    return (*shape[:-1], shape[-1] // scheme.group_size)
