"""Each quantized layer's output error on real inputs, layer by layer.

::

    with linquant.compare_layers(float_model, quantized_model) as errors:
        float_model(batch)              # as many batches as you like
    print(errors)                       # per-layer table, lowest output SQNR named last
    errors.worst(5)                     # the five layers that lose the most

A weight's SQNR (the quantize report's column) says how well the codes hold the weight; what a
model loses also depends on the inputs each layer multiplies it with (an outlier channel of the
activations meets a badly rounded weight column). While the context is open, a forward hook on
every layer of the float model that has a quantized counterpart (the module of the same name
in the quantized model: a :class:`~linquant.nn.base.QuantModule`, or a whole
:class:`~linquant.nn.experts.QuantExperts` block) runs the quantized layer on the very input the
float layer got (cast to the quantized layer's compute dtype, moved to its device: the two
models may live on different devices), and accumulates the error of its output against the
float layer's. Each layer is so measured in isolation: errors from layers before it do not
reach it, so the rows say which layers to keep at more bits (``quantize_model``'s dict of
patterns, ``linquant quantize --layer-config``). ``linquant eval --per-layer`` prints the table
for the eval inputs.

The float model runs as usual (its outputs are unchanged); the quantized model is only called
layer by layer. Static W8A8 layers must be calibrated first, as for running the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from linquant.errors import LinquantError
from linquant.ops.metrics import sqnr_from_sums

__all__ = ["LayerError", "LayerErrors", "compare_layers"]


@dataclass
class LayerError:
    """One quantized layer's output error against its float counterpart.

    Attributes:
        name: the layer's name (the same in both models).
        type: the quantized module's class name.
        scheme: its weight scheme (and int8 activations, for W8A8 layers).
        calls: how many forwards of the float layer it was compared on.
        sqnr_db: ``10 log10(sum y^2 / sum (y - y_q)^2)`` over all calls (inf when exact; None
            when not compared).
        max_abs_error: the largest ``|y - y_q|`` seen.
        weight_sqnr_db: the SQNR of the quantized layer's weight against the float layer's
            (the quantize report's column; an experts block's quantized projections pooled;
            None without a float counterpart). A layer whose output SQNR sits well below it
            meets inputs that magnify its weight error (outlier channels).
        reason: why the layer was not compared (None when it was).
    """

    name: str
    type: str
    scheme: str
    calls: int = 0
    sqnr_db: float | None = None
    max_abs_error: float | None = None
    weight_sqnr_db: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "scheme": self.scheme,
                "calls": self.calls, "sqnr_db": self.sqnr_db,
                "max_abs_error": self.max_abs_error, "weight_sqnr_db": self.weight_sqnr_db,
                "reason": self.reason}


class LayerErrors:
    """The rows of :func:`compare_layers`, in the quantized model's module order."""

    def __init__(self, rows: list[LayerError]) -> None:
        self.rows = rows

    def __getitem__(self, name: str) -> LayerError:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.rows)

    def worst(self, n: int = 3) -> list[LayerError]:
        """The ``n`` compared layers with the lowest output SQNR, lowest first."""
        measured = [r for r in self.rows if r.sqnr_db is not None]
        return sorted(measured, key=lambda r: (r.sqnr_db, r.name))[:n]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rows]

    def plot(self, path: str | os.PathLike[str], title: str = "") -> None:
        """Draw each layer's output SQNR in module order (needs matplotlib); see
        :func:`linquant.report.plot_layer_errors`."""
        from linquant.report import plot_layer_errors

        plot_layer_errors(self, path, title)

    def __str__(self) -> str:
        from linquant.report import format_table

        columns = [("name", "layer", "s"), ("type", "type", "s"), ("scheme", "scheme", "s"),
                   ("calls", "calls", "d"), ("sqnr_db", "output SQNR dB", ".1f"),
                   ("max_abs_error", "max error", ".3g"),
                   ("weight_sqnr_db", "weight SQNR dB", ".1f")]
        if any(r.reason is not None for r in self.rows):
            columns.append(("reason", "not compared", "s"))
        lines = [format_table(self.to_dicts(), columns)]
        worst = self.worst(5)
        if worst:
            lines.append("lowest output SQNR: " + ", ".join(
                f"{r.name} {r.sqnr_db:.1f} dB" for r in worst))
        return "\n".join(lines)


def _units(quantized: nn.Module) -> dict[str, nn.Module]:
    """The quantized model's layers to compare, by name: every QuantModule, and each
    QuantExperts block as one unit (its projections are not modules that get called)."""
    from linquant.nn.base import QuantModule
    from linquant.nn.experts import QuantExperts

    units: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in quantized.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, QuantExperts):
            units[name] = m
            inside.append(name)
        elif isinstance(m, QuantModule):
            units[name] = m
    return units


def _scheme(m: nn.Module) -> str:
    """The weight scheme (``int8 dynamic`` / ``static`` activations added); for an experts block
    each projection's, ``float`` for one kept float."""
    from linquant.nn.experts import QuantExperts, projection_names
    from linquant.nn.w8a8 import StaticActivations

    parts: list[nn.Module | None] = [m]
    if isinstance(m, QuantExperts):
        parts = [m._modules.get(n) for n in projection_names(m)]
    texts = []
    for p in parts:
        scheme = getattr(p, "scheme", None)
        text = "float" if scheme is None else str(scheme)
        if isinstance(p, StaticActivations) and p.activation is not None:
            text += f", act int8 {p.activation}"
        texts.append(text)
    return " / ".join(dict.fromkeys(texts))


