"""Quantization schemes: what to quantize to, validated before any tensor is touched.

A :class:`QuantScheme` is a small frozen dataclass. Its text form is short and parses back::

    >>> s = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32,
    ...                 scale_dtype=torch.float16)
    >>> str(s)
    'int4-sym-g32-fp16'
    >>> QuantScheme.parse("int4-sym-g32-fp16") == s
    True

Text grammar: ``int{bits}-{mode}-{granularity}[-{scale dtype}][-mse]`` where mode is ``sym``,
``asym`` (integer zero point) or ``asymf`` (float offset), granularity is ``tensor``,
``ch{axis}`` (``ch0``, ``ch-1``) or ``g{group_size}``, and the scale dtype is ``fp32`` (default),
``fp16`` or ``bf16``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

import torch

from linquant.errors import LinquantError

__all__ = ["GRANULARITIES", "Granularity", "QuantScheme"]

Granularity = Literal["tensor", "channel", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
ZeroPointKind = Literal["int", "float"]
ClipMethod = Literal["minmax", "mse"]

SCALE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in SCALE_DTYPES.items()}
_DTYPE_ALIASES = {**SCALE_DTYPES, "float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}
_FIELDS = ("bits", "symmetric", "granularity", "axis", "group_size", "scale_dtype",
           "zero_point", "clip")

_TEXT = re.compile(
    r"^int(?P<bits>\d+)-(?P<mode>sym|asymf|asym)-(?P<gran>tensor|ch-?\d+|g\d+)"
    r"(?:-(?P<dtype>fp32|fp16|bf16))?(?P<mse>-mse)?$"
)


@dataclass(frozen=True)
class QuantScheme:
    """How a tensor is quantized.

    Args:
        bits: code width, 2..8.
        symmetric: ``True``: codes in the restricted range ``[-q_max, q_max]``,
            ``q_max = 2**(bits-1) - 1``, no zero point. ``False``: unsigned codes
            ``[0, 2**bits-1]``.
        granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per index of ``axis``)
            or ``"group"`` (one scale per ``group_size`` consecutive elements of the last dim).
        axis: the kept dimension for ``"channel"`` (negative counts from the end); 0 for the
            other granularities, whatever is given.
        group_size: elements per group for ``"group"``; must divide the last dimension.
        scale_dtype: storage dtype of scales (and float offsets): fp32, fp16 or bf16.
        zero_point: asymmetric only. ``"int"``: integer zero point in the code domain, the range
            widened to include 0 so 0.0 is exact, ``r = s (q - z)``. ``"float"``: ``r = s q + m``
            with ``m = min`` kept in ``scale_dtype``, no widening (llama.cpp Q4_1, tinygemm).
        clip: ``"minmax"`` uses the full range; ``"mse"`` searches per granule the clipping ratio
            that minimises the reconstruction MSE.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    axis: int = 0
    group_size: int | None = None
    scale_dtype: torch.dtype = torch.float32
    zero_point: ZeroPointKind = "int"
    clip: ClipMethod = "minmax"

    def __post_init__(self) -> None:
        if isinstance(self.scale_dtype, str) and self.scale_dtype in _DTYPE_ALIASES:
            object.__setattr__(self, "scale_dtype", _DTYPE_ALIASES[self.scale_dtype])
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise LinquantError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise LinquantError(f"bits must be in 2..8, got {self.bits}")
        if not isinstance(self.symmetric, bool):
            raise LinquantError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise LinquantError(
                f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise LinquantError(f"axis must be an int, got {self.axis!r}")
        if self.granularity != "channel" and self.axis != 0:
            # only a channel scheme has an axis: schemes that print alike compare equal
            object.__setattr__(self, "axis", 0)
        if self.granularity == "group":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                raise LinquantError(
                    f"granularity='group' needs a positive int group_size, got {gs!r}"
                )
        elif self.group_size is not None:
            raise LinquantError(
                f"group_size={self.group_size} is only meaningful with granularity='group', "
                f"not {self.granularity!r}"
            )
        if self.scale_dtype not in _DTYPE_NAMES:
            raise LinquantError(
                "scale_dtype must be torch.float32, torch.float16 or torch.bfloat16 (or "
                "'fp32', 'fp16', 'bf16'), "
                f"got {self.scale_dtype!r}"
            )
        if self.zero_point not in ("int", "float"):
            raise LinquantError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")
        if self.symmetric and self.zero_point != "int":
            raise LinquantError("zero_point='float' needs symmetric=False (a symmetric scheme "
                                "has no zero point)")
        if self.clip not in ("minmax", "mse"):
            raise LinquantError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")

    # ---- code range -----------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest code: ``-q_max`` (symmetric, restricted range) or 0 (asymmetric)."""
        return -self.qmax if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: ``2**(bits-1) - 1`` (symmetric) or ``2**bits - 1`` (asymmetric)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def has_int_zero_point(self) -> bool:
        return not self.symmetric and self.zero_point == "int"

    @property
    def has_offset(self) -> bool:
        return not self.symmetric and self.zero_point == "float"

    @property
    def scale_bits(self) -> int:
        return torch.finfo(self.scale_dtype).bits

    @property
    def mode(self) -> str:
        """``sym``, ``asym`` (integer zero point) or ``asymf`` (float offset)."""
        if self.symmetric:
            return "sym"
        return "asym" if self.zero_point == "int" else "asymf"

    def with_(self, **changes: object) -> QuantScheme:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def resolve(cls, scheme: QuantScheme | str | None = None, **fields: object) -> QuantScheme:
        """``scheme`` (a scheme, its text form, or None for the defaults: int8 symmetric per
        output channel) with ``fields`` changed, validated: what :func:`linquant.quantize`
        takes. A ``group_size`` without a ``granularity`` means ``granularity="group"``; a
        non-group ``granularity`` drops the base scheme's group size; ``scale_dtype`` may be
        named (``"fp16"``)::

            >>> str(QuantScheme.resolve(bits=4, group_size=32, scale_dtype="fp16"))
            'int4-sym-g32-fp16'
            >>> str(QuantScheme.resolve("int4-sym-g32", symmetric=False))
            'int4-asym-g32-fp32'
        """
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise LinquantError(f"unknown scheme field(s) {', '.join(unknown)}: expected some "
                                f"of {', '.join(_FIELDS)}")
        if isinstance(scheme, str):
            scheme = cls.parse(scheme)
        elif scheme is None:
            scheme = cls()
        elif not isinstance(scheme, cls):
            raise LinquantError(f"scheme must be a QuantScheme, its text or None, got {scheme!r}")
        changes = dict(fields)
        if changes.get("group_size") is not None:
            changes.setdefault("granularity", "group")
        elif changes.get("granularity", "group") != "group":
            changes.setdefault("group_size", None)
        return scheme.with_(**changes) if changes else scheme

    # ---- text form -------------------------------------------------------------------------
    def __str__(self) -> str:
        if self.granularity == "tensor":
            gran = "tensor"
        elif self.granularity == "channel":
            gran = f"ch{self.axis}"
        else:
            gran = f"g{self.group_size}"
        text = f"int{self.bits}-{self.mode}-{gran}-{_DTYPE_NAMES[self.scale_dtype]}"
        return text + ("-mse" if self.clip == "mse" else "")

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """Parse the text form: ``int4-sym-g32-fp16``, ``int8-asym-ch0``, ``int3-asymf-g64-mse``."""
        m = _TEXT.match(text.strip().lower()) if isinstance(text, str) else None
        if m is None:
            hint = ""
            if isinstance(text, str):
                from linquant.config import PRESETS

                preset = PRESETS.get(text.strip().lower())
                if preset is not None:
                    hint = (f"; {text.strip()!r} is a preset, a model config for "
                            f"quantize_model: its weight scheme is {preset.weight}")
            raise LinquantError(
                f"cannot parse scheme {text!r}: expected int<bits>-<sym|asym|asymf>-"
                "<tensor|ch<axis>|g<group_size>>[-fp32|-fp16|-bf16][-mse], e.g. int4-sym-g32-fp16"
                + hint
            )
        gran = m["gran"]
        kwargs: dict[str, object] = {}
        if gran == "tensor":
            kwargs["granularity"] = "tensor"
        elif gran.startswith("ch"):
            kwargs.update(granularity="channel", axis=int(gran[2:]))
        else:
            kwargs.update(granularity="group", group_size=int(gran[1:]))
        mode = m["mode"]
        return cls(
            bits=int(m["bits"]),
            symmetric=mode == "sym",
            zero_point="float" if mode == "asymf" else "int",
            scale_dtype=SCALE_DTYPES[m["dtype"] or "fp32"],
            clip="mse" if m["mse"] else "minmax",
            **kwargs,  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (used in reports and file metadata)."""
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "axis": self.axis,
            "group_size": self.group_size,
            "scale_dtype": _DTYPE_NAMES[self.scale_dtype],
            "zero_point": self.zero_point,
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> QuantScheme:
        if not isinstance(d, dict):
            raise LinquantError(f"scheme dict must be a dict, got {type(d).__name__}")
        if "scale_dtype" in d and str(d["scale_dtype"]) not in SCALE_DTYPES:
            raise LinquantError(
                f"scheme dict: scale_dtype {d['scale_dtype']!r} is not one of "
                f"{', '.join(SCALE_DTYPES)}"
            )
        try:
            dtype = SCALE_DTYPES[str(d["scale_dtype"])]
            return cls(
                bits=d["bits"],  # type: ignore[arg-type]
                symmetric=d["symmetric"],  # type: ignore[arg-type]
                granularity=d["granularity"],  # type: ignore[arg-type]
                axis=d.get("axis", 0),  # type: ignore[arg-type]
                group_size=d.get("group_size"),  # type: ignore[arg-type]
                scale_dtype=dtype,
                zero_point=d.get("zero_point", "int"),  # type: ignore[arg-type]
                clip=d.get("clip", "minmax"),  # type: ignore[arg-type]
            )
        except KeyError as e:
            raise LinquantError(f"scheme dict is missing key {e}: {d!r}") from None
