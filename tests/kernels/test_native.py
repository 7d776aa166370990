"""linquant's native W4A16 CPU kernel (linquant.kernels.native) against the reference, its
dispatcher rows, and how it builds, caches and falls back.

Tolerances: within half-precision tolerance of the reference (|y - ref| <= HALF_TOL * max|ref|);
against the exact product, one bf16 rounding of the output plus fp32 accumulation error; exact
where every sum is exact in fp32.
"""

from __future__ import annotations

import os
import platform
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linquant as lq
from linquant import kernels
from linquant.kernels import cpu, native
from linquant.kernels import reference as ref
from linquant.nn import QuantLinear, clear_kernel_caches

INT4PACK_OR_BLOCKED = "cpu_int4pack" if cpu.HAS_INT4PACK else "cpu_blocked"  # no CPU int4 op

HALF_TOL = 2e-2
needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel {native.status()}")
linux_x86 = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"),
    reason="the native kernel is built on Linux x86-64 only")

SCHEMES = ["int4-sym-g32-fp16", "int4-asym-g64-bf16", "int4-asymf-g128-fp32",
           "int4-sym-g256-fp32", "int4-asym-g8", "int4-sym-ch0", "int4-asym-g4-fp16"]


def _close(y: torch.Tensor, r: torch.Tensor, rel: float) -> None:
    assert y.shape == r.shape and y.dtype == r.dtype
    err = (y.double() - r.double()).abs().max().item()
    bound = rel * max(r.double().abs().max().item(), 1e-6)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _qt(n: int, k: int, scheme: str, seed: int = 0) -> lq.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.3 * torch.rand(n, 1, generator=g)
    return lq.quantize(w, scheme)


# ---- no silent skips -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(native._SPECS))
def test_every_kernel_this_machine_can_build_is_available(kernel: str) -> None:
    """Where the platform, the CPU features and a compiler are all there, the kernel must build
    and pass its probe: otherwise its tests would skip (``needs_native`` and the like) and a
    broken build or probe would pass CI unnoticed."""
    why = native._why_not(native._SPECS[kernel])
    if why:
        pytest.skip(f"{kernel}: {why}")
    assert native.available(kernel), native.status(kernel)


# ---- numerics ----------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("nk", [(48, 256), (100, 512), (7, 256)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_native_matches_reference(nk: tuple[int, int], scheme: str) -> None:
    n, k = nk  # N = 100 and 7: a ragged last block of 16 output channels
    qt = _qt(n, k, scheme)
    assert native.supported(qt, torch.bfloat16)
    bias = torch.randn(n)
    cache: dict[str, object] = {}
    for m in (1, 3, 9, 17, 30):  # every row tile: 8, 4, 2, 1
        x = torch.randn(m, k).bfloat16()
        _close(native.linear_int4(x, qt, bias, cache), ref.linear_weight_only(x, qt, bias),
               HALF_TOL)
    x3 = torch.randn(2, 5, k).bfloat16()
    _close(native.linear_int4(x3, qt, None, cache), ref.linear_weight_only(x3, qt, None),
           HALF_TOL)
    assert list(cache) == ["native_int4"]


@needs_native
@pytest.mark.parametrize("scheme", SCHEMES)
def test_native_error_against_exact_product_is_within_its_bound(scheme: str) -> None:
    """|y - exact| <= one bf16 rounding + fp32 accumulation error of the offset sums."""
    n, k = 96, 512
    qt = _qt(n, k, scheme, seed=2)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(11, k, generator=g) * torch.logspace(-2, 2, 11).reshape(11, 1)).bfloat16()
    bias = torch.randn(n)
    y = native.linear_int4(x, qt, bias, {}).double()
    w = qt.dequantize(torch.float64)
    exact = x.double() @ w.T + bias.bfloat16().double()
    group = int(qt.scheme.group_size or k)
    s = qt.scale.double().reshape(n, -1).repeat_interleave(group, dim=1)  # per element
    z = x.double().abs() @ (w.abs() + 144 * s.abs()).T  # magnitudes the fp32 sums run through
    bound = 2.0**-8 * exact.abs() + 2.0**-16 * z
    assert bool(((y - exact).abs() <= bound).all())


