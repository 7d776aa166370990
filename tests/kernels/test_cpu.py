"""CPU fast paths (linquant.kernels.cpu) against the reference, and the dispatcher's choices.

Tolerances (also in the linquant.kernels.cpu docstring):
* cpu_int4pack / cpu_int8pack (half-precision activations, scales rounded to that dtype):
  |y - ref| <= HALF_TOL * max|ref| elementwise.
* cpu_blocked / cpu_scratch in fp32: |y - ref| <= 1e-5 * max|ref| (accumulation order only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linquant as lq
from linquant import kernels
from linquant.kernels import cpu, native
from linquant.kernels import reference as ref
from linquant.nn import QuantLinear

HALF_TOL = 2e-2
MS = (1, 3, 17)
# What 4-bit weights with bf16 activations run on: linquant's native kernel where it builds
# (tests/kernels/test_native.py), else PyTorch's int4 op.
INT4_BF16, INT4_CACHE = (("cpu_native_int4", "native_int4") if native.available()
                         else ("cpu_int4pack", "int4pack"))
# PyTorch's CPU int4 op (2.6 and later; 2.4's shared op where it passes its check); without
# it, half-precision int4 at few tokens takes the blocked path
needs_int4pack = pytest.mark.skipif(not cpu.HAS_INT4PACK,
                                    reason="this PyTorch has no usable CPU int4 op")
INT4PACK_OR_BLOCKED = "cpu_int4pack" if cpu.HAS_INT4PACK else "cpu_blocked"


def _close(y: torch.Tensor, r: torch.Tensor, rel: float) -> None:
    assert y.shape == r.shape and y.dtype == r.dtype
    err = (y.double() - r.double()).abs().max().item()
    bound = rel * max(r.double().abs().max().item(), 1e-6)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _qt(n: int, k: int, scheme: str, seed: int = 0) -> lq.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.3 * torch.rand(n, 1, generator=g)  # off-centre rows
    return lq.quantize(w, scheme)


# ---- int4pack -----------------------------------------------------------------------------

INT4 = [  # (N, K, scheme): N % 16 == 0 but not % 64; several groups per row
    (48, 96, "int4-sym-g32-fp16"),
    (80, 320, "int4-asym-g64-bf16"),
    (16, 384, "int4-asymf-g128-fp32"),
    (112, 512, "int4-sym-g256-fp32"),
    (48, 256, "int4-asym-g32-fp32"),
]


@needs_int4pack
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("nks", INT4, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_int4pack_matches_reference(nks: tuple[int, int, str], dtype: torch.dtype) -> None:
    n, k, scheme = nks
    qt = _qt(n, k, scheme)
    assert cpu.int4pack_supported(qt, dtype)
    bias = torch.randn(n)
    cache: dict[str, object] = {}
    for m in MS:
        x = torch.randn(m, k).to(dtype)
        y = cpu.linear_int4pack(x, qt, bias, cache)
        _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)
    x3 = torch.randn(2, 5, k).to(dtype)  # leading dims
    _close(cpu.linear_int4pack(x3, qt, None, cache), ref.linear_weight_only(x3, qt, None),
           HALF_TOL)
    assert list(cache) == ["int4pack"]


@needs_int4pack
def test_int4pack_scales_and_zeros_reproduce_the_dequantized_weight() -> None:
    """The (scale, zero) conversion is exact in fp32: scale * (q - 8) + zero == s (c - z)."""
    for scheme in ("int4-sym-g32-fp32", "int4-asym-g32-fp32", "int4-asymf-g64-fp32"):
        qt = _qt(32, 128, scheme)
        packed, sz = cpu.repack_int4(qt, torch.float32)
        eye = torch.eye(128)
        mm = (torch._weight_int4pack_mm_for_cpu if cpu._INT4PACK_FOR_CPU
              else torch._weight_int4pack_mm)  # PyTorch 2.4 / 2.5
        w_t = mm(eye, packed, int(qt.scheme.group_size or 0), sz)
        torch.testing.assert_close(w_t.t(), qt.dequantize(torch.float32), rtol=1e-6, atol=1e-6)


def test_inner_k_tiles_of_the_shared_op() -> None:
    """PyTorch 2.4 / 2.5's layout: the most inner K tiles of 16 (8, 4, 2) dividing K."""
    assert [cpu._inner_k_tiles(k) for k in (128, 256, 64, 96, 32, 16, 48, 384)] \
        == [8, 8, 4, 2, 2, 0, 0, 8]
    if not cpu._INT4PACK_FOR_CPU and cpu.HAS_INT4PACK:  # PyTorch 2.4 / 2.5
        assert not cpu.int4pack_supported(_qt(32, 48, "int4-sym-g16"), torch.bfloat16)
        assert cpu.shared_int4pack_format() in cpu.FORMATS
    if cpu._INT4PACK_FOR_CPU:  # PyTorch 2.6+: the CPU's own ops; the shared one is not probed
        assert cpu.shared_int4pack_format() is None


# ---- int8pack -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("nk", [(33, 64), (100, 96), (7, 304)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_int8pack_matches_reference(nk: tuple[int, int], dtype: torch.dtype) -> None:
    n, k = nk
    qt = _qt(n, k, "int8-sym-ch0")
    assert cpu.int8pack_supported(qt, dtype)
    bias = torch.randn(n)
    for m in MS:
        x = torch.randn(m, k).to(dtype)
        _close(cpu.linear_int8pack(x, qt, bias, {}), ref.linear_weight_only(x, qt, bias),
               HALF_TOL)


# ---- blocked / scratch (every scheme) -------------------------------------------------------

GENERIC = [  # N > BLOCK_ROWS with a ragged tail; odd K where the scheme allows
    (300, 97, "int8-sym-ch0"),
    (300, 97, "int8-asym-ch1-fp16"),
    (261, 97, "int3-sym-tensor"),
    (261, 96, "int3-asym-g16-bf16"),
    (270, 64, "int4-asymf-g32-fp16"),
    (257, 40, "int2-asym-g8"),
    (300, 99, "int5-asym-ch0"),
    (64, 128, "int4-sym-g32-fp16"),
]


@pytest.mark.parametrize("fn", [cpu.linear_blocked, cpu.linear_scratch],
                         ids=["blocked", "scratch"])
