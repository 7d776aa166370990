"""Which quantized module replaces which float module: one table entry per float type.

Entries are keyed by ``(mode, "module.QualName")`` of the float class, so types from optional
packages (transformers' ``Conv1D``) are registered by name and matched without importing them.
Matching is on the exact type: a subclass may override ``forward`` or be read by its parent
module (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly), so it is not swapped
unless registered itself.

Modes: ``"weight_only"`` (any :class:`~linquant.scheme.QuantScheme`; ``from_float(module,
scheme, *, name=)``) and ``"w8a8"`` (int8 weights and activations; ``from_float(module, *,
activation=, act_symmetric=, name=)``).

Example::

    >>> quant_module_for(nn.Linear(4, 4))
    <class 'linquant.nn.linear.QuantLinear'>
    >>> quant_module_for(nn.Linear(4, 4), mode="w8a8")
    <class 'linquant.nn.w8a8.W8A8Linear'>
    >>> quant_module_for(nn.LayerNorm(4)) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from torch import nn

from linquant.errors import LinquantError
from linquant.nn.base import QuantModule, qualified_name

__all__ = ["MODES", "Mode", "quant_module_for", "register_qmodule", "registered"]

Mode = Literal["weight_only", "w8a8"]
MODES: tuple[str, ...] = ("weight_only", "w8a8")

_TABLE: dict[tuple[str, str], type[QuantModule]] = {}

Q = TypeVar("Q", bound=type[QuantModule])


def _key(float_type: type | str) -> str:
    return float_type if isinstance(float_type, str) else qualified_name(float_type)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise LinquantError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


def register_qmodule(*float_types: type | str, mode: Mode = "weight_only") -> Callable[[Q], Q]:
    """Class decorator: ``cls`` replaces each of ``float_types`` (a class, or its
    ``"module.QualName"`` for optional packages) in ``mode``."""
    _check_mode(mode)

    def decorate(cls: Q) -> Q:
        for t in float_types:
            key = (mode, _key(t))
            if key in _TABLE and _TABLE[key] is not cls:
                raise LinquantError(
                    f"{key[1]} is already registered for {mode} as {_TABLE[key].__name__}"
                )
            _TABLE[key] = cls
        return cls

    return decorate


def quant_module_for(module: nn.Module, mode: Mode = "weight_only") -> type[QuantModule] | None:
    """The quantized class that replaces ``module`` in ``mode``, or None if there is none."""
    _check_mode(mode)
    return _TABLE.get((mode, qualified_name(type(module))))


def registered(mode: Mode = "weight_only") -> dict[str, type[QuantModule]]:
    """A copy of the table for ``mode``: float type name -> quantized class."""
    _check_mode(mode)
    return {name: cls for (m, name), cls in _TABLE.items() if m == mode}
