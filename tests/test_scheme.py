"""QuantScheme: validation messages, the text form, and the dict form."""

from __future__ import annotations

import json

import pytest
import torch

import linquant as lq
from linquant import LinquantError, QuantScheme

# ---- validation -----------------------------------------------------------------------------

# (kwargs, fragments that must all appear in the message)
BAD_SCHEMES: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "bits-1": ({"bits": 1}, ("bits", "2..8", "1")),
    "bits-9": ({"bits": 9}, ("bits", "2..8", "9")),
    "bits-0": ({"bits": 0}, ("bits", "2..8", "0")),
    "bits-negative": ({"bits": -4}, ("bits", "2..8", "-4")),
    "bits-float": ({"bits": 4.0}, ("bits", "int", "4.0")),
    "bits-str": ({"bits": "4"}, ("bits", "int", "'4'")),
    "bits-true": ({"bits": True}, ("bits", "int", "True")),
    "bits-false": ({"bits": False}, ("bits", "int", "False")),
    "symmetric-not-bool": ({"symmetric": 1}, ("symmetric", "bool", "1")),
    "granularity-unknown": ({"granularity": "row"}, ("granularity", "'row'", "tensor",
                                                    "channel", "group")),
    "granularity-none": ({"granularity": None}, ("granularity", "None")),
    "axis-float": ({"axis": 1.0}, ("axis", "int", "1.0")),
    "axis-bool": ({"axis": True}, ("axis", "int", "True")),
    "group-size-none": ({"granularity": "group"}, ("group_size", "positive", "None")),
    "group-size-zero": ({"granularity": "group", "group_size": 0}, ("group_size", "positive",
                                                                    "0")),
    "group-size-negative": ({"granularity": "group", "group_size": -32},
                            ("group_size", "positive", "-32")),
    "group-size-float": ({"granularity": "group", "group_size": 32.0},
                         ("group_size", "int", "32.0")),
    "group-size-bool": ({"granularity": "group", "group_size": True},
                        ("group_size", "True")),
    "group-size-with-channel": ({"granularity": "channel", "group_size": 32},
                                ("group_size=32", "group", "'channel'")),
    "group-size-with-tensor": ({"granularity": "tensor", "group_size": 16},
                               ("group_size=16", "group", "'tensor'")),
    "scale-dtype-fp64": ({"scale_dtype": torch.float64}, ("scale_dtype", "torch.float64",
                                                          "float16", "bfloat16")),
    "scale-dtype-int8": ({"scale_dtype": torch.int8}, ("scale_dtype", "torch.int8")),
    "scale-dtype-str": ({"scale_dtype": "fp8"}, ("scale_dtype", "'fp8'", "'fp16'")),
    "zero-point-unknown": ({"symmetric": False, "zero_point": "fixed"},
                           ("zero_point", "'fixed'", "'int'", "'float'")),
    "float-zero-point-symmetric": ({"symmetric": True, "zero_point": "float"},
                                   ("zero_point='float'", "symmetric=False")),
    "clip-unknown": ({"clip": "percentile"}, ("clip", "'percentile'", "minmax", "mse")),
    "clip-none": ({"clip": None}, ("clip", "None")),
}


@pytest.mark.parametrize(("kwargs", "fragments"), list(BAD_SCHEMES.values()),
                         ids=list(BAD_SCHEMES))
