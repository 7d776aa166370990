"""Triton W8A8 kernels (linquant.kernels.triton_w8a8) against the reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
tests/kernels/conftest.py and again below) on CPU tensors, against the reference on CPU; with a
GPU the same tests run on CUDA tensors against the reference on CUDA. Skipped without triton.

Tolerance: none. Activation codes and scales must equal the reference's bit for bit, and so must
the linear outputs (int32 accumulation is exact, the epilogue rounds each step as the reference's
separate torch ops do): every comparison is ``torch.equal`` (NaN positions compared apart).

Interpreter run time: a few seconds on one CPU thread (every autotuning config runs once). On a
GPU every config is compiled (``test_every_config``); the tests marked ``cuda`` need one: real
shapes through W8A8Linear, the dispatcher's choice, the autotuned launch.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # must precede the first kernel launch (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from linquant import kernels
from linquant.errors import LinquantError
from linquant.kernels import _triton_env
from linquant.kernels import reference as ref
from linquant.kernels import triton_w8a8 as tw
from linquant.nn import W8A8Linear

if not _triton_env.available():  # Triton older than the kernels are tested with
    pytest.skip(_triton_env.status(), allow_module_level=True)
# Triton's autotuner runs in the interpreter (with a stand-in timer) from Triton 3.3
TIMER_HOOK = _triton_env.parse_version(importlib.import_module("triton").__version__) >= (3, 3)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
MS = (1, 3, 17)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]

if not CUDA and not tw.interpreting():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal shape, dtype and values; NaN where the other has NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if a.is_floating_point():
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb)
        a, b = a.masked_fill(na, 0), b.masked_fill(nb, 0)
    diff = (a != b).sum().item()
    assert diff == 0, f"{diff} of {a.numel()} elements differ"


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Activations with outlier tokens, exact ties of x / s and a zero token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    if m > 1 and k > 2:
        x[1] = 0.0  # all-zero token: smallest normal scale
        x[0, :3] = torch.tensor([2.0, -0.5 * 2.0 / 127, 1.5 * 2.0 / 127])  # ties of round()
    return x.to(dtype).to(DEV)


def _w(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return w.to(DEV), (torch.rand(n, 1, generator=g) * 0.02 + 1e-3).to(DEV)


# ---- activation quantization ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("k", [1, 40, 100, 300])
def test_per_token_codes_and_scales_exact(k: int, dtype: torch.dtype) -> None:
    for m in MS:
        x = _x(m, k, dtype)
        q, s = tw.quantize_activations(x)
        rq, rs = ref.quantize_activation_per_token(x)
        _same(q, rq)
        _same(s, rs)


def test_per_token_special_values() -> None:
    x = torch.randn(6, 50)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = -float("inf")
    x[3] = 1e-40  # subnormal: the scale clamps to the smallest normal
    x[4, :5] = torch.tensor([3e38, -3e38, 1e-45, -0.0, 0.0])
    for dtype in DTYPES:
        xd = x.to(dtype).to(DEV)
        q, s = tw.quantize_activations(xd)
        rq, rs = ref.quantize_activation_per_token(xd)
        _same(q, rq)
        _same(s, rs)
    xb = torch.tensor([[1e-39, -2e-39, 5e-40, 0.0]]).bfloat16().to(DEV)  # bf16 subnormals
    _same(tw.quantize_activations(xb)[1], ref.quantize_activation_per_token(xb)[1])


def test_per_token_long_rows_two_passes() -> None:
    k = tw.MAX_SINGLE_K + 70  # longer than one tile: amax pass, then the codes pass
    x = _x(2, k, torch.bfloat16)
    q, s = tw.quantize_activations(x)
    rq, rs = ref.quantize_activation_per_token(x)
    _same(q, rq)
    _same(s, rs)
    xs = x.float()
    sa = torch.tensor(0.01, device=DEV)
    _same(tw.quantize_activations(xs, sa)[0], ref.quantize_activation_per_tensor(xs, sa))


def test_per_token_many_rows_per_program() -> None:
    x = _x(70, 24, torch.float32)  # 64 rows per program, a partial last program
    q, s = tw.quantize_activations(x)
    rq, rs = ref.quantize_activation_per_token(x)
    _same(q, rq)
    _same(s, rs)


def test_per_token_strided_rows() -> None:
    x = _x(5, 96, torch.float32)[:, :64]  # row stride 96, last dim contiguous
    q, s = tw.quantize_activations(x)
    rq, rs = ref.quantize_activation_per_token(x)
    _same(q, rq)
    _same(s, rs)


def test_reciprocal_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA rule (``amax * fp32(1/127)``), run here through the interpreter and compared with
    a torch emulation of it."""
    monkeypatch.setattr(tw, "divides_by_reciprocal", lambda device: True)
    x = _x(17, 300, torch.float32, seed=3)
    q, s = tw.quantize_activations(x)
    inv = torch.ones((), dtype=torch.float32) / 127
    tiny = torch.finfo(torch.float32).tiny
    es = (x.abs().amax(dim=-1, keepdim=True) * inv.to(DEV)).clamp_min(tiny)
    eq = torch.round(x / es).clamp(-127, 127).to(torch.int8)
    _same(s, es)
    _same(q, eq)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_static_codes_exact(dtype: torch.dtype) -> None:
    x = _x(17, 100, dtype) * 3
    x[2, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=dtype)
    sa = torch.tensor(0.02, device=DEV)
    q, _ = tw.quantize_activations(x, sa)
    _same(q, ref.quantize_activation_per_tensor(x, sa))
    for z in (0, 3, 128, 200, 255):
        za = torch.tensor(z, dtype=torch.uint8, device=DEV)
        q, _ = tw.quantize_activations(x, sa, za)
        u = ref.quantize_activation_per_tensor(x, sa, za)
        _same(q, (u.to(torch.int16) - 128).to(torch.int8))