@needs_native
def test_native_is_exact_when_every_sum_is() -> None:
    """Integer activations, small codes and a power-of-two scale: every fp32 sum is exact, so
    the output is the exact product rounded once to bf16."""
    g = torch.Generator().manual_seed(4)
    n, k, m = 40, 256, 13
    codes = torch.randint(-7, 8, (n, k), generator=g).float()
    codes[:, 0] = 7  # each row's max: scale 0.25 exactly
    qt = lq.quantize(codes * 0.25, "int4-sym-ch0")
    assert torch.equal(qt.dequantize(torch.float64), codes.double() * 0.25)
    x = torch.randint(-9, 10, (m, k), generator=g).bfloat16()
    y = native.linear_int4(x, qt, None, {})
    exact = x.double() @ (codes.double() * 0.25).T
    assert torch.equal(y, exact.bfloat16())


@needs_native
@pytest.mark.parametrize("scheme",
                         ["int4-sym-g32-fp16", "int4-asym-g64-fp16", "int4-asym-ch0-fp16"])
def test_compact_scales_give_the_same_bits_as_fp32_scales(
        scheme: str, one_signed_qt: Callable[[str], lq.QuantizedTensor]) -> None:
    qt = one_signed_qt(scheme)  # zero points at both ends of their range
    compact, full = native.repack(qt), native.repack(qt, compact=False)
    assert compact[3] and not full[3]
    assert compact[1].dtype == torch.float16 and compact[2].dtype == torch.uint8
    assert 8 * (compact[1].nbytes + compact[2].nbytes) == 3 * (full[1].nbytes + full[2].nbytes)
    lib = native._load()
    assert lib is not None
    x = torch.randn(11, 256).bfloat16()
    bias = torch.randn(100)
    a, b = native._run(lib, x, qt, compact, bias), native._run(lib, x, qt, full, bias)
    assert a is not None and b is not None and torch.equal(a, b)


@needs_native
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), k4=st.integers(1, 40), mode=st.sampled_from(["sym", "asym", "asymf"]),
       seed=st.integers(0, 2**16))
def test_native_repack_equals_the_torch_repack(n: int, k4: int, mode: str, seed: int) -> None:
    """The library's code rearrangement (lq_w4a16_repack) writes the bytes of the PyTorch one,
    ragged last block of 16 rows included (its rows zero)."""
    k = 4 * k4
    qt = _qt(n, k, f"int4-{mode}-g4", seed)
    lib = native._load()
    assert lib is not None
    codes = native.repack(qt, lib=lib)[0]
    assert torch.equal(codes, native.repack_codes_torch(qt))
    if n % 16:
        assert not codes.view(-1, k // 4, 16, 2)[-1, :, n % 16:].any()


@needs_native
def test_native_repack_takes_every_code_value() -> None:
    """Every pair of 4-bit codes in every position of a chunk, symmetric and asymmetric."""
    for scheme in ("int4-sym-ch0", "int4-asym-ch0"):
        qt = _qt(16, 256, scheme)
        qt.qdata.copy_(torch.arange(256, dtype=torch.uint8).repeat(8))  # all 256 byte values
        assert torch.equal(native.repack(qt)[0], native.repack_codes_torch(qt))


def test_compact_layout_only_where_exact() -> None:
    assert not native.repack(_qt(32, 64, "int4-asymf-g32-fp16"))[3]  # float offsets
    assert not native.repack(_qt(32, 64, "int4-sym-g32-fp32"))[3]  # fp32 scales
    assert native.repack(_qt(32, 64, "int4-asym-g32-bf16"))[3]  # bf16 scales: exact in fp16
    with pytest.raises(lq.LinquantError, match="compact layout"):
        native.repack(_qt(32, 64, "int4-sym-g32-fp32"), compact=True)


needs_avx2 = pytest.mark.skipif(not native.available("avx2"),
                                reason=f"AVX2 kernel {native.status('avx2')}")
KERNELS = [pytest.param(native.linear_int4, marks=needs_native, id="w4a16"),
           pytest.param(native.linear_avx2, marks=needs_avx2, id="avx2")]


@pytest.mark.parametrize("linear", KERNELS)
def test_native_result_does_not_depend_on_thread_count(linear: Callable[..., torch.Tensor]
                                                       ) -> None:
    qt = _qt(200, 512, "int4-asym-g32-fp16")
    x = torch.randn(19, 512).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, qt, None, {})
        torch.set_num_threads(max(2, before))
        many = linear(x, qt, None, {})
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("linear", KERNELS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_native_nonfinite_token_follows_the_reference(bad: float,
                                                      linear: Callable[..., torch.Tensor]) -> None:
    qt = _qt(48, 256, "int4-sym-g32")
    x = torch.randn(3, 256).bfloat16()
    x[1, 7] = bad
    y = linear(x, qt, None, {})
    r = ref.linear_weight_only(x, qt, None)
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.nan_to_num(), r.nan_to_num())