def test_invalid_scheme_raises_with_message(
    kwargs: dict[str, object], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(LinquantError) as info:
        QuantScheme(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_linquant_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        QuantScheme(bits=12)


def test_scale_dtype_may_be_named() -> None:
    for name, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16),
                        ("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert QuantScheme(scale_dtype=name).scale_dtype == dtype  # type: ignore[arg-type]


# (base scheme, fields) -> the scheme's text
RESOLVED = [
    (None, {}, "int8-sym-ch0-fp32"),
    (None, {"bits": 4}, "int4-sym-ch0-fp32"),
    (None, {"bits": 4, "group_size": 32, "scale_dtype": "fp16"}, "int4-sym-g32-fp16"),
    (None, {"bits": 3, "symmetric": False, "granularity": "tensor"}, "int3-asym-tensor-fp32"),
    (None, {"bits": 4, "symmetric": False, "zero_point": "float", "group_size": 64},
     "int4-asymf-g64-fp32"),
    (None, {"axis": 1, "clip": "mse"}, "int8-sym-ch1-fp32-mse"),
    ("int4-sym-g32-fp16", {}, "int4-sym-g32-fp16"),
    ("int4-sym-g32-fp16", {"symmetric": False}, "int4-asym-g32-fp16"),
    ("int4-sym-g32-fp16", {"group_size": 128}, "int4-sym-g128-fp16"),
    ("int4-sym-g32-fp16", {"granularity": "channel"}, "int4-sym-ch0-fp16"),
    ("int4-sym-g32-fp16", {"granularity": "tensor", "bits": 8}, "int8-sym-tensor-fp16"),
    (QuantScheme(bits=2), {"group_size": 16}, "int2-sym-g16-fp32"),
]


@pytest.mark.parametrize(("base", "fields", "text"), RESOLVED)
def test_resolve_changes_the_named_fields(base: object, fields: dict[str, object],
                                          text: str) -> None:
    scheme = QuantScheme.resolve(base, **fields)  # type: ignore[arg-type]
    assert str(scheme) == text
    assert scheme == QuantScheme.parse(text)
    qt = lq.quantize(torch.randn(8, 128), base, **fields)  # type: ignore[arg-type]
    assert qt.scheme == scheme


def test_resolve_refuses_unknown_fields_and_invalid_values() -> None:
    with pytest.raises(LinquantError, match=r"unknown scheme field\(s\) bitz, mode: expected "
                                            r"some of bits, symmetric"):
        QuantScheme.resolve(bitz=4, mode="asym")
    with pytest.raises(LinquantError, match=r"^w: unknown scheme field\(s\) group"):
        lq.quantize(torch.randn(4, 8), bits=4, group=32, name="w")
    with pytest.raises(LinquantError, match=r"^w: bits must be in 2..8, got 9"):
        lq.quantize(torch.randn(4, 8), "int4-sym-g4", bits=9, name="w")
    with pytest.raises(LinquantError, match="needs symmetric=False"):
        QuantScheme.resolve("int4-sym-g32", zero_point="float")
    with pytest.raises(LinquantError, match="QuantScheme, its text or None, got 4"):
        QuantScheme.resolve(4)  # type: ignore[arg-type]


def test_with_revalidates() -> None:
    s = QuantScheme(bits=4, granularity="group", group_size=32)
    assert s.with_(bits=3).bits == 3
    with pytest.raises(LinquantError, match="bits"):
        s.with_(bits=10)
    with pytest.raises(LinquantError, match="group_size"):
        s.with_(granularity="channel")


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"int{b}")
def test_code_range(bits: int) -> None:
    sym = QuantScheme(bits=bits, symmetric=True)
    asym = QuantScheme(bits=bits, symmetric=False)
    assert (sym.qmin, sym.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert (asym.qmin, asym.qmax) == (0, 2**bits - 1)


def test_defaults_and_mode_names() -> None:
    s = QuantScheme()
    assert (s.bits, s.symmetric, s.granularity, s.axis, s.group_size) == (8, True, "channel", 0,
                                                                          None)
    assert (s.scale_dtype, s.zero_point, s.clip) == (torch.float32, "int", "minmax")
    assert s.mode == "sym"
    assert QuantScheme(symmetric=False).mode == "asym"
    assert QuantScheme(symmetric=False, zero_point="float").mode == "asymf"
    assert QuantScheme(symmetric=False).has_int_zero_point
    assert QuantScheme(symmetric=False, zero_point="float").has_offset
    assert not s.has_int_zero_point and not s.has_offset


# ---- text form ------------------------------------------------------------------------------

def _grid() -> list[QuantScheme]:
    out = []
    grans: list[dict[str, object]] = [
        {"granularity": "tensor"},
        {"granularity": "channel", "axis": 0},
        {"granularity": "channel", "axis": 1},
        {"granularity": "channel", "axis": -1},
        {"granularity": "group", "group_size": 32},
        {"granularity": "group", "group_size": 128},
    ]
    modes: list[dict[str, object]] = [
        {"symmetric": True},
        {"symmetric": False, "zero_point": "int"},
        {"symmetric": False, "zero_point": "float"},
    ]
    for bits in (2, 3, 4, 8):
        for gran in grans:
            for mode in modes:
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    for clip in ("minmax", "mse"):
                        out.append(QuantScheme(bits=bits, scale_dtype=dtype, clip=clip,  # type: ignore[arg-type]
                                               **gran, **mode))  # type: ignore[arg-type]
    return out


GRID = _grid()


@pytest.mark.parametrize("scheme", GRID, ids=str)
def test_text_round_trip(scheme: QuantScheme) -> None:
    text = str(scheme)
    assert QuantScheme.parse(text) == scheme
    assert str(QuantScheme.parse(text)) == text


@pytest.mark.parametrize("scheme", GRID, ids=str)
def test_dict_round_trip(scheme: QuantScheme) -> None:
    d = scheme.to_dict()
    assert QuantScheme.from_dict(d) == scheme
    # the dict is JSON-friendly and survives a trip through JSON
    assert QuantScheme.from_dict(json.loads(json.dumps(d))) == scheme


EXAMPLES = {
    "int4-sym-g32-fp16": QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32,
                                     scale_dtype=torch.float16),
    "int8-asym-ch0-fp32": QuantScheme(bits=8, symmetric=False, granularity="channel", axis=0),
    "int3-asymf-g64-bf16-mse": QuantScheme(bits=3, symmetric=False, zero_point="float",
                                           granularity="group", group_size=64,
                                           scale_dtype=torch.bfloat16, clip="mse"),
    "int2-sym-tensor-fp32": QuantScheme(bits=2, granularity="tensor"),
    "int5-sym-ch-1-fp16": QuantScheme(bits=5, axis=-1, scale_dtype=torch.float16),
    "int6-asym-ch2-bf16": QuantScheme(bits=6, symmetric=False, axis=2,
                                      scale_dtype=torch.bfloat16),
}


@pytest.mark.parametrize(("text", "expected"), list(EXAMPLES.items()), ids=list(EXAMPLES))
def test_parse_examples(text: str, expected: QuantScheme) -> None:
    assert QuantScheme.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("int8-asym-ch0", "int8-asym-ch0-fp32"),
     ("int4-sym-g32-mse", "int4-sym-g32-fp32-mse"),
     ("  int4-sym-tensor-fp16\n", "int4-sym-tensor-fp16")],
    ids=["default-dtype", "default-dtype-mse", "surrounding-whitespace"],
)
def test_parse_defaults(text: str, canonical: str) -> None:
    assert str(QuantScheme.parse(text)) == canonical


