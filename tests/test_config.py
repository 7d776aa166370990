"""QuantConfig validation and the preset table."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from linquant.config import PRESETS, QuantConfig, get_config, preset_name, preset_names
from linquant.errors import LinquantError
from linquant.scheme import QuantScheme

S = QuantScheme.parse
W8 = S("int8-sym-ch0")
PER_TOKEN = QuantScheme(bits=8, symmetric=True, granularity="channel", axis=0)
PER_TENSOR = S("int8-sym-tensor")

# name -> (weight scheme text, activation mode or None for weight-only, compute dtype)
EXPECTED = {
    "w8a32": ("int8-sym-ch0-fp32", None, None),
    "w8a16": ("int8-sym-ch0-fp32", None, torch.bfloat16),
    "w4a16-g32": ("int4-asym-g32-fp16", None, torch.bfloat16),
    "w4a16-g32-mse": ("int4-asym-g32-fp16-mse", None, torch.bfloat16),
    "w4a16-g128": ("int4-asym-g128-fp16", None, torch.bfloat16),
    "w4a16-sym-g32": ("int4-sym-g32-fp16", None, torch.bfloat16),
    "w8a8": ("int8-sym-ch0-fp32", "dynamic", None),
    "w8a8-static": ("int8-sym-ch0-fp32", "static", None),
}


def test_preset_table_is_the_documented_one() -> None:
    assert set(preset_names()) == set(EXPECTED)
    for name, (weight, mode, dtype) in EXPECTED.items():
        cfg = PRESETS[name]
        assert str(cfg.weight) == weight, name
        assert cfg.compute_dtype == dtype, name
        if mode is None:
            assert cfg.activation is None and not cfg.is_w8a8, name
        else:
            assert cfg.is_w8a8 and cfg.activation_mode == mode, name
            assert cfg.activation is not None and cfg.activation.bits == 8


def test_w8a16_differs_from_w8a32_only_in_compute_dtype() -> None:
    a, b = PRESETS["w8a32"], PRESETS["w8a16"]
    assert a.weight == b.weight and a.activation == b.activation
    assert (a.compute_dtype, b.compute_dtype) == (None, torch.bfloat16)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_get_config_by_name_and_passthrough(name: str) -> None:
    cfg = get_config(name)
    assert cfg is PRESETS[name]
    assert get_config(cfg) is cfg
    assert get_config(f"  {name.upper()} ") is cfg
    assert preset_name(cfg) == name


def test_unknown_preset_lists_the_valid_names() -> None:
    with pytest.raises(LinquantError, match="unknown preset 'w3a16'") as e:
        get_config("w3a16")
    for name in EXPECTED:
        assert name in str(e.value)


def test_every_config_text_parses_back() -> None:
    for name, cfg in PRESETS.items():
        assert QuantConfig.parse(str(cfg)) == cfg, name
        assert get_config(str(cfg)) == cfg, name
    static_asym = QuantConfig(W8, S("int8-asym-tensor"), "static")
    assert str(static_asym) == "int8-sym-ch0-fp32, act int8-asym-tensor static"
    assert QuantConfig.parse(str(static_asym)) == static_asym
    assert get_config(" int3-asymf-g16-bf16-mse , compute fp16 ") == QuantConfig(
        S("int3-asymf-g16-bf16-mse"), compute_dtype=torch.float16)


@given(bits=st.integers(2, 8), mode=st.sampled_from(["sym", "asym", "asymf"]),
       gran=st.sampled_from(["tensor", "ch0", "ch1", "ch-1", "g8", "g128"]),
       scale=st.sampled_from(["fp32", "fp16", "bf16"]), mse=st.booleans(),
       compute=st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]))
def test_weight_only_config_texts_round_trip(bits: int, mode: str, gran: str, scale: str,
                                             mse: bool, compute: torch.dtype | None) -> None:
    cfg = QuantConfig(S(f"int{bits}-{mode}-{gran}-{scale}" + ("-mse" if mse else "")),
                      compute_dtype=compute)
    assert QuantConfig.parse(str(cfg)) == cfg
    assert get_config(str(cfg)) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("int4-asym-g32-fp16, compute fp8", "compute dtype must be one of fp32, fp16, bf16"),
        ("int4-asym-g32-fp16, compute bf16, compute fp16", "each at most once"),
        ("int4-asym-g32-fp16, bf16", "cannot read 'bf16'"),
        ("int8-sym-ch0-fp32, act int8-sym-token lazy", "expected 'act int8-<sym|asym>"),
        ("int8-sym-ch0-fp32, act int4-sym-token dynamic", "expected 'act int8-<sym|asym>"),
        ("int4-asym-g32-fp16, act int8-sym-token dynamic", "needs weight int8-sym-ch0-fp32"),
        ("int8-sym-ch0-fp32, act int8-asym-token dynamic", "activations are symmetric"),
        ("int9-sym-ch0", "bits must be in 2..8"),
    ],
)
def test_bad_config_texts(text: str, message: str) -> None:
    with pytest.raises(LinquantError, match=re.escape(message)):
        get_config(text)


def test_get_config_rejects_other_types() -> None:
    with pytest.raises(LinquantError, match="preset name or a QuantConfig"):
        get_config(8)  # type: ignore[arg-type]


def test_config_is_frozen_and_hashable() -> None:
    cfg = PRESETS["w4a16-g32"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight = W8  # type: ignore[misc]
    assert {cfg: 1}[QuantConfig(S("int4-asym-g32-fp16"), compute_dtype=torch.bfloat16)] == 1


def test_text_forms() -> None:
    assert str(PRESETS["w4a16-g32"]) == "int4-asym-g32-fp16, compute bf16"
    assert str(PRESETS["w8a16"]) == "int8-sym-ch0-fp32, compute bf16"
    assert str(PRESETS["w8a8"]) == "int8-sym-ch0-fp32, act int8-sym-token dynamic"
    assert str(PRESETS["w8a8-static"]) == "int8-sym-ch0-fp32, act int8-sym-tensor static"
    assert repr(PRESETS["w8a32"]) == "QuantConfig(int8-sym-ch0-fp32)"
    d = PRESETS["w8a8-static"].to_dict()
    assert d["activation_mode"] == "static" and d["weight"]["bits"] == 8  # type: ignore[index]


def test_any_weight_only_scheme_is_allowed() -> None:
    for text in ("int2-asymf-g16-bf16", "int3-sym-tensor", "int8-asym-ch1-fp16-mse"):
        assert QuantConfig(S(text)).activation is None


def test_static_asymmetric_activations_are_allowed() -> None:
    cfg = QuantConfig(W8, S("int8-asym-tensor"), "static")
    assert cfg.activation is not None and not cfg.activation.symmetric


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"weight": "int8-sym-ch0"}, "must be a QuantScheme", id="weight-str"),
        pytest.param({"weight": W8, "activation_mode": "lazy"}, "'dynamic' or 'static'",
                     id="mode"),
        pytest.param({"weight": W8, "activation_mode": "static"}, "needs an activation scheme",
                     id="static-without-activation"),
        pytest.param({"weight": W8, "compute_dtype": torch.int8}, "compute_dtype",
                     id="compute-int8"),
        pytest.param({"weight": S("int4-sym-g32"), "activation": PER_TOKEN},
                     "needs weight int8-sym-ch0-fp32", id="w4a8"),
        pytest.param({"weight": S("int8-sym-ch0-fp16"), "activation": PER_TOKEN},
                     "needs weight int8-sym-ch0-fp32", id="w8a8-fp16-scales"),
        pytest.param({"weight": S("int8-sym-ch1"), "activation": PER_TOKEN},
                     "needs weight int8-sym-ch0-fp32", id="w8a8-axis1"),
        pytest.param({"weight": W8, "activation": S("int4-sym-ch0")}, "must be 8-bit",
                     id="a4"),
        pytest.param({"weight": W8, "activation": PER_TENSOR}, "per token", id="dynamic-tensor"),
        pytest.param({"weight": W8, "activation": PER_TOKEN, "activation_mode": "static"},
                     "per tensor", id="static-per-token"),
        pytest.param({"weight": W8, "activation": S("int8-asym-ch0")}, "symmetric",
                     id="dynamic-asym"),
        pytest.param({"weight": W8, "activation": S("int8-asymf-tensor"),
                      "activation_mode": "static"}, "integer zero point", id="float-offset"),
        pytest.param({"weight": W8, "activation": S("int8-sym-tensor-fp16"),
                      "activation_mode": "static"}, "fp32", id="fp16-act-scale"),
        pytest.param({"weight": W8, "activation": "int8-sym-ch0"}, "QuantScheme or None",
                     id="activation-str"),
    ],
)
def test_invalid_configs_say_what_is_allowed(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(LinquantError, match=match):
        QuantConfig(**kwargs)  # type: ignore[arg-type]


def test_config_text_is_case_insensitive_as_presets_are() -> None:
    assert str(QuantConfig.parse("INT4-ASYM-G64-FP16, COMPUTE BF16")) == (
        "int4-asym-g64-fp16, compute bf16")
    assert str(QuantConfig.parse("Int8-Sym-Ch0-Fp32, Act Int8-Sym-Token Dynamic")) == (
        "int8-sym-ch0-fp32, act int8-sym-token dynamic")
