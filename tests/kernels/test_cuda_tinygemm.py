"""The tinygemm path (linquant.kernels.cuda, ``cuda_tinygemm``) against the reference.

Without a GPU: the bytes and parameters handed to the operator are checked exactly against an
independent decoding of the stored codes, and everything around the operator (the layout
cache, the runner, plans, the probe, the fallback on failure) runs on the CPU with the two
aten operators replaced by an emulation of their documented contract (PyTorch's
``aten/src/ATen/native/cuda/int4mm.cu``: uint8 ``[N, K / 2]`` codes, two per byte;
``w = scale * (q - 8) + zero`` per group, ``(scale, zero)`` bf16 ``[K / g, N, 2]``; bf16
activations, contiguous). With a GPU the tests marked ``cuda`` run the real operators:
the probe, every supported scheme on real and odd shapes, the dispatcher's choices, plans
and CUDA-graph capture. Tolerance as for the Triton kernels: ``|y - ref| <= 2e-2 * max|ref|``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linquant as lq
from linquant import kernels
from linquant.kernels import cpu, cuda, plans, triton_linear
from linquant.kernels import reference as ref
from linquant.nn import QuantLinear

HALF_TOL = 2e-2
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SCHEMES = ["int4-sym-g128", "int4-asym-g32", "int4-asymf-g64-bf16", "int4-sym-g256-fp16",
           "int4-asym-g32-bf16"]


def _close(y: torch.Tensor, r: torch.Tensor, rel: float = HALF_TOL) -> None:
    assert y.shape == r.shape and y.dtype == r.dtype, (y.shape, r.shape, y.dtype, r.dtype)
    err = (y.double() - r.double()).abs().max().item()
    bound = rel * max(r.double().abs().max().item(), 1e-6)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _qt(n: int, k: int, scheme: str, seed: int = 0, device: str = "cpu") -> lq.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.3 * torch.rand(n, 1, generator=g)  # off-centre rows
    return lq.quantize(w, scheme).to(device)


def _x(*shape: int, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16().to(device)


# ---- the operator's contract, emulated on the CPU ----------------------------------------------


class Emulated:
    """``_convert`` / ``_mm`` with the documented semantics: ``order`` says which nibble holds
    the even-numbered code (the CUDA operator of PyTorch 2.5+: the high one), or ``"int32"``:
    one code per int32 element, as PyTorch 2.4 takes them (it rejects uint8 codes, and the
    later versions int32 ones)."""

    def __init__(self, order: str = "hi") -> None:
        self.order = order
        self.converts = 0
        self.fail: Exception | None = None

    def convert(self, codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        want = torch.int32 if self.order == "int32" else torch.uint8
        if codes.dtype != want:
            raise RuntimeError(f"_convert_weight_to_int4pack: expect weight to be {want}")
        assert codes.dim() == 2 and codes.is_contiguous()
        assert inner_k_tiles == cuda.INNER_K_TILES
        per_element = 1 if self.order == "int32" else 2
        assert (codes.shape[1] * per_element) % (inner_k_tiles * 16) == 0
        self.converts += 1
        return codes.clone()

    def mm(self, x2: torch.Tensor, packed: torch.Tensor, group: int,
           sz: torch.Tensor) -> torch.Tensor:
        if self.fail is not None:
            raise self.fail
        assert x2.dtype == torch.bfloat16 and x2.dim() == 2 and x2.is_contiguous()
        assert sz.dtype == torch.bfloat16 and sz.dim() == 3 and sz.shape[2] == 2
        assert group in (32, 64, 128, 256)
        if self.order == "int32":
            assert packed.dtype == torch.int32 and 0 <= int(packed.min()) <= int(packed.max()) < 16
            q = packed.float()
        else:
            hi, lo = (packed >> 4).to(torch.int32), (packed & 0xF).to(torch.int32)
            even, odd = (hi, lo) if self.order == "hi" else (lo, hi)
            q = torch.stack([even, odd], dim=-1).reshape(packed.shape[0], -1).float()
        s = sz[..., 0].float().t().repeat_interleave(group, 1)
        z = sz[..., 1].float().t().repeat_interleave(group, 1)
        w = ((q - 8) * s + z).bfloat16()  # tinygemm dequantizes into bf16
        return (x2.float() @ w.float().t()).bfloat16()


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulated]:
    """The emulated operators, the CPU "device" probed as code format ``hi``, no failures."""
    em = Emulated("hi")
    monkeypatch.setattr(cuda, "_convert", em.convert)
    monkeypatch.setattr(cuda, "_mm", em.mm)
    monkeypatch.delenv("LINQUANT_TINYGEMM", raising=False)
    cuda._reset()
    cuda._state["cpu"] = ("hi", "")
    yield em
    cuda._reset()


# ---- exact: the bytes and the parameters ------------------------------------------------------


def test_pack_codes_by_hand() -> None:
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 8, 7]], dtype=torch.uint8)
    assert cuda.pack_codes(q, "lo").tolist() == [[0x21, 0x43], [0x0F, 0x78]]
    assert cuda.pack_codes(q, "hi").tolist() == [[0x12, 0x34], [0xF0, 0x87]]
    i32 = cuda.pack_codes(q, "int32")
    assert i32.dtype == torch.int32 and i32.tolist() == q.tolist()


def test_weight_bytes_by_hand() -> None:
    # symmetric codes c are stored as 4-bit two's complement; the operator wants c + 8
    w = torch.tensor([[-7.0, 7.0] + [0.0] * 30])
    qt = lq.quantize(w, "int4-sym-g32")
    assert qt.codes()[0, :2].tolist() == [-7, 7]
    assert cuda.weight_bytes(qt, "lo")[0, 0].item() == 1 | (15 << 4)
    assert cuda.weight_bytes(qt, "hi")[0, 0].item() == (1 << 4) | 15
    assert cuda.weight_bytes(qt, "lo")[0, 1:].tolist() == [0x88] * 15  # zeros: code 8
    assert cuda.weight_bytes(qt, "int32")[0].tolist() == [1, 15] + [8] * 30


@settings(max_examples=60, deadline=None)
@given(scheme=st.sampled_from(["int4-sym-g32", "int4-asym-g64-fp16", "int4-asymf-g32-bf16",
                               "int4-sym-g128-bf16", "int4-asym-ch0", "int4-sym-tensor"]),
       n=st.integers(1, 12), kw=st.integers(1, 4), order=st.sampled_from(cuda.FORMATS),
       seed=st.integers(0, 2**16))
def test_weight_bytes_are_the_unpacked_codes(scheme: str, n: int, kw: int, order: str,
                                             seed: int) -> None:
    """Straight from the stream (XOR, nibble swap) == unpack, sign-extend, +8, pack again."""
    k = 128 * kw
    qt = _qt(n, k, scheme, seed)
    got = cuda.weight_bytes(qt, order)
    assert (got.dtype, tuple(got.shape)) == ((torch.int32, (n, k)) if order == "int32"
                                             else (torch.uint8, (n, k // 2)))
    assert torch.equal(got, cuda.pack_codes(cpu.int4_codes(qt), order))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scales_and_zeros_reproduce_dequantize(scheme: str) -> None:
    """``scale * (q - 8) + zero`` with the bf16 pairs is the stored weight within the bf16
    rounding of scale and zero (exact where both are exact in bf16)."""
    qt = _qt(24, 256, scheme)
    g = int(qt.scheme.group_size or 256)
    sz = cuda.scales_and_zeros(qt)
    assert sz.dtype == torch.bfloat16 and sz.shape == (256 // g, 24, 2)
    s = sz[..., 0].float().t().repeat_interleave(g, 1)
    z = sz[..., 1].float().t().repeat_interleave(g, 1)
    w = (cpu.int4_codes(qt).float() - 8) * s + z
    want = qt.dequantize(torch.float32)
    s32, z32 = (t.repeat_interleave(g, 1) for t in cpu.int4_scale_zero(qt))
    bound = 2.0**-8 * (8 * s32.abs() + z32.abs()) + 1e-7
    assert ((w - want).abs() <= bound).all()
    if scheme == "int4-sym-g256-fp16" or scheme.endswith("sym-g128"):
        assert (sz[..., 1] == 0).all()  # symmetric: no zero
    if scheme == "int4-asym-g32-bf16":  # bf16 scales stay exact
        assert torch.equal(sz[..., 0].t(), qt.scale.reshape(24, -1))


# ---- around the operator, on the CPU (emulated operator) ---------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_runner_matches_reference(emulated: Emulated, scheme: str, m: int,
                                  with_bias: bool) -> None:
    qt = _qt(40, 512, scheme)
    bias = torch.randn(40) if with_bias else None
    run = cuda.runner(qt, bias, {})
    x = _x(m, 512)
    _close(run(x), ref.linear_weight_only(x, qt, bias))
    x3 = _x(2, m, 512)
    _close(run(x3), ref.linear_weight_only(x3, qt, bias))
    wide = _x(m, 1024)[:, ::2]  # last-dim stride 2: copied before the operator
    _close(run(wide), ref.linear_weight_only(wide, qt, bias))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_runner_on_pytorch_24s_int32_format(emulated: Emulated, scheme: str) -> None:
    """The device probed as ``int32`` (PyTorch 2.4): the layout is built from int32 codes."""
    emulated.order = "int32"
    cuda._state["cpu"] = ("int32", "")
    qt = _qt(40, 512, scheme)
    bias = torch.randn(40)
    x = _x(3, 512)
    _close(cuda.runner(qt, bias, {})(x), ref.linear_weight_only(x, qt, bias))
    assert emulated.converts == 1


def test_layout_is_cached_per_weight(emulated: Emulated) -> None:
    qt = _qt(16, 256, "int4-sym-g32")
    cache: dict[str, Any] = {}
    x = _x(1, 256)
    y = cuda.linear_tinygemm(x, qt, None, cache)
    cuda.runner(qt, None, cache)(x)
    assert emulated.converts == 1 and "tinygemm" in cache
    qt.qdata.bitwise_xor_(0x11)  # in place: the cached layout must not be used again
    y2 = cuda.linear_tinygemm(x, qt, None, cache)
    assert emulated.converts == 2
    _close(y2, ref.linear_weight_only(x, qt))
    assert not torch.equal(y, y2)


def test_bias_that_needs_grad_gets_one(emulated: Emulated) -> None:
    qt = _qt(16, 128, "int4-asym-g32")
    bias = torch.randn(16, requires_grad=True)
    y = cuda.linear_tinygemm(_x(3, 128), qt, bias, {})
    y.float().sum().backward()
    assert bias.grad is not None and torch.equal(bias.grad, torch.full((16,), 3.0))


@pytest.mark.parametrize("order", cuda.FORMATS)
def test_probe_finds_the_code_format(monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    em = Emulated(order)
    monkeypatch.setattr(cuda, "_convert", em.convert)
    monkeypatch.setattr(cuda, "_mm", em.mm)
    monkeypatch.setattr(cuda, "_why_not", lambda device: "")
    assert cuda._probe(torch.device("cpu")) == (order, "")


def test_probe_rejects_a_wrong_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    em = Emulated("hi")
    monkeypatch.setattr(cuda, "_convert", em.convert)
    monkeypatch.setattr(cuda, "_why_not", lambda device: "")

    def no_offset(x2: torch.Tensor, packed: torch.Tensor, g: int, sz: torch.Tensor) -> Any:
        sz = sz.clone()
        sz[..., 1] = 0  # an operator that ignored the zeros
        return em.mm(x2, packed, g, sz)

    monkeypatch.setattr(cuda, "_mm", no_offset)
    order, why = cuda._probe(torch.device("cpu"))
    assert order is None and "in no code format (hi, lo, int32)" in why

    def raises(*args: Any) -> Any:
        raise RuntimeError("expected self.dtype == kInt")

    monkeypatch.setattr(cuda, "_mm", raises)
    order, why = cuda._probe(torch.device("cpu"))
    assert order is None and why.startswith("probe failed: RuntimeError: expected self.dtype")


def test_no_probe_inside_a_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe copies to the host, which a CUDA graph capture forbids: during a capture the
    path is undecided (not off for good), and the first call outside one probes."""
    probes: list[torch.device] = []

    def probe(device: torch.device) -> tuple[str | None, str]:
        probes.append(device)
        return "hi", ""

    monkeypatch.setattr(cuda, "_probe", probe)
    cuda._reset()
    dev = torch.device("cpu")
    try:
        monkeypatch.setattr(cuda, "_capturing", lambda: True)
        assert cuda._order(dev) is None and not probes and "cpu" not in cuda._state
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            assert cuda.status("cuda:0") == (
                "unavailable: not probed yet (a CUDA graph capture is in progress)")
        assert not probes
        monkeypatch.setattr(cuda, "_capturing", lambda: False)
        assert cuda._order(dev) == "hi" and probes == [dev]
        monkeypatch.setattr(cuda, "_capturing", lambda: True)
        assert cuda._order(dev) == "hi" and len(probes) == 1  # decided: no probe needed
    finally:
        cuda._reset()