GRAMMAR_ERRORS = {
    "empty": "",
    "garbage": "int4",
    "no-int-prefix": "4-sym-g32",
    "unknown-mode": "int4-signed-g32",
    "unknown-granularity": "int4-sym-row",
    "unknown-dtype": "int4-sym-g32-fp64",
    "trailing-junk": "int4-sym-g32-fp16-extra",
    "mse-before-dtype": "int4-sym-g32-mse-fp16",
    "plus-axis": "int4-sym-ch+1",
    "no-group-size": "int4-sym-g",
}


@pytest.mark.parametrize("text", list(GRAMMAR_ERRORS.values()), ids=list(GRAMMAR_ERRORS))
def test_parse_grammar_errors(text: str) -> None:
    with pytest.raises(LinquantError) as info:
        QuantScheme.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert "int4-sym-g32-fp16" in message  # an example of the grammar


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("int9-sym-g32", "bits"), ("int1-asym-tensor", "bits"), ("int4-sym-g0", "group_size"),
     ("int4-sym-g-32", "int4-sym-g-32")],
    ids=["bits-9", "bits-1", "group-0", "group-negative"],
)
def test_parse_value_errors(text: str, fragment: str) -> None:
    with pytest.raises(LinquantError, match=fragment):
        QuantScheme.parse(text)