@needs_native
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20), nblocks=st.integers(1, 5), tail=st.integers(0, 15),
       groups=st.integers(1, 4), group=st.sampled_from([4, 8, 12, 20, 32, 64]),
       mode=st.sampled_from(["sym", "asym", "asymf"]), seed=st.integers(0, 2**16))
def test_native_equals_reference_property(m: int, nblocks: int, tail: int, groups: int,
                                          group: int, mode: str, seed: int) -> None:
    n, k = 16 * nblocks - (16 - tail if tail else 0), groups * group
    qt = _qt(n, k, f"int4-{mode}-g{group}", seed)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).bfloat16()
    _close(native.linear_int4(x, qt, None, None), ref.linear_weight_only(x, qt, None), HALF_TOL)


# ---- dispatcher and layers ---------------------------------------------------------------------


@needs_native
def test_select_path_native_rows() -> None:
    bf = torch.bfloat16

    def path(m: int, qt: lq.QuantizedTensor, dtype: torch.dtype = bf) -> str:
        return kernels.select_path(torch.zeros(m, int(qt.shape[1]), dtype=dtype), qt)

    q = _qt(256, 512, "int4-asym-g32-fp16")
    assert kernels.NATIVE_INT4_MAX_M == 256
    for m in (1, 16, 63, 64, 256):  # no int4pack crossover
        assert path(m, q) == "cpu_native_int4"
    assert path(257, q) == "cpu_scratch"  # dequantize once, one bf16 matmul
    assert path(3, _qt(256, 512, "int4-sym-ch0")) == "cpu_native_int4"
    assert path(3, _qt(250, 512, "int4-sym-g64")) == "cpu_native_int4"  # N % 16 != 0
    # fp16 activations: the AVX2 kernel (tests/kernels/test_native_avx2.py), else PyTorch's op
    assert path(3, q, torch.float16) == ("cpu_native_avx2" if native.available("avx2")
                                         else INT4PACK_OR_BLOCKED)
    # fp32 activations: fp32 math, on the AVX2 kernel up to 64 tokens, else the blocked path
    assert path(3, q, torch.float32) == ("cpu_native_avx2" if native.available("avx2")
                                         else "cpu_blocked")
    assert path(65, q, torch.float32) == "cpu_blocked"
    assert path(3, _qt(256, 518, "int4-sym-ch0")) == "cpu_blocked"  # K % 4 != 0
    assert path(3, _qt(256, 512, "int8-sym-ch0")) != "cpu_native_int4"
    assert path(3, _qt(48, 64, "int4-sym-g32")) == "reference"  # tiny weight


@needs_native
def test_w4a16_layer_runs_native_caches_layout_and_clears() -> None:
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(512, 256), "int4-asym-g32-fp16").to(torch.bfloat16)
    x = torch.randn(4, 512).bfloat16()
    y = q(x)
    _close(y, ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    assert list(q.kernel_cache()) == ["native_int4", "cpu_plans"]
    assert clear_kernel_caches(q) == 1 and q.kernel_cache() == {}
    assert torch.equal(q(x), y)


# ---- building, caching, falling back -----------------------------------------------------------


def test_native_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, fresh_native: Path) -> None:
    monkeypatch.setenv("LINQUANT_NATIVE", "0")
    assert not native.available()
    assert native.status() == "unavailable: turned off by LINQUANT_NATIVE"
    qt = _qt(256, 512, "int4-sym-g32")
    assert not native.supported(qt, torch.bfloat16)
    assert kernels.select_path(torch.zeros(2, 512, dtype=torch.bfloat16), qt) \
        == INT4PACK_OR_BLOCKED
    assert not fresh_native.exists()  # nothing was built


