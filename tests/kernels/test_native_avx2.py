"""linquant's AVX2 weight-only kernel (linquant.kernels.native, ``cpu_native_avx2``) against the
reference, its layout, its dispatcher rows, and the ISA cap.

Tolerances: within half-precision tolerance of the reference (|y - ref| <= HALF_TOL * max|ref|);
against the exact product, one rounding of the output to x.dtype plus fp32 accumulation error;
bit-exact where every sum is exact in fp32, and under power-of-two scaling of a token. Thread-count
independence and non-finite tokens: tests/kernels/test_native.py (parametrized over both kernels).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linquant as lq
from linquant import kernels
from linquant.kernels import native
from linquant.kernels import reference as ref
from linquant.nn import QuantLinear, clear_kernel_caches

HALF_TOL = 2e-2
needs_avx2 = pytest.mark.skipif(not native.available("avx2"),
                                reason=f"AVX2 kernel {native.status('avx2')}")
linux_x86 = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"),
    reason="the native kernels are built on Linux x86-64 only")

SCHEMES = ["int4-sym-g32-fp16", "int4-asym-g64-bf16", "int4-asymf-g128-fp32", "int4-sym-g8",
           "int4-sym-ch0", "int4-asym-tensor", "int8-sym-ch0", "int8-asym-g32-fp16",
           "int8-asymf-g64", "int8-sym-g4", "int8-sym-tensor"]
HALF = [torch.bfloat16, torch.float16]
ALL = [*HALF, torch.float32]
FP32_TOL = 1e-5  # cpu_blocked's fp32 tolerance (tests/kernels/test_cpu.py)


def _close(y: torch.Tensor, r: torch.Tensor, rel: float) -> None:
    assert y.shape == r.shape and y.dtype == r.dtype
    err = (y.double() - r.double()).abs().max().item()
    bound = rel * max(r.double().abs().max().item(), 1e-6)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _qt(n: int, k: int, scheme: str, seed: int = 0) -> lq.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.3 * torch.rand(n, 1, generator=g)
    return lq.quantize(w, scheme)


def _lib():  # type: ignore[no-untyped-def]
    lib = native._load(native.AVX2)
    assert lib is not None
    return lib


# ---- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int4-sym-g32", "int4-asym-g64", "int8-sym-ch0",
                                    "int8-asym-g32", "int4-asymf-g32", "int8-asymf-g32"])
def test_layout_words_hold_the_unsigned_codes_from_the_low_bits_up(scheme: str) -> None:
    n, k = 19, 64  # a ragged last block of 8 rows
    qt = _qt(n, k, scheme)
    bits = qt.scheme.bits
    per = 32 // bits
    codes, scales, params, fmt = native.repack_avx2(qt, compact=False)
    assert codes.dtype == torch.int32 and codes.shape == (3, k // per, 8)
    words = codes.permute(0, 2, 1).reshape(24, k // per).long() & 0xFFFFFFFF
    shifts = torch.arange(per) * bits
    got = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [24, K / P, P]
    from linquant.ops.affine import sign_extend
    from linquant.ops.packing import unpack
    u = unpack(qt.qdata, bits, n * k).view(n, k).long()
    if qt.scheme.symmetric:
        u = sign_extend(u.to(torch.uint8), bits).long() + (1 << (bits - 1))
    assert torch.equal(got.reshape(24, k)[:n], u)
    assert torch.equal(got.reshape(24, k)[n:], torch.zeros(24 - n, k, dtype=torch.long))
    # w = s (u - c) + o_c per (row, group): the weight up to o_c's fp32 rounding
    g = int(qt.scheme.group_size or k)

    def per_code(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 1).reshape(24, k // g)[:n].double().repeat_interleave(g, 1)

    assert scales.dtype == torch.float32 and params.dtype == torch.uint8
    if qt.scheme.has_offset:  # records: 8 rows' fp32 offsets, then their 8 centers
        assert fmt == native.AVX2_FMT_OFFSET and params.shape == (3, k // g, 40)
        offsets = params[..., :32].contiguous().view(torch.float32)
        centers = params[..., 32:]
    else:  # centers only (the zero points, or 2^(bits - 1)): no offset
        assert fmt == native.AVX2_FMT_CENTER and params.shape == (3, k // g, 8)
        offsets, centers = torch.zeros(params.shape), params
    s, o, c = per_code(scales), per_code(offsets), per_code(centers)
    w = qt.dequantize(torch.float64)
    torch.testing.assert_close(s * (u.double() - c) + o, w, rtol=0,
                               atol=2e-7 * w.abs().max().item())
    assert (o.abs() <= s / 2 * (1 + 1e-6)).all()  # c: the code nearest to w = 0


def test_compact_layout_only_where_exact() -> None:
    assert native.repack_avx2(_qt(32, 64, "int4-asymf-g32-fp16"))[3] == native.AVX2_FMT_OFFSET
    fp32 = native.repack_avx2(_qt(32, 64, "int8-sym-g32-fp32"))
    assert fp32[3] == native.AVX2_FMT_CENTER and fp32[1].dtype == torch.float32
    c = native.repack_avx2(_qt(32, 64, "int8-asym-g32-bf16"))  # bf16 scales: exact in fp16
    assert c[3] == native.AVX2_FMT_COMPACT
    assert c[1].dtype == torch.float16 and c[2].dtype == torch.uint8
    with pytest.raises(lq.LinquantError, match="compact layout"):
        native.repack_avx2(_qt(32, 64, "int4-sym-g32-fp32"), compact=True)


# ---- numerics ----------------------------------------------------------------------------------


@needs_avx2
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_avx2_matches_reference(scheme: str, dtype: torch.dtype) -> None:
    tol = FP32_TOL if dtype == torch.float32 else HALF_TOL
    for n, k in ((48, 256), (100, 512), (7, 128)):  # ragged last blocks of 8 rows
        qt = _qt(n, k, scheme)
        assert native.avx2_supported(qt, dtype)
        bias = torch.randn(n)
        cache: dict[str, object] = {}
        for m in (1, 2, 3, 5, 9, 15):  # every row tile: 8, 4, 2, 1
            x = torch.randn(m, k).to(dtype)
            _close(native.linear_avx2(x, qt, bias, cache), ref.linear_weight_only(x, qt, bias),
                   tol)
        x3 = torch.randn(2, 5, k).to(dtype)
        _close(native.linear_avx2(x3, qt, None, cache), ref.linear_weight_only(x3, qt, None),
               tol)
        assert list(cache) == ["native_avx2"]


@needs_avx2
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("scheme", ["int4-sym-g32", "int4-asym-ch0", "int4-asymf-g64",
                                    "int8-sym-ch0", "int8-asym-g128"])
def test_avx2_error_against_exact_product_is_within_its_bound(scheme: str,
                                                              dtype: torch.dtype) -> None:
    """|y - exact| <= one rounding to x.dtype + fp32 accumulation error of the offset sums."""
    n, k = 96, 512
    qt = _qt(n, k, scheme, seed=2)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(11, k, generator=g) * torch.logspace(-2, 2, 11).reshape(11, 1)).to(dtype)
    bias = torch.randn(n)
    y = native.linear_avx2(x, qt, bias, {}).double()
    w = qt.dequantize(torch.float64)
    exact = x.double() @ w.T + bias.to(dtype).double()
    group = int(qt.scheme.group_size or k)
    s = qt.scale.double().reshape(n, -1).repeat_interleave(group, dim=1).expand(n, k)
    z = x.double().abs() @ (w.abs() + 2**qt.scheme.bits * s.abs()).T  # what the fp32 sums see
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    bound = rounding * exact.abs() + 2.0**-16 * z
    assert bool(((y - exact).abs() <= bound).all())


@needs_avx2
@pytest.mark.parametrize("scheme", ["int4-sym-g32", "int4-asym-ch0", "int4-asymf-g64",
                                    "int8-sym-ch0", "int8-asym-g128", "int8-asym-ch0"])
def test_avx2_fp32_error_against_exact_product_is_within_its_bound(scheme: str) -> None:
    """fp32 activations, centered codes: |y - exact| <= one fp32 rounding of the output plus
    the fp32 rounding of every partial sum (each of the 8 chains per token sums K / 8 terms)
    and of the per-group epilogue, over the magnitudes the sums see."""
    n, k = 96, 1024
    qt = _qt(n, k, scheme, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, k, generator=g) * torch.logspace(-3, 3, 11).reshape(11, 1)
    bias = torch.randn(n)
    y = native.linear_avx2(x, qt, bias, {}).double()
    w = qt.dequantize(torch.float64)
    exact = x.double() @ w.T + bias.double()
    bits = qt.scheme.bits
    group = int(qt.scheme.group_size or k)
    s = qt.scale.double().reshape(n, -1).repeat_interleave(group, dim=1).expand(n, k)
    z = x.double().abs() @ (w.abs() + 2 ** (bits - 1) * s.abs()).T + bias.abs().double()
    bound = 2.0**-24 * exact.abs() + (k / 8 + k / group + 8) * 2.0**-24 * z
    assert bool(((y - exact).abs() <= bound).all())
    # and far inside it in practice: as close to the exact product as the reference
    r = ref.linear_weight_only(x, qt, bias).double()
    assert (y - exact).abs().max() <= 8 * max((r - exact).abs().max().item(), 1e-30)


@needs_avx2
@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int8-asym-ch0", "int4-sym-ch0"])
def test_avx2_fp32_sums_carry_no_code_offset(scheme: str) -> None:
    """Tokens with a large mean, one group over K = 4096: with the codes' 2^(bits - 1) offset
    in the sums (as for 16-bit activations) the fp32 error was 300x the reference's (1.2e-4 of
    max|y|), with centered codes but one sum over K 8.6e-6 of max|y| for the asymmetric weight
    (the offset s (2^(bits - 1) - z)); centered codes in parts of 256 keep it near the
    reference's (1.2e-6 here; the reference's was 2.7e-7 to 1e-6, by thread count)."""
    g = torch.Generator().manual_seed(8)
    qt = lq.quantize(torch.randn(64, 4096, generator=g), scheme)
    x = 4 + 0.5 * torch.randn(5, 4096, generator=g)
    exact = x.double() @ qt.dequantize(torch.float64).T
    y = native.linear_avx2(x, qt, None, {}).double()
    assert (y - exact).abs().max() <= 3e-6 * exact.abs().max()


@needs_avx2
@pytest.mark.parametrize("scheme", ["int8-asym-ch0", "int4-asym-ch0", "int8-asymf-g256",
                                    "int4-asymf-g128", "int8-asym-g32-fp16", "int8-sym-ch0"])
def test_avx2_fp32_weights_with_an_outlier_stay_near_the_reference(scheme: str) -> None:
    """One outlier weight of 60 per row (an LLM's outlier channel): an asymmetric weight's
    zero then sits near the bottom of the code range, and sums of codes centered at
    2^(bits - 1) carried about 114 sum(x) that the offset term cancelled: with activations of
    mean 1, 5.6e-5 of max|y| away from the reference (int8-asym-ch0; the tolerance is 1e-5,
    the reference's own error 5e-7). Codes centered at each row's zero now: near the
    reference."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g)
    w[:, 0] = 60.0
    qt = lq.quantize(w, scheme)
    x = torch.randn(16, 1024, generator=g) + 1.0
    exact = x.double() @ qt.dequantize(torch.float64).T
    y = native.linear_avx2(x, qt, None, {}).double()
    r = ref.linear_weight_only(x, qt, None).double()
    top = exact.abs().max()
    assert (y - r).abs().max() <= 3e-6 * top
    assert (y - exact).abs().max() <= 4 * max((r - exact).abs().max().item(), 1e-7 * top)


@needs_avx2
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("scheme", ["int4-sym-ch0", "int4-asym-g32", "int8-sym-ch0",
                                    "int8-asym-g64"])
def test_avx2_is_exact_when_every_sum_is(scheme: str, dtype: torch.dtype) -> None:
    """Small-integer activations, codes covering the whole range at every position of a word
    and power-of-two scales: every fp32 sum is exact, so the output is the exact product
    rounded once to x.dtype."""
    g = torch.Generator().manual_seed(4)
    bits = int(scheme[3])
    n, k, m = 40, 256, 13
    group = int(scheme.split("-g")[1]) if "-g" in scheme else k
    sym = "-sym-" in scheme
    lo, hi = (-(1 << (bits - 1)) + sym), (1 << (bits - 1)) - 1  # symmetric codes: +-(2^(b-1) - 1)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g).float()
    codes[:, 0::group], codes[:, 1::group] = hi, lo  # each group's range: a power-of-two scale
    per = 32 // bits
    codes[:5, per - 1::per] = lo  # the extremes at the last position of a word (shifted down)
    codes[5:10, per - 1::per] = hi
    w = codes * 0.25 + (0.5 if not sym else 0.0)
    qt = lq.quantize(w, scheme)
    assert torch.equal(qt.dequantize(torch.float64), w.double())
    x = torch.randint(-9, 10, (m, k), generator=g).to(dtype)
    y = native.linear_avx2(x, qt, None, {})
    exact = x.double() @ w.double().T
    assert torch.equal(y, exact.to(dtype))


@needs_avx2
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_tokens_scaled_by_powers_of_two_give_exactly_scaled_outputs(dtype: torch.dtype) -> None:
    """Each token is brought to [1, 2) by a power of two before the products: tokens far
    outside that range (where the per-position factors down to 2^-28 would underflow without
    it) give bit for bit the scaled result."""
    qt = _qt(64, 256, "int4-asym-g32")
    g = torch.Generator().manual_seed(5)
    x = ((torch.rand(3, 256, generator=g) + 0.5) * torch.randn(3, 256, generator=g).sign())
    x = x.to(dtype)  # no element near zero: every scaled input below is exact
    y = native.linear_avx2(x, qt, None, {}).float()
    tiny = 2.0**-14 if dtype == torch.float16 else 2.0**-126  # smallest normal
    exps = (-10, -4, 4, 6) if dtype == torch.float16 else (-122, -110, -60, 60, 100)
    for e in exps:
        xe = x * 2.0**e
        assert torch.equal(xe.float(), x.float() * 2.0**e)
        ye = native.linear_avx2(xe, qt, None, {}).float()
        want = y * 2.0**e
        normal = want.abs() >= tiny  # rounding a subnormal result does not commute with 2^e
        assert int(normal.sum()) > 120
        assert torch.equal(ye[normal], want[normal]), e


@needs_avx2
@pytest.mark.parametrize("scheme", ["int4-sym-g32-fp16", "int8-asym-g64-fp16", "int4-sym-ch0-fp16"])
def test_compact_scales_give_the_same_bits_as_fp32_scales(
        scheme: str, one_signed_qt: Callable[[str], lq.QuantizedTensor]) -> None:
    qt = one_signed_qt(scheme)  # zero points at both ends of their range
    compact, full = native.repack_avx2(qt), native.repack_avx2(qt, compact=False)
    assert (compact[3], full[3]) == (native.AVX2_FMT_COMPACT, native.AVX2_FMT_CENTER)
    assert 5 * (compact[1].nbytes + compact[2].nbytes) == 3 * (full[1].nbytes + full[2].nbytes)
    x = torch.randn(11, 256).bfloat16()
    bias = torch.randn(100)
    a = native._run_avx2(_lib(), x, qt, compact, bias)
    b = native._run_avx2(_lib(), x, qt, full, bias)
    assert a is not None and b is not None and torch.equal(a, b)


@needs_avx2
def test_padded_activation_rows_are_never_read_and_short_rows_are_refused() -> None:
    """The prepared activations' rows are ldx >= K floats apart (native.py pads them by 16):
    NaN in the padding changes nothing, bit for bit, at every tile size; ldx < K is refused
    (-1) before anything is written."""
    qt = _qt(24, 256, "int4-asym-g32")
    codes, scales, offsets, compact = native.repack_avx2(qt)
    for m in (1, 3, 8, 15):
        x = torch.randn(m, 256).bfloat16()
        want = native._run_avx2(_lib(), x, qt, (codes, scales, offsets, compact), None)
        for ldx in (256 + 16, 256 + 5):
            xp = torch.full((m, ldx), float("nan"))
            xs, ts = torch.empty(m, 256 // 32), torch.empty(m)
            y = torch.empty(m, 24)
            bad = _lib().lq_wa16_avx2(codes.data_ptr(), scales.data_ptr(), offsets.data_ptr(),
                                      int(compact), x.data_ptr(), 0, xp.data_ptr(), ldx,
                                      xs.data_ptr(), ts.data_ptr(), None, y.data_ptr(), m, 24,
                                      256, 32, 4)
            assert bad == 0 and want is not None
            assert torch.equal(y.bfloat16(), want), (m, ldx)
            assert torch.isnan(xp[:, 256:]).all()
    y = torch.zeros(1, 24)
    xp = torch.zeros(1, 256)
    assert _lib().lq_wa16_avx2(codes.data_ptr(), scales.data_ptr(), offsets.data_ptr(),
                               int(compact), x.data_ptr(), 0, xp.data_ptr(), 255,
                               xs.data_ptr(), ts.data_ptr(), None, y.data_ptr(), 1, 24, 256,
                               32, 4) == -1
    assert not y.any() and not xp.any()


@needs_avx2
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), nblocks=st.integers(1, 5), tail=st.integers(0, 7),
       groups=st.integers(1, 4), gwords=st.sampled_from([1, 2, 4, 8]), bits=st.sampled_from([4, 8]),
       mode=st.sampled_from(["sym", "asym", "asymf"]), half=st.sampled_from(HALF),
       seed=st.integers(0, 2**16))
def test_avx2_equals_reference_property(m: int, nblocks: int, tail: int, groups: int,
                                        gwords: int, bits: int, mode: str, half: torch.dtype,
                                        seed: int) -> None:
    group = gwords * 32 // bits
    n, k = 8 * nblocks - (8 - tail if tail else 0), groups * group
    qt = _qt(n, k, f"int{bits}-{mode}-g{group}", seed)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).to(half)
    _close(native.linear_avx2(x, qt, None, None), ref.linear_weight_only(x, qt, None), HALF_TOL)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_avx2_over_several_token_chunks_gives_the_bits_of_tile_sized_calls(
        dtype: torch.dtype, poisoned_empty: Any) -> None:
    """wa16_avx2.c takes the tokens in chunks of about 1 MiB of prepared activations
    (CHUNK_BYTES: 56 tokens at K = 4096). A token's result depends on its tile only, and the
    chunks are multiples of 8 tokens, so 125 tokens (two whole chunks, then tiles of 8, 4 and
    1) give the bits of the same tokens run 8 at a time, with the reference's accuracy."""
    n, k = 20, 4096  # 3 row blocks, the last one partial
    qt = _qt(n, k, "int4-asym-g32-fp16")
    x = (torch.randn(125, k, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    bias = torch.randn(n)
    cache: dict[str, Any] = {}
    with poisoned_empty():  # a row the kernel skipped stays NaN
        y = native.linear_avx2(x, qt, bias, cache)
    parts = [native.linear_avx2(x[i:i + 8], qt, bias, cache) for i in range(0, len(x), 8)]
    assert torch.equal(y, torch.cat(parts))
    _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL if dtype != torch.float32 else 1e-5)


@needs_avx2
def test_avx2_support_matrix() -> None:
    bf = torch.bfloat16
    assert native.avx2_supported(_qt(16, 64, "int4-sym-g8"), bf)
    assert native.avx2_supported(_qt(16, 64, "int8-sym-g4"), torch.float16)
    assert not native.avx2_supported(_qt(16, 64, "int4-sym-g4"), bf)  # half a 32-bit word
    assert not native.avx2_supported(_qt(16, 60, "int4-sym-ch0"), bf)  # K % 8 != 0
    assert native.avx2_supported(_qt(16, 60, "int8-sym-ch0"), bf)  # K % 4 == 0
    assert not native.avx2_supported(_qt(16, 64, "int2-sym-g32"), bf)
    assert native.avx2_supported(_qt(16, 64, "int4-sym-g32"), torch.float32)
    assert not native.avx2_supported(_qt(16, 64, "int4-sym-g32"), torch.float64)
    assert not native.avx2_supported(_qt(16, 64, "int4-sym-ch1"), bf)  # per input channel


# ---- dispatcher and layers ---------------------------------------------------------------------


@needs_avx2
def test_fp16_int4_layer_runs_avx2_caches_layout_and_clears() -> None:
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(512, 256), "int4-asym-g32-fp16").to(torch.float16)
    x = torch.randn(4, 512).half()
    assert kernels.select_path(x, q.qweight) == "cpu_native_avx2"
    y = q(x)
    _close(y, ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    assert list(q.kernel_cache()) == ["native_avx2", "cpu_plans"]
    assert clear_kernel_caches(q) == 1 and q.kernel_cache() == {}
    assert torch.equal(q(x), y)


# ---- the ISA cap and the CPU check --------------------------------------------------------------


@linux_x86
def test_isa_cap_leaves_only_the_avx2_kernel(monkeypatch: pytest.MonkeyPatch,
                                            fresh_native: Path) -> None:
    monkeypatch.setenv("LINQUANT_MAX_CPU_ISA", "avx2")
    assert native.status("w4a16") == "unavailable: capped at AVX2 by LINQUANT_MAX_CPU_ISA"
    assert native.status("w8a8") == "unavailable: capped at AVX2 by LINQUANT_MAX_CPU_ISA"
    assert not native.wide_dequant()  # the dequantizers' AVX-512 code is off too
    if not native.available("avx2"):
        pytest.skip(f"AVX2 kernel {native.status('avx2')}")
    bf = torch.bfloat16
    q4, q8 = _qt(256, 512, "int4-sym-g32"), _qt(1024, 1024, "int8-sym-ch0")
    for m in (1, 16, 256):
        assert kernels.select_path(torch.zeros(m, 512, dtype=bf), q4) == "cpu_native_avx2"
        assert kernels.select_path(torch.zeros(m, 1024, dtype=bf), q8) == "cpu_native_avx2"
    assert kernels.select_path(torch.zeros(3, 512), q4) == "cpu_native_avx2"  # fp32 math
    assert kernels.select_path(torch.zeros(65, 512), q4) == "cpu_blocked"
    assert kernels.NATIVE_AVX2_MAX_M_FP32 == 64
    # W8A8: the AVX2 W8A8 library (not capped) instead of the VNNI one
    assert native.available("w8a8_avx2"), native.status("w8a8_avx2")
    w8 = torch.zeros(512, 256, dtype=torch.int8)
    for m in (1, 16, 256):
        assert kernels.select_w8a8_path(torch.zeros(m, 256), w8) == "cpu_native_w8a8_avx2"


@linux_x86
def test_avx2_kernel_checks_its_cpu_features(monkeypatch: pytest.MonkeyPatch,
                                             fresh_native: Path) -> None:
    monkeypatch.setattr(native, "_cpu_has_avx2_fma", lambda: False)
    assert native.status("avx2") == "unavailable: this CPU lacks AVX2, FMA and F16C"
    assert not native.avx2_supported(_qt(16, 64, "int4-sym-g32"), torch.float16)
    assert not fresh_native.exists()  # nothing was built


# ---- the dequantizer of the scratch paths (lq_dequant_rows) ---------------------------------

DEQ_SCHEMES = ["int4-sym-g32-fp16", "int4-asym-g64-bf16", "int4-asymf-g128", "int4-sym-g4",
               "int4-asym-ch0", "int4-sym-ch1", "int4-asymf-tensor", "int8-sym-ch0",
               "int8-asym-g32-fp16", "int8-asymf-ch1-bf16", "int8-sym-g8", "int2-asym-g16",
               "int3-sym-g8", "int5-asymf-ch0", "int6-sym-tensor", "int7-asym-g4",
               "int4-asym-g16", "int8-asymf-g16-fp16", "int4-asym-ch1", "int8-asym-ch1",
               "int4-asymf-g32-bf16"]
# which code each (scheme, K) of the tests below runs, with and without AVX-512: 4-bit groups
# of 32 or more by table, 16 codes by arithmetic, 8 codes (AVX2), one code at a time
DEQ_K = [256, 48, 40]
needs_wide = pytest.mark.skipif(not native.wide_dequant(),
                                reason="the dequantizers' AVX-512 code needs AVX-512 F, BW, VL")
WIDE = [False, pytest.param(True, marks=needs_wide)]


def _deq_k(scheme: str, k: int) -> int:
    gran = scheme.split("-")[2]
    if gran.startswith("g") and k % int(gran[1:]):
        return 2 * int(gran[1:])  # the group must divide K
    return k


@needs_avx2
@pytest.mark.parametrize("wide", WIDE)
@pytest.mark.parametrize("scheme", DEQ_SCHEMES)
@pytest.mark.parametrize("k", DEQ_K)  # 16-code rows; 8-code rows; scalar (K % 8 != 0)
def test_dequantizer_is_bit_identical_to_pytorch(scheme: str, k: int, wide: bool) -> None:
    """The native dequantizer writes the same bits as the PyTorch ops it replaces
    (``(c - z) * s + m`` in fp32, rounded to nearest even) for every width, mode and
    granularity, into bf16 / fp16 / fp32 buffers, for whole weights and row ranges; large
    parameters round to Inf in fp16 as PyTorch's conversion does. Its AVX-512 code (tables
    and arithmetic) and its AVX2 code alike."""
    from linquant.kernels import cpu

    k = _deq_k(scheme, k)
    n = 21
    qt = _qt(n, k, scheme, seed=k)
    if "fp16" not in scheme and "bf16" not in scheme:
        qt.scale = qt.scale * 3e4  # fp16 overflow on some weights
    elif qt.offset is not None:
        qt.offset = qt.offset.float()  # offsets read in their own dtype, not the scales'
    slow = cpu._RowDequant(qt, native=False)
    fast = cpu._RowDequant(qt)
    assert fast.fast is not None
    fast.fast = native._dequantizer(qt, wide=wide)
    for dtype in ALL:
        for r0, r1 in ((0, n), (8, 21), (3, 4)):
            want = torch.full((r1 - r0, k), 7.0, dtype=dtype)
            got = torch.full((r1 - r0, k), 7.0, dtype=dtype)
            slow.into(want, r0, r1)
            fast.into(got, r0, r1)
            assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               want.view(torch.int16 if dtype != torch.float32 else torch.int32)
                               ), (scheme, dtype, r0, r1)