# ---- linear ------------------------------------------------------------------------------------

NK = [(40, 72), (24, 100), (48, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["dynamic", "static-sym", "static-asym"])
def test_linear_matches_reference(mode: str, dtype: torch.dtype) -> None:
    sa = torch.tensor(0.031, device=DEV)
    za = torch.tensor(117, dtype=torch.uint8, device=DEV)
    for i, (n, k) in enumerate(NK):
        w, ws = _w(n, k, seed=i)
        for m in MS:
            x = _x(m, k, dtype, seed=m)
            bias = None if m == 3 else torch.randn(n).to(dtype).to(DEV)
            act = {"dynamic": (None, None), "static-sym": (sa, None),
                   "static-asym": (sa, za)}[mode]
            y = tw.linear_w8a8(x, w, ws, bias, *act, {}, config=tw.default_config(m))
            _same(y, ref.linear_w8a8(x, w, ws, bias, *act))


def test_linear_leading_dims_and_fp32_bias_with_bf16() -> None:
    w, ws = _w(40, 72)
    x = torch.randn(2, 3, 72).bfloat16().to(DEV)
    bias = torch.randn(40, device=DEV)  # fp32 bias, bf16 activations
    y = tw.linear_w8a8(x, w, ws, bias)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    _same(y, ref.linear_w8a8(x, w, ws, bias))


def test_linear_nan_token_gives_nan_row() -> None:
    w, ws = _w(40, 72)
    x = _x(3, 72, torch.float32)
    x[2, 5] = float("nan")
    y = tw.linear_w8a8(x, w, ws)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[:2]).any()
    _same(y, ref.linear_w8a8(x, w, ws))