@linux_x86
def test_missing_compiler_means_unavailable(monkeypatch: pytest.MonkeyPatch,
                                            fresh_native: Path) -> None:
    monkeypatch.setattr(native, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setenv("CC", "linquant-no-such-compiler")
    assert not native.available()
    assert "no C compiler (linquant-no-such-compiler)" in native.status()


@linux_x86
def test_failed_build_warns_once_falls_back_and_leaves_no_file(
        monkeypatch: pytest.MonkeyPatch, fresh_native: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(native, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(native, "_cpu_has_avx2_fma", lambda: True)
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'error: simulated' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(cc))
    with pytest.warns(RuntimeWarning, match="native W4A16 kernel disabled .*simulated"):
        assert not native.available()
    assert native.available() is False  # decided once: no second warning, no second build
    assert "build failed" in native.status() and "simulated" in native.status()
    assert list(fresh_native.iterdir()) == []  # the temporary output was removed
    qt = _qt(256, 512, "int4-sym-g32")
    x = torch.randn(2, 512).bfloat16()
    with pytest.warns(RuntimeWarning, match="native AVX2 kernel disabled .*simulated"):
        assert kernels.select_path(x, qt) == INT4PACK_OR_BLOCKED  # the AVX2 kernel fails alike
    _close(kernels.linear_weight_only(x, qt), ref.linear_weight_only(x, qt), HALF_TOL)


@needs_native
def test_build_goes_to_the_cache_folder_and_is_reused(fresh_native: Path) -> None:
    fresh_native.mkdir(parents=True)
    stale = fresh_native / "linquant_w4a16_bf16_0123456789abcdef.so"  # an older source's build
    stale.write_bytes(b"old")
    other = fresh_native / "unrelated.so"
    other.write_bytes(b"keep")
    assert native.available()
    assert not stale.exists() and other.read_bytes() == b"keep"
    other.unlink()
    built = [p for p in fresh_native.iterdir()]
    assert len(built) == 1 and built[0].suffix == ".so" and built[0].name.startswith("linquant_")
    assert native.status() == f"available: {built[0]}"
    stamp = built[0].stat().st_mtime_ns
    native._reset()
    assert native.available()  # loaded from the cache, not rebuilt
    assert [p for p in fresh_native.iterdir()] == built and built[0].stat().st_mtime_ns == stamp
    assert os.access(built[0], os.R_OK)
    if native.available("w8a8"):  # the other library builds next to it, on its own
        names = sorted(p.name for p in fresh_native.iterdir())
        assert len(names) == 2 and names[0].startswith("linquant_w4a16_bf16_")
        assert names[1].startswith("linquant_w8a8_")
        assert native.status("w8a8") == f"available: {fresh_native / names[1]}"
        if native.available("w8a8_avx2"):  # its name begins with w8a8's: rebuilding w8a8
            names = sorted(p.name for p in fresh_native.iterdir())  # must leave it alone
            assert len(names) == 3
            w8 = [n for n in names if n.startswith("linquant_w8a8_") and "avx2" not in n]
            (fresh_native / w8[0]).unlink()
            native._reset()
            assert native.available("w8a8")  # rebuilt under the same name
            assert sorted(p.name for p in fresh_native.iterdir()) == names


def test_each_kernel_checks_its_own_cpu_feature(monkeypatch: pytest.MonkeyPatch,
                                               fresh_native: Path) -> None:
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        pytest.skip("the native kernels are built on Linux x86-64 only")
    monkeypatch.setattr(native, "_cpu_has_avx512_bf16", lambda: False)
    monkeypatch.setattr(native, "_cpu_has_avx512_vnni", lambda: False)
    assert native.status("w4a16") == "unavailable: this CPU lacks AVX512-BF16"
    assert native.status("w8a8") == "unavailable: this CPU lacks AVX512-VNNI"
    w = torch.zeros(512, 256, dtype=torch.int8)
    assert not native.w8a8_supported(torch.zeros(2, 256), w)
    assert kernels.select_w8a8_path(torch.zeros(2, 256), w) != "cpu_native_w8a8"


# ---- W8A16 (two int8 digits per activation, in the W8A8 library) --------------------------------

needs_native_w8a8 = pytest.mark.skipif(not native.available("w8a8"),
                                       reason=f"native W8A8 kernel {native.status('w8a8')}")
# Numerics: the int8split tests in test_cpu.py run on linear_w8a16 too (SPLIT_IMPLS).


@needs_native_w8a8
def test_select_path_native_w8a16_rows() -> None:
    bf = torch.bfloat16

    def path(m: int, qt: lq.QuantizedTensor, dtype: torch.dtype = bf) -> str:
        return kernels.select_path(torch.zeros(m, int(qt.shape[1]), dtype=dtype), qt)

    big = _qt(1024, 1024, "int8-sym-ch0")  # SMALL_WEIGHT_NUMEL elements
    small = _qt(256, 512, "int8-sym-ch0")
    assert kernels.NATIVE_W8A16_MAX_M == 256
    for m in (1, 2, 16, 128, 129, 256):
        assert path(m, big) == "cpu_native_w8a16"
        assert path(m, big, torch.float16) == "cpu_native_w8a16"
    assert path(257, big) == "cpu_scratch"
    assert path(1, small) == "cpu_int8pack"  # one token, small weight: PyTorch's op is faster
    assert path(2, small) == "cpu_native_w8a16"
    assert path(1, _qt(256, 520, "int8-sym-tensor")) == "cpu_native_w8a16"  # no int8pack
    assert path(200, small, torch.float32) == "cpu_scratch"  # W8A32: fp32 math
    assert path(3, _qt(256, 512, "int8-asym-ch0")) == ("cpu_native_avx2"
                                                      if native.available("avx2")
                                                      else "cpu_blocked")


@needs_native_w8a8
def test_w8a16_layer_runs_native_with_one_layout_for_every_m() -> None:
    q = QuantLinear.from_float(nn.Linear(1024, 1024), "int8-sym-ch0").to(torch.bfloat16)
    x = torch.randn(2, 3, 1024).bfloat16()
    y = q(x)
    _close(y, ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    assert list(q.kernel_cache()) == ["native_w8a8", "cpu_plans"]
    assert q(torch.randn(1, 1024).bfloat16()).shape == (1, 1024)  # one token: the same layout
    assert list(q.kernel_cache()) == ["native_w8a8", "cpu_plans"]
    assert clear_kernel_caches(q) == 1 and torch.equal(q(x), y)


@pytest.mark.parametrize("case", [
    pytest.param(("int4-asym-g32-fp16", torch.bfloat16, False), marks=needs_native, id="w4a16"),
    pytest.param(("int8-sym-ch0", torch.bfloat16, False), marks=needs_native_w8a8, id="w8a16"),
    pytest.param(("int8-asym-g64", torch.float32, False), marks=needs_avx2, id="avx2-fp32"),
    pytest.param(("int4-sym-g32", torch.float16, False), marks=needs_avx2, id="avx2-fp16"),
    pytest.param(("w8a8", torch.float32, True), marks=needs_native_w8a8, id="w8a8"),
])
def test_native_paths_pass_gradients_to_a_bias_that_needs_them(
        case: tuple[str, torch.dtype, bool]) -> None:
    """The native kernels add the bias inside; a bias that requires grad is added outside, by
    torch, so that training the bias of a quantized model works on these paths too."""
    from linquant.nn import W8A8Linear

    scheme, dtype, w8a8 = case
    torch.manual_seed(0)
    base = nn.Linear(1024, 1024)
    q: nn.Module = (W8A8Linear.from_float(base) if w8a8
                    else QuantLinear.from_float(base, scheme).to(dtype))
    x = torch.randn(3, 1024).to(dtype)
    path = (kernels.select_w8a8_path(x, q.weight_qdata) if w8a8
            else kernels.select_path(x, q.qweight))
    assert path.startswith("cpu_native")
    with torch.no_grad():
        want = q(x)
    y = q(x)
    y.float().sum().backward()
    assert q.bias.grad is not None and torch.equal(q.bias.grad, torch.full((1024,), 3.0))
    _close(y.detach(), want, 1e-2 if dtype != torch.float32 else 1e-6)

