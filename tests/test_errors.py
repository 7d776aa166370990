"""Every bad input ends in a LinquantError that says what was wrong; metrics on known values."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import linquant as lq
from linquant import LinquantError

NAME = "encoder.layer.0.weight"


def raises(x: object, scheme: object, *fragments: str) -> str:
    """quantize(x, scheme, name=NAME) raises LinquantError naming the tensor and every
    fragment (regular expressions)."""
    with pytest.raises(LinquantError) as info:
        lq.quantize(x, scheme, name=NAME)  # type: ignore[arg-type]
    message = str(info.value)
    assert NAME in message, message
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"
    return message


# ---- input type and shape ------------------------------------------------------------------

@pytest.mark.parametrize(
    "dtype",
    [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64,
     torch.float8_e4m3fn],
    ids=lambda d: str(d).replace("torch.", ""),
)
def test_non_float_tensor(dtype: torch.dtype) -> None:  # (float64 is quantized: test_convert)
    raises(torch.zeros(4, 8, dtype=dtype), "int8-sym-ch0", re.escape(str(dtype)), "float32",
           "float16", "bfloat16", "float64")


@pytest.mark.parametrize(
    "value",
    [[1.0, 2.0], 3.0, None, "weights"],
    ids=["list", "float", "none", "str"],
)
def test_non_tensor_input(value: object) -> None:
    raises(value, "int8-sym-tensor", "torch.Tensor", type(value).__name__)


def test_numpy_array_is_not_a_tensor() -> None:
    np = pytest.importorskip("numpy")
    raises(np.zeros((2, 4), dtype=np.float32), "int8-sym-tensor", "torch.Tensor", "ndarray")


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_tensor(shape: tuple[int, ...]) -> None:
    raises(torch.zeros(shape), "int4-sym-tensor", "empty", re.escape(str(shape)))


@pytest.mark.parametrize(("shape", "group"), [((4, 48), 32), ((3, 2, 10), 4), ((7,), 2)],
                         ids=["48-by-32", "3d-10-by-4", "1d-7-by-2"])
def test_group_size_must_divide_last_dim(shape: tuple[int, ...], group: int) -> None:
    raises(torch.randn(shape), f"int4-sym-g{group}", f"group_size {group}", str(shape[-1]))


@pytest.mark.parametrize(("shape", "axis"), [((4, 8), 2), ((4, 8), -3), ((5,), 1),
                                             ((2, 3, 4), 7)],
                         ids=["2d-axis2", "2d-axis-3", "1d-axis1", "3d-axis7"])
def test_axis_out_of_range(shape: tuple[int, ...], axis: int) -> None:
    raises(torch.randn(shape), f"int8-sym-ch{axis}", f"axis {axis}", f"{len(shape)}-D")


@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g1"])
def test_scalar_needs_tensor_granularity(scheme: str) -> None:
    raises(torch.tensor(1.5), scheme, "scalar")
    assert lq.quantize(torch.tensor(1.5), "int8-sym-tensor").dequantize().shape == ()


@pytest.mark.parametrize("scheme", ["int4-sym-g33-fp16", "", "int4_sym_g32", "fp16"],
                         ids=["bad-group", "empty", "underscores", "dtype-only"])
def test_unparseable_or_invalid_scheme_text(scheme: str) -> None:
    x = torch.randn(4, 64)
    with pytest.raises(LinquantError) as info:
        lq.quantize(x, scheme)
    message = str(info.value)
    assert "group_size" in message or "cannot parse scheme" in message


@pytest.mark.parametrize("scheme", [4, {"bits": 4}, torch.float16], ids=["int", "dict", "dtype"])
def test_scheme_of_wrong_type(scheme: object) -> None:
    raises(torch.randn(4, 8), scheme, "QuantScheme or str")


def test_no_scheme_means_the_defaults() -> None:
    assert str(lq.quantize(torch.randn(4, 8)).scheme) == "int8-sym-ch0-fp32"


# ---- non-finite values ---------------------------------------------------------------------

NONFINITE_SCHEMES = ["int8-sym-tensor", "int8-sym-ch0", "int4-asym-ch1-fp16",
                     "int4-asymf-g4-bf16", "int3-sym-g8-fp32-mse"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("scheme", NONFINITE_SCHEMES)
def test_non_finite_values_give_count_and_first_index(scheme: str, bad: float) -> None:
    x = torch.randn(4, 8)
    x[2, 5] = bad
    x[3, 0] = math.nan
    raises(x, scheme, r"\b2 NaN/Inf", re.escape("(2, 5)"))


@pytest.mark.parametrize("scheme", ["int8-sym-tensor", "int8-asym-ch1", "int4-sym-g2"])
def test_non_finite_index_in_3d_tensor_coordinates(scheme: str) -> None:
    x = torch.randn(3, 4, 6)
    x[1, 2, 3] = math.nan
    raises(x, scheme, r"\b1 NaN/Inf", re.escape("(1, 2, 3)"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_non_finite_low_precision_input(dtype: torch.dtype) -> None:
    x = torch.randn(2, 8).to(dtype)
    x[0, 3] = math.inf
    raises(x, "int4-sym-ch0", r"\b1 NaN/Inf", re.escape("(0, 3)"))


# ---- overflow of low-precision parameters ---------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8-sym-ch0-fp16", "int4-asym-g8-fp16",
                                    "int2-asymf-tensor-fp16", "int8-sym-ch0-fp16-mse"])
def test_fp16_scale_overflow_suggests_fp32(scheme: str) -> None:
    x = torch.randn(4, 8)
    x[1, 2] = 1e9
    raises(x, scheme, "overflow", "float16", "fp32|float32")


def test_fp16_scale_overflow_counts_scales() -> None:
    x = torch.randn(4, 8)
    x[1] = 1e9
    x[3] = -1e9
    raises(x, "int8-sym-ch0-fp16", r"\b2 scale")


def test_large_values_fit_fp32_and_bf16_scales() -> None:
    x = torch.randn(4, 8) * 1e9
    for scheme in ("int8-sym-ch0-fp32", "int8-sym-ch0-bf16", "int4-asymf-g4-bf16"):
        dq = lq.quantize(x, scheme).dequantize()
        assert lq.sqnr(x, dq) > 15


def test_fp16_offset_overflow_is_an_error() -> None:
    """A float offset m = min is stored in the scale dtype too, rounded down: -7e4 overflows
    fp16 although the scale (range / 15) is small. The result must not silently be inf. (A
    minimum of +7e4 is stored as fp16's largest value, 65504, below it, which is fine: the
    scale spans the rest.)"""
    x = torch.full((2, 8), -7e4)
    x[:, 0] = -7.0001e4
    with pytest.raises(LinquantError, match=r"fp32|float32"):
        lq.quantize(x, "int4-asymf-g8-fp16", name=NAME)
    qt = lq.quantize(-x, "int4-asymf-g8-fp16", name=NAME)
    assert qt.offset is not None and float(qt.offset.max()) == 65504.0
    assert float((qt.dequantize() + x).abs().max()) <= float(qt.scale.max()) / 2


@pytest.mark.parametrize("scheme", ["int4-asym-tensor-fp32", "int4-asymf-tensor-fp32"])
def test_range_wider_than_fp32_is_not_silent(scheme: str) -> None:
    """max - min of finite fp32 values can overflow to inf: the scale must never be inf (DESIGN:
    'never 0, NaN or Inf'). Raising a LinquantError is acceptable; NaN output is not."""
    x = torch.tensor([[-3e38, 3e38, 1.0, -2.0]])
    try:
        qt = lq.quantize(x, scheme, name=NAME)
    except LinquantError as e:
        assert NAME in str(e)
        return
    assert bool(torch.isfinite(qt.scale).all())
    assert bool(torch.isfinite(qt.dequantize()).all())


# ---- metrics on known values ---------------------------------------------------------------

def t(*v: float) -> torch.Tensor:
    return torch.tensor(v)


def test_mse_known() -> None:
    assert lq.mse(t(1.0, 2.0, 3.0), t(1.0, 2.0, 5.0)) == pytest.approx(4 / 3, rel=1e-15)
    assert lq.mse(t(0.5, -0.5), t(0.0, 0.0)) == 0.25
    assert lq.mse(t(1.0, 2.0), t(1.0, 2.0)) == 0.0


def test_sqnr_known() -> None:
    assert lq.sqnr(t(3.0, 4.0), t(3.0, 3.0)) == pytest.approx(10 * math.log10(25), rel=1e-15)
    assert lq.sqnr(t(10.0, 0.0), t(9.0, 0.0)) == pytest.approx(20.0, rel=1e-15)
    assert lq.sqnr(t(1.0, -2.0), t(1.0, -2.0)) == math.inf
    assert lq.sqnr(t(0.0, 0.0), t(0.0, 0.0)) == math.inf
    assert lq.sqnr(t(0.0, 0.0), t(1.0, 0.0)) == -math.inf


def test_max_abs_error_known() -> None:
    assert lq.max_abs_error(t(1.0, -2.0, 0.0), t(1.5, -4.0, 0.25)) == 2.0
    assert lq.max_abs_error(t(1.0), t(1.0)) == 0.0


def test_cosine_similarity_known() -> None:
    assert lq.cosine_similarity(t(1.0, 0.0), t(0.0, 1.0)) == 0.0
    assert lq.cosine_similarity(t(1.0, 0.0), t(-3.0, 0.0)) == -1.0
    assert lq.cosine_similarity(t(1.0, 2.0), t(2.0, 4.0)) == pytest.approx(1.0, abs=1e-15)
    assert lq.cosine_similarity(t(1.0, 1.0), t(1.0, 0.0)) == pytest.approx(math.sqrt(0.5),
                                                                          rel=1e-15)
    assert lq.cosine_similarity(t(0.0, 0.0), t(0.0, 0.0)) == 1.0
    assert lq.cosine_similarity(t(0.0, 0.0), t(1.0, 0.0)) == 0.0


def test_metrics_flatten_and_use_fp64() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    y = torch.tensor([[1.0, 2.0], [3.0, 4.5]], dtype=torch.float16)
    assert lq.mse(x, y) == 0.0625
    assert lq.max_abs_error(x, y) == 0.5
    assert isinstance(lq.sqnr(x, y), float)
    # squared errors that underflow fp32 (1e-60) are kept by the fp64 computation
    tiny = float(torch.tensor(1e-30))
    assert lq.mse(t(1e-30, 0.0), t(0.0, 0.0)) == pytest.approx(tiny**2 / 2, rel=1e-12)
    assert lq.sqnr(t(1e-30, 1e-30), t(0.0, 1e-30)) == pytest.approx(10 * math.log10(2),
                                                                    rel=1e-12)


METRICS = [lq.mse, lq.sqnr, lq.max_abs_error, lq.cosine_similarity]


@pytest.mark.parametrize("fn", METRICS, ids=lambda f: f.__name__)
def test_metric_shape_mismatch(fn: object) -> None:
    with pytest.raises(LinquantError, match=re.escape("(2, 3)") + ".*" + re.escape("(3, 2)")):
        fn(torch.zeros(2, 3), torch.zeros(3, 2))  # type: ignore[operator]


@pytest.mark.parametrize("fn", METRICS, ids=lambda f: f.__name__)
def test_metric_bad_inputs(fn: object) -> None:
    with pytest.raises(LinquantError, match=r"two tensors.*list"):
        fn([1.0], torch.zeros(1))  # type: ignore[operator]
    with pytest.raises(LinquantError, match="non-empty"):
        fn(torch.zeros(0), torch.zeros(0))  # type: ignore[operator]


def test_compare_known_values() -> None:
    # int2 asymmetric: s = 1, z = 0; 2.5 rounds to 2 (half to even); every other value exact
    x = t(0.0, 1.0, 2.5, 3.0)
    qt = lq.quantize(x, "int2-asym-tensor-fp32")
    assert qt.dequantize().tolist() == [0.0, 1.0, 2.0, 3.0]
    report = lq.compare(x, qt)
    assert set(report) == {"sqnr_db", "mse", "max_abs_error", "cosine_similarity",
                           "bits_per_weight"}
    assert report["mse"] == 0.0625
    assert report["max_abs_error"] == 0.5
    assert report["sqnr_db"] == pytest.approx(10 * math.log10(16.25 / 0.25), rel=1e-14)
    assert report["cosine_similarity"] == pytest.approx(15 / math.sqrt(16.25 * 14), rel=1e-14)
    assert report["bits_per_weight"] == 2 + (32 + 2) / 4


def test_compare_exact_reconstruction() -> None:
    x = t(-7.0, -3.0, 0.0, 1.0, 7.0, 5.0, -6.0, 2.0)
    report = lq.compare(x, lq.quantize(x, "int4-sym-tensor-fp32"))
    assert report["sqnr_db"] == math.inf
    assert report["mse"] == 0.0 and report["max_abs_error"] == 0.0
    assert report["cosine_similarity"] == pytest.approx(1.0, abs=1e-15)
    assert report["bits_per_weight"] == 4 + 32 / 8


def test_compare_shape_mismatch() -> None:
    qt = lq.quantize(torch.randn(4, 8), "int4-sym-ch0")
    with pytest.raises(LinquantError, match=re.escape("(4, 9)") + ".*" + re.escape("(4, 8)")):
        lq.compare(torch.randn(4, 9), qt)
    with pytest.raises(LinquantError):
        lq.compare(torch.randn(8, 4), qt)


def test_compare_non_tensor() -> None:
    qt = lq.quantize(torch.randn(4, 8), "int4-sym-ch0")
    with pytest.raises(LinquantError, match="list"):
        lq.compare([[0.0] * 8] * 4, qt)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(5,), (), (7, 3), (100, 40, 3), (64, 32)])
def test_check_finite_in_blocks_finds_the_last_element(shape: tuple[int, ...]) -> None:
    """quantize_model's check before it changes anything reads a weight in views of ``block``
    elements: a NaN in the last element, of a transposed (non-contiguous) weight too, is found
    and named as the per-tensor check names it."""
    from linquant.ops.qparams import check_finite

    x = torch.randn(shape)
    x = x.t() if x.dim() == 2 else x
    check_finite(x, "w", block=8)  # finite: passes
    last = tuple(d - 1 for d in x.shape)
    x[last] = float("nan")
    with pytest.raises(LinquantError, match=re.escape(f"w: input holds 1 NaN/Inf value(s), "
                                                      f"first at index {last}")):
        check_finite(x, "w", block=8)


def test_messages_a_user_met_say_what_is_wrong(tmp_path: Path) -> None:
    """Each once said something beside the point (README walk-through)."""
    from torch import nn

    from linquant.kernels import native

    with pytest.raises(LinquantError, match=r"nope: no such folder"):
        lq.load(tmp_path / "nope")
    with pytest.raises(LinquantError, match=r"a preset name, not a config's text form; "
                                            r"get_config\('w8a8'\) takes both"):
        lq.QuantConfig.parse("w8a8")
    with pytest.raises(LinquantError, match=r"native.status: unknown kernel 'foo'; one of "):
        native.status("foo")  # was a KeyError
    with pytest.raises(LinquantError, match=r"^QuantLinear.from_float: "):  # was "QuantLinear ''"
        lq.nn.QuantLinear.from_float(nn.Conv1d(4, 4, 1), "int8-sym-ch0")  # type: ignore[arg-type]
    with pytest.raises(LinquantError, match=r"^QuantLinear 'fc'.from_float: "):
        lq.nn.QuantLinear.from_float(nn.Conv1d(4, 4, 1), "int8-sym-ch0",  # type: ignore[arg-type]
                                     name="fc")
    (tmp_path / "out").mkdir()
    src = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(4, 8)}, str(src))
    with pytest.raises(LinquantError, match=r"pass overwrite=True / --overwrite"):
        lq.quantize_checkpoint(src, tmp_path / "out", "w8a16")


def test_dequantize_takes_quantized_tensors_and_float_dtypes() -> None:
    """``lq.dequantize`` of a plain tensor returned it unchanged (torch's own
    ``Tensor.dequantize``); an integer dtype truncated the values; a dtype's name failed inside
    torch. Names of float dtypes work, others are errors naming what is expected."""
    x = torch.randn(4, 32)
    qt = lq.quantize(x, "int4-asym-g16-fp16")
    with pytest.raises(LinquantError, match=r"expected a QuantizedTensor .*got Tensor"):
        lq.dequantize(x)  # type: ignore[arg-type]
    for bad in (torch.int8, torch.bool, "int8", "nonsense"):
        with pytest.raises(LinquantError, match=r"dtype must be float32, float16, bfloat16 or "
                                                r"float64, got"):
            qt.dequantize(bad)  # type: ignore[arg-type]
    for name, dtype in (("fp16", torch.float16), ("bfloat16", torch.bfloat16),
                        ("torch.float64", torch.float64)):
        assert torch.equal(qt.dequantize(name), qt.dequantize(dtype))
    assert torch.equal(lq.dequantize(qt, "fp16"), qt.dequantize(torch.float16))


def test_a_quantized_tensor_built_by_hand_is_checked() -> None:
    """The constructor checks that its parts fit (sizes and dtypes): a truncated code stream
    failed deep inside unpacking; an asymmetric scheme without its zero points dequantized
    wrong without a word."""
    qt = lq.quantize(torch.randn(8, 32), "int4-asym-g32-fp16")
    parts = dict(qdata=qt.qdata, scale=qt.scale, zero_point_packed=qt.zero_point_packed,
                 offset=None, scheme=qt.scheme, shape=(8, 32), dtype=torch.float32)
    assert torch.equal(lq.QuantizedTensor(**parts).dequantize(), qt.dequantize())
    cases = {
        "qdata": (qt.qdata[:20], r"qdata holds 20 bytes, 256 codes of 4 bits need 128"),
        "zero_point_packed": (None, r"zero_point_packed must be given"),
        "scale": (qt.scale.float(), r"scale must hold 8 torch.float16 value\(s\), got 8 "
                                    r"torch.float32"),
        "offset": (qt.scale, r"offset must be None"),
        "dtype": (torch.int32, r"dtype must be a float dtype"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(LinquantError, match=r"QuantizedTensor of shape \(8, 32\), "
                                                r"int4-asym-g32-fp16: " + message):
            lq.QuantizedTensor(**{**parts, key: value})