def _compute_dtype(m: nn.Module) -> torch.dtype | None:
    dtype = getattr(m, "weight_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for sub in m.modules():  # a QuantExperts block: its projections'
        dtype = getattr(sub, "weight_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def _weight_sqnr(ref: nn.Module, q: nn.Module) -> float | None:
    """The quantized layer's weight (dequantized to fp32, in the float layer's layout) against
    the float layer's, as the quantize report measures it; for an experts block, its quantized
    projections pooled. None where the weights do not line up."""
    from linquant.nn.base import QuantModule
    from linquant.nn.experts import QuantExperts, projection_names

    pairs: list[tuple[object, QuantModule]] = []
    if isinstance(q, QuantExperts):
        pairs = [(getattr(ref, n, None), p) for n in projection_names(q)
                 if isinstance(p := q._modules.get(n), QuantModule)]
    elif isinstance(q, QuantModule):
        pairs = [(getattr(ref, "weight", None), q)]
    signal = noise = 0.0
    with torch.no_grad():
        for w, layer in pairs:
            wq = layer.dequantized_weight(torch.float32)
            if not isinstance(w, torch.Tensor) or w.shape != wq.shape:
                return None
            a = w.detach().to(device=wq.device, dtype=torch.float64)
            signal += float((a * a).sum())
            noise += float(((a - wq.double()) ** 2).sum())
    return sqnr_from_sums(signal, noise) if pairs else None


def _device(m: nn.Module) -> torch.device | None:
    t = next(iter(m.buffers()), None)
    if t is None:
        t = next(iter(m.parameters()), None)
    return None if t is None else t.device


def _cast(x: Any, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    """A tensor argument moved to the quantized layer's device, a float one also cast to its
    compute dtype; anything else as it is."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point() and dtype is not None:
        x = x.to(dtype)
    return x if device is None else x.to(device)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class _Acc:
    def __init__(self) -> None:
        self.calls = 0
        self.signal = 0.0
        self.noise = 0.0
        self.worst = 0.0


@contextmanager
def compare_layers(reference: nn.Module, quantized: nn.Module) -> Iterator[LayerErrors]:
    """Measure each quantized layer of ``quantized`` on the inputs its float counterpart in
    ``reference`` gets while the context is open (see the module docstring). The yielded
    :class:`LayerErrors` is filled in when the context closes; layers without a float
    counterpart, or not reached by the inputs, are listed with the reason."""
    for what, m in (("reference", reference), ("quantized", quantized)):
        if not isinstance(m, nn.Module):
            raise LinquantError(f"compare_layers: {what} must be an nn.Module, got "
                                f"{type(m).__name__}")
    units = _units(quantized)
    if not units:
        raise LinquantError("compare_layers: the quantized model has no quantized layer")
    floats = dict(reference.named_modules())
    rows = LayerErrors([LayerError(name, type(m).__name__, _scheme(m)) for name, m in
                        units.items()])
    accs: dict[str, _Acc] = {}
    handles = []

    def make_hook(name: str, qlayer: nn.Module, acc: _Acc) -> Any:
        dtype, device = _compute_dtype(qlayer), _device(qlayer)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            y = _first_tensor(output)
            if y is None:
                return
            with torch.inference_mode():
                yq = _first_tensor(qlayer(*(_cast(a, dtype, device) for a in args), **{
                    k: _cast(v, dtype, device) for k, v in kwargs.items()}))
                if yq is None or yq.shape != y.shape:
                    raise LinquantError(
                        f"compare_layers: layer {name!r}: the quantized layer returned "
                        f"{None if yq is None else tuple(yq.shape)}, the float one "
                        f"{tuple(y.shape)}")
                a = y.detach().double()
                d = a - yq.to(a.device).double()
                acc.calls += 1
                acc.signal += float((a * a).sum())
                acc.noise += float((d * d).sum())
                acc.worst = max(acc.worst, float(d.abs().max()) if d.numel() else 0.0)

        return hook

    try:
        for row in rows.rows:
            ref = floats.get(row.name)
            if ref is None:
                row.reason = "no module of this name in the reference model"
                continue
            if ref is units[row.name]:
                row.reason = ("the reference model holds this same quantized module "
                              "(compare with a float copy)")
                continue
            row.weight_sqnr_db = _weight_sqnr(ref, units[row.name])
            acc = accs[row.name] = _Acc()
            handles.append(ref.register_forward_hook(make_hook(row.name, units[row.name], acc),
                                                     with_kwargs=True))
        yield rows
    finally:
        for h in handles:
            h.remove()
    for row in rows.rows:
        acc_ = accs.get(row.name)
        if acc_ is None:
            continue
        if acc_.calls == 0:
            row.reason = "not reached by the inputs"
            continue
        row.calls, row.max_abs_error = acc_.calls, acc_.worst
        row.sqnr_db = sqnr_from_sums(acc_.signal, acc_.noise)