@pytest.mark.parametrize("config", tw.CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_every_config(config: tuple[int, int, int, int, int]) -> None:
    """Each autotuning config (on a GPU: each compiled): dynamic, bf16, bias, K = 72 (masked K
    tail); static asymmetric, fp32, K = 256 (EVEN_K, no mask)."""
    w, ws = _w(40, 72)
    x = _x(17, 72, torch.bfloat16)
    bias = torch.randn(40).bfloat16().to(DEV)
    _same(tw.linear_w8a8(x, w, ws, bias, config=config), ref.linear_w8a8(x, w, ws, bias))
    sa = torch.tensor(0.05, device=DEV)
    za = torch.tensor(90, dtype=torch.uint8, device=DEV)
    w, ws = _w(300, 256)
    x = _x(300, 256, torch.float32)
    _same(tw.linear_w8a8(x, w, ws, None, sa, za, config=config),
          ref.linear_w8a8(x, w, ws, None, sa, za))


@pytest.mark.skipif(not TIMER_HOOK, reason="the autotuner needs a GPU driver before Triton 3.3")
def test_autotuner_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuned launch (prune, EVEN_K heuristic, config kwargs) with a stand-in timer that
    runs each candidate once; the interpreter has no GPU timer."""
    timed: list[int] = []

    def fake_bench(kernel_call: object, quantiles: object) -> list[float]:
        kernel_call()  # type: ignore[operator]
        timed.append(1)
        return [float(len(timed))] * 3  # the first candidate wins

    tuned = tw.build_tuned_kernel(do_bench=fake_bench, cache_results=False)
    monkeypatch.setattr(tw, "_tuned_kernel", lambda: tuned)
    monkeypatch.setattr(tw, "interpreting", lambda: False)
    w, ws = _w(40, 72)
    x = _x(3, 72, torch.bfloat16)
    a_q, a_s = ref.quantize_activation_per_token(x)
    bias = torch.randn(40).to(DEV)
    y = tw.gemm(a_q, w, ws, a_s.reshape(-1), bias, x.dtype, 0)
    _same(y, ref.linear_w8a8(x, w, ws, bias))
    assert len(timed) == 2  # M = 3: only the two 16-row configs
    assert tuned.best_config.kwargs["BLOCK_M"] == 16


@pytest.mark.skipif(not TIMER_HOOK, reason="the autotuner needs a GPU driver before Triton 3.3")
def test_no_autotuning_inside_a_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a CUDA graph capture before its first tuned launch, the GEMM runs the default
    config (no timing, which would synchronize); after a launch outside, the tuned one."""
    timed: list[int] = []

    def fake_bench(kernel_call: object, quantiles: object) -> list[float]:
        kernel_call()  # type: ignore[operator]
        timed.append(1)
        return [float(len(timed))] * 3

    tuned = tw.build_tuned_kernel(do_bench=fake_bench, cache_results=False)
    monkeypatch.setattr(tw, "_tuned_kernel", lambda: tuned)
    monkeypatch.setattr(tw, "interpreting", lambda: False)
    capture = [True]
    monkeypatch.setattr(_triton_env, "capturing", lambda: capture[0])
    w, ws = _w(40, 72)
    x = _x(3, 72, torch.bfloat16)
    a_q, a_s = ref.quantize_activation_per_token(x)
    want = ref.linear_w8a8(x, w, ws, None)
    kern, kw = tw._gemm_launcher(3, 40, 72, 0, False, None)
    args = (a_q, w, None, a_s.reshape(-1), ws.float(), ws.float(), ws.float(), ws.float(), 3,
            40, 72, tw._m_key(3), a_q.stride(0), w.stride(0))

    def run() -> torch.Tensor:
        y = torch.empty(3, 40, dtype=torch.bfloat16, device=DEV)
        kern(args[0], args[1], y, *args[3:], y.stride(0), **kw)
        return y

    _same(run(), want)  # captured: the default config
    assert timed == []
    capture[0] = False
    _same(run(), want)  # outside: tuned
    assert len(timed) == 2
    capture[0] = True
    _same(run(), want)  # captured again: the tuned config, nothing timed
    assert len(timed) == 2


def test_prune_and_default_config() -> None:
    assert tw.default_config(1)[0] == 16
    assert tw.default_config(4096)[0] >= 64
    for m in (1, 17, 64, 100, 128, 5000):
        mk = tw._m_key(m)
        chosen = tw.default_config(m)
        assert chosen[0] <= max(16, mk) and (mk < 128 or chosen[0] >= 64)


@pytest.mark.parametrize("mode", ["dynamic", "static-sym", "static-asym"])
def test_runner_is_linear_w8a8_for_its_signature(mode: str) -> None:
    """``runner(x0, ...)`` binds everything but the input: later inputs of x0's shape give the
    bits the reference gives them (fresh codes and scales every call), leading dims and an
    input whose last dim is strided included."""
    sa = torch.tensor(0.031, device=DEV)
    za = torch.tensor(117, dtype=torch.uint8, device=DEV)
    act = {"dynamic": (None, None), "static-sym": (sa, None), "static-asym": (sa, za)}[mode]
    w, ws = _w(40, 72)
    bias = torch.randn(40, device=DEV)
    run = tw.runner(torch.zeros(2, 3, 72, dtype=torch.bfloat16, device=DEV), w, ws, bias, *act,
                    {})
    xs = [_x(6, 72, torch.bfloat16, seed).reshape(2, 3, 72) for seed in range(3)]
    ys = [run(x) for x in xs]  # each call its own output: earlier ones stay as they were
    for x, y in zip(xs, ys, strict=True):
        _same(y, ref.linear_w8a8(x, w, ws, bias, *act))
    wide = _x(6, 144, torch.bfloat16, seed=7).reshape(2, 3, 144)
    strided = wide[..., ::2]
    assert strided.stride(-1) == 2
    _same(run(strided), ref.linear_w8a8(strided, w, ws, bias, *act))


def test_dispatcher_keeps_and_replays_a_plan_for_the_triton_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A W8A8 layer on CUDA keeps a plan for ``cuda_triton_w8a8`` (one ``tw.runner`` per input
    signature) and replays it from its forward; a bias changed in place is not replayed. Without
    a GPU the dispatcher is made to pick the Triton path for CPU tensors, which the interpreter
    runs."""
    real_select, real_runner = kernels.select_w8a8_path, tw.runner
    monkeypatch.setattr(kernels, "select_w8a8_path", lambda x, w, s=None: (
        "cuda_triton_w8a8" if tw.supported(x, w) else real_select(x, w, s)))
    built: list[int] = []

    def counting_runner(*args: object, **kw: object) -> object:
        built.append(1)
        return real_runner(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tw, "runner", counting_runner)
    layer = W8A8Linear.from_float(nn.Linear(72, 40)).to(DEV)

    def check(x: torch.Tensor) -> None:
        _same(layer(x), ref.linear_w8a8(x, layer.weight_qdata, layer.weight_scale, layer.bias))

    with torch.inference_mode():
        for seed in range(3):
            check(_x(5, 72, torch.float32, seed))
        assert len(built) == 1
        (p,) = layer.kernel_cache()["w8a8_plans"].values()
        assert p.path == "cuda_triton_w8a8"
        check(_x(7, 72, torch.float32))  # another signature: another plan
        assert len(built) == 2
    with torch.no_grad():
        layer.bias.add_(1.0)  # in place: the plans no longer apply
    with torch.inference_mode():
        check(_x(5, 72, torch.float32, seed=9))
    assert len(built) == 3


def test_rowsum_cached_and_rebuilt() -> None:
    w, ws = _w(40, 72)
    sa = torch.tensor(0.05, device=DEV)
    za = torch.tensor(30, dtype=torch.uint8, device=DEV)
    x = _x(3, 72, torch.float32)
    cache: dict[str, object] = {}
    tw.linear_w8a8(x, w, ws, None, sa, za, cache)
    entry = cache["triton_w8a8_rowsum"]
    tw.linear_w8a8(x, w, ws, None, sa, za, cache)
    assert cache["triton_w8a8_rowsum"] is entry
    w.neg_()  # in-place change: version bump rebuilds the row sums
    y = tw.linear_w8a8(x, w, ws, None, sa, za, cache)
    assert cache["triton_w8a8_rowsum"] is not entry
    _same(y, ref.linear_w8a8(x, w, ws, None, sa, za))


def test_zero_point_needs_scale() -> None:
    w, ws = _w(8, 16)
    with pytest.raises(LinquantError, match="act_zero_point needs act_scale"):
        tw.linear_w8a8(_x(2, 16, torch.float32), w, ws, None, None,
                       torch.tensor(3, dtype=torch.uint8, device=DEV))


def test_supported() -> None:
    w, _ = _w(8, 16)
    x = _x(2, 16, torch.float32)
    assert tw.supported(x, w)
    assert not tw.supported(x.double(), w)
    assert not tw.supported(x[:, :8], w)
    assert not tw.supported(x[:0], w)
    assert not tw.supported(x, w.float())
    assert not tw.supported(x, w.t())  # not row-major
    assert not tw.supported(x.requires_grad_(), w)
    with torch.no_grad():
        assert tw.supported(x, w)


def test_cpu_dispatch_never_picks_triton() -> None:
    w = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    for m in (1, 3, 64):
        assert kernels.select_w8a8_path(torch.randn(m, 64), w) != "cuda_triton_w8a8"


# ---- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation,sym", [("dynamic", True), ("static", True),
                                            ("static", False)])
def test_cuda_layer_uses_triton_and_matches_reference(activation: str, sym: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4096, 1024).to(torch.bfloat16)
    layer = W8A8Linear.from_float(lin, activation=activation, act_symmetric=sym).to("cuda")  # type: ignore[arg-type]
    if activation == "static":
        layer.set_activation_range(-3.0, 2.5)
    for m in (1, 16, 17, 1024):
        x = torch.randn(m, 4096, device="cuda").bfloat16()
        assert kernels.select_w8a8_path(x, layer.weight_qdata) == "cuda_triton_w8a8"
        y = layer(x)
        scale = layer._buffers.get("input_scale")
        zp = layer._buffers.get("input_zero_point")
        r = ref.linear_w8a8(x, layer.weight_qdata, layer.weight_scale, layer.bias, scale, zp)
        _same(y, r)
        with torch.inference_mode():  # a plan, then its replay
            _same(layer(x), r)
            _same(layer(x), r)
    paths = {p.path for p in layer.kernel_cache()["w8a8_plans"].values()}
    assert paths == {"cuda_triton_w8a8"}