@pytest.mark.parametrize("nks", GENERIC, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_blocked_and_scratch_match_reference(nks: tuple[int, int, str], fn: object) -> None:
    n, k, scheme = nks
    qt = _qt(n, k, scheme)
    bias = torch.randn(n)
    assert callable(fn)
    for m in MS:
        x = torch.randn(m, k)
        _close(fn(x, qt, bias), ref.linear_weight_only(x, qt, bias), 1e-5)
    xb = torch.randn(2, 3, k).to(torch.bfloat16)
    _close(fn(xb, qt, None), ref.linear_weight_only(xb, qt, None), HALF_TOL)


@pytest.mark.parametrize("native_deq", [True, False], ids=["native-dequant", "torch-dequant"])
@pytest.mark.parametrize("nks", GENERIC, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_scratch_is_the_reference_bit_for_bit(nks: tuple[int, int, str], native_deq: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside autograd the scratch path is the reference's own computation: the same
    dequantized weight (linquant's native dequantizer writes the same bits as the PyTorch ops)
    into the same ``F.linear`` call, bias included."""
    if not native_deq:
        monkeypatch.setattr(native, "_dequantizer", lambda qt, lib=None: None)
    n, k, scheme = nks
    qt = _qt(n, k, scheme)
    bias = torch.randn(n)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(2, 35, k).to(dtype)
            assert torch.equal(cpu.linear_scratch(x, qt, bias),
                               ref.linear_weight_only(x, qt, bias)), dtype


# ---- dispatcher ------------------------------------------------------------------------------


def test_select_path_documented_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table without the native kernel (its rows: tests/kernels/test_native.py)."""
    monkeypatch.setattr(native, "available", lambda kernel="w4a16": False)
    bf, f32 = torch.bfloat16, torch.float32
    n, k = 256, 512  # numel >= MIN_FAST_NUMEL
    assert n * k >= kernels.MIN_FAST_NUMEL
    small, big4, big8, bigb = 1, kernels.INT4PACK_MAX_M, kernels.INT8PACK_MAX_M, \
        kernels.BLOCKED_MAX_M
    assert (big4, big8, bigb) == (64, 32, 128)  # the documented crossovers

    def x(m: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(m, k, dtype=dtype)

    for scheme in ("int4-sym-g32-fp16", "int4-asym-g128-bf16", "int4-asymf-g256-fp32"):
        qt = _qt(n, k, scheme)
        assert kernels.select_path(x(small, bf), qt) == INT4PACK_OR_BLOCKED
        assert kernels.select_path(x(big4 - 1, torch.float16), qt) == INT4PACK_OR_BLOCKED
        assert kernels.select_path(x(big4, bf), qt) == "cpu_blocked"
        assert kernels.select_path(x(bigb, bf), qt) == "cpu_scratch"
        assert kernels.select_path(x(small, f32), qt) == "cpu_blocked"  # fp32: fp32 math
        assert kernels.select_path(x(bigb * 2, f32), qt) == "cpu_scratch"  # small weight
    q8 = _qt(n, k, "int8-sym-ch0")
    assert kernels.select_path(x(small, bf), q8) == "cpu_int8pack"
    assert kernels.select_path(x(big8 - 1, bf), q8) == "cpu_int8pack"
    assert kernels.select_path(x(big8, bf), q8) == "cpu_blocked"
    assert kernels.select_path(x(bigb, bf), q8) == "cpu_scratch"
    assert kernels.select_path(x(small, f32), q8) == "cpu_blocked"
    assert kernels.select_path(x(bigb, f32), q8) == "cpu_scratch"
    assert kernels.select_path(x(bigb - 1, f32), q8) == "cpu_blocked"
    large = _qt(1024, 1024, "int8-sym-ch0")  # SMALL_WEIGHT_NUMEL elements: fp32 stays blocked
    assert large.numel == kernels.SMALL_WEIGHT_NUMEL
    assert kernels.select_path(torch.zeros(bigb * 2, 1024), large) == "cpu_blocked"
    assert kernels.select_path(torch.zeros(bigb + 1, 1024, dtype=bf), large) == "cpu_scratch"
    large_asym = _qt(1024, 1024, "int8-asym-ch0")  # not cpu_int8split's (see its own table)
    assert kernels.select_path(torch.zeros(bigb, 1024, dtype=bf), large_asym) == "cpu_scratch"
    assert kernels.select_path(x(3, torch.float64), q8) == "cpu_blocked"
    # int4 layouts the aten op cannot take fall back to the generic paths
    assert kernels.select_path(x(small, bf), _qt(n, k, "int4-sym-g16")) == "cpu_blocked"
    assert kernels.select_path(x(small, bf), _qt(n + 8, k, "int4-sym-g32")) == "cpu_blocked"
    assert kernels.select_path(x(small, bf), _qt(n, k, "int8-asym-ch0")) == "cpu_blocked"
    q8_odd = _qt(n, k + 1, "int8-sym-ch0")  # K % 16 != 0: the aten op would crash on bf16
    assert kernels.select_path(torch.zeros(1, k + 1, dtype=bf), q8_odd) == "cpu_blocked"
    # tiny weights and empty inputs: the reference
    assert kernels.select_path(torch.zeros(1, 64, dtype=bf), _qt(48, 64, "int4-sym-g32")) \
        == "reference"
    assert kernels.select_path(x(0, bf), q8) == "reference"
    assert kernels.select_path(torch.zeros(1, k, device="meta"), q8) == "reference"


def test_linear_weight_only_routes_through_the_selected_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "available", lambda kernel="w4a16": False)
    qt = _qt(256, 512, "int4-sym-g32-fp16")
    calls: list[str] = []
    for name in ("linear_int4pack", "linear_int8pack", "linear_blocked", "linear_scratch"):
        orig = getattr(cpu, name)

        def spy(*a: object, _n: str = name, _o: object = orig) -> torch.Tensor:
            calls.append(_n)
            assert callable(_o)
            return _o(*a)  # type: ignore[no-any-return]

        monkeypatch.setattr(cpu, name, spy)
    kernels.linear_weight_only(torch.randn(2, 512).bfloat16(), qt)
    kernels.linear_weight_only(torch.randn(2, 512), qt)
    kernels.linear_weight_only(torch.randn(200, 512).bfloat16(), qt)
    first = "linear_int4pack" if cpu.HAS_INT4PACK else "linear_blocked"
    assert calls == [first, "linear_blocked", "linear_scratch"]


# ---- layers ----------------------------------------------------------------------------------


def test_quant_linear_caches_repack_outside_state_dict_and_rebuilds_on_load() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(512, 256)
    q = QuantLinear.from_float(lin, "int4-asym-g64-bf16").to(torch.bfloat16)
    x = torch.randn(3, 512).bfloat16()
    y = q(x)
    _close(y, ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    assert set(q.kernel_cache()) == {INT4_CACHE, "cpu_plans"}
    assert all("cache" not in key for key in q.state_dict())
    other = QuantLinear.from_float(nn.Linear(512, 256), "int4-asym-g64-bf16").to(torch.bfloat16)
    q.load_state_dict(other.state_dict())  # in place: the cached layout must be rebuilt
    _close(q(x), ref.linear_weight_only(x, other.qweight, other.bias), HALF_TOL)
    assert not torch.equal(q(x), y)


def test_cache_rebuilds_for_replaced_and_inference_mode_buffers() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 512).bfloat16()
    a, b = nn.Linear(512, 256), nn.Linear(512, 256)
    with torch.inference_mode():  # buffers without version counters
        q = QuantLinear.from_float(a, "int4-sym-g32-bf16").to(torch.bfloat16)
        q(x)
        q.load_state_dict(QuantLinear.from_float(b, "int4-sym-g32-bf16").state_dict())
        _close(q(x), ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    q2 = QuantLinear.from_float(a, "int4-sym-g32-bf16")
    q2(x)
    q2._set_qweight(lq.quantize(b.weight.detach(), "int4-sym-g32-bf16"))  # new buffer objects
    _close(q2(x), ref.linear_weight_only(x, q2.qweight, q2.bias), HALF_TOL)


def test_inputs_that_need_grad_take_the_reference_and_bias_grad_works() -> None:
    qt = _qt(256, 512, "int4-sym-g32-fp16")
    x = torch.randn(3, 512, dtype=torch.bfloat16, requires_grad=True)
    assert kernels.select_path(x, qt) == "reference"
    kernels.linear_weight_only(x, qt).float().sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert kernels.select_path(x, qt) == INT4_BF16
    q = QuantLinear.from_float(nn.Linear(512, 256), "int8-sym-ch0")  # bias requires grad
    for m in (1, 200):
        y = q(torch.randn(m, 512))
        y.sum().backward()
        assert q.bias.grad is not None and torch.allclose(q.bias.grad, torch.full((256,),
                                                                                  float(m)))
        q.bias.grad = None


def test_scratch_made_under_inference_mode_is_usable_outside() -> None:
    cpu.release_scratch()
    qt = _qt(256, 512, "int8-sym-ch0")
    x = torch.randn(300, 512)
    with torch.inference_mode():
        cpu.linear_scratch(x, qt, None)
        cpu.linear_blocked(x[:1], qt, None)
    _close(cpu.linear_scratch(x, qt, None), ref.linear_weight_only(x, qt, None), 1e-5)
    _close(cpu.linear_blocked(x[:1], qt, None), ref.linear_weight_only(x[:1], qt, None), 1e-5)


def test_int8pack_copes_with_misaligned_codes() -> None:
    """safetensors may return int8 weights at any offset; the aten kernel needs 64-byte ones."""
    qt = lq.quantize(torch.randn(256, 512), "int8-sym-ch0")
    buf = torch.empty(qt.qdata.numel() + 1, dtype=torch.uint8)
    buf[1:] = qt.qdata
    qt.qdata = buf[1:]
    assert qt.qdata.data_ptr() % 64 != 0
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    y = cpu.linear_int8pack(x, qt, None).float()
    want = ref.linear_weight_only(x, qt, None).float()
    assert (y - want).abs().max() <= 2e-2 * want.abs().max()


def test_int8pack_copes_with_misaligned_activations() -> None:
    """``torch._weight_int8pack_mm`` crashed the process (SIGSEGV) on bf16 activations 2 or 16
    bytes off a 64-byte boundary: a contiguous view at an odd element, through QuantLinear on
    the layer's first call. Run in a child process, so that a crash fails this test only."""
    import subprocess
    import sys

    child = (
        "import torch\n"
        "from torch import nn\n"
        "from linquant import kernels\n"
        "from linquant.kernels import reference as ref\n"
        "from linquant.nn import QuantLinear\n"
        "q = QuantLinear.from_float(nn.Linear(256, 512), 'int8-sym-ch0')\n"
        "for off in (1, 8, 16, 32):\n"
        "    for m in (1, 5):\n"
        "        x = torch.randn(m * 256 + 64, dtype=torch.bfloat16)[off:off + m * 256]\n"
        "        x = x.view(m, 256)\n"
        "        with torch.no_grad():\n"
        "            y = kernels.cpu.linear_int8pack(x, q.qweight, q.bias).float()\n"
        "            want = ref.linear_weight_only(x, q.qweight, q.bias).float()\n"
        "            assert (y - want).abs().max() <= 2e-2 * want.abs().max(), (off, m)\n"
        "            assert torch.equal(q(x), q(x.clone()))\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=600, check=False)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr[-2000:]


# ---- W8A8 through oneDNN and fbgemm ---------------------------------------------------------

needs_onednn = pytest.mark.skipif(not cpu.onednn_available(),
                                  reason="oneDNN int8 linear needs a CPU with VNNI")
needs_fbgemm = pytest.mark.skipif(not cpu.fbgemm_available(),
                                  reason="fbgemm int8 linear needs a CPU with VNNI")
needs_native_w8a8 = pytest.mark.skipif(not native.available("w8a8"),
                                       reason=f"native W8A8 kernel {native.status('w8a8')}")
needs_native_w8a8_avx2 = pytest.mark.skipif(
    not native.available("w8a8_avx2"), reason=f"AVX2 W8A8 kernel {native.status('w8a8_avx2')}")


def _native_avx2(*args: Any) -> torch.Tensor:
    return native.linear_w8a8(*args, kernel=native.W8A8_AVX2)


W8A8_CPU = {"onednn": cpu.linear_w8a8_onednn, "fbgemm": cpu.linear_w8a8_fbgemm,
            "native_w8a8": native.linear_w8a8, "native_w8a8_avx2": _native_avx2}
W8A8_CACHE = {"native_w8a8_avx2": "native_w8a8"}  # the AVX2 kernel reads the same layout
BACKENDS = [pytest.param("onednn", marks=needs_onednn), pytest.param("fbgemm", marks=needs_fbgemm),
            pytest.param("native_w8a8", marks=needs_native_w8a8),
            pytest.param("native_w8a8_avx2", marks=needs_native_w8a8_avx2)]


@pytest.fixture
def no_native_w8a8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The W8A8 table below the native kernels (their rows: test_select_w8a8_path_native_rows
    and test_select_w8a8_path_avx2_rows)."""
    monkeypatch.setattr(native, "w8a8_supported", lambda x, w: False)
    monkeypatch.setattr(native, "w8a8_avx2_supported", lambda x, w: False)


def _w8(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return w, torch.rand(n, 1, generator=g) * 0.02 + 1e-3


@pytest.mark.parametrize("kernel", [pytest.param("w8a8", marks=needs_native_w8a8),
                                    pytest.param("w8a8_avx2", marks=needs_native_w8a8_avx2)])
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(2, 70), seed=st.integers(0, 2**16))
def test_w8a8_layout_from_the_library_equals_the_torch_one(kernel: str, n: int, k: int,
                                                           seed: int) -> None:
    """lq_w8a8_repack (w8a8_layout.c, in both W8A8 libraries) writes the kernels' layout and
    row sums exactly as the PyTorch version: ragged blocks of 16 rows, K not a multiple of 4
    (zero padded), extreme codes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[0, 0], w[-1, -1] = -128, 127
    got, want = native.repack_w8a8(w, native._load(kernel)), native.repack_w8a8_torch(w)
    assert got[2] == want[2] and got[0].shape == want[0].shape
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


W8A8_ACTS = ["dynamic", "static-sym", "static-asym"]


def _act(kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if kind == "dynamic":
        return None, None
    scale = torch.tensor(0.031)
    return (scale, None) if kind == "static-sym" else (scale, torch.tensor(97, dtype=torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("act", W8A8_ACTS)
@pytest.mark.parametrize("nk", [(75, 97), (64, 2), (130, 301)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_cpu_w8a8_is_bit_identical_to_reference(
    nk: tuple[int, int], act: str, dtype: torch.dtype, backend: str
) -> None:
    n, k = nk
    w, ws = _w8(n, k)
    a_s, a_z = _act(act)
    cache: dict[str, object] = {}
    for m in (1, 3, 17):
        for bias in (None, torch.randn(n)):
            x = (torch.randn(2, m, k) * 2).to(dtype)
            y = W8A8_CPU[backend](x, w, ws, bias, a_s, a_z, cache)
            r = ref.linear_w8a8(x, w, ws, bias, a_s, a_z)
            assert y.dtype == dtype and y.shape == (2, m, n)
            assert torch.equal(y, r)
    assert set(cache) == {W8A8_CACHE.get(backend, backend)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", W8A8_ACTS)
def test_cpu_w8a8_extreme_codes_are_exact(act: str, backend: str) -> None:
    """Every code at its extreme: u8 x s8 pair sums that would saturate int16 (255 * 127 * 2),
    and sums past 2**24 where the int32 -> fp32 conversion itself rounds."""
    k = 4096
    w = torch.full((32, k), 127, dtype=torch.int8)
    w[1::2] = -127
    w[2, ::2] = -127
    ws = torch.full((32, 1), 1e-3)
    a_s, a_z = _act(act)
    big = 1e4 if a_s is None else float(a_s) * 300  # saturates static codes at both ends
    x = torch.full((5, k), big)
    x[1] = -big
    x[2, ::2] = -big
    x[3] = 0.0
    x[4, 7] = big
    y = W8A8_CPU[backend](x, w, ws, None, a_s, a_z)
    assert torch.equal(y, ref.linear_w8a8(x, w, ws, None, a_s, a_z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_w8a8_rounds_ties_to_even_like_reference(backend: str) -> None:
    """Tokens whose max is 127 have scale 1, so x / s lands exactly on .5: the codes must be
    rounded half to even, like the reference's."""
    k = 64
    w, ws = _w8(40, k)
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5] * 8)
    x = torch.stack([ties, ties.flip(0), -ties]).clone()
    x[:, 0] = 127.0
    q, s = ref.quantize_activation_per_token(x)
    assert torch.equal(s, torch.ones(3, 1))
    assert set(q[0, 1:9].tolist()) == {2, -2, 0, -126, 126}  # half to even
    y = W8A8_CPU[backend](x, w, ws, None, None, None)
    assert torch.equal(y, ref.linear_w8a8(x, w, ws))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_w8a8_inf_token_matches_reference(backend: str) -> None:
    w, ws = _w8(48, 64)
    x = torch.randn(4, 64)
    x[2, 3] = float("inf")
    x[3, 0] = float("-inf")
    y = W8A8_CPU[backend](x, w, ws, None, None, None)
    r = ref.linear_w8a8(x, w, ws)
    assert torch.allclose(y, r, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(y[:2], r[:2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_w8a8_nan_token_gives_nan_row_like_reference(backend: str) -> None:
    w, ws = _w8(48, 64)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    y = W8A8_CPU[backend](x, w, ws, None, None, None)
    assert torch.equal(y, ref.linear_w8a8(x, w, ws)) is False  # NaN != NaN
    assert torch.allclose(y, ref.linear_w8a8(x, w, ws), equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()


@pytest.mark.usefixtures("no_native_w8a8")
def test_select_w8a8_path_documented_table() -> None:
    big = torch.zeros(512, 256, dtype=torch.int8)  # 131072 >= MIN_FAST_NUMEL
    small = torch.zeros(64, 64, dtype=torch.int8)
    fast = "cpu_onednn" if cpu.onednn_available() else "reference"
    few = "cpu_fbgemm" if cpu.fbgemm_available() else fast
    m_max = kernels.FBGEMM_MAX_M
    assert kernels.select_w8a8_path(torch.randn(1, 256), big) == "reference"  # M = 1: _int_mm
    assert kernels.select_w8a8_path(torch.randn(2, 256), big) == few
    assert kernels.select_w8a8_path(torch.randn(m_max, 256), big) == few
    assert kernels.select_w8a8_path(torch.randn(m_max + 1, 256), big) == few  # small weight
    m_small = kernels.FBGEMM_MAX_M_SMALL
    assert kernels.select_w8a8_path(torch.randn(m_small, 256), big) == few
    assert kernels.select_w8a8_path(torch.randn(m_small + 1, 256), big) == fast
    large = torch.zeros(kernels.SMALL_WEIGHT_NUMEL // 256, 256, dtype=torch.int8)
    assert kernels.select_w8a8_path(torch.randn(m_max, 256), large) == few
    assert kernels.select_w8a8_path(torch.randn(m_max + 1, 256), large) == fast
    assert kernels.select_w8a8_path(torch.randn(4, 10, 256).bfloat16(), big) == fast  # M = 40
    assert kernels.select_w8a8_path(torch.randn(3, 256), big, torch.tensor(0.1)) == few
    assert kernels.select_w8a8_path(torch.randn(16, 64), small) == "reference"
    assert kernels.select_w8a8_path(torch.randn(0, 256), big) == "reference"
    needs_grad = torch.randn(4, 256, requires_grad=True)  # out= scratch ops have no backward
    assert kernels.select_w8a8_path(needs_grad, big) == "reference"
    with torch.no_grad():
        assert kernels.select_w8a8_path(needs_grad, big) == few
    too_long = torch.zeros(1, cpu.ONEDNN_MAX_K + 1, dtype=torch.int8)
    assert not cpu.onednn_supported(torch.randn(2, cpu.ONEDNN_MAX_K + 1), too_long)
    assert not cpu.fbgemm_supported(torch.randn(2, cpu.ONEDNN_MAX_K + 1), too_long)
    assert set(kernels.W8A8_PATHS) >= {"reference", "cpu_fbgemm", "cpu_onednn"}


@needs_fbgemm
@pytest.mark.usefixtures("no_native_w8a8")
def test_fbgemm_path_steps_aside_when_the_quantized_engine_is_not_fbgemm() -> None:
    big = torch.zeros(512, 256, dtype=torch.int8)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "onednn"
        assert not cpu.fbgemm_available()
        assert kernels.select_w8a8_path(torch.randn(2, 256), big) == "cpu_onednn"
    finally:
        torch.backends.quantized.engine = engine
    assert kernels.select_w8a8_path(torch.randn(2, 256), big) == "cpu_fbgemm"


@pytest.mark.parametrize(("backend", "m"), [
    pytest.param("onednn", 40, marks=needs_onednn), pytest.param("fbgemm", 4, marks=needs_fbgemm),
    pytest.param("native_w8a8", 3, marks=needs_native_w8a8)])
def test_w8a8_layer_caches_prepack_rebuilds_on_change_and_copies_without_it(
    backend: str, m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend != "native_w8a8":
        monkeypatch.setattr(native, "w8a8_supported", lambda x, w: False)
        monkeypatch.setattr(native, "w8a8_avx2_supported", lambda x, w: False)
    import copy
    import io

    from linquant.nn import W8A8Linear

    q = W8A8Linear.from_float(nn.Linear(256, 512))
    x = torch.randn(m, 256)
    assert kernels.select_w8a8_path(x, q.weight_qdata) == f"cpu_{backend}"
    y = q(x)
    cache = q.kernel_cache()
    packed = cache[backend][1]
    q(x)
    assert cache[backend][1] is packed  # reused
    assert not any(backend in k for k in q.state_dict())
    dup = copy.deepcopy(q)  # packed weights cannot always be copied: the cache is not
    assert dup.kernel_cache() == {} and torch.equal(dup(x), y)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.kernel_cache() == {} and torch.equal(loaded(x), y)
    with torch.no_grad():
        q.weight_qdata.mul_(-1)  # in place: version bump -> repack
    y2 = q(x)
    assert cache[backend][1] is not packed
    assert torch.equal(y2, ref.linear_w8a8(x, q.weight_qdata, q.weight_scale, q.bias))


@needs_fbgemm
@needs_onednn
@pytest.mark.usefixtures("no_native_w8a8")
def test_clear_kernel_caches_drops_every_backend_layout_and_results_stay_exact() -> None:
    from linquant.nn import W8A8Linear, clear_kernel_caches

    model = nn.Sequential(W8A8Linear.from_float(nn.Linear(256, 512)), nn.ReLU(),
                          QuantLinear.from_float(nn.Linear(512, 256), "int4-sym-g32").bfloat16())
    w8 = model[0]
    few, many = torch.randn(4, 256), torch.randn(40, 256)
    y_few, y_many = w8(few), w8(many)
    assert set(w8.kernel_cache()) == {"fbgemm", "onednn"}  # one int8 copy per backend
    model[2](torch.randn(3, 512).bfloat16())
    assert clear_kernel_caches(model) == 3
    assert w8.kernel_cache() == {} and model[2].kernel_cache() == {}
    assert clear_kernel_caches(model) == 0
    assert torch.equal(w8(few), y_few) and torch.equal(w8(many), y_many)


def test_quant_linear_copies_and_pickles_without_its_cache() -> None:
    import copy
    import io

    q = QuantLinear.from_float(nn.Linear(256, 512), "int4-sym-g32")
    x = torch.randn(3, 256).bfloat16()
    y = q(x)
    assert INT4_CACHE in q.kernel_cache()
    assert copy.deepcopy(q).kernel_cache() == {}
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.kernel_cache() == {} and torch.equal(loaded(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
@given(m=st.integers(2, 20), k=st.integers(2, 200), n=st.integers(1, 70),
       act=st.sampled_from(W8A8_ACTS), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_cpu_w8a8_equals_reference_property(
    backend: str, m: int, k: int, n: int, act: str, seed: int, dtype: torch.dtype
) -> None:
    w, ws = _w8(n, k, seed)
    a_s, a_z = _act(act)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(dtype)
    bias = torch.randn(n, generator=g) if seed % 2 else None
    y = W8A8_CPU[backend](x, w, ws, bias, a_s, a_z)
    assert torch.equal(y, ref.linear_w8a8(x, w, ws, bias, a_s, a_z))


# ---- W8A16 through fbgemm: activations split into two int8 digits ----------------------------

SPLIT_SCHEMES = ["int8-sym-ch0", "int8-sym-tensor", "int8-sym-ch0-fp16"]
# The two implementations of the two-digit W8A16 scheme, with the cache entry each keeps.
SPLIT_IMPLS = [
    pytest.param(cpu.linear_int8split, "fbgemm", marks=needs_fbgemm, id="int8split"),
    pytest.param(native.linear_w8a16, "native_w8a8", marks=needs_native_w8a8, id="native"),
]


def _bf16_or_fp16_tokens(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Tokens with very different magnitudes, zeros and tiny elements among large ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m).reshape(m, 1)
    x[:, ::7] *= 1e-4
    x[:, 3::11] = 0
    return x.to(dtype)


@pytest.mark.parametrize(("impl", "entry"), SPLIT_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheme", SPLIT_SCHEMES)
@pytest.mark.parametrize("nk", [(33, 64), (100, 97), (7, 304), (130, 2)],
                         ids=lambda c: f"{c[0]}x{c[1]}")
def test_int8split_matches_reference(nk: tuple[int, int], scheme: str, dtype: torch.dtype,
                                     impl: Any, entry: str) -> None:
    n, k = nk
    qt = _qt(n, k, scheme)
    assert cpu.int8split_supported(qt, dtype) or entry != "fbgemm"
    bias = torch.randn(n)
    cache: dict[str, object] = {}
    for m in (*MS, 5, 9):  # the native kernel's tiles of 8, 4 and 2 digit rows
        x = torch.randn(m, k).to(dtype)
        _close(impl(x, qt, bias, cache), ref.linear_weight_only(x, qt, bias), HALF_TOL)
    x3 = torch.randn(2, 5, k).to(dtype)  # leading dims
    _close(impl(x3, qt, None, cache), ref.linear_weight_only(x3, qt, None), HALF_TOL)
    assert list(cache) == [entry]


@pytest.mark.parametrize(("impl", "entry"), SPLIT_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheme", SPLIT_SCHEMES)
def test_int8split_error_against_exact_product_is_within_its_bound(
        scheme: str, dtype: torch.dtype, impl: Any, entry: str) -> None:
    """Elementwise: |y - exact| <= one rounding to x.dtype + (max|x| / 16256) * sum|w| + fp32
    rounding; and overall no worse than the reference, which rounds the weight to x.dtype."""
    n, k = 96, 517
    qt = _qt(n, k, scheme, seed=3)
    x = _bf16_or_fp16_tokens(9, k, dtype, seed=4)
    bias = torch.randn(n)
    y = impl(x, qt, bias, {}).double()
    w = qt.dequantize(torch.float64)
    xd = x.double()
    exact = xd @ w.T + bias.double()
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # half an ulp, relative: 2 ** -9 / -12
    amax = xd.abs().amax(dim=1, keepdim=True)
    bound = (eps * exact.abs() + amax / 16256 * w.abs().sum(dim=1)
             + 1e-6 * (xd.abs() @ w.abs().T + bias.double().abs()))
    assert bool(((y - exact).abs() <= bound).all())
    r = ref.linear_weight_only(x, qt, bias).double()
    assert (y - exact).abs().max() <= (r - exact).abs().max()


@pytest.mark.parametrize(("impl", "entry"), SPLIT_IMPLS)
def test_int8split_is_exact_when_the_digits_hold_every_element(impl: Any, entry: str) -> None:
    """bf16 elements within a factor 127 of the token's max split exactly; with small codes
    every sum stays exact in fp32, so the result is the exact product rounded once."""
    g = torch.Generator().manual_seed(5)
    n, k, m = 40, 64, 6
    mag = torch.randint(128, 16257, (m, k), generator=g).float() / 128  # [1, 127]
    sign = torch.randint(0, 2, (m, k), generator=g).float() * 2 - 1
    x = (mag * sign).bfloat16()
    x[:, 0] = 127.0  # every token's max: p = 0
    small = torch.randint(-3, 4, (n, k), generator=g).float()
    small[0, 0] = 127  # the tensor's max: codes stay small, sums exact in fp32
    qt = lq.quantize(small * 0.37, "int8-sym-tensor")
    codes = qt.qdata.view(torch.int8).view(n, k)
    assert torch.equal(codes.float(), small)
    y = impl(x, qt, None, {})
    exact = (x.double() @ codes.double().T) * qt.scale.double()  # exact in fp64
    assert torch.equal(y, exact.float().bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@given(m=st.integers(1, 6), k=st.integers(1, 80), seed=st.integers(0, 2**16),
       scale_exp=st.integers(-140, 15))
def test_split_digits_property(dtype: torch.dtype, m: int, k: int, seed: int,
                               scale_exp: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2.0**scale_exp
         * torch.rand(m, k, generator=g) ** 4).to(dtype)
    if seed % 3 == 0:
        x[0] = 0
    got = cpu.split_digits(x)
    assert got is not None
    digits, scale = got
    d1, d2 = digits[:m].double(), digits[m:].double()
    assert torch.equal(d1, d1.round()) and torch.equal(d2, d2.round())
    assert d1.abs().max() <= 127 and d2.abs().max() <= 64
    p = torch.log2(scale.double())
    assert torch.equal(p, p.round()) and int(p.min()) >= cpu.SPLIT_MIN_EXP
    xd = x.double()
    amax = xd.abs().amax(dim=1, keepdim=True)
    assert bool((amax <= 127 * scale.double()).all())
    # p is the smallest such exponent (unless clamped, or the token is all zeros)
    smallest = (amax > 127 * scale.double() / 2) | (p == cpu.SPLIT_MIN_EXP) | (amax == 0)
    assert bool(smallest.all())
    err = (xd - scale.double() * (d1 + d2 / 128)).abs()
    assert bool((err <= scale.double() * 2.0**-8).all())
    exact_from = scale.double() * (1 if dtype == torch.bfloat16 else 8)
    assert bool((err[xd.abs() >= exact_from.expand_as(xd)] == 0).all())


@pytest.mark.parametrize(("impl", "entry"), SPLIT_IMPLS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_int8split_nonfinite_token_follows_the_reference(bad: float, impl: Any,
                                                         entry: str) -> None:
    qt = _qt(48, 64, "int8-sym-ch0")
    x = torch.randn(3, 64).bfloat16()
    x[1, 5] = bad
    y = impl(x, qt, None, {})
    r = ref.linear_weight_only(x, qt, None)
    assert torch.equal(y.isnan(), r.isnan())
    assert torch.equal(y.nan_to_num(), r.nan_to_num())


def test_int8split_support_predicate() -> None:
    ok = cpu.fbgemm_available()
    bf = torch.bfloat16
    assert cpu.int8split_supported(_qt(48, 97, "int8-sym-ch0"), bf) is ok
    assert cpu.int8split_supported(_qt(48, 64, "int8-sym-tensor"), torch.float16) is ok
    assert not cpu.int8split_supported(_qt(48, 64, "int8-sym-ch0"), torch.float32)  # fp32 math
    assert not cpu.int8split_supported(_qt(48, 64, "int8-asym-ch0"), bf)
    assert not cpu.int8split_supported(_qt(48, 64, "int8-sym-ch1"), bf)
    assert not cpu.int8split_supported(_qt(48, 64, "int8-sym-g32"), bf)
    assert not cpu.int8split_supported(_qt(48, 64, "int4-sym-ch0"), bf)


@needs_fbgemm
def test_select_path_int8split_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The W8A16 rows without the native kernels (which take them all where they build)."""
    monkeypatch.setattr(native, "w8a16_supported", lambda qt, dtype: False)
    monkeypatch.setattr(native, "avx2_supported", lambda qt, dtype: False)
    bf = torch.bfloat16
    assert (kernels.INT8SPLIT_MIN_M, kernels.INT8SPLIT_MAX_M) == (2, 128)
    big = _qt(1024, 1024, "int8-sym-ch0")  # SMALL_WEIGHT_NUMEL elements
    assert big.numel == kernels.SMALL_WEIGHT_NUMEL

    def path(m: int, qt: lq.QuantizedTensor, dtype: torch.dtype = bf) -> str:
        return kernels.select_path(torch.zeros(m, int(qt.shape[1]), dtype=dtype), qt)

    assert path(1, big) == "cpu_int8pack"  # a tie; int8pack needs no second copy
    assert path(2, big) == "cpu_int8split"
    assert path(128, big, torch.float16) == "cpu_int8split"
    assert path(129, big) == "cpu_scratch"
    assert path(16, big, torch.float32) == "cpu_blocked"  # W8A32 keeps fp32 math
    odd = _qt(1024, 1025, "int8-sym-ch0")  # K % 16 != 0: int8pack cannot take it
    assert path(1, odd) == "cpu_int8split"
    assert path(16, _qt(1024, 1024, "int8-sym-tensor")) == "cpu_int8split"
    assert path(16, _qt(1024, 1024, "int8-asym-ch0")) == "cpu_blocked"
    small = _qt(256, 512, "int8-sym-ch0")  # below SMALL_WEIGHT_NUMEL: the digit ops would cost more
    assert path(2, small) == "cpu_int8pack"
    assert path(40, small) == "cpu_blocked"


@needs_fbgemm
def test_w8a16_layer_uses_int8split_caches_fbgemm_pack_and_clears(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "w8a16_supported", lambda qt, dtype: False)
    monkeypatch.setattr(native, "avx2_supported", lambda qt, dtype: False)
    from linquant.nn import clear_kernel_caches

    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(1024, 1024), "int8-sym-ch0").to(torch.bfloat16)
    x = torch.randn(2, 3, 1024).bfloat16()
    assert kernels.select_path(x, q.qweight) == "cpu_int8split"
    y = q(x)
    _close(y, ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    assert list(q.kernel_cache()) == ["fbgemm"]
    q(torch.randn(1, 1024).bfloat16())  # one token: int8pack, sharing the codes' storage
    assert set(q.kernel_cache()) == {"fbgemm", "int8pack"}
    assert clear_kernel_caches(q) == 2
    assert torch.equal(q(x), y)
    with torch.no_grad():
        q.qweight.qdata.copy_(torch.flip(q.qweight.qdata, [0]))  # in place: repack
    _close(q(x), ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)


@needs_native_w8a8
def test_select_w8a8_path_native_rows() -> None:
    big = torch.zeros(512, 256, dtype=torch.int8)
    for m in (1, 2, 16, 300):  # every M
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert kernels.select_w8a8_path(torch.zeros(m, 256, dtype=dtype), big) \
                == "cpu_native_w8a8"
    assert kernels.select_w8a8_path(torch.zeros(3, 256), big, torch.tensor(0.1)) \
        == "cpu_native_w8a8"  # static activations too
    assert kernels.select_w8a8_path(torch.zeros(1, 64), torch.zeros(64, 64, dtype=torch.int8)) \
        == "reference"  # tiny weight
    x = torch.zeros(2, 256, requires_grad=True)
    assert kernels.select_w8a8_path(x, big) == "reference"


@needs_native_w8a8
def test_native_w8a8_through_the_layer_and_clear_kernel_caches() -> None:
    from linquant.nn import W8A8Linear, clear_kernel_caches

    q = W8A8Linear.from_float(nn.Linear(256, 512))
    few, many = torch.randn(1, 256), torch.randn(300, 256)
    y_few, y_many = q(few), q(many)
    assert list(q.kernel_cache()) == ["native_w8a8", "w8a8_plans"]  # one layout for every M
    assert torch.equal(y_few, ref.linear_w8a8(few, q.weight_qdata, q.weight_scale, q.bias))
    assert torch.equal(y_many, ref.linear_w8a8(many, q.weight_qdata, q.weight_scale, q.bias))
    assert clear_kernel_caches(q) == 1
    assert torch.equal(q(few), y_few)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if "native" in str(p.values)])
@pytest.mark.parametrize("act", W8A8_ACTS)
def test_native_w8a8_over_several_token_chunks_is_bit_identical(
        act: str, backend: str, poisoned_empty: Callable[[], Any]) -> None:
    """The native kernels take the tokens in chunks of about 1 MiB of codes (CHUNK_BYTES in
    w8a8.c and w8a8_avx2.c: 248 tokens at K = 4100, 120 in the AVX2 kernel's int16 form): two
    or more whole chunks and a remainder that ends in tiles of 4 and 1 give the reference's
    bits, and W8A16's digit rows (two per token) the bits of the same tokens run a few at a
    time."""
    n, k = 40, 4100  # 3 row blocks, the last one partial; K not a multiple of 4
    w, ws = _w8(n, k)
    a_s, a_z = _act(act)
    x = torch.randn(2 * 248 + 13, k, generator=torch.Generator().manual_seed(1)) * 2
    bias = torch.randn(n)
    cache: dict[str, object] = {}
    with poisoned_empty():  # a row the kernel skipped stays NaN
        y = W8A8_CPU[backend](x, w, ws, bias, a_s, a_z, cache)
    assert torch.equal(y, ref.linear_w8a8(x, w, ws, bias, a_s, a_z))
    if act != "dynamic" or backend != "native_w8a8":
        return
    qt = lq.quantize(torch.randn(n, k), "int8-sym-ch0")
    xb = x.bfloat16()
    with poisoned_empty():
        y16 = native.linear_w8a16(xb, qt, bias, cache)
    parts = [native.linear_w8a16(xb[i:i + 9], qt, bias, cache) for i in range(0, len(xb), 9)]
    assert torch.equal(y16, torch.cat(parts))
    _close(y16, ref.linear_weight_only(xb, qt, bias), HALF_TOL)


# ---- W8A8 on AVX2 only (linquant's AVX2 W8A8 kernel) and oneDNN's int8 GEMM without VNNI -------


@needs_native_w8a8_avx2
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-sym"])
def test_avx2_w8a8_exact_with_minus_128_weights(static: bool) -> None:
    """-128 weights (v = 0 in the split form; |w| = 128 in the sign form) with codes at both
    ends, rows of one sign (shifted) and of both signs (split or the sign form): exact."""
    k = 1024
    w = torch.full((24, k), -128, dtype=torch.int8)
    w[1::2] = 127
    w[2, ::2] = 127
    ws = torch.full((24, 1), 1e-3)
    a_s = torch.tensor(0.01) if static else None
    big = 1e4
    x = torch.full((6, k), big)
    x[1] = -big
    x[2, ::2] = -big
    x[3] = 0.0
    x[4, 7] = -big
    y = _native_avx2(x, w, ws, None, a_s, None, {})
    assert torch.equal(y, ref.linear_w8a8(x, w, ws, None, a_s, None))
    exact = (ref.quantize_activation_per_token(x)[0].double() @ w.double().T)
    if not static:  # the int32 sums themselves, from an independent fp64 product
        got = (y.double() / ref.quantize_activation_per_token(x)[1].double() / ws.double().T)
        assert torch.allclose(got[[0, 1, 2, 4]], exact[[0, 1, 2, 4]], rtol=1e-6, atol=0)


@needs_native_w8a8_avx2
def test_avx2_w8a8_tiles_odd_shapes_threads() -> None:
    lib = native._load(native.W8A8_AVX2)
    assert lib is not None
    for m in (1, 2, 3, 4, 5, 7, 9):
        for n, k in ((1, 2), (15, 3), (17, 5), (33, 255), (16, 64)):
            w, ws = _w8(n, k, seed=m + n + k)
            x = torch.randn(m, k) * 3
            bias = torch.randn(n)
            for a_s in (None, torch.tensor(0.02)):
                y = native._run_w8a8(lib, x, w, ws, bias, a_s, None, native.repack_w8a8(w))
                assert y is not None and torch.equal(y, ref.linear_w8a8(x, w, ws, bias, a_s))
    w, ws = _w8(300, 700)
    x = torch.randn(37, 700)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native_avx2(x, w, ws, None, None, None, {})
        torch.set_num_threads(max(2, threads))
        assert torch.equal(_native_avx2(x, w, ws, None, None, None, {}), one)
    finally:
        torch.set_num_threads(threads)


@needs_native_w8a8_avx2
def test_avx2_w8a8_static_asymmetric_codes_are_exact() -> None:
    """Static asymmetric codes reach a - 128 = -128, which the sign form cannot negate: they
    take the split form, or the int16 form past 50% of chunks with a remainder; exact for every
    code (0 and 255 included) and every weight (-128 included), on every tile size."""
    lib = native._load(native.W8A8_AVX2)
    assert lib is not None
    a_s = torch.tensor(0.02)
    for z in (0, 97, 255):
        a_z = torch.tensor(z, dtype=torch.uint8)
        for m, n, k in ((1, 16, 64), (2, 17, 3), (3, 33, 129), (5, 40, 1000)):
            w, ws = _w8(n, k, seed=m + z)
            w[0] = -128
            w[-1, ::2] = 127
            x = torch.randn(m, k) * 3
            x[0, ::3] = 1e4  # code 255
            x[-1, 1::3] = -1e4  # code 0
            bias = torch.randn(n)
            y = native._run_w8a8(lib, x, w, ws, bias, a_s, a_z, native.repack_w8a8(w))
            assert y is not None and torch.equal(y, ref.linear_w8a8(x, w, ws, bias, a_s, a_z))


def _acts(dist: str, m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Activations whose codes stress the AVX2 kernel's split in different ways."""
    if dist == "gauss":  # few remainders: the split form
        return torch.randn(m, k, generator=g)
    if dist == "uniform":  # remainders in about 44% of the chunks: the sign form (symmetric)
        return torch.rand(m, k, generator=g) * 2 - 1
    if dist == "positive":  # one sign, span <= 128 once shifted: no remainder
        return torch.rand(m, k, generator=g) + 0.01
    if dist == "constant":
        return torch.full((m, k), -0.7)
    if dist == "pairs":  # every pair of one sign and large: a remainder in every chunk
        return torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(m, -(-k // 4))[:, :k].contiguous()
    if dist == "gelu":  # with a small zero point, static asymmetric codes near a = z
        return torch.nn.functional.gelu(torch.randn(m, k, generator=g) * 2) / 4
    if dist == "mixed":  # "pairs" tokens (the sign form) and a shifted one, which it restores
        x = _acts("pairs", m, k, g)
        x[0] = torch.rand(k, generator=g) * 0.5 + 0.5
        return x
    raise AssertionError(dist)


DISTS = ["gauss", "uniform", "positive", "constant", "pairs", "mixed", "gelu"]


def _prepare_avx2(x: torch.Tensor, kp: int, a_s: float, z: int) -> dict[str, Any]:
    """``lq_w8a8_prepare`` on x [M, K]: the split codes, shifts, sums and remainders, read back
    from the activation buffer (its layout: ``Acts`` in w8a8_avx2.c)."""
    lib = native._load(native.W8A8_AVX2)
    assert lib is not None
    m, k = x.shape
    nq = kp // 4
    a = torch.zeros(5 * m * kp + 16 * m + 128, dtype=torch.uint8)
    tok = torch.empty(m)
    total = lib.lq_w8a8_prepare(x.contiguous().data_ptr(), a.data_ptr(), tok.data_ptr(), m, k,
                                kp, a_s, z)
    o = (a.data_ptr() + m * kp + 63) // 64 * 64 - a.data_ptr()
    ints = a[o:o + 4 * (3 * m + 2 * m * nq)].view(torch.int32)
    return {"total": total, "d": a[:m * kp].view(torch.int8).reshape(m, kp).to(torch.int32),
            "dsum": ints[:m], "shift": ints[m:2 * m], "nres": ints[2 * m:3 * m],
            "ridx": ints[3 * m:3 * m + m * nq].reshape(m, nq),
            "rpat": ints[3 * m + m * nq:].reshape(m, nq).contiguous().view(torch.int8)
            .reshape(m, nq, 4).to(torch.int32)}


@needs_native_w8a8_avx2
@given(m=st.integers(1, 5), k=st.integers(1, 200), dist=st.sampled_from(DISTS),
       mode=st.sampled_from(["dynamic", "static-sym", "static-asym-0", "static-asym-97",
                             "static-asym-255"]),
       seed=st.integers(0, 2**16))
def test_avx2_w8a8_split_keeps_codes_and_every_pair_exact(
    m: int, k: int, dist: str, mode: str, seed: int
) -> None:
    """The activation side of the AVX2 kernel, exactly: d' + e + t gives back the reference's
    codes; every pair of d' fits vpmaddubsw's int16 sum for any weight (opposite signs, or
    |d0| + |d1| <= 128); every pair of e holds a zero; t is the midpoint where the codes span at
    most 128, else 0; the sums and the remainder list are consistent."""
    g = torch.Generator().manual_seed(seed)
    x = _acts(dist, m, k, g) * 3
    kp = -(-k // 4) * 4
    if mode == "dynamic":
        codes = ref.quantize_activation_per_token(x)[0].to(torch.int32)
        a_s, z = 0.0, -1
    else:
        a_s = 0.02
        z = -1 if mode == "static-sym" else int(mode.rsplit("-", 1)[1])
        if z < 0:
            codes = ref.quantize_activation_per_tensor(x, torch.tensor(a_s)).to(torch.int32)
        else:
            codes = ref.quantize_activation_per_tensor(
                x, torch.tensor(a_s), torch.tensor(z, dtype=torch.uint8)).to(torch.int32) - 128
    r = _prepare_avx2(x, kp, a_s, z)
    nres = r["nres"]
    assert r["total"] == int(nres.sum())
    e = torch.zeros(m, kp, dtype=torch.int32)
    for i in range(m):
        idx = r["ridx"][i, :nres[i]]
        assert bool((idx[1:] > idx[:-1]).all()) and bool((idx < kp // 4).all())
        pat = r["rpat"][i, :nres[i]]
        assert bool(pat.ne(0).any(dim=1).all())  # no empty entries
        e[i].view(kp // 4, 4)[idx.long()] = pat
    t = r["shift"]
    for i in range(m):
        lo, hi = int(codes[i].min()), int(codes[i].max())
        assert int(t[i]) == ((lo + hi) // 2 if hi - lo <= 128 else 0)
        assert hi - lo > 128 or int(nres[i]) == 0  # shifted into [-64, 64]: nothing to split
    d = r["d"]
    assert torch.equal((d + e)[:, :k] + t[:, None], codes)
    assert not d[:, k:].any() and not e[:, k:].any()
    assert torch.equal(r["dsum"], (codes - t[:, None]).sum(dim=1, dtype=torch.int32))
    p0, p1 = d.view(m, kp // 2, 2).unbind(-1)
    assert bool(((p0 * p1 <= 0) | (p0.abs() + p1.abs() <= 128)).all())
    e0, e1 = e.view(m, kp // 2, 2).unbind(-1)
    assert bool(((e0 == 0) | (e1 == 0)).all())


@needs_native_w8a8_avx2
@pytest.mark.parametrize("k", [70, 200])
def test_avx2_w8a8_split_boundary(k: int) -> None:
    """A pair of one sign summing to 129 is split (255 * 129 would overflow int16); 128 is not;
    opposite signs never are. Codes set exactly (max 127, so the scale is 1)."""
    x = torch.zeros(3, k)
    x[:, 0] = 127.0  # pair (127, 0): fits
    x[0, 40], x[0, 41] = 64.0, 65.0  # 129: split
    x[1, 40], x[1, 41] = 64.0, 64.0  # 128: kept
    x[2, 40], x[2, 41] = -127.0, 127.0  # opposite signs: kept
    x[:, 2:4] = -2.0  # span 129 > 128, so no shift
    kp = -(-k // 4) * 4
    r = _prepare_avx2(x, kp, 0.0, -1)
    assert r["nres"].tolist() == [1, 0, 0] and r["shift"].tolist() == [0, 0, 0]
    assert r["ridx"][0, 0] == 10 and r["rpat"][0, 0].tolist() == [0, 1, 0, 0]
    assert r["d"][0, 40:42].tolist() == [64, 64]
    w = torch.full((16, k), 127, dtype=torch.int8)
    w[1] = -128
    ws = torch.full((16, 1), 1e-3)
    assert torch.equal(_native_avx2(x, w, ws, None, None, None, {}), ref.linear_w8a8(x, w, ws))


@needs_native_w8a8_avx2
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("act", W8A8_ACTS)
def test_avx2_w8a8_exact_on_every_form(dist: str, act: str) -> None:
    """Codes that take each of the kernel's forms (split with few remainders, shifted, the sign
    form, the int16 form for static asymmetric codes), on 1-9 tokens (every tile size) and odd
    K, against the reference bit for bit; the remainder rate puts each call where the
    documented rule says (30% for symmetric codes, 50% for static asymmetric ones)."""
    g = torch.Generator().manual_seed(1)
    a_s, a_z = _act(act)
    for m, n, k in ((1, 17, 255), (2, 16, 64), (3, 33, 130), (4, 40, 1001), (9, 24, 67)):
        w, ws = _w8(n, k, seed=m)
        w[0, ::5] = -128
        # static: codes over the whole range (Gaussian ones at about 1/4 of it)
        amp = 3.0 if a_s is None else (32 if dist == "gauss" else 127) * float(a_s)
        x = _acts(dist, m, k, g) * amp
        bias = torch.randn(n, generator=g)
        y = _native_avx2(x, w, ws, bias, a_s, a_z, {})
        assert torch.equal(y, ref.linear_w8a8(x, w, ws, bias, a_s, a_z))
    kp = -(-k // 4) * 4
    r = _prepare_avx2(x, kp, 0.0 if a_s is None else float(a_s),
                      -1 if a_z is None else int(a_z))
    form = _avx2_form(r["total"], m, kp, act != "static-asym")
    if dist in ("pairs", "mixed"):
        assert form == ("int16" if act == "static-asym" else "sign")
    elif dist in ("gauss", "positive", "constant"):
        assert form == "split"


def _avx2_form(nres: int, m: int, kp: int, sym: bool) -> str:
    lib = native._load(native.W8A8_AVX2)
    assert lib is not None
    return ("split", "sign", "int16")[lib.lq_w8a8_form(nres, m, kp, int(sym))]


@needs_native_w8a8_avx2
@pytest.mark.parametrize("dist", ["gauss", "pairs", "gelu"])
def test_avx2_w8a8_forms_with_threads(dist: str) -> None:
    """Calls big enough for the threaded quantization, split and restore (M * K >= 65536), in
    each form (split; sign; int16 for the GELU codes with a small zero point), on 1 and 2
    threads: the reference's bits either way."""
    g = torch.Generator().manual_seed(3)
    m, n, k = 70, 40, 1001
    w, ws = _w8(n, k)
    x = _acts(dist, m, k, g) * 3
    a_s, a_z = (torch.tensor(0.02), torch.tensor(5, dtype=torch.uint8)) if dist == "gelu" \
        else (None, None)
    kp = -(-k // 4) * 4
    r = _prepare_avx2(x, kp, 0.0 if a_s is None else float(a_s), -1 if a_z is None else 5)
    assert _avx2_form(r["total"], m, kp, a_z is None) == {
        "gauss": "split", "pairs": "sign", "gelu": "int16"}[dist]
    want = ref.linear_w8a8(x, w, ws, None, a_s, a_z)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(_native_avx2(x, w, ws, None, a_s, a_z, {}), want)
    finally:
        torch.set_num_threads(threads)


@needs_native_w8a8_avx2
def test_avx2_w8a8_form_rule() -> None:
    """The documented thresholds: symmetric codes leave the split form past 30% of the chunks
    with a remainder (for the sign form), static asymmetric ones past 50% (for int16)."""
    chunks = 10 * 100  # 10 tokens, Kp = 400
    assert [_avx2_form(n, 10, 400, True) for n in (0, 300, 301, chunks)] == [
        "split", "split", "sign", "sign"]
    assert [_avx2_form(n, 10, 400, False) for n in (0, 301, 500, 501, chunks)] == [
        "split", "split", "split", "int16", "int16"]


@needs_native_w8a8_avx2
def test_avx2_w8a8_static_asymmetric_gelu_codes_take_the_int16_form() -> None:
    """GELU outputs quantized statically with a small zero point: most codes sit near a = z, so
    d = a - 128 is near -128 in most pairs and the split would leave a remainder in most chunks
    (the int16 form then); exact at every tile size."""
    g = torch.Generator().manual_seed(2)
    a_s, a_z = torch.tensor(0.02), torch.tensor(5, dtype=torch.uint8)
    for m, n, k in ((1, 16, 512), (2, 17, 130), (3, 40, 1001), (9, 24, 68)):
        w, ws = _w8(n, k, seed=m)
        w[0, ::3] = -128
        x = torch.nn.functional.gelu(torch.randn(m, k, generator=g) * 2)
        r = _prepare_avx2(x, -(-k // 4) * 4, float(a_s), int(a_z))
        assert _avx2_form(r["total"], m, -(-k // 4) * 4, False) == "int16"
        y = _native_avx2(x, w, ws, None, a_s, a_z, {})
        assert torch.equal(y, ref.linear_w8a8(x, w, ws, None, a_s, a_z))


@needs_native_w8a8_avx2
def test_select_w8a8_path_avx2_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the VNNI kernel does not run (a CPU without AVX512-VNNI), the AVX2 kernel takes
    every W8A8 layer at every M."""
    monkeypatch.setattr(native, "w8a8_supported", lambda x, w: False)
    big = torch.zeros(512, 256, dtype=torch.int8)
    for m in (1, 2, 16, 300):
        assert kernels.select_w8a8_path(torch.zeros(m, 256), big) == "cpu_native_w8a8_avx2"
    s = torch.tensor(0.1)
    assert kernels.select_w8a8_path(torch.zeros(3, 256), big, s) == "cpu_native_w8a8_avx2"
    from linquant.nn import W8A8Linear

    q = W8A8Linear.from_float(nn.Linear(256, 512))
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = q(x)
    assert [p.path for p in q.kernel_cache()["w8a8_plans"].values()] == ["cpu_native_w8a8_avx2"]
    assert torch.equal(y, ref.linear_w8a8(x, q.weight_qdata, q.weight_scale, q.bias))
    # static asymmetric activations (a zero point) take it too
    qa = W8A8Linear.from_float(nn.Linear(256, 512), activation="static", act_symmetric=False)
    qa.set_activation_range(-3.0, 2.5)
    with torch.no_grad():
        ya = qa(x)
    assert [p.path for p in qa.kernel_cache()["w8a8_plans"].values()] == ["cpu_native_w8a8_avx2"]
    assert torch.equal(ya, ref.linear_w8a8(x, qa.weight_qdata, qa.weight_scale, qa.bias,
                                           qa.input_scale, qa._buffers["input_zero_point"]))


def test_int8_matmul_stays_exact_when_int_mm_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``torch._int_mm`` saturates (CPUs without VNNI), the reference's product takes the
    exact int32 fallback."""
    a = torch.full((3, 64), 127, dtype=torch.int8)
    w = torch.full((5, 64), 127, dtype=torch.int8)
    w[1] = -128
    assert ref.int_mm_supported(a, w) == ref.cpu_int_mm_exact()
    monkeypatch.setattr(ref, "cpu_int_mm_exact", lambda: False)
    assert not ref.int_mm_supported(a, w)
    assert torch.equal(ref.int8_matmul(a, w), (a.long() @ w.long().T).int())


@pytest.mark.slow
def test_without_vnni_in_onednn_w8a8_stays_exact() -> None:
    """``ONEDNN_MAX_CPU_ISA=AVX2`` gives oneDNN's int8 GEMM the saturating AVX2 path (as on a
    CPU without VNNI): ``torch._int_mm`` and ``qlinear_pointwise`` are then inexact. In a
    process under that cap (and linquant's own, ``LINQUANT_MAX_CPU_ISA=avx2``) both are
    detected and left alone, and a W8A8 layer's output is the exact formula's."""
    import os
    import subprocess
    import sys

    code = """
import torch
from torch import nn
from linquant.kernels import cpu, native, reference as ref
from linquant import kernels
from linquant.nn import W8A8Linear
a = torch.full((4, 64), 127, dtype=torch.int8)
print("int_mm exact", torch.equal(torch._int_mm(a, a.t().contiguous()), (a.int() @ a.int().T)))
print("probe", ref.cpu_int_mm_exact(), cpu.onednn_available(), cpu.fbgemm_available())
torch.manual_seed(0)
q = W8A8Linear.from_float(nn.Linear(512, 384))
x = torch.randn(9, 512) * 3
with torch.no_grad():
    y = q(x)
print("path", kernels.select_w8a8_path(x, q.weight_qdata))
c, s = ref.quantize_activation_per_token(x)
acc = (c.double() @ q.weight_qdata.double().T).float()  # exact int32 sums, then the rescale
want = acc.mul_(s).mul_(q.weight_scale.reshape(1, -1).float()).add_(q.bias.float())
print("exact", torch.equal(y, want))
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "LINQUANT_MAX_CPU_ISA": "avx2",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "int_mm exact False" in lines  # oneDNN's AVX2 int8 GEMM saturates...
    assert "probe False False False" in lines  # ... and linquant sees it
    want_path = "cpu_native_w8a8_avx2" if native.available("w8a8_avx2") else "reference"
    assert f"path {want_path}" in lines and "exact True" in lines, out.stdout


def test_kernel_cache_nbytes_counts_each_layout_storage_once_and_not_the_layers_own() -> None:
    """Exact on a hand-filled cache: tensors in tuples, lists, dicts and plain objects count
    once per storage (a view adds nothing); the layer's own buffers, plans and opaque objects
    count nothing."""
    import types

    from linquant.nn import kernel_cache_nbytes

    q = QuantLinear.from_float(nn.Linear(64, 32), "int4-sym-g32")
    assert kernel_cache_nbytes(q) == 0
    a = torch.empty(100, dtype=torch.uint8)
    b = torch.empty(10, dtype=torch.float32)
    cache = q.kernel_cache()
    cache["layout"] = (a, [b, a[:50], q.weight_qdata], {"c": torch.empty(3)})
    cache["pack"] = types.SimpleNamespace(words=torch.empty(4, dtype=torch.int32), scale=b)
    cache["cpu_plans"] = {"key": torch.empty(1000)}  # plans: not counted
    cache["opaque"] = object()
    assert kernel_cache_nbytes(q) == 100 + 40 + 12 + 16
    model = nn.Sequential(q, nn.ReLU(), QuantLinear.from_float(nn.Linear(32, 8), "int8-sym-ch0"))
    model[2].kernel_cache()["x"] = (torch.empty(7, dtype=torch.int8),)
    assert kernel_cache_nbytes(model) == 168 + 7


def test_kernel_cache_nbytes_sees_a_real_layout_and_clear_frees_it() -> None:
    from linquant.nn import clear_kernel_caches, kernel_cache_nbytes

    q = QuantLinear.from_float(nn.Linear(512, 256), "int4-sym-g32").bfloat16()
    with torch.inference_mode():
        q(torch.randn(3, 512).bfloat16())
    held = kernel_cache_nbytes(q)
    path = kernels.select_path(torch.randn(3, 512).bfloat16(), q.qweight)
    if path.startswith("cpu_native") or path == "cpu_int4pack":  # paths with a layout
        assert held >= 256 * 512 // 2  # at least another copy of the int4 codes
    clear_kernel_caches(q)
    assert kernel_cache_nbytes(q) == 0


def test_one_layer_called_from_two_python_threads() -> None:
    """A layer's plan binds one dequantizer, which every Python thread calling the layer
    shares. Where the native dequantizer does not write the output itself (fp64, or no AVX2
    library), it staged codes in one buffer of its own: two threads overwrote each other's
    (7 of 150 calls wrong per thread with fp64 here). It now stages them in a buffer of the
    calling thread's."""
    import threading

    deq = cpu._RowDequant(lq.quantize(torch.randn(16, 64), "int4-asym-g32"), native=False)
    seen: list[int] = []
    both = threading.Barrier(2)

    def grab() -> None:
        ptr = deq._buf(1024).data_ptr()
        both.wait()  # both threads alive, each buffer held: two addresses, or one shared
        seen.append(ptr)

    runs = [threading.Thread(target=grab) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert len(set(seen)) == 2
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(512, 1024), "int4-asym-g32").double()
    xs = [torch.randn(4, 512, dtype=torch.float64) * (i + 1) for i in range(2)]
    assert kernels.select_path(xs[0], q.qweight) == "cpu_blocked"
    with torch.no_grad():
        want = [q(x) for x in xs]
    wrong = [0, 0]

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(100):
                wrong[i] += not torch.equal(q(xs[i]), want[i])

    runs = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert wrong == [0, 0]
