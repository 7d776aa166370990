"""Static activation ranges from sample batches.

::

    with linquant.calibrate(model):             # min/max
        for batch in batches:
            model(batch)
    # every static W8A8 layer now has its activation scale (and zero point)

    with linquant.calibrate(model, percentile=99.99):   # clip rare outliers
        ...

While the context is open, a forward pre-hook on every static :class:`~linquant.nn.W8A8Linear`
and every static W8A8 experts projection (:class:`~linquant.nn.experts.QuantExpertsProj`,
whose one range covers all its experts: the hook sees every token routed to any of them)
records the layer's input, and the layers compute with float activations (their int8 weights
dequantized), so each layer sees the inputs the float-activation model would give it, whether or
not it had a range before. On a normal exit each layer gets
:meth:`~linquant.nn.W8A8Linear.set_activation_range`; if any static layer saw no batch, a
:class:`~linquant.errors.LinquantError` names them and no layer is changed, unless
``unreached="dynamic"``: then those layers switch to dynamic per-token activations and the
others are calibrated. A layer whose inputs held NaN or Inf (a range that is not finite) is an
error naming it, and no layer is changed. If the body raises, the hooks are removed and nothing
is changed.

How batches are combined:

* ``percentile=None``: the running minimum and maximum over all batches (the exact range).
* ``percentile=p`` (``50 < p <= 100``): each batch gives a percentile estimate, computed on at
  most ``sample_size`` of its values drawn uniformly at random (with replacement, seeded, so
  runs repeat) -- ``p``-th percentile of ``|x|`` for symmetric layers (range ``[-a, a]``), the
  ``(100-p)``-th and ``p``-th percentiles of ``x`` for asymmetric ones. The layer's range is the
  mean of the batch estimates weighted by each batch's number of values. Memory stays
  ``O(sample_size)`` per layer whatever the number of batches; with equal-sized batches the
  estimate is the plain mean of per-batch percentiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from linquant.errors import LinquantError
from linquant.nn.w8a8 import StaticActivations

__all__ = ["RangeObserver", "calibrate"]

DEFAULT_SAMPLE_SIZE = 1 << 16


class RangeObserver:
    """Accumulates one layer's activation range over batches (see the module docstring)."""

    def __init__(
        self, *, symmetric: bool, percentile: float | None = None,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
    ) -> None:
        self.symmetric = symmetric
        self.percentile = percentile
        self.sample_size = sample_size
        self.batches = 0
        self.values = 0
        self.rows = 0  # input vectors (tokens): values over the last dimension
        self._lo: torch.Tensor | None = None  # running min, or weighted sum of batch estimates
        self._hi: torch.Tensor | None = None
        self._gen: torch.Generator | None = None

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.sample_size:
            return x
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(0)
        idx = torch.randint(0, x.numel(), (self.sample_size,), generator=self._gen,
                            device=x.device)
        return x[idx]

    def update(self, x: torch.Tensor) -> None:
        """Record one batch of inputs (any shape)."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if self.percentile is None:
            lo, hi = torch.aminmax(flat)
            lo, hi = lo.double(), hi.double()
            if self._lo is not None and self._hi is not None:
                lo, hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)
        else:
            s = self._sample(flat)
            q = self.percentile / 100.0
            if self.symmetric:
                hi_b = torch.quantile(s.abs(), q).double()
                lo_b = -hi_b
            else:
                lo_b = torch.quantile(s, 1.0 - q).double()
                hi_b = torch.quantile(s, q).double()
            if not bool(torch.isfinite(flat).all()):  # the sample may have missed them
                lo_b = hi_b = torch.tensor(math.nan, dtype=torch.float64, device=flat.device)
            n = float(flat.numel())
            lo, hi = lo_b * n, hi_b * n
            if self._lo is not None and self._hi is not None:
                lo, hi = self._lo + lo, self._hi + hi
        self._lo, self._hi = lo, hi
        self.batches += 1
        self.values += flat.numel()
        self.rows += flat.numel() // (int(x.shape[-1]) if x.dim() else 1)

    def range(self) -> tuple[float, float]:
        """The combined ``(lo, hi)``; needs at least one batch."""
        if self._lo is None or self._hi is None:
            raise LinquantError("RangeObserver.range: no batch observed")
        if self.percentile is None:
            return float(self._lo), float(self._hi)
        return float(self._lo) / self.values, float(self._hi) / self.values


def _static_layers(model: nn.Module) -> dict[str, StaticActivations]:
    """Static W8A8 layers by name: ``W8A8Linear`` and W8A8 experts projections."""
    return {
        (name or m.name or type(m).__name__): m
        for name, m in model.named_modules()
        if isinstance(m, StaticActivations) and m.activation == "static"
    }


@contextmanager
def calibrate(
    model: nn.Module,
    percentile: float | None = None,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    unreached: str = "raise",
) -> Iterator[dict[str, RangeObserver]]:
    """Context manager that sets the activation range of every static W8A8 layer in ``model``
    (``W8A8Linear``, W8A8 experts projections).

    Args:
        model: the model holding static :class:`~linquant.nn.W8A8Linear` layers (or
            static experts projections).
        percentile: None for min/max, else ``50 < p <= 100`` (e.g. 99.99).
        sample_size: values per batch and layer the percentile is estimated on.
        unreached: what happens to a static layer that no batch reached (a vision tower fed
            text only, cross-attention run without encoder states): ``"raise"`` (a
            :class:`~linquant.errors.LinquantError` naming them; no layer is changed) or
            ``"dynamic"`` (those layers compute with dynamic per-token activations instead,
            :meth:`~linquant.nn.w8a8.StaticActivations.use_dynamic_activations`; their
            observers have ``batches == 0``).

    Yields:
        The observers by layer name (inspect ``.range()`` after the block).
    """
    if not isinstance(model, nn.Module):
        raise LinquantError(f"calibrate: expected an nn.Module, got {type(model).__name__}")
    if percentile is not None and not (
        isinstance(percentile, (int, float)) and not isinstance(percentile, bool)
        and 50.0 < float(percentile) <= 100.0
    ):
        # below 50 the "upper" percentile of an asymmetric range falls under its lower one,
        # and a symmetric range clips most inputs
        raise LinquantError(f"calibrate: percentile must be in (50, 100] (the share of inputs "
                            f"the range covers, e.g. 99.99), got {percentile!r}")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
        raise LinquantError(f"calibrate: sample_size must be a positive int, got {sample_size!r}")
    if unreached == "error":  # the CLI's word (--unreached error)
        unreached = "raise"
    if unreached not in ("raise", "dynamic"):
        raise LinquantError(f"calibrate: unreached must be 'raise' (or 'error') or 'dynamic', "
                            f"got {unreached!r}")
    layers = _static_layers(model)
    if not layers:
        raise LinquantError(
            "calibrate: the model has no static W8A8Linear layer (quantize it with a static "
            "W8A8 config first)"
        )
    observers = {
        name: RangeObserver(symmetric=layer.act_symmetric, percentile=percentile,
                            sample_size=sample_size)
        for name, layer in layers.items()
    }
    handles = []
    was_observing = {name: layer.observing for name, layer in layers.items()}

    def make_hook(obs: RangeObserver) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                obs.update(args[0])

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make_hook(observers[name])))
            layer.observing = True
        yield observers
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.observing = was_observing[name]
    unseen = [name for name, obs in observers.items() if obs.batches == 0]
    if unseen and unreached == "raise":
        raise LinquantError(
            f"calibrate: {len(unseen)} static layer(s) saw no batch: {', '.join(unseen)}; run "
            "batches that reach them, or give them dynamic activations (calibrate(..., "
            "unreached='dynamic'); linquant calibrate --unreached dynamic)"
        )
    ranges = {name: obs.range() for name, obs in observers.items() if obs.batches}
    bad = [f"{name} [{lo:.4g}, {hi:.4g}]" for name, (lo, hi) in ranges.items()
           if not (math.isfinite(lo) and math.isfinite(hi))]
    if bad:  # checked before any layer changes: no model half recalibrated
        raise LinquantError(
            f"calibrate: {len(bad)} static layer(s) saw NaN or Inf inputs: {', '.join(bad)}; "
            "no layer was changed (find where the float model's activations overflow, or "
            "leave out the batches that do)")
    for name, layer in layers.items():
        if name not in ranges:
            layer.use_dynamic_activations()
            continue
        layer.set_activation_range(*ranges[name])