def test_quantlinear_keeps_and_replays_a_plan(emulated: Emulated,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher's ``cuda_tinygemm`` branch, forced for CPU tensors: a plan in
    ``cuda_plans`` that ``QuantLinear.forward`` replays without asking the dispatcher."""
    monkeypatch.setattr(kernels, "select_path", lambda x, qt: "cuda_tinygemm")
    lin = nn.Linear(256, 48).bfloat16()
    q = QuantLinear.from_float(lin, "int4-asym-g64-bf16")
    x = _x(1, 256)
    with torch.no_grad():
        y = q(x)
        _close(y, ref.linear_weight_only(x, q.qweight, q.bias))
        cache = q.kernel_cache()
        assert sorted(cache) == ["cuda_plans", "tinygemm"]
        assert [p.path for p in cache["cuda_plans"].values()] == ["cuda_tinygemm"]

        def dispatcher(*a: Any) -> Any:
            raise AssertionError("a repeat call asked the dispatcher")

        monkeypatch.setattr(kernels, "select_path", dispatcher)
        assert torch.equal(q(x), y)
        q.bias.add_(1.0)  # in place: the plan's bias is stale, so the dispatcher runs again
        with pytest.raises(AssertionError, match="asked the dispatcher"):
            q(x)


def test_failure_warns_once_and_falls_back(emulated: Emulated,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "select_path",
                        lambda x, qt: "reference" if cuda.failures() else "cuda_tinygemm")
    emulated.fail = RuntimeError("CUDA error: no kernel image is available")
    qt = _qt(16, 256, "int4-sym-g128")
    x = _x(1, 256)
    cache: dict[str, Any] = {}
    with pytest.warns(RuntimeWarning, match="tinygemm failed for a \\(16, 256\\) weight"):
        y = kernels.linear_weight_only(x, qt, None, cache)
    assert torch.equal(y, ref.linear_weight_only(x, qt))
    assert list(cuda.failures()) == [("cpu", 16, 256, 128)]
    assert "cuda_plans" not in cache  # nothing kept that would fail again
    cuda.note_failure(qt, x, RuntimeError("again"))  # no second warning, first error kept
    assert "no kernel image" in cuda.failures()[("cpu", 16, 256, 128)]


def test_out_of_memory_is_not_a_failure(emulated: Emulated,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "select_path", lambda x, qt: "cuda_tinygemm")
    emulated.fail = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        kernels.linear_weight_only(_x(1, 256), _qt(16, 256, "int4-sym-g128"), None, {})
    assert not cuda.failures()


def test_layout_size_and_room() -> None:
    qt = _qt(4096, 4096, "int4-sym-g128")
    assert cuda.layout_nbytes(qt) == 4096 * 4096 // 2 + 32 * 4096 * 4
    gib = 1 << 30
    assert cuda.fits(gib, 3 * gib, 16 * gib)  # 1 GiB + the 1 GiB margin in 3 GiB
    assert not cuda.fits(gib, 2 * gib - 1, 16 * gib)
    assert not cuda.fits(gib, 10 * gib, 200 * gib)  # margin: 5% of 200 GiB = 10 GiB
    assert cuda.room_for(qt)  # CPU weights: nothing to check


def test_no_room_keeps_the_call_off_tinygemm(emulated: Emulated,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without room for another copy of the codes, the call takes the path it would take
    without tinygemm (here, CPU tensors: Triton's interpreter where installed, else the
    reference) and builds no layout; a layout already built is used regardless."""
    monkeypatch.setattr(kernels, "select_path", lambda x, qt: "cuda_tinygemm")
    monkeypatch.setattr(cuda, "room_for", lambda qt: False)
    qt = _qt(16, 256, "int4-sym-g128")
    x = _x(1, 256)
    cache: dict[str, Any] = {}
    with torch.no_grad():
        y = kernels.linear_weight_only(x, qt, None, cache)
    _close(y, ref.linear_weight_only(x, qt))
    assert "tinygemm" not in cache and "cuda_plans" not in cache and emulated.converts == 0
    cuda.runner(qt, None, cache)  # built while there was room
    cache.pop("cpu_plans", None)  # (the CPU input made a CPU plan of the fallback)
    with torch.no_grad():
        kernels.linear_weight_only(x, qt, None, cache)
    assert [p.path for p in cache["cuda_plans"].values()] == ["cuda_tinygemm"]


def test_what_it_supports(emulated: Emulated, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = _qt(16, 256, "int4-sym-g32")
    assert cuda._layout_ok(ok)
    for n, k, scheme in [(16, 256, "int4-sym-g16"), (16, 512, "int4-sym-g512"),
                         (16, 192, "int4-sym-g64"), (12, 256, "int4-sym-g32"),
                         (16, 256, "int8-sym-g32"), (16, 256, "int4-sym-ch0"),
                         (16, 256, "int4-sym-tensor"), (16, 256, "int3-sym-g32")]:
        assert not cuda._layout_ok(_qt(n, k, scheme)), (n, k, scheme)
    # CPU inputs never take it, whatever the layout
    assert not cuda.supported(ok, _x(1, 256))
    assert not cuda.supported(ok, "x")  # type: ignore[arg-type]
    assert not cuda.available("cpu")
    assert kernels.select_path(_x(1, 256), ok) != "cuda_tinygemm"
    assert "cuda_tinygemm" in kernels.PATHS
    monkeypatch.setenv("LINQUANT_TINYGEMM", "0")
    assert cuda.status() == "unavailable: turned off by LINQUANT_TINYGEMM"
    assert not cuda.available("cuda")
    if not CUDA:
        monkeypatch.delenv("LINQUANT_TINYGEMM")
        assert cuda.status() == "unavailable: no CUDA device"


# ---- CUDA: the real operators ---------------------------------------------------------------


@pytest.fixture
def fresh() -> Iterator[None]:
    cuda._reset()
    yield
    cuda._reset()


@pytest.mark.cuda
@cuda_only
def test_cuda_probe(fresh: None) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs compute capability 8.0")
    st_ = cuda.status("cuda")
    print("tinygemm:", st_)
    assert st_.startswith("available: code format"), st_
    assert cuda.available("cuda") and cuda.available(torch.device("cuda", 0))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(4096, 4096), (264, 384), (1000, 1536)])
