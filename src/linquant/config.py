"""Whole-model quantization configs and the named presets.

A :class:`QuantConfig` says what every selected layer of a model becomes:

* **weight-only** (``activation=None``): the weight is stored with ``weight`` (any
  :class:`~linquant.scheme.QuantScheme`); compute stays float. ``compute_dtype`` names the float
  dtype the model runs in (``None``: leave the model's dtype alone; ``torch.bfloat16`` for
  ``w8a16`` and the ``w4a16-*`` presets, whose names promise 16-bit activations:
  :func:`~linquant.convert.quantize_model` casts the float parts of the model to bf16 and the
  quantized layers compute in bf16, where the CPU int4/int8 kernels need it).
* **W8A8** (``activation`` set): linear layers multiply int8 weights by int8 activations
  (oneDNN or ``torch._int_mm``, see :mod:`linquant.kernels`). Only one weight scheme is
  allowed, ``int8-sym-ch0-fp32`` (what :class:`~linquant.nn.W8A8Linear` computes with), and
  the activation scheme must be 8-bit with an
  integer zero point, fp32 scales and min/max ranges; it is read on the activations flattened
  to ``[tokens, in_features]``:

  =============== ======================================= ===================================
  activation_mode ``activation``                          activation scale from
  =============== ======================================= ===================================
  ``"dynamic"``   symmetric, ``"channel"``, ``axis=0``    each token's range, every forward
                  (one scale per token)
  ``"static"``    symmetric or asymmetric, ``"tensor"``   calibration
                                                          (:func:`linquant.calibrate.calibrate`)
  =============== ======================================= ===================================

  Layers without an int8-activation kernel (embeddings, convolutions) are quantized weight-only
  with ``weight``.

Presets (``get_config(name)``)::

    name           weight                  activations                     compute
    w8a32          int8-sym-ch0-fp32       float                           model dtype
    w8a16          int8-sym-ch0-fp32       float                           bfloat16
    w4a16-g32      int4-asym-g32-fp16      float                           bfloat16
    w4a16-g32-mse  int4-asym-g32-fp16-mse  float                           bfloat16
    w4a16-g128     int4-asym-g128-fp16     float                           bfloat16
    w4a16-sym-g32  int4-sym-g32-fp16       float                           bfloat16
    w8a8           int8-sym-ch0-fp32       int8-sym per token, dynamic     int8 x int8
    w8a8-static    int8-sym-ch0-fp32       int8-sym per tensor, static     int8 x int8
                                           (calibrate first)

Every preset also quantizes embedding tables (weight-only, with the preset's weight scheme:
one scale per row for int8, groups along the embedding dimension for int4); in small encoders
the token table is about half of all parameters. Exclude them by name to keep them float.

The ``a16`` of the ``w8a16`` and ``w4a16-*`` names is their compute dtype: the model is cast to
bf16 after quantizing (codes and scales are never cast), which is also what the fast CPU int4 /
int8 kernels take. ``w8a32`` keeps the model's dtype.

A config also has a text form, ``str(config)``, which :meth:`QuantConfig.parse` and
:func:`get_config` read back: ``"int4-asym-g32-fp16"`` (weight-only, the model's dtype),
``"int4-asym-g32-fp16, compute bf16"``, ``"int8-sym-ch0-fp32, act int8-sym-token dynamic"``,
``"int8-sym-ch0-fp32, act int8-asym-tensor static"``. Every API that takes a config takes a
preset name or such a text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from linquant.errors import LinquantError
from linquant.scheme import QuantScheme

__all__ = ["PRESETS", "ActivationMode", "QuantConfig", "get_config", "preset_names"]

ActivationMode = Literal["dynamic", "static"]

W8A8_WEIGHT = QuantScheme(bits=8, symmetric=True, granularity="channel", axis=0)
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_TEXT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class QuantConfig:
    """What a selected layer becomes (see the module docstring for the allowed combinations).

    Args:
        weight: scheme of the stored weights.
        activation: ``None`` for weight-only; an 8-bit scheme for W8A8 (per token for
            ``"dynamic"``, per tensor for ``"static"``).
        activation_mode: ``"dynamic"`` or ``"static"``; only meaningful with ``activation``.
        compute_dtype: float dtype the quantized model runs in, or ``None`` (keep the model's).

    Example::

        >>> QuantConfig(QuantScheme.parse("int4-asym-g32-fp16"))
        QuantConfig(int4-asym-g32-fp16)
    """

    weight: QuantScheme
    activation: QuantScheme | None = None
    activation_mode: ActivationMode = "dynamic"
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QuantScheme):
            raise LinquantError(f"QuantConfig.weight must be a QuantScheme, got {self.weight!r}")
        if self.activation_mode not in ("dynamic", "static"):
            raise LinquantError(
                f"activation_mode must be 'dynamic' or 'static', got {self.activation_mode!r}"
            )
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise LinquantError(
                "compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, "
                f"got {self.compute_dtype!r}"
            )
        if self.activation is None:
            if self.activation_mode != "dynamic":
                raise LinquantError(
                    f"activation_mode={self.activation_mode!r} needs an activation scheme; "
                    "a weight-only config (activation=None) computes in float"
                )
            return
        self._check_w8a8()

    def _check_w8a8(self) -> None:
        act = self.activation
        if not isinstance(act, QuantScheme):
            raise LinquantError(
                f"QuantConfig.activation must be a QuantScheme or None, got {act!r}")
        if self.weight != W8A8_WEIGHT:
            raise LinquantError(
                f"a W8A8 config (activation set) needs weight {W8A8_WEIGHT} (int8 symmetric "
                f"per output channel, fp32 scales, min/max), got {self.weight}"
            )
        want = "channel" if self.activation_mode == "dynamic" else "tensor"
        what = "per token: granularity='channel', axis=0" if want == "channel" else (
            "per tensor: granularity='tensor'")
        if act.bits != 8:
            raise LinquantError(f"W8A8 activations must be 8-bit, got {act.bits}-bit ({act})")
        if act.granularity != want or (want == "channel" and act.axis != 0):
            raise LinquantError(
                f"{self.activation_mode} W8A8 activations are quantized {what}; got {act}"
            )
        if self.activation_mode == "dynamic" and not act.symmetric:
            raise LinquantError(
                f"dynamic W8A8 activations are symmetric (int8-sym, one scale per token); got "
                f"{act}; asymmetric activations need activation_mode='static'"
            )
        if act.zero_point != "int":
            raise LinquantError(
                f"W8A8 activations need an integer zero point (or symmetric), got {act}: a float "
                "offset cannot be applied in integer arithmetic"
            )
        if act.scale_dtype != torch.float32 or act.clip != "minmax":
            raise LinquantError(
                f"W8A8 activation scales are fp32 from min/max ranges, got {act}"
            )

    @property
    def is_w8a8(self) -> bool:
        return self.activation is not None

    @classmethod
    def parse(cls, text: str) -> QuantConfig:
        """The config whose ``str()`` is ``text`` (see the module docstring): a weight scheme
        (:meth:`QuantScheme.parse`), then optionally ``act int8-<sym|asym>-<token|tensor>
        <dynamic|static>`` and ``compute <fp32|fp16|bf16>``, comma-separated."""
        if not isinstance(text, str):
            raise LinquantError(f"QuantConfig.parse needs a str, got {type(text).__name__}")
        parts = [p.strip().lower() for p in text.split(",")]  # case-insensitive, as presets
        if text.strip().lower() in PRESETS:
            raise LinquantError(f"QuantConfig.parse({text!r}): a preset name, not a config's "
                                f"text form; get_config({text!r}) takes both")
        weight = QuantScheme.parse(parts[0])
        activation: QuantScheme | None = None
        mode: ActivationMode = "dynamic"
        compute: torch.dtype | None = None
        for part in parts[1:]:
            words = part.split()
            if len(words) == 3 and words[0] == "act" and activation is None:
                act = _ACT_TEXT.get(words[1])
                if act is None or words[2] not in ("dynamic", "static"):
                    raise LinquantError(
                        f"config {text!r}: cannot read {part!r}; expected 'act "
                        "int8-<sym|asym>-<token|tensor> <dynamic|static>'")
                activation, mode = act, "dynamic" if words[2] == "dynamic" else "static"
            elif len(words) == 2 and words[0] == "compute" and compute is None:
                found = [d for d, name in _DTYPE_TEXT.items() if name == words[1]]
                if not found:
                    raise LinquantError(f"config {text!r}: compute dtype must be one of "
                                        f"{', '.join(_DTYPE_TEXT.values())}, got {words[1]!r}")
                compute = found[0]
            else:
                raise LinquantError(
                    f"config {text!r}: cannot read {part!r}; expected 'act ...' or 'compute "
                    "<dtype>' after the weight scheme, each at most once")
        return cls(weight, activation, mode, compute)

    def __str__(self) -> str:
        parts = [str(self.weight)]
        if self.activation is not None:
            act = self.activation
            gran = "token" if act.granularity == "channel" else "tensor"
            parts.append(f"act int8-{act.mode}-{gran} {self.activation_mode}")
        if self.compute_dtype is not None:
            parts.append(f"compute {_DTYPE_TEXT[self.compute_dtype]}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"QuantConfig({self})"

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (used in reports)."""
        return {
            "weight": self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "activation_mode": self.activation_mode if self.activation is not None else None,
            "compute_dtype": None if self.compute_dtype is None
            else _DTYPE_TEXT[self.compute_dtype],
        }


def _s(text: str) -> QuantScheme:
    return QuantScheme.parse(text)


_PER_TOKEN = QuantScheme(bits=8, symmetric=True, granularity="channel", axis=0)
_PER_TENSOR = QuantScheme(bits=8, symmetric=True, granularity="tensor")
_ACT_TEXT = {
    "int8-sym-token": _PER_TOKEN,
    "int8-sym-tensor": _PER_TENSOR,
    "int8-asym-token": QuantScheme(bits=8, symmetric=False, granularity="channel", axis=0),
    "int8-asym-tensor": QuantScheme(bits=8, symmetric=False, granularity="tensor"),
}

PRESETS: Mapping[str, QuantConfig] = MappingProxyType({
    "w8a32": QuantConfig(W8A8_WEIGHT),
    "w8a16": QuantConfig(W8A8_WEIGHT, compute_dtype=torch.bfloat16),
    "w4a16-g32": QuantConfig(_s("int4-asym-g32-fp16"), compute_dtype=torch.bfloat16),
    "w4a16-g32-mse": QuantConfig(_s("int4-asym-g32-fp16-mse"), compute_dtype=torch.bfloat16),
    "w4a16-g128": QuantConfig(_s("int4-asym-g128-fp16"), compute_dtype=torch.bfloat16),
    "w4a16-sym-g32": QuantConfig(_s("int4-sym-g32-fp16"), compute_dtype=torch.bfloat16),
    "w8a8": QuantConfig(W8A8_WEIGHT, _PER_TOKEN, "dynamic"),
    "w8a8-static": QuantConfig(W8A8_WEIGHT, _PER_TENSOR, "static"),
})


def preset_names() -> tuple[str, ...]:
    """The preset names, in table order."""
    return tuple(PRESETS)


def get_config(config: str | QuantConfig) -> QuantConfig:
    """A :class:`QuantConfig` from a preset name (``"w4a16-g32"``), a config's text form
    (``"int4-asym-g128-fp16, compute bf16"``, :meth:`QuantConfig.parse`) or a config
    (returned as is)."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        found = PRESETS.get(config.strip().lower())
        if found is not None:
            return found
        if config.strip().lower().startswith("int"):
            return QuantConfig.parse(config.strip())
        raise LinquantError(
            f"unknown preset {config!r}; valid presets: {', '.join(PRESETS)}; or a config "
            "text such as 'int4-asym-g32-fp16, compute bf16'"
        )
    raise LinquantError(
        f"a quantization config must be a preset name or a QuantConfig, got {config!r}"
    )


def preset_name(config: QuantConfig) -> str | None:
    """The name of the preset equal to ``config``, or None."""
    for name, preset in PRESETS.items():
        if preset == config:
            return name
    return None
