"""The linquant file format: safetensors + JSON metadata, versioned, validated on load.

A quantized tensor ``N`` (e.g. ``encoder.layer.0.attention.self.query.weight``) is stored as
plain safetensors tensors ``N.qdata`` (uint8, the packed code stream), ``N.scale`` and, by
scheme, ``N.zero_point`` (uint8, packed at the scheme's bit width) or ``N.offset``. Every other
tensor is stored as itself. The safetensors header metadata of **every** file carries::

    format          "linquant"
    format_version  "1"
    linquant        JSON: {"tensors": {N: {"scheme": "int4-asym-g32-fp16",
                                           "shape": [384, 1536], "dtype": "float32"}, ...},
                           "modules": {module name: {"type": "QuantLinear", ...}, ...},
                           ...}

so a file describes itself: nothing is inferred from file names or tensor sizes, and each shard
describes the tensors it holds. :func:`decode_quantized` checks every claim before trusting it
(dtypes, byte sizes, scale shapes, finite positive scales, codes in range, zero padding bits)
and raises :class:`~linquant.errors.FormatError` naming the file and tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from linquant.errors import FormatError, LinquantError
from linquant.ops.affine import sign_extend
from linquant.ops.grouping import granules, scale_shape
from linquant.ops.packing import packed_nbytes, unpack
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PARTS",
    "decode_quantized",
    "encode_quantized",
    "read_header_metadata",
]

FORMAT_NAME = "linquant"
FORMAT_VERSION = 1
PARTS = ("qdata", "scale", "zero_point", "offset")

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,  # a layer's dtype after .double() (its codes and scales as ever)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_quantized(
    name: str, qt: QuantizedTensor
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to store for ``qt`` under ``name`` and its metadata entry."""
    tensors = {f"{name}.{part}": t.contiguous() for part, t in qt.tensors().items()}
    entry = {"scheme": str(qt.scheme), "shape": list(qt.shape), "dtype": dtype_name(qt.dtype)}
    return tensors, entry


def split_part(key: str) -> tuple[str, str] | None:
    """``"a.weight.qdata"`` -> ``("a.weight", "qdata")``; None for a key that is no part."""
    base, _, part = key.rpartition(".")
    return (base, part) if base and part in PARTS else None


def _fail(file: str, name: str, what: str) -> FormatError:
    return FormatError(f"{file}: tensor {name!r}: {what}")


def decode_quantized(
    name: str, parts: Mapping[str, torch.Tensor], entry: Any, file: str
) -> QuantizedTensor:
    """Validate one stored quantized tensor and build it. ``parts`` maps part name -> tensor."""
    if not isinstance(entry, dict):
        raise _fail(file, name, f"metadata entry must be an object, got {type(entry).__name__}")
    try:
        scheme = QuantScheme.parse(entry["scheme"])
    except KeyError:
        raise _fail(file, name, "metadata entry has no 'scheme'") from None
    except LinquantError as e:
        raise _fail(file, name, f"bad scheme: {e}") from None
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or (not shape and scheme.granularity != "tensor")
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise _fail(file, name, f"bad shape {shape!r} (expected a list of positive ints)")
    if len(shape) > 8 or math.prod(shape) > 1 << 40:
        raise _fail(file, name, f"implausible shape {shape!r}")
    dtype = DTYPE_NAMES.get(str(entry.get("dtype")))
    if dtype is None:
        raise _fail(file, name, f"bad dtype {entry.get('dtype')!r} "
                                "(expected float32, float16, bfloat16 or float64)")
    shape_t = tuple(shape)
    try:
        granules(shape_t, scheme, name)
    except LinquantError as e:
        raise _fail(file, name, f"scheme {scheme} does not fit shape {shape_t}: {e}") from None
    numel = math.prod(shape_t)
    sshape = scale_shape(shape_t, scheme)
    n_params = math.prod(sshape)

    expected = {"qdata", "scale"}
    if scheme.has_int_zero_point:
        expected.add("zero_point")
    if scheme.has_offset:
        expected.add("offset")
    missing = expected - set(parts)
    extra = set(parts) - expected
    if missing:
        raise _fail(file, name, f"missing part(s) {sorted(missing)} for scheme {scheme}")
    if extra:
        raise _fail(file, name, f"unexpected part(s) {sorted(extra)} for scheme {scheme}")

    qdata = parts["qdata"]
    _check_packed(file, f"{name}.qdata", qdata, numel, scheme.bits)
    if scheme.symmetric:
        codes = sign_extend(unpack(qdata, scheme.bits, numel), scheme.bits)
        if bool((codes < scheme.qmin).any()):
            raise _fail(file, name, f"symmetric codes below -q_max = {scheme.qmin}")

    scale = parts["scale"]
    if scale.dtype != scheme.scale_dtype:
        raise _fail(file, f"{name}.scale", f"dtype {scale.dtype} but scheme {scheme} says "
                                           f"{scheme.scale_dtype}")
    if tuple(scale.shape) != sshape:
        raise _fail(file, f"{name}.scale", f"shape {tuple(scale.shape)}, expected {sshape}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise _fail(file, f"{name}.scale", "scales must be finite and positive")

    zp = parts.get("zero_point")
    if zp is not None:
        _check_packed(file, f"{name}.zero_point", zp, n_params, scheme.bits)
    offset = parts.get("offset")
    if offset is not None:
        if offset.dtype != scheme.scale_dtype or tuple(offset.shape) != sshape:
            raise _fail(file, f"{name}.offset", f"{offset.dtype} {tuple(offset.shape)}, expected "
                                                f"{scheme.scale_dtype} {sshape}")
        if not bool(torch.isfinite(offset).all()):
            raise _fail(file, f"{name}.offset", "offsets must be finite")
    return QuantizedTensor(qdata, scale, zp, offset, scheme, shape_t, dtype)


def _check_packed(file: str, name: str, t: torch.Tensor, n: int, bits: int) -> None:
    want = packed_nbytes(n, bits)
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != want:
        raise _fail(file, name, f"expected 1-D uint8 of {want} bytes ({n} codes x {bits} bits), "
                                f"got {t.dtype} {tuple(t.shape)}")
    spare = want * 8 - n * bits
    if spare and int(t[-1]) >> (8 - spare):
        raise _fail(file, name, "unused padding bits of the last byte are not zero")


def read_header_metadata(raw: Mapping[str, str] | None, file: str) -> dict[str, Any]:
    """Check a safetensors header's metadata is linquant's, of a version we read; parse it."""
    if not raw or raw.get("format") != FORMAT_NAME:
        raise FormatError(f"{file}: not a linquant file (safetensors metadata 'format' is "
                          f"{(raw or {}).get('format')!r}, expected {FORMAT_NAME!r}); a float "
                          "checkpoint is quantized first (linquant quantize SRC -o DST, or "
                          "lq.quantize_model on the model its own library loads)")
    version = raw.get("format_version")
    if version is None:
        raise FormatError(f"{file}: linquant file without a format_version")
    if version != str(FORMAT_VERSION):
        raise FormatError(f"{file}: format_version {version!r} is not supported "
                          f"(this linquant reads version {FORMAT_VERSION})")
    try:
        meta = json.loads(raw.get("linquant", ""))
    except json.JSONDecodeError as e:
        raise FormatError(f"{file}: linquant metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors", {}), dict):
        raise FormatError(f"{file}: linquant metadata must be an object with a 'tensors' object")
    return meta


def header_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata strings for ``meta``."""
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "linquant": json.dumps(meta, sort_keys=True, separators=(",", ":")),
    }
