"""The per-tensor format: encode -> decode is exact; every bad claim is a FormatError."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from linquant.errors import FormatError
from linquant.io.format import (
    FORMAT_VERSION,
    decode_quantized,
    encode_quantized,
    header_metadata,
    read_header_metadata,
    split_part,
)
from linquant.scheme import QuantScheme
from linquant.tensor import quantize

SCHEMES = ["int8-sym-ch0-fp32", "int4-asym-g32-fp16", "int4-sym-g32-fp16", "int3-asym-g16-bf16",
           "int8-asym-tensor-fp32"]


def _encoded(scheme: str = "int4-asym-g32-fp16") -> tuple[dict[str, torch.Tensor], Any]:
    qt = quantize(torch.randn(8, 64), QuantScheme.parse(scheme))
    return encode_quantized("fc.weight", qt)


def _parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        sp = split_part(k)
        assert sp is not None
        out[sp[1]] = v.clone()
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_exact(scheme: str) -> None:
    qt = quantize(torch.randn(8, 64), QuantScheme.parse(scheme))
    tensors, entry = encode_quantized("fc.weight", qt)
    back = decode_quantized("fc.weight", _parts(tensors), json.loads(json.dumps(entry)), "f")
    assert back.scheme == qt.scheme and back.shape == qt.shape and back.dtype == qt.dtype
    for role, t in qt.tensors().items():
        assert torch.equal(back.tensors()[role], t)


def test_split_part() -> None:
    assert split_part("a.weight.qdata") == ("a.weight", "qdata")
    assert split_part("a.weight") is None
    assert split_part("scale") is None


def _bad(parts: dict[str, torch.Tensor], entry: Any, match: str) -> None:
    with pytest.raises(FormatError, match=match) as e:
        decode_quantized("fc.weight", parts, entry, "shard.safetensors")
    assert "shard.safetensors" in str(e.value) and "fc.weight" in str(e.value)


def test_scheme_shape_and_bytes_disagreements() -> None:
    tensors, entry = _encoded()
    parts = _parts(tensors)
    _bad(parts, {**entry, "scheme": "int9-x"}, "bad scheme")
    _bad(parts, {k: v for k, v in entry.items() if k != "scheme"}, "no 'scheme'")
    _bad(parts, {**entry, "shape": [8, 63]}, "does not fit")
    _bad(parts, {**entry, "shape": [8, -64]}, "bad shape")
    _bad(parts, {**entry, "shape": [16, 64]}, "bytes")
    _bad(parts, {**entry, "dtype": "int8"}, "bad dtype")
    _bad(parts, {**entry, "scheme": "int8-asym-g32-fp16"}, "bytes")
    _bad(parts, "nope", "must be an object")
    _bad({k: v for k, v in parts.items() if k != "zero_point"}, entry, "missing part")
    _bad({**parts, "offset": parts["scale"]}, entry, "unexpected part")
    _bad({**parts, "scale": parts["scale"].float()}, entry, "dtype")
    _bad({**parts, "scale": parts["scale"][:, :1]}, entry, "shape")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scales(value: float) -> None:
    tensors, entry = _encoded()
    parts = _parts(tensors)
    parts["scale"][0, 0] = value
    _bad(parts, entry, "finite and positive")


def test_symmetric_code_out_of_range() -> None:
    tensors, entry = _encoded("int8-sym-ch0-fp32")
    parts = _parts(tensors)
    parts["qdata"][0] = 0x80  # -128 < -q_max
    _bad(parts, entry, "below")


def test_nonzero_padding_bits() -> None:
    qt = quantize(torch.randn(3, 5), QuantScheme.parse("int3-asym-tensor-fp32"))
    tensors, entry = encode_quantized("fc.weight", qt)
    parts = _parts(tensors)
    parts["qdata"][-1] |= 0x80
    _bad(parts, entry, "padding")


def test_header_metadata() -> None:
    meta = {"tensors": {}, "modules": {}}
    raw = header_metadata(meta)
    assert read_header_metadata(raw, "f") == meta
    with pytest.raises(FormatError, match=r"not a linquant file .*'pt'.*; a float checkpoint is "
                                          r"quantized first \(linquant quantize SRC -o DST"):
        read_header_metadata({"format": "pt"}, "f")
    with pytest.raises(FormatError, match="not a linquant file"):
        read_header_metadata(None, "f")
    with pytest.raises(FormatError, match="without a format_version"):
        read_header_metadata({k: v for k, v in raw.items() if k != "format_version"}, "f")
    with pytest.raises(FormatError, match="not supported"):
        read_header_metadata({**raw, "format_version": str(FORMAT_VERSION + 1)}, "f")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_header_metadata({**raw, "linquant": "{"}, "f")
    with pytest.raises(FormatError, match="must be an object"):
        read_header_metadata({**raw, "linquant": "[]"}, "f")