@needs_avx2
@pytest.mark.parametrize("wide", WIDE)
@pytest.mark.parametrize("scheme", ["int4-asym-g32-fp32", "int4-sym-ch1-fp32",
                                    "int8-asymf-g16-fp32", "int8-sym-g8-fp32"])
def test_dequantizer_keeps_nan_and_inf(scheme: str, wide: bool) -> None:
    """Non-finite scales (fp32 NaNs whose payload would carry into the exponent when rounded,
    of either sign, and Inf) give NaN and Inf exactly where the PyTorch ops do, and every
    other element the same bits. (NaN bits themselves differ: PyTorch's own fp32 -> bf16
    conversion writes 0x7FC0 or 0xFFFF depending on its code path.)"""
    from linquant.kernels import cpu

    qt = _qt(6, 64, scheme)
    raw = qt.scale.clone().view(torch.int32)
    raw.view(-1)[0] = 0x7FFFFFFF
    raw.view(-1)[3] = -1  # 0xFFFFFFFF
    scale = raw.view(torch.float32)
    scale.view(-1)[5] = float("inf")
    qt.scale = scale
    for dtype in ALL:
        want = torch.empty(6, 64, dtype=dtype)
        got = torch.empty(6, 64, dtype=dtype)
        cpu._RowDequant(qt, native=False).into(want, 0, 6)
        run = native._dequantizer(qt, wide=wide)
        assert run is not None and run(got, 0, 6)
        nan = want.isnan()
        assert nan.any() and torch.equal(got.isnan(), nan), dtype
        assert want.isinf().any() and torch.equal(_bits(got[~nan]), _bits(want[~nan])), dtype
        rows = torch.tensor([5, 0, 3])
        gathered = native.dequantize_rows(qt, rows, dtype, wide=wide)
        assert gathered is not None and torch.equal(gathered.isnan(), nan[rows])