@pytest.mark.parametrize("value", [None, 4, b"int4-sym-g32"], ids=["none", "int", "bytes"])
def test_parse_non_string(value: object) -> None:
    with pytest.raises(LinquantError, match="cannot parse scheme"):
        QuantScheme.parse(value)  # type: ignore[arg-type]


def test_quantize_accepts_text() -> None:
    x = torch.randn(4, 64)
    by_text = lq.quantize(x, "int4-sym-g32-fp16")
    by_obj = lq.quantize(x, EXAMPLES["int4-sym-g32-fp16"])
    assert by_text.scheme == by_obj.scheme
    assert torch.equal(by_text.qdata, by_obj.qdata)


# ---- dict form errors ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["bits", "symmetric", "granularity", "scale_dtype"])
def test_from_dict_missing_key(key: str) -> None:
    d = QuantScheme().to_dict()
    del d[key]
    with pytest.raises(LinquantError, match=f"missing key '{key}'"):
        QuantScheme.from_dict(d)


def test_from_dict_optional_keys_default() -> None:
    d = {"bits": 4, "symmetric": False, "granularity": "tensor", "scale_dtype": "fp16"}
    assert QuantScheme.from_dict(d) == QuantScheme(bits=4, symmetric=False,
                                                   granularity="tensor",
                                                   scale_dtype=torch.float16)


def test_from_dict_bad_values_are_validated() -> None:
    d = QuantScheme().to_dict()
    d["bits"] = 12
    with pytest.raises(LinquantError, match="bits"):
        QuantScheme.from_dict(d)


def test_from_dict_unknown_scale_dtype_names_the_field() -> None:
    d = QuantScheme().to_dict()
    d["scale_dtype"] = "fp64"
    with pytest.raises(LinquantError) as info:
        QuantScheme.from_dict(d)
    message = str(info.value)
    assert "fp64" in message
    # the problem is the value of scale_dtype, not a missing key
    assert "scale_dtype" in message.split("{")[0], message
    assert "missing" not in message, message


def test_axis_belongs_to_channel_schemes_only() -> None:
    """``resolve("int8-sym-ch1", granularity="tensor")`` kept axis 1: a scheme that printed as
    ``int8-sym-tensor-fp32`` compared unequal to the parsed one (and the sweep listed both)."""
    a = QuantScheme.resolve("int8-sym-ch1", granularity="tensor")
    assert a == QuantScheme.parse("int8-sym-tensor") and a.axis == 0
    b = QuantScheme.resolve("int4-sym-ch-1", group_size=32)
    assert b == QuantScheme.parse("int4-sym-g32") and QuantScheme.parse(str(b)) == b
    assert QuantScheme.resolve("int8-sym-tensor", granularity="channel", axis=-1).axis == -1


def test_text_forms_are_case_insensitive_and_a_preset_is_named() -> None:
    """Presets were case-insensitive and text forms not; a preset given where a scheme is
    expected said only "cannot parse scheme"."""
    assert QuantScheme.parse("INT4-ASYM-G64-FP16") == QuantScheme.parse("int4-asym-g64-fp16")
    with pytest.raises(LinquantError, match=r"'W4A16-G32' is a preset, a model config for "
                                            r"quantize_model: its weight scheme is "
                                            r"int4-asym-g32-fp16"):
        QuantScheme.parse("W4A16-G32")