def test_cuda_matches_reference(fresh: None, scheme: str, shape: tuple[int, int]) -> None:
    n, k = shape
    qt = _qt(n, k, scheme, device="cuda")
    if not cuda._layout_ok(qt):
        assert k % 256 and scheme.endswith("g256-fp16"), (shape, scheme)
        return
    assert cuda.available("cuda"), cuda.status("cuda")
    bias = torch.randn(n, device="cuda")
    for m in (1, 3, 16, 17):
        x = _x(m, k, device="cuda")
        for b in (None, bias):
            _close(cuda.linear_tinygemm(x, qt, b, {}), ref.linear_weight_only(x, qt, b))
    assert not cuda.failures()


@pytest.mark.cuda
@cuda_only
def test_cuda_dispatcher(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    qt = _qt(4096, 4096, "int4-sym-g128", device="cuda")
    x1, x16, x17 = (_x(m, 4096, device="cuda") for m in (1, 16, 17))
    triton_ok = triton_linear.triton_available()
    assert kernels.select_path(x1, qt) == "cuda_tinygemm"
    assert kernels.select_path(x1.view(1, 1, 4096), qt) == "cuda_tinygemm"
    assert kernels.select_path(x16, qt) == ("cuda_triton" if triton_ok else "cuda_tinygemm")
    assert kernels.select_path(x1.half(), qt) == ("cuda_triton" if triton_ok else "reference")
    assert kernels.select_path(_x(1, 4096 + 64, device="cuda"),
                               _qt(4096, 4096 + 64, "int4-sym-g64", device="cuda")) \
        == ("cuda_triton" if triton_ok else "reference")  # K % 128 != 0
    monkeypatch.setattr(triton_linear, "triton_available", lambda: False)
    assert kernels.select_path(x16, qt) == "cuda_tinygemm"
    assert kernels.select_path(x17, qt) == "reference"
    monkeypatch.setenv("LINQUANT_TINYGEMM", "0")
    assert kernels.select_path(x1, qt) == "reference"
    x1g = x1.clone().requires_grad_()
    monkeypatch.delenv("LINQUANT_TINYGEMM")
    assert kernels.select_path(x1g, qt) == "reference"  # autograd through x: never


@pytest.mark.cuda
@cuda_only
def test_cuda_quantlinear_plan_and_graph(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    lin = nn.Linear(2048, 1024).to("cuda", torch.bfloat16)
    q = QuantLinear.from_float(lin, "int4-asym-g32-bf16").to("cuda")
    x = _x(1, 1, 2048, device="cuda")
    with torch.no_grad():
        y = q(x)
        _close(y, ref.linear_weight_only(x, q.qweight, q.bias))
        cache = q.kernel_cache()
        assert "tinygemm" in cache and "triton" not in cache
        p = next(iter(cache["cuda_plans"].values()))
        assert isinstance(p, plans.Plan) and p.path == "cuda_tinygemm"
        monkeypatch.setattr(kernels, "select_path", lambda *a: pytest.fail("dispatcher"))
        assert torch.equal(q(x), y)  # tinygemm is deterministic: the same bits
        # capturable: a CUDA graph of the planned call replays to the same result
        static_x = x.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = q(static_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, y)