@needs_avx2
def test_dequantizer_falls_back_for_buffers_it_does_not_take() -> None:
    """A non-contiguous or float64 buffer goes to the PyTorch ops (same values)."""
    from linquant.kernels import cpu

    qt = _qt(16, 64, "int4-asym-g32")
    deq = cpu._RowDequant(qt)
    want = torch.empty(16, 64, dtype=torch.float64)
    cpu._RowDequant(qt, native=False).into(want, 0, 16)
    got = torch.empty(16, 64, dtype=torch.float64)
    deq.into(got, 0, 16)
    assert torch.equal(got, want)
    strided = torch.empty(64, 16, dtype=torch.float32).t()
    deq.into(strided, 0, 16)
    assert torch.equal(strided, want.float())


@needs_avx2
@pytest.mark.parametrize("path", ["cpu_scratch", "cpu_blocked"])
def test_scratch_paths_unchanged_by_the_native_dequantizer(path: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The scratch and blocked paths give the same outputs with and without it (the same
    dequantized weight into the same matmul)."""
    from linquant.kernels import cpu

    qt = _qt(300, 128, "int4-asym-g32-fp16")
    x = torch.randn(70, 128).bfloat16()
    run = getattr(cpu, path.replace("cpu_", "linear_"))
    fast = run(x, qt, None)
    monkeypatch.setattr(native, "_dequantizer", lambda qt, lib=None: None)
    assert torch.equal(fast, run(x, qt, None))


# ---- gathered rows of an embedding table (lq_dequant_gather) --------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@needs_avx2
@pytest.mark.parametrize("wide", WIDE)
@pytest.mark.parametrize("scheme", DEQ_SCHEMES)
@pytest.mark.parametrize("k", DEQ_K)
def test_gathered_rows_are_bit_identical_to_the_reference(scheme: str, k: int,
                                                          wide: bool) -> None:
    """``native.dequantize_rows`` writes the reference's bits for rows in any order, repeated,
    first and last, for every width, mode and granularity, into bf16 / fp16 / fp32."""
    k = _deq_k(scheme, k)
    n = 37
    qt = _qt(n, k, scheme, seed=k + 1)
    if "fp16" not in scheme and "bf16" not in scheme:
        qt.scale = qt.scale * 3e4  # fp16 overflow on some rows
    rows = torch.tensor([36, 0, 5, 5, 17, 36, 1, 0])
    for dtype in ALL:
        got = native.dequantize_rows(qt, rows, dtype, wide=wide)
        assert got is not None and got.shape == (8, k) and got.dtype == dtype
        want = ref.dequantize_rows(qt, rows, dtype)
        assert torch.equal(_bits(got), _bits(want)), (scheme, dtype)


@needs_avx2
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 12), bits=st.integers(2, 8),
       mode=st.sampled_from(["sym", "asym", "asymf"]),
       gran=st.sampled_from(["ch0", "ch1", "tensor", "g4", "g8", "g16", "g32"]),
       unit=st.sampled_from([1, 8, 16, 32]),
       ids=st.lists(st.integers(0, 10**6), max_size=70), seed=st.integers(0, 2**16))
def test_gathered_rows_equal_the_reference_property(n: int, k: int, bits: int, mode: str,
                                                     gran: str, unit: int, ids: list[int],
                                                     seed: int) -> None:
    """Any table, any rows, both codes of the dequantizer (AVX-512 where the CPU has it)."""
    k = (max(unit, int(gran[1:])) if gran.startswith("g") else unit) * k
    qt = _qt(n, k, f"int{bits}-{mode}-{gran}-fp16", seed=seed)
    rows = torch.tensor([i % n for i in ids], dtype=torch.int64)
    for wide in sorted({False, native.wide_dequant()}):
        for dtype in (torch.bfloat16, torch.float32):
            got = native.dequantize_rows(qt, rows, dtype, wide=wide)
            assert got is not None
            assert torch.equal(_bits(got), _bits(ref.dequantize_rows(qt, rows, dtype)))


@needs_avx2
@pytest.mark.parametrize(("scheme", "k", "avx512"), [
    ("int4-asym-g32", 256, "avx512"), ("int4-sym-g16", 256, "avx512"),
    ("int4-asym-ch0", 48, "avx512"), ("int4-sym-ch1", 256, "avx512"),
    ("int8-sym-ch0", 384, "avx512"), ("int8-asymf-g16", 64, "avx512"),
    ("int4-sym-g8", 64, "avx2"), ("int8-asym-ch0", 40, "avx2"), ("int3-sym-g8", 24, "scalar"),
    ("int4-asym-g4", 64, "scalar")])
def test_dequantizer_code_by_shape(scheme: str, k: int, avx512: str) -> None:
    """Which code takes a weight's rows: AVX-512 where K and the parameters allow 16 codes at
    a time (and the CPU has it), else AVX2 for 8 codes at a time, else one code at a time."""
    qt = _qt(4, k, scheme)
    assert native._dequant_code(qt, wide=True) == avx512
    assert native._dequant_code(qt, wide=False) == ("avx2" if avx512 == "avx512" else avx512)
    assert native._dequant_code(qt) == (avx512 if native.wide_dequant()
                                        else native._dequant_code(qt, wide=False))


@needs_avx2
def test_gather_checks_indices_before_reading() -> None:
    qt = _qt(10, 32, "int4-asym-g32")
    for bad in ([0, 10], [-1, 3]):
        with pytest.raises(lq.LinquantError, match=r"must be in \[0, 10\).*shape \(10, 32\)"):
            native.dequantize_rows(qt, torch.tensor(bad), torch.float32)
    empty = native.dequantize_rows(qt, torch.zeros(0, dtype=torch.int64), torch.bfloat16)
    assert empty is not None and empty.shape == (0, 32)
    # int32 ids and a non-contiguous index tensor are taken as they are
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32).t()
    got = native.dequantize_rows(qt, ids, torch.float32)
    assert got is not None and torch.equal(got, ref.dequantize_rows(qt, ids, torch.float32))


@needs_avx2
def test_embedding_dispatcher_picks_the_native_gather_on_cpu() -> None:
    qt = _qt(50, 64, "int4-asym-g32-fp16")
    ids = torch.randint(0, 50, (3, 7))
    assert kernels.select_embedding_path(ids, qt, torch.bfloat16) == "cpu_native_gather"
    assert kernels.select_embedding_path(ids, qt, torch.float64) == "reference"
    assert kernels.select_embedding_path(ids.to("meta"), qt, torch.float32) == "reference"
    out = kernels.embedding_weight_only(ids, qt, torch.bfloat16)
    assert out.shape == (3, 7, 64)
    assert torch.equal(out, ref.embedding_weight_only(ids, qt, torch.bfloat16))
    assert torch.equal(kernels.embedding_weight_only(ids, qt, torch.float64),
                       ref.embedding_weight_only(ids, qt, torch.float64))
