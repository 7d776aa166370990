"""The reference kernels: exact integer products, activation quantization, W8A8 formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import linquant as lq
from linquant import kernels
from linquant.kernels import reference as ref

# ---- int8_matmul ---------------------------------------------------------------------------

SHAPES = [  # (M, K, N): torch._int_mm shapes, the K == 1 bug, odd and CUDA-unfriendly shapes
    (1, 1, 1), (5, 1, 3), (1, 1, 17), (1, 2, 1), (3, 7, 5), (16, 8, 8), (17, 8, 8),
    (17, 9, 7), (33, 129, 17), (64, 256, 40), (0, 8, 8), (4, 0, 3),
]


def _ints(*shape: int, lo: int = -128, hi: int = 128) -> torch.Tensor:
    return torch.randint(lo, hi, shape, dtype=torch.int8)


def _exact(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return a.to(torch.int64) @ w.to(torch.int64).t()


@pytest.mark.parametrize("mkn", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_matmul_is_exact(mkn: tuple[int, int, int]) -> None:
    m, k, n = mkn
    a, w = _ints(m, k), _ints(n, k)
    out = ref.int8_matmul(a, w)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.to(torch.int64), _exact(a, w))


@pytest.mark.parametrize("mkn", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int_mm_and_fallbacks_agree_exactly(mkn: tuple[int, int, int]) -> None:
    m, k, n = mkn
    a, w = _ints(m, k), _ints(n, k)
    exact = _exact(a, w)
    assert torch.equal(ref._exact_mm_int32(a, w).to(torch.int64), exact)
    assert torch.equal(ref._exact_mm_float64(a, w).to(torch.int64), exact)
    if ref.int_mm_supported(a, w):
        assert torch.equal(torch._int_mm(a, w.t()).to(torch.int64), exact)


def test_int8_matmul_extremes_fill_the_int32_accumulator() -> None:
    k = 4096
    a = torch.full((17, k), -128, dtype=torch.int8)
    w = torch.full((8, k), -128, dtype=torch.int8)
    assert ref.int8_matmul(a, w)[0, 0].item() == 128 * 128 * k
    assert ref._exact_mm_float64(a, w)[0, 0].item() == 128 * 128 * k


def test_int_mm_rules_on_cpu() -> None:
    a, w = _ints(4, 1), _ints(3, 1)
    assert not ref.int_mm_supported(a, w)  # K == 1: torch 2.13 CPU returns garbage
    assert ref.int_mm_supported(_ints(1, 2), _ints(3, 2))  # no M > 16 / multiple-of-8 rule
    assert not ref.int_mm_supported(a.to("meta"), w.to("meta"))


@pytest.mark.parametrize(
    "a, w",
    [
        (torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 5, dtype=torch.int8)),
        (torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.int8)),
        (torch.zeros(2, 2, 4, dtype=torch.int8), torch.zeros(3, 4, dtype=torch.int8)),
        (torch.zeros(2, 4), torch.zeros(3, 4)),
    ],
    ids=["k-mismatch", "uint8", "3d", "float"],
)
def test_int8_matmul_rejects_bad_inputs(a: torch.Tensor, w: torch.Tensor) -> None:
    with pytest.raises(lq.LinquantError, match=r"int8_matmul"):
        ref.int8_matmul(a, w)


def test_int8_matmul_rejects_k_that_could_overflow() -> None:
    k = ref.INT32_MAX_K + 1
    with pytest.raises(lq.LinquantError, match=r"overflow"):
        ref.int8_matmul(torch.zeros(1, k, dtype=torch.int8), torch.zeros(1, k, dtype=torch.int8))


# ---- activation quantization ---------------------------------------------------------------


@given(st.integers(1, 5), st.integers(1, 40), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_per_token_codes_in_range_and_error_within_half_step(
    rows: int, cols: int, mag: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * mag
    q, s = ref.quantize_activation_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (rows, 1)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    torch.testing.assert_close(s, x.abs().amax(dim=1, keepdim=True) / 127, rtol=0, atol=0)
    assert bool(((x - q.float() * s).abs() <= s / 2 * (1 + 1e-6)).all())
    # the largest |x| of each token maps to +-127
    assert bool((q.abs().amax(dim=1) == 127).all())


def test_per_token_all_zero_row_and_batch_dims() -> None:
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    x[1, 2] = 0
    q, s = ref.quantize_activation_per_token(x)
    assert q.shape == (2, 3, 8) and s.shape == (2, 3, 1)
    assert bool((q[1, 2] == 0).all()) and float(s[1, 2]) > 0


def test_per_token_nan_token_gives_nan_row_only() -> None:
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    w = _ints(8, 16, lo=-127)
    y = ref.linear_w8a8(x, w, torch.rand(8, 1) / 100, None)
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())


# ---- weight-only ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g16-fp16", "int3-asymf-g8-bf16"])
def test_linear_weight_only_is_f_linear_on_dequantized(dtype: torch.dtype, scheme: str) -> None:
    w = torch.randn(24, 32)
    qw = lq.quantize(w, scheme)
    x = torch.randn(2, 5, 32, dtype=dtype)
    b = torch.randn(24)
    y = kernels.linear_weight_only(x, qw, b)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    expected = F.linear(x, qw.dequantize(dtype), b.to(dtype))
    assert torch.equal(y, expected)


def test_linear_weight_only_rejects_int_input() -> None:
    qw = lq.quantize(torch.randn(4, 8), "int8-sym-ch0")
    with pytest.raises(lq.LinquantError, match=r"float"):
        kernels.linear_weight_only(torch.ones(2, 8, dtype=torch.int64), qw)


@pytest.mark.parametrize(
    "shape, scheme",
    [
        ((13, 24), "int3-asym-g8"),
        ((13, 24), "int4-sym-g12-fp16"),
        ((13, 24), "int8-asym-g8"),
        ((13, 7), "int3-sym-ch0"),  # rows not byte-aligned
        ((13, 7), "int5-asymf-tensor-bf16"),
        ((13, 7), "int7-asym-ch1"),
        ((13, 7), "int6-asym-g7"),
        ((13, 7), "int2-sym-ch-1"),
    ],
)
def test_dequantize_rows_equals_full_dequantize(shape: tuple[int, int], scheme: str) -> None:
    qt = lq.quantize(torch.randn(shape), scheme)
    rows = torch.tensor([0, 12, 5, 5, 3, 1])
    got = ref.dequantize_rows(qt, rows, torch.float32)
    assert torch.equal(got, qt.dequantize()[rows])
    assert ref.dequantize_rows(qt, rows[:0], torch.float32).shape == (0, shape[1])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), dim=st.integers(1, 40), bits=st.integers(2, 8),
       mode=st.sampled_from(["sym", "asym", "asymf"]),
       gran=st.sampled_from(["ch0", "ch1", "tensor", "g"]), group=st.sampled_from([1, 2, 4, 5]),
       ids=st.lists(st.integers(0, 10**6), max_size=40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_dequantize_rows_property(n: int, dim: int, bits: int, mode: str, gran: str, group: int,
                                  ids: list[int], dtype: torch.dtype, seed: int) -> None:
    """Rows gathered from the packed stream equal rows of the whole dequantized table, byte-
    aligned rows (``dim * bits % 8 == 0``) or not, for every width, mode and granularity."""
    if gran == "g":
        dim = group * max(1, dim // group)
        gran = f"g{group}"
    g = torch.Generator().manual_seed(seed)
    qt = lq.quantize(torch.randn(n, dim, generator=g), f"int{bits}-{mode}-{gran}-fp16")
    rows = torch.tensor([i % n for i in ids], dtype=torch.int64)
    assert torch.equal(ref.dequantize_rows(qt, rows, dtype), qt.dequantize(dtype)[rows])


# ---- W8A8 ----------------------------------------------------------------------------------


def _w8a8_operands(
    n: int = 24, k: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k)
    qw = lq.quantize(w, "int8-sym-ch0")
    w_int8 = qw.codes()  # int8 [n, k]
    return w, w_int8, qw.scale, torch.randn(n)


def test_w8a8_dynamic_matches_exact_integer_formula() -> None:
    _, w_q, w_s, b = _w8a8_operands()
    x = torch.randn(3, 7, 40)
    y = kernels.linear_w8a8(x, w_q, w_s, b)
    a_q, a_s = ref.quantize_activation_per_token(x.reshape(-1, 40))
    acc = _exact(a_q, w_q)  # exact, int64
    expected = (acc.double() * a_s.double() * w_s.double().reshape(1, -1) + b.double())
    torch.testing.assert_close(y.reshape(-1, 24).double(), expected, rtol=1e-6, atol=1e-5)
    # and the int32 accumulation inside is the exact product
    assert torch.equal(ref.int8_matmul(a_q, w_q).to(torch.int64), acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_w8a8_output_dtype_and_bias_none(dtype: torch.dtype) -> None:
    _, w_q, w_s, _ = _w8a8_operands()
    x = torch.randn(2, 4, 40, dtype=dtype)
    y = kernels.linear_w8a8(x, w_q, w_s, None)
    assert y.dtype == dtype and y.shape == (2, 4, 24)


def test_w8a8_static_symmetric_formula() -> None:
    _, w_q, w_s, b = _w8a8_operands()
    x = torch.randn(9, 40)
    s_a = torch.tensor(x.abs().max().item() / 127)
    y = kernels.linear_w8a8(x, w_q, w_s, b, act_scale=s_a)
    a_q = torch.clamp(torch.round(x / s_a), -127, 127)
    expected = (a_q.double() @ w_q.double().t()) * (float(s_a) * w_s.double().reshape(1, -1))
    torch.testing.assert_close(y.double(), expected + b.double(), rtol=1e-6, atol=1e-5)


def test_w8a8_static_asymmetric_equals_float_reference_of_shifted_codes() -> None:
    _, w_q, w_s, b = _w8a8_operands()
    x = torch.rand(11, 40) * 3 - 0.5  # skewed range: zero point far from the middle
    s_a = torch.tensor(3.0 / 255)
    z_a = torch.tensor(43, dtype=torch.uint8)
    y = kernels.linear_w8a8(x, w_q, w_s, b, act_scale=s_a, act_zero_point=z_a)
    a_q = torch.clamp(torch.round(x / s_a) + 43, 0, 255)
    expected = ((a_q.double() - 43) @ w_q.double().t()) * (
        float(s_a) * w_s.double().reshape(1, -1)
    ) + b.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-5)
    # the integer correction is exact: A_q W^T - z rowsum(W) == (A_q - z) W^T
    a_u = ref.quantize_activation_per_tensor(x, s_a, z_a)
    lhs = _exact(a_u.to(torch.int16).sub(128).to(torch.int8), w_q) - (43 - 128) * w_q.to(
        torch.int64).sum(dim=1)
    assert torch.equal(lhs, (a_u.to(torch.int64) - 43) @ w_q.to(torch.int64).t())


def test_w8a8_zero_point_without_scale_is_refused() -> None:
    _, w_q, w_s, _ = _w8a8_operands()
    with pytest.raises(lq.LinquantError, match=r"act_scale"):
        kernels.linear_w8a8(torch.randn(2, 40), w_q, w_s, None,
                            act_zero_point=torch.tensor(3, dtype=torch.uint8))
