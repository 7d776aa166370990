"""Triton weight-only linear kernels (linquant.kernels.triton_linear) against the reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
tests/kernels/conftest.py and again below) on CPU tensors; with one they compile for it and the
same tests run on CUDA tensors. The module is skipped when triton is not installed.

Tolerances (also in the triton_linear docstring):
* bf16 / fp16 activations: ``|y - ref| <= HALF_TOL * max|ref|`` elementwise, ``HALF_TOL = 2e-2``
  (the kernels accumulate in fp32 in another order and round the dequantized weight and the
  output once; the interpreter also rounds fp32 -> bf16 toward zero).
* fp32 activations (one token, gemv): ``FP32_TOL = 1e-4``.

Interpreter run time: about 15 s on one CPU thread (small shapes; every autotuning config of
:data:`triton_linear.CONFIGS` runs once), plus about 40 s for two tests that compile kernels
for sm_90 through benchmarks/triton_static.py in a subprocess (no GPU needed). On a GPU the
unmarked tests run on CUDA tensors (a subset of the
cases: every case is a compile there), and the tests marked ``cuda`` add real shapes, the
dispatcher's choice and autotuning, ``QuantLinear.to("cuda")`` and every config compiled; they
compile about 100 kernels (a second or so each) in all.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import pytest
import torch
from torch import nn

import linquant as lq
from linquant import kernels
from linquant.errors import LinquantError
from linquant.kernels import _triton_env
from linquant.kernels import reference as ref
from linquant.kernels import triton_linear as tlin
from linquant.nn import QuantLinear

if not torch.cuda.is_available():  # before the first kernel launch (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

HALF_TOL = 2e-2
FP32_TOL = 1e-4
if not _triton_env.available():  # Triton older than the kernels are tested with
    pytest.skip(_triton_env.status(), allow_module_level=True)
# Triton's autotuner runs in the interpreter (with a stand-in timer) from Triton 3.3
TIMER_HOOK = _triton_env.parse_version(importlib.import_module("triton").__version__) >= (3, 3)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

if not CUDA and not tlin._interpreting():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

pytestmark = pytest.mark.triton


def _close(y: torch.Tensor, r: torch.Tensor, rel: float) -> None:
    assert y.shape == r.shape and y.dtype == r.dtype, (y.shape, r.shape, y.dtype, r.dtype)
    err = (y.double() - r.double()).abs().max().item()
    bound = rel * max(r.double().abs().max().item(), 1e-6)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _qt(n: int, k: int, scheme: str, seed: int = 0, device: str = DEV) -> lq.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.3 * torch.rand(n, 1, generator=g)  # off-centre rows
    return lq.quantize(w, scheme).to(device)


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEV)


def _bias(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(2)).to(DEV)


def _explicit(kind: str) -> dict[str, int] | None:
    """The first config of a kernel on a GPU (skips autotuning many tiny shapes); None in the
    interpreter, which runs that config anyway."""
    return dict(tlin.CONFIGS[kind][0]) if CUDA else None


def _packed_config(kind: str) -> dict[str, int]:
    """The first config of a ``tl.dot`` kernel that decodes 4-bit codes in packed pairs."""
    return dict(next(c for c in tlin.CONFIGS[kind] if c.get("PACKED")))


# (N, K, scheme): odd N, K not a multiple of 64 where the scheme allows it, every group path
# (a group per K tile, groups smaller than or straddling a tile), every mode, both widths.
CASES = [
    (40, 96, "int4-sym-g32"),
    (24, 160, "int4-asym-g32-fp16"),
    (33, 128, "int4-asymf-g64-bf16"),
    (20, 384, "int4-sym-g128"),
    (17, 512, "int4-asym-g256-fp16"),
    (36, 192, "int4-sym-g96"),
    (24, 40, "int4-asym-g8"),
    (30, 72, "int4-sym-ch0"),
    (25, 48, "int4-asymf-tensor"),
    (21, 100, "int8-sym-ch0"),
    (40, 96, "int8-asym-g32"),
    (19, 128, "int8-asymf-g64-fp16"),
    (26, 80, "int8-asymf-ch0-bf16"),
    (18, 64, "int8-sym-g16"),
]
MS = (1, 3, 17, 70)  # gemv, splitk (BLOCK_M 16 and 32), tiled
# On a GPU every (scheme, dtype, kernel) is a compile of about a second: a subset there.
GPU_CASES = ("int4-asym-g32-fp16", "int4-sym-g96", "int4-asymf-tensor", "int8-sym-ch0",
             "int8-asymf-g64-fp16")
DTYPES = [torch.bfloat16] if CUDA else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
@pytest.mark.parametrize("case", [c for c in CASES if not CUDA or c[2] in GPU_CASES],
                         ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_matches_reference(case: tuple[int, int, str], dtype: torch.dtype) -> None:
    n, k, scheme = case
    qt = _qt(n, k, scheme)
    cache: dict[str, object] = {}
    for i, m in enumerate(MS):
        x = _x(m, k, dtype, seed=m)
        bias = _bias(n) if i % 2 == 0 else None
        assert tlin.supported(qt, x)
        for kind in tlin.GEMV_KERNELS if m == 1 else (tlin.kernel_for(m),):
            y = tlin.linear(x, qt, bias, cache, kernel=kind, config=_explicit(kind))
            _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)
    assert sorted(cache) == ["triton", "triton_t"]  # gemv_t reads a transposed copy


def _stand_in_autotuner(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The kernels with autotuned wrappers whose timer (a stand-in: the interpreter has none)
    runs every candidate once and makes the last one fastest; returns the list each timing
    appends to."""
    timed: list[int] = []

    def fake_bench(kernel_call: Any, quantiles: Any = None, **kw: Any) -> list[float]:
        kernel_call()
        timed.append(1)
        return [1000.0 - len(timed)] * 3

    monkeypatch.setattr(tlin, "_BUILT", {True: tlin._build(do_bench=fake_bench, tune=True)})
    monkeypatch.setattr(tlin, "_FAILED", {})
    return timed


@pytest.mark.skipif(CUDA, reason="the cuda tests run the real autotuner")
@pytest.mark.skipif(not TIMER_HOOK, reason="the autotuner needs a GPU driver before Triton 3.3")
def test_autotuned_launch_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic path as a GPU runs it (autotuned wrappers: keys, the pruner, the atomic
    outputs restored after each timed run), in the interpreter with a stand-in timer that runs
    every candidate once and makes the last one fastest. A broken wrapper would make the
    launcher warn and fall back to the reference: warnings are errors here."""
    import warnings

    timed = _stand_in_autotuner(monkeypatch)
    kern = tlin._kernels()
    qt = _qt(40, 1024, "int4-asym-g32-fp16")  # per-word parameters: the pruner swaps tiles
    bias = _bias(40)
    cache: dict[str, object] = {}
    # M = 1: gemv split over K in 2 (the pretend GPU has 4 SMs), so its output is atomic;
    # gemv_t splits K too (fp32 atomics), and its 4 distinct configs cap BLOCK_KW at one group
    assert tlin._gemv_split(40, 1024, torch.device(DEV)) == 2
    assert tlin._gemv_t_atomic(40, torch.device(DEV))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for m, tuned, n_cfg, kind in ((1, kern.gemv_t_tuned, 4, None),
                                      (1, kern.gemv_tuned, 4, "gemv"),
                                      (3, kern.splitk_tuned, 7, None),
                                      (70, kern.tiled_tuned, 10, None)):
            timed.clear()
            x = _x(m, 1024, torch.bfloat16, seed=m)
            y = tlin.linear(x, qt, bias, cache, kernel=kind)
            _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)
            assert len(timed) == n_cfg, (m, len(timed))  # pruned duplicates are not timed
            best = dict(tuned.best_config.kwargs)
            if m > 1:  # the last candidate won, as fit_config left it for 32-code groups
                name = "splitk" if m <= tlin.SKINNY_MAX_M else "tiled"
                last = {k: v for k, v in tlin.CONFIGS[name][-1].items()
                        if k not in ("num_warps", "num_stages")}
                assert best == tlin.fit_config(name, last, 32, False, 4), best
            if tuned is kern.gemv_t_tuned:
                assert best["BLOCK_KW"] == 4  # 32 codes: one group
            y2 = tlin.linear(x, qt, bias, cache, kernel=kind)  # cached choice: no timing
            assert len(timed) == n_cfg
            assert torch.equal(y, y2)
    assert tlin.failures() == {}


@pytest.mark.skipif(CUDA, reason="the cuda tests run the real autotuner")
@pytest.mark.skipif(not TIMER_HOOK, reason="the autotuner needs a GPU driver before Triton 3.3")
def test_no_autotuning_inside_a_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan whose first call is inside a CUDA graph capture runs the kind's first config (the
    autotuner's timing would synchronize the device, which a capture forbids); once a call ran
    outside a capture, the tuned launch runs, captured or not, with no timing again."""
    timed = _stand_in_autotuner(monkeypatch)
    capture = [True]
    monkeypatch.setattr(_triton_env, "capturing", lambda: capture[0])
    qt = _qt(40, 1024, "int4-sym-g128")
    bias = _bias(40)
    for m in (1, 3, 70):  # gemv_t, splitk, tiled
        cache: dict[str, object] = {}
        x = _x(m, 1024, torch.bfloat16, seed=m)
        want = ref.linear_weight_only(x, qt, bias)
        timed.clear()
        capture[0] = True
        _close(tlin.linear(x, qt, bias, cache), want, HALF_TOL)  # keeps a plan
        assert timed == [], m  # in a capture, before any tuned launch: the first config
        capture[0] = False
        y = tlin.planned(x, qt, bias, cache)  # the plan, outside a capture: tuned
        assert y is not None
        _close(y, want, HALF_TOL)
        n_timed = len(timed)
        assert n_timed > 0, m
        capture[0] = True
        y = tlin.planned(x, qt, bias, cache)  # captured again: the tuned launch, no timing
        assert y is not None
        _close(y, want, HALF_TOL)
        assert len(timed) == n_timed, m
    assert tlin.failures() == {}


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32 d, a, b, c`` (default mode), as the PTX ISA defines it: the bytes of
    ``{b, a}`` are numbered 0-7 (``a``'s are 0-3); nibble ``j`` of ``c`` selects ``d``'s byte
    ``j`` (bits 0-2 the source byte, bit 3 replicates that byte's sign bit instead)."""
    src = (b << 32) | a
    d = 0
    for j in range(4):
        sel = (c >> (4 * j)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        d |= byte << (8 * j)
    return d


def test_byte_permute_selectors_give_the_fp32_magic() -> None:
    """The 8-bit decode on a GPU (_triton_kernels._byte_into_magic, inline PTX that the
    interpreter cannot run): ``prmt(word, 0x4B000000, 0x7650 + i)`` must be the interpreter's
    ``((word >> 8i) & 255) | 0x4B000000`` for every byte (checked here on PTX's definition of
    prmt; the CUDA tests run the kernels)."""
    import random

    tk = pytest.importorskip("linquant.kernels._triton_kernels")
    src = inspect.getsource(tk._byte_into_magic.fn)
    assert "prmt.b32 $0, $1, $2, $3;" in src and "0x7650 + i" in src
    rng = random.Random(0)
    for word in [0, 0xFFFFFFFF, 0x80808080, 0x7F7F7F7F] + [rng.getrandbits(32) for _ in range(200)]:
        for i in range(4):
            want = ((word >> (8 * i)) & 255) | 0x4B000000
            assert _prmt(word, 0x4B000000, 0x7650 + i) == want, (hex(word), i)


def test_fit_config_keeps_per_word_parameters_out_of_unswapped_tiles() -> None:
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 0}
    assert tlin.fit_config("tiled", cfg, 128, False) == cfg  # a group spans whole tiles
    assert tlin.fit_config("tiled", cfg, 32, False) == {**cfg, "SWAP": 1}
    assert tlin.fit_config("splitk", cfg, 96, False) == {**cfg, "SWAP": 1}
    assert tlin.fit_config("tiled", cfg, 40, True) == cfg  # per-channel: no groups
    assert tlin.fit_config("gemv", {"BLOCK_N": 16, "BLOCK_K": 512}, 32, False)["BLOCK_K"] == 512
    t = {"BLOCK_N": 512, "BLOCK_KW": 8}
    assert tlin.fit_config("gemv_t", t, 32, False, 4)["BLOCK_KW"] == 4  # one group per tile
    assert tlin.fit_config("gemv_t", t, 32, False, 8)["BLOCK_KW"] == 8
    assert tlin.fit_config("gemv_t", t, 96, False, 4) == t  # 12 words: per-word parameters
    assert tlin.fit_config("gemv_t", t, 4096, True, 4) == t
    packed = {**cfg, "SWAP": 1, "PACKED": 1}
    assert tlin.fit_config("tiled", packed, 32, False, 4) == packed
    assert tlin.fit_config("tiled", packed, 32, False, 8) == {**cfg, "SWAP": 1}  # 4-bit only
    # packed 4-bit tiles compile unswapped with per-word parameters, and stay so
    unswapped = {**cfg, "PACKED": 1}
    assert tlin.fit_config("tiled", unswapped, 32, False, 4) == unswapped
    assert tlin.fit_config("splitk", unswapped, 96, False, 4) == unswapped
    assert tlin.fit_config("tiled", unswapped, 32, False, 8) == {**cfg, "SWAP": 1}


def test_kernel_choice_by_m() -> None:
    assert [tlin.kernel_for(m) for m in (1, 2, 64, 65, 4096)] == [
        "gemv", "splitk", "splitk", "tiled", "tiled"]
    # one token: gemv_t for small groups (gemv would load parameters per word), else gemv
    for scheme, kind in (("int4-asym-g32", "gemv_t"), ("int8-sym-g64", "gemv_t"),
                         ("int4-sym-g128", "gemv"), ("int8-sym-ch0", "gemv"),
                         ("int4-asym-tensor", "gemv")):
        assert tlin.kernel_for(1, _qt(16, 256, scheme)) == kind, scheme
        assert tlin.kernel_for(2, _qt(16, 256, scheme)) == "splitk"


@pytest.mark.parametrize("scheme", ["int4-asym-g32", "int8-sym-ch0", "int4-asymf-g64",
                                    "int8-asym-tensor"])
def test_fp32_single_token(scheme: str) -> None:
    """fp32 activations go through the gemv kernel (fp32 math) and match to fp32 rounding."""
    qt = _qt(28, 128, scheme)
    x = _x(1, 128, torch.float32)
    bias = _bias(28)
    assert tlin.supported(qt, x)
    for kind in tlin.GEMV_KERNELS:
        _close(tlin.linear(x, qt, bias, None, kernel=kind, config=_explicit(kind)),
               ref.linear_weight_only(x, qt, bias), FP32_TOL)
    assert not tlin.supported(qt, _x(3, 128, torch.float32))  # larger M: reference


EXACT_CASES = [(s, m) for s in ("int4-sym-g32", "int4-asym-g64-fp16", "int4-asymf-g32",
                                 "int4-sym-ch0", "int8-sym-ch0", "int8-asym-g32",
                                 "int8-asymf-tensor")
               for m in (1, 3, 70)
               if not (s == "int8-asymf-tensor" and m == 3)]  # 9 bits: not exact in bf16


@pytest.mark.parametrize(("scheme", "m"), EXACT_CASES,
                         ids=[f"{s}-{ {1: 'gemv-fp32', 3: 'splitk-bf16', 70: 'tiled-fp16'}[m]}"
                              for s, m in EXACT_CASES])
def test_decodes_every_code_at_every_position_exactly(scheme: str, m: int) -> None:
    """The kernels' in-place decoding (4-bit codes masked where they sit in their word) against
    the reference, bit for bit: every stored bit pattern at every position of a 32-bit word,
    zero points from 0 to the largest code, power-of-two scales, offsets in halves, tokens of
    small integers. Every weight is exact in the activation dtype and every product and partial
    sum exact in fp32, so the results are equal whatever the summation order (half-precision
    outputs round the same exact sums). The tiled kernel runs fp16: the interpreter rounds its
    fp32 -> bf16 stores toward zero (the GPU rounds to nearest); 8-bit weights with offsets
    need 9 significant bits, more than bf16 has."""
    from linquant.ops.packing import pack

    dtype = {1: torch.float32, 3: torch.bfloat16, 70: torch.float16}[m]
    n, k = 24, 256
    qt = _qt(n, k, scheme, device="cpu")
    bits = qt.scheme.bits
    levels = 1 << bits
    rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
    u = (rows + cols + cols // (32 // bits)) % levels  # each pattern at each word position
    qt.qdata = pack(u.reshape(-1).to(torch.uint8), bits)
    idx = torch.arange(qt.scale.numel()).reshape(qt.scale.shape)
    qt.scale = (2.0 ** -(idx % 4)).to(qt.scale.dtype)
    if qt.zero_point_packed is not None:
        qt.zero_point_packed = pack(((idx * 5) % levels).reshape(-1).to(torch.uint8), bits)
    if qt.offset is not None:
        qt.offset = ((idx % 7) - 3).to(qt.offset.dtype) * 0.5
    qt = qt.to(DEV)
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-4, 5, (m, k), generator=g).to(dtype).to(DEV)
    expected = ref.linear_weight_only(x, qt, None)
    assert expected.abs().max() > 50  # not a trivially small result
    for kind in tlin.GEMV_KERNELS if m == 1 else (tlin.kernel_for(m),):
        configs = [_explicit(kind)]
        if kind not in tlin.GEMV_KERNELS and bits == 4:  # and the packed-pair decoding
            configs.append(_packed_config(kind))
        for config in configs:
            y = tlin.linear(x, qt, None, None, kernel=kind, config=config)
            assert torch.equal(y, expected), (kind, config,
                                              (y.float() - expected.float()).abs().max())


# ---- every autotuning config --------------------------------------------------------------

CONFIG_CASES = [  # (N, K, scheme, M per kernel kind)
    (40, 512, "int4-asym-g256-fp16"),  # a group spans whole tiles (gemv BLOCK_K 256/512 too)
    (36, 160, "int4-sym-g32"),  # groups smaller than a tile
    (24, 96, "int8-asymf-ch0"),  # per-channel, float offset
]
KIND_M = {"gemv_t": 1, "gemv": 1, "splitk": 17, "tiled": 70}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c[2])
@pytest.mark.parametrize(
    ("kind", "index"),
    [(kind, i) for kind, cfgs in tlin.CONFIGS.items() for i in range(len(cfgs))],
    ids=lambda v: str(v),
)
def test_every_config(kind: str, index: int, case: tuple[int, int, str]) -> None:
    if CUDA and case is not CONFIG_CASES[1]:
        pytest.skip("on a GPU: one case here; test_cuda_every_config_compiles_and_matches")
    n, k, scheme = case
    qt = _qt(n, k, scheme)
    config = tlin.CONFIGS[kind][index]
    bias = _bias(n)
    # packed-pair configs in fp16 too: the interpreter runs their half arithmetic as the GPU
    # does for fp16 (for bf16 it takes an fp32 detour, see _triton_kernels._pair)
    for dtype in (torch.bfloat16, torch.float16) if config.get("PACKED") else (torch.bfloat16,):
        x = _x(KIND_M[kind], k, dtype)
        y = tlin.linear(x, qt, bias, {}, kernel=kind, config=dict(config))
        _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)


@pytest.mark.parametrize("scheme", ["int4-sym-g128", "int8-asym-g32", "int4-asymf-ch0"])
def test_split_k_paths(scheme: str) -> None:
    """gemv split over K (fp32 atomics, bias once) and splitk with BLOCK_M 64 (M = 40)."""
    qt = _qt(20, 1024, scheme)
    bias = _bias(20)
    x1 = _x(1, 1024, torch.float16)
    y = tlin.linear(x1, qt, bias, None, kernel="gemv",
                    config={"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 3})
    _close(y, ref.linear_weight_only(x1, qt, bias), HALF_TOL)
    # gemv_t: 20 rows on the pretend 4-SM GPU: K in 8 splits (fp32 atomics, bias once)
    y = tlin.linear(x1, qt, bias, None, kernel="gemv_t",
                    config={"BLOCK_N": 512, "BLOCK_KW": 8, "num_warps": 4, "num_stages": 1})
    _close(y, ref.linear_weight_only(x1, qt, bias), HALF_TOL)
    x40 = _x(40, 1024, torch.bfloat16)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 5, "SWAP": 0}
    y = tlin.linear(x40, qt, bias, None, kernel="splitk", config=cfg)
    _close(y, ref.linear_weight_only(x40, qt, bias), HALF_TOL)
    y = tlin.linear(x40, qt, bias, None, kernel="splitk", config={**cfg, "SWAP": 1})
    _close(y, ref.linear_weight_only(x40, qt, bias), HALF_TOL)


# ---- inputs, layout, cache -----------------------------------------------------------------


def _same_run(a: torch.Tensor | None, b: torch.Tensor) -> None:
    """Two runs of one kernel: bit-equal in the interpreter; on a GPU, split-K sums with fp32
    atomics in any order."""
    assert a is not None
    if CUDA:
        _close(a, b, 1e-2)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["int4-asym-g32", "int8-asymf-ch0"])
def test_plans_replay_the_automatic_path_and_expire(scheme: str) -> None:
    """An automatic call keeps a plan per input signature in the layer's cache; a repeat call
    by :func:`triton_linear.planned` gives the same output, and any change (shape, bias object,
    an in-place write to a weight tensor or the bias, a new weight, autograd) finds no plan."""
    qt = _qt(24, 256, scheme)
    bias = _bias(24)
    cache: dict[str, Any] = {}
    xs = {m: _x(m, 256, torch.bfloat16, seed=m) for m in (1, 3, 70)}
    outs = {m: tlin.linear(x, qt, bias, cache) for m, x in xs.items()}
    assert len(cache["triton_plans"]) == 3
    for m, x in xs.items():
        _same_run(tlin.planned(x, qt, bias, cache), outs[m])
        _close(outs[m], ref.linear_weight_only(x, qt, bias), HALF_TOL)
    x = xs[1]
    assert tlin.planned(_x(2, 256, torch.bfloat16), qt, bias, cache) is None  # new shape
    assert tlin.planned(x, qt, bias.clone(), cache) is None  # another bias object
    assert tlin.planned(x, qt, None, cache) is None
    x_req = x.clone().requires_grad_(True)
    assert tlin.planned(x_req, qt, bias, cache) is None  # autograd: the checked path
    with torch.no_grad():
        _same_run(tlin.planned(x_req, qt, bias, cache), outs[1])
    b2 = bias.clone()
    tlin.linear(x, qt, b2, cache)
    b2.add_(1.0)  # the bias written in place: its plan expires
    assert tlin.planned(x, qt, b2, cache) is None
    qt.scale.mul_(2.0)  # a weight tensor written in place: every plan expires
    assert tlin.planned(x, qt, bias, cache) is None
    y = tlin.linear(x, qt, bias, cache)  # rebuilt, and the stale plans are dropped
    assert len(cache["triton_plans"]) == 1
    _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)
    _same_run(tlin.planned(x, qt, bias, cache), y)
    other = _qt(24, 256, scheme, seed=5)  # the same cache, another weight
    assert tlin.planned(x, other, bias, cache) is None
    # explicit kernels and configs (tests, benchmarks) keep no plan
    cache2: dict[str, Any] = {}
    tlin.linear(x, qt, bias, cache2, kernel=tlin.kernel_for(1, qt))
    assert "triton_plans" not in cache2



def test_quantlinear_forward_replays_its_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """``QuantLinear.forward`` first looks for a plan in its cache (the Triton path keeps them
    on CUDA; here an automatic call in the interpreter makes one) and runs it without the
    dispatcher, for any layout of the same input shape; a new shape, autograd, or a buffer or
    bias written in place goes through the dispatcher again, with the right result."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 24).to(torch.bfloat16)
    q = QuantLinear.from_float(lin, "int4-asym-g32").to(DEV)
    x = _x(3, 256, torch.bfloat16)
    calls: list[int] = []
    real = kernels.linear_weight_only

    def counted(*a: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "linear_weight_only", counted)
    with torch.no_grad():
        y = tlin.linear(x, q.qweight, q.bias, q.kernel_cache())  # keeps the plan
        _same_run(q(x), y)
        _same_run(q(x.t().contiguous().t()), y)  # another layout, same signature
        x3 = x.reshape(1, 3, 256)
        _close(q(x3), y.reshape(1, 3, 24), HALF_TOL)  # a new shape: the dispatcher
        assert len(calls) == 1
        q.weight_scale.mul_(2.0)
        _close(q(x), ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
        assert len(calls) == 2
        y = tlin.linear(x, q.qweight, q.bias, q.kernel_cache())  # a fresh plan
        assert q.bias is not None
        q.bias.add_(1.0)
        _close(q(x), ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
        assert len(calls) == 3
    q.bias.requires_grad_(True)
    y = tlin.linear(x, q.qweight, q.bias, q.kernel_cache())  # bias added outside: no plan
    out = q(x)
    assert out.requires_grad and len(calls) == 4
    _close(out.detach(), ref.linear_weight_only(x, q.qweight, q.bias.detach()), HALF_TOL)


def test_leading_dims_and_strided_input() -> None:
    qt = _qt(24, 64, "int4-asym-g32")
    x3 = torch.randn(2, 5, 128).bfloat16().to(DEV)[..., ::2]  # non-contiguous last dim
    y = tlin.linear(x3, qt, None, {}, config=_explicit("splitk"))
    assert y.shape == (2, 5, 24)
    _close(y, ref.linear_weight_only(x3.contiguous(), qt, None), HALF_TOL)
    x1 = torch.randn(64).half().to(DEV)  # a 1-D input: one token
    for kind in tlin.GEMV_KERNELS:
        _close(tlin.linear(x1, qt, None, {}, kernel=kind, config=_explicit(kind)),
               ref.linear_weight_only(x1, qt, None), HALF_TOL)


def test_bias_that_requires_grad_gets_its_gradient() -> None:
    qt = _qt(24, 64, "int8-sym-ch0")
    bias = _bias(24).requires_grad_(True)
    x = _x(3, 64, torch.bfloat16)
    y = tlin.linear(x, qt, bias, {}, config=_explicit("splitk"))
    _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)
    y.float().sum().backward()
    assert bias.grad is not None
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 3.0))


def test_repack_reads_codes_in_place_and_transposes_params() -> None:
    qt = _qt(24, 64, "int4-asym-g32")
    pk = tlin.repack(qt)
    assert pk.words.dtype == torch.int32 and pk.words.shape == (24, 8)
    assert pk.words.untyped_storage().data_ptr() == qt.qdata.untyped_storage().data_ptr()
    assert pk.scale.shape == (2, 24) and pk.zero is not None and pk.zero.shape == (2, 24)
    assert torch.equal(pk.scale, qt.scale.reshape(24, 2).t())
    assert pk.group == 32 and not pk.per_channel and pk.offset is None
    ch = tlin.repack(_qt(24, 64, "int8-sym-ch0"))
    assert ch.per_channel and ch.group == 64 and ch.scale.shape == (1, 24)


def test_cache_reused_and_rebuilt_after_in_place_change() -> None:
    qt = _qt(24, 64, "int4-sym-g32")
    cache: dict[str, object] = {}
    x = _x(3, 64, torch.bfloat16)
    tlin.linear(x, qt, None, cache, config=_explicit("splitk"))
    first = cache["triton"]
    tlin.linear(x, qt, None, cache, config=_explicit("splitk"))
    assert cache["triton"] is first
    with torch.no_grad():
        qt.scale.mul_(2.0)  # bumps the version counter
    y = tlin.linear(x, qt, None, cache, config=_explicit("splitk"))
    assert cache["triton"] is not first
    _close(y, ref.linear_weight_only(x, qt, None), HALF_TOL)


# ---- dequantize, then matmul (cuda_dequant, opt-in) -------------------------------------------


def _bf16_ulps(y: torch.Tensor, r: torch.Tensor) -> int:
    """Largest distance in bf16 steps (same-sign values: their bit patterns' difference)."""
    a = y.contiguous().view(torch.int16).int()
    b = r.contiguous().view(torch.int16).int()
    return int((a - b).abs().max().item()) if y.numel() else 0


@pytest.mark.parametrize("case", CASES if not CUDA else [c for c in CASES if c[2] in GPU_CASES],
                         ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_dequantize_kernel_is_the_reference(case: tuple[int, int, str]) -> None:
    """The same bits as ``QuantizedTensor.dequantize`` (fp32 and fp16 everywhere, bf16 on a
    GPU; Triton's interpreter rounds fp32 -> bf16 toward zero, so there within one step)."""
    n, k, scheme = case
    qt = _qt(n, k, scheme)
    cache: dict[str, object] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = tlin.dequantize(qt, dtype, cache)
        want = qt.dequantize(dtype)
        assert got.shape == (n, k) and got.dtype == dtype
        if dtype == torch.bfloat16 and not CUDA:
            assert _bf16_ulps(got, want) <= 1
            assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
        else:
            assert torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())
    assert list(cache) == ["triton"]


def test_dequantize_more_rows_and_words_than_one_tile() -> None:
    # 4-bit: 64 words = 512 codes per tile row, 16 rows per tile; K, N not multiples of either
    qt = _qt(37, 520, "int4-asym-g8-fp16")
    assert torch.equal(tlin.dequantize(qt, torch.float32), qt.dequantize(torch.float32))
    q8 = _qt(35, 300, "int8-sym-g4")
    assert torch.equal(tlin.dequantize(q8, torch.float16), q8.dequantize(torch.float16))


def test_dequantize_rejects_what_it_cannot_do() -> None:
    with pytest.raises(LinquantError, match="dequantize: unsupported"):
        tlin.dequantize(_qt(8, 64, "int3-sym-g32"), torch.float32)
    with pytest.raises(LinquantError, match="dequantize: unsupported"):
        tlin.dequantize(_qt(8, 64, "int4-sym-g32"), torch.float64)


def test_dequant_min_m_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINQUANT_CUDA_DEQUANT_MIN_M", raising=False)
    assert tlin.dequant_min_m() is None
    for raw, want in (("", None), ("0", None), (" 1024 ", 1024), ("-3", None)):
        monkeypatch.setenv("LINQUANT_CUDA_DEQUANT_MIN_M", raw)
        assert tlin.dequant_min_m() == want
    monkeypatch.setenv("LINQUANT_CUDA_DEQUANT_MIN_M", "lots")
    with pytest.raises(LinquantError, match="whole number of tokens, got 'lots'"):
        tlin.dequant_min_m()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_linear_dequant_matches_reference_and_plans(dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    n, k = 33, 128
    qt = _qt(n, k, "int4-asymf-g64-bf16")
    bias = _bias(n)
    monkeypatch.setenv("LINQUANT_CUDA_DEQUANT_MIN_M", "17")
    x = _x(17, k, dtype)
    assert tlin.dequant_chosen(qt, x)
    assert not tlin.dequant_chosen(qt, _x(16, k, dtype))  # below the threshold
    assert not tlin.dequant_chosen(qt, _x(17, k, torch.float32))  # fp32: never
    cache: dict[str, Any] = {}
    with torch.no_grad():
        y = tlin.linear_dequant(x, qt, bias, cache)
    want = ref.linear_weight_only(x, qt, bias)
    if dtype == torch.float16 or CUDA:
        assert torch.equal(y, want)  # the reference's own F.linear on the same weight bits
    else:
        _close(y, want, HALF_TOL)
    p = next(iter(cache["cuda_plans"].values()))
    assert p.path == "cuda_dequant" and torch.equal(p.run(x), y)
    # a bias that needs a gradient gets it, and no plan is kept for such calls
    b = bias.clone().requires_grad_()
    cache2: dict[str, Any] = {}
    tlin.linear_dequant(x, qt, b, cache2).float().sum().backward()
    assert b.grad is not None and torch.equal(b.grad, torch.full((n,), 17.0, device=b.device))
    assert "cuda_plans" not in cache2


def test_linear_dequant_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlin, "_FAILED", {})
    monkeypatch.setenv("LINQUANT_CUDA_DEQUANT_MIN_M", "1")

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(tlin, "_dequantize_pk", broken)
    qt = _qt(24, 64, "int8-sym-ch0")
    x = _x(3, 64, torch.float16)
    cache: dict[str, Any] = {}
    with pytest.warns(RuntimeWarning, match="dequant kernel failed"):
        y = tlin.linear_dequant(x, qt, None, cache)
    assert torch.equal(y, ref.linear_weight_only(x, qt, None))
    assert "cuda_plans" not in cache and not tlin.dequant_chosen(qt, x)
    # the failure is kept per kind of input (bits, mode, group, dtype): 4-bit weights still go
    assert tlin.dequant_chosen(_qt(24, 64, "int4-sym-g32"), x)

    def oom(*args: Any) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 128 MiB")

    monkeypatch.setattr(tlin, "_dequantize_pk", oom)
    q4 = _qt(24, 64, "int4-sym-g32")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tlin.linear_dequant(x, q4, None, {})
    assert tlin.dequant_chosen(q4, x)  # not noted as a kernel failure


# ---- what is not supported -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "scheme", "dtype", "m"),
    [
        (24, 64, "int3-sym-g32", torch.bfloat16, 2),  # 3-bit codes
        (24, 64, "int4-sym-ch1", torch.bfloat16, 2),  # per input channel
        (24, 100, "int4-sym-ch0", torch.bfloat16, 2),  # K % 8 != 0 for 4 bits
        (24, 102, "int8-sym-ch0", torch.bfloat16, 2),  # K % 4 != 0 for 8 bits
        (24, 48, "int4-sym-g12", torch.bfloat16, 2),  # group of 1.5 words
        (24, 64, "int4-sym-g32", torch.float32, 2),  # fp32 beyond one token
        (24, 64, "int4-sym-g32", torch.float64, 1),  # fp64
    ],
)
def test_unsupported_inputs_fall_back(n: int, k: int, scheme: str, dtype: torch.dtype,
                                      m: int) -> None:
    qt = _qt(n, k, scheme)
    x = _x(m, k, dtype)
    assert not tlin.supported(qt, x)
    with pytest.raises(LinquantError, match="unsupported"):
        tlin.linear(x, qt, None, None)
    # the dispatcher falls back to the reference (bit-identical)
    y = kernels.linear_weight_only(x, qt, None, {})
    torch.testing.assert_close(y, ref.linear_weight_only(x, qt, None), rtol=0, atol=0)


def test_unsupported_empty_grad_and_shape() -> None:
    qt = _qt(24, 64, "int4-sym-g32")
    assert not tlin.supported(qt, _x(0, 64, torch.bfloat16))
    assert not tlin.supported(qt, _x(2, 32, torch.bfloat16))
    xg = _x(2, 64, torch.float16).requires_grad_(True)
    assert not tlin.supported(qt, xg)
    with torch.no_grad():
        assert tlin.supported(qt, xg)
    assert not tlin.supported(qt, "x")  # type: ignore[arg-type]


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = _qt(24, 64, "int4-sym-g32", device="cpu")
    x = torch.randn(2, 64).bfloat16()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tlin.supported(qt, x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tlin.supported(qt, x)


def test_cpu_dispatch_unchanged() -> None:
    """With the interpreter on, CPU inputs still take the CPU paths, never Triton."""
    qt = _qt(64, 1024, "int4-sym-g32", device="cpu")
    for m in (1, 3, 200):
        x = torch.randn(m, 1024).bfloat16()
        assert kernels.select_path(x, qt) != "cuda_triton"
    assert "cuda_triton" in kernels.PATHS


def test_bad_arguments_raise() -> None:
    qt = _qt(24, 64, "int4-sym-g32")
    x = _x(2, 64, torch.bfloat16)
    with pytest.raises(LinquantError, match="bias"):
        tlin.linear(x, qt, torch.zeros(23, device=DEV), None)
    with pytest.raises(LinquantError, match="kernel"):
        tlin.linear(x, qt, None, None, kernel="fast")
    with pytest.raises(LinquantError, match="one token"):
        tlin.linear(x, qt, None, None, kernel="gemv")
    with pytest.raises(LinquantError, match="power of 2"):
        tlin.linear(x, qt, None, None, kernel="tiled",
                    config={"BLOCK_M": 48, "BLOCK_N": 64, "BLOCK_K": 64, "SWAP": 0})
    with pytest.raises(LinquantError, match="lacks"):
        tlin.linear(x, qt, None, None, kernel="splitk", config={"BLOCK_N": 64})
    with pytest.raises(LinquantError):
        tlin.repack(_qt(24, 64, "int3-sym-g32"))


def test_kernel_failure_falls_back_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that raises (a Triton compile error, say) on the automatic path warns once,
    returns the reference and is not chosen again; explicit kernel/config calls still raise."""
    monkeypatch.setattr(tlin, "_FAILED", {})

    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(tlin, "_make_run", boom)
    qt = _qt(24, 64, "int4-asym-g32")
    x = _x(3, 64, torch.bfloat16)
    assert tlin.supported(qt, x)
    with pytest.warns(RuntimeWarning, match="splitk kernel failed"):
        y = tlin.linear(x, qt, None, {})
    assert torch.equal(tlin.linear(x, qt, None, None), y)  # no cache: the same fallback
    torch.testing.assert_close(y, ref.linear_weight_only(x, qt, None), rtol=0, atol=0)
    assert not tlin.supported(qt, x) and len(tlin.failures()) == 1
    assert tlin.supported(qt, _x(1, 64, torch.bfloat16))  # gemv is another kernel
    with pytest.raises(RuntimeError, match="PassManager"):
        tlin.linear(x, qt, None, {}, kernel="splitk")

    def oom(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tlin, "_make_run", oom)  # running out of memory is not the kernel's
    x1 = _x(1, 64, torch.bfloat16)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tlin.linear(x1, qt, None, {})
    assert tlin.supported(qt, x1) and len(tlin.failures()) == 1


def test_triton_available() -> None:
    assert tlin.triton_available() is True


# ---- compiles for Hopper without a GPU ----------------------------------------------------


def _static_check(tmp_path: object, *args: str,
                  kinds: tuple[str, ...] = tlin.KERNELS) -> list[str]:
    """Rows printed by benchmarks/triton_static.py (compiles for sm_90, no GPU needed) for the
    kernels ``kinds`` (default: the weight-only ones)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_static.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode and "ImportError" in out.stderr:
        pytest.skip(f"triton compiler internals differ: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [r for r in out.stdout.splitlines() if r.startswith(kinds)]


@pytest.mark.skipif(CUDA, reason="a GPU compiles the kernels for real in the other tests")
def test_kernels_compile_for_sm90(tmp_path: pytest.TempPathFactory) -> None:
    """Triton's NVIDIA backend compiles the first config of every kernel to sm_90 PTX and a
    cubin (ptxas ships with triton) without a GPU, for every scheme of the static check
    (int4 asym g32 among them: per-word parameters), with and without the divisibility hints
    (as for odd N): a syntax or lowering error in a kernel is caught here, not only on the GPU
    machine (it found the crash :func:`triton_linear.fit_config` avoids). Uses Triton
    compiler internals (ASTSource, GPUTarget); skipped without them."""
    rows = _static_check(tmp_path, "--odd")
    assert len(rows) == 4 * 5 * 2 and not any("FAILED" in r for r in rows), rows
    for r in rows:
        assert r.startswith("gemv") or " wgmma " in r or " mma " in r, r


@pytest.mark.skipif(CUDA, reason="a GPU compiles the kernels for real in the other tests")
def test_w8a8_and_quant_kernels_compile_for_sm90(tmp_path: pytest.TempPathFactory) -> None:
    """The kernels of :mod:`linquant.kernels._triton_jit` compile to sm_90 without a GPU, with
    the constexprs and options their launchers pass on CUDA: the activation quantization (3
    modes, one tile per row or two passes), the int8 GEMM's first config (3 modes, with and
    without bias, K a multiple of BLOCK_K or not) and the weight quantization (4 and 8 bits, 3
    modes, one tile or two passes). The GEMM's 128x256 tile uses Hopper's wgmma
    (``s32.s8.s8``), asynchronous (ptxas reports no C7515), with Triton 3.3, 3.4, 3.6 and 3.9."""
    kinds = ("act_quant", "w8a8", "weight_quant")
    rows = _static_check(tmp_path, "--kinds", ",".join(kinds), kinds=kinds)
    assert not any("FAILED" in r for r in rows), "\n".join(rows)
    counts = {k: sum(r.startswith(f"{k} ") for r in rows) for k in kinds}
    assert counts == {"act_quant": 3 * 2, "w8a8": 3 * 2 * 2, "weight_quant": 2 * 3 * 2}, rows
    for r in rows:
        assert r.startswith("w8a8 ") == (" wgmma " in r or " mma " in r), r
        if r.startswith("w8a8 "):
            assert " wgmma " in r and "SERIALIZED" not in r, r


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="a GPU compiles the kernels for real in the other tests")
def test_static_check_script(tmp_path: pytest.TempPathFactory) -> None:
    """benchmarks/triton_static.py reads the gemv's SASS: registers and spills are reported,
    the 4-bit in-place decoding stays under 6 loop instructions per code for int4-sym-g128
    (6.5 before it), and the 8-bit byte permute (one PRMT per code) under 5 for int8-sym-ch0
    (5.4 with the shift and the OR)."""
    import re

    rows = _static_check(tmp_path, "--kinds", "gemv")
    assert len(rows) == 5 and not any("FAILED" in r for r in rows), rows
    for scheme, most in (("int4-sym-g128", 6.0), ("int8-sym-ch0", 5.0)):
        row = next(r for r in rows if scheme in r)
        m = re.search(r"regs +(\d+) spill +(\d+) .* ([\d.]+) instr/code", row)
        assert m is not None, row
        assert int(m.group(2)) == 0 and float(m.group(3)) < most, row


def _per_code(rows: list[str], prefix: str) -> float:
    import re

    row = next(r for r in rows if r.startswith(prefix))
    m = re.search(r" ([\d.]+) instr/code", row)
    assert m is not None and "FAILED" not in row, row
    return float(m.group(1))


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="a GPU compiles the kernels for real in the other tests")
def test_static_packed_pairs_cost_fewer_instructions(tmp_path: pytest.TempPathFactory) -> None:
    """The split-K kernel's packed-pair decoding (two 4-bit codes per HADD2) takes at least
    10% fewer loop instructions per code than the fp32 decoding of the same tile shape
    (compiled for sm_90: 4.2-4.3 against 5.1-5.3 with Triton 3.6 and 3.9)."""
    plain = next(i for i, c in enumerate(tlin.CONFIGS["splitk"]) if not c.get("PACKED"))
    packed = next(i for i, c in enumerate(tlin.CONFIGS["splitk"])
                  if c.get("PACKED") and {**c, "PACKED": 0} == {**tlin.CONFIGS["splitk"][plain],
                                                                "PACKED": 0})
    rows = _static_check(tmp_path, "--kinds", "splitk", "--configs", f"{plain},{packed}")
    a = _per_code(rows, f"splitk c{plain} int4-sym-g128")
    b = _per_code(rows, f"splitk c{packed} int4-sym-g128")
    assert b < 0.9 * a, (a, b)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="a GPU compiles the kernels for real in the other tests")
def test_static_prefetch_configs_are_not_serialized(tmp_path: pytest.TempPathFactory) -> None:
    """The PREFETCH configs (swapped tiles, num_stages 1, loads one tile ahead in registers)
    keep their wgmma asynchronous: ptxas does not report C7515 ("serialized") for them, for any
    scheme of the static check. Their pipelined twins are serialized for several schemes
    (Triton 3.6 and 3.9; BENCHMARKS.md, "Serialized wgmma"), which is why they exist."""
    for kind in ("splitk", "tiled"):
        picked = [str(i) for i, c in enumerate(tlin.CONFIGS[kind]) if c.get("PREFETCH")]
        assert picked and all(tlin.CONFIGS[kind][int(i)]["num_stages"] == 1 for i in picked)
        rows = _static_check(tmp_path, "--kinds", kind, "--configs", ",".join(picked))
        assert len(rows) == 5 * len(picked), rows
        assert not any("FAILED" in r or "SERIALIZED" in r for r in rows), "\n".join(rows)
        assert all(" wgmma " in r for r in rows), "\n".join(rows)


# ---- CUDA only -------------------------------------------------------------------------------
# Each (scheme, kernel, config) is one Triton compile (about a second) on first use; these
# tests compile about 60 kernels in all.


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("scheme", ["int4-sym-g128", "int8-sym-ch0"])
def test_cuda_dispatcher_autotuned_4096(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINQUANT_TINYGEMM", "0")  # one-token int4 calls: Triton, not tinygemm
    qt = _qt(4096, 4096, scheme)
    bias = _bias(4096).bfloat16()
    cache: dict[str, object] = {}
    for m in (1, 16, 300):
        x = _x(m, 4096, torch.bfloat16)
        assert kernels.select_path(x, qt) == "cuda_triton"
        y = kernels.linear_weight_only(x, qt, bias, cache)
        _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)
        # the second call takes the layer's plan (no checks), the same kernel and config; split
        # K sums with fp32 atomics, in any order, so not always to the same bits
        _close(tlin.planned(x, qt, bias, cache), y, 1e-2)
        _close(kernels.linear_weight_only(x, qt, bias, cache), y, 1e-2)
    assert sorted(cache) == ["triton", "triton_plans"]
    assert len(cache["triton_plans"]) == 3
    assert not tlin.failures()


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("scheme", ["int4-asym-g32", "int4-asymf-g64-bf16", "int8-asym-g128"])
def test_cuda_odd_shape(scheme: str) -> None:
    qt = _qt(1000, 1536, scheme)
    bias = _bias(1000)
    for m in (1, 16, 300):
        x = _x(m, 1536, torch.float16)
        kind = tlin.kernel_for(m, qt)
        y = tlin.linear(x, qt, bias, {}, kernel=kind, config=dict(tlin.CONFIGS[kind][0]))
        _close(y, ref.linear_weight_only(x, qt, bias), HALF_TOL)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("scheme", ["int4-sym-g128", "int8-asymf-ch0"])
def test_cuda_every_config_compiles_and_matches(scheme: str) -> None:
    qt = _qt(1024, 2048, scheme)
    bias = _bias(1024)
    bad = []
    for kind, cfgs in tlin.CONFIGS.items():
        x = _x({"gemv_t": 1, "gemv": 1, "splitk": 16, "tiled": 512}[kind], 2048,
               torch.bfloat16)
        r = ref.linear_weight_only(x, qt, bias)
        for cfg in cfgs:
            y = tlin.linear(x, qt, bias, {}, kernel=kind, config=dict(cfg))
            err = (y.double() - r.double()).abs()
            if err.max().item() > HALF_TOL * r.double().abs().max().item():
                rows = (err.amax(1) > HALF_TOL * r.double().abs().max().item()).nonzero()
                bad.append(f"{kind} {cfg}: max error {err.max().item():.3g}, wrong rows "
                           f"{rows.flatten().tolist()[:8]} of {x.shape[0]}")
    assert not bad, "\n".join(bad)


@pytest.mark.cuda
@cuda_only
def test_cuda_quantlinear_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINQUANT_TINYGEMM", "0")  # one-token int4 calls: Triton, not tinygemm
    lin = nn.Linear(512, 384).to(torch.bfloat16)
    q = QuantLinear.from_float(lin, "int4-asym-g32-bf16").to("cuda")
    for lead in ((1, 1), (2, 8)):
        x = torch.randn(*lead, 512, dtype=torch.bfloat16, device="cuda")
        assert kernels.select_path(x, q.qweight) == "cuda_triton"
        with torch.no_grad():
            y = q(x)
        _close(y, ref.linear_weight_only(x, q.qweight, q.bias), HALF_TOL)
    assert "triton" in q._kernel_cache
    assert not tlin.failures()


@pytest.mark.cuda
@cuda_only
def test_cuda_dequant_path_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = _qt(4096, 4096, "int4-asym-g32")
    bias = _bias(4096).bfloat16()
    x = _x(2048, 4096, torch.bfloat16)
    monkeypatch.delenv("LINQUANT_CUDA_DEQUANT_MIN_M", raising=False)
    assert kernels.select_path(x, qt) == "cuda_triton"
    monkeypatch.setenv("LINQUANT_CUDA_DEQUANT_MIN_M", "1024")
    assert kernels.select_path(x, qt) == "cuda_dequant"
    assert kernels.select_path(x[:1000], qt) == "cuda_triton"
    assert kernels.select_path(x.float(), qt) == "reference"  # fp32 at 2048 tokens: as before
    cache: dict[str, Any] = {}
    with torch.no_grad():
        y = kernels.linear_weight_only(x, qt, bias, cache)
        assert torch.equal(y, ref.linear_weight_only(x, qt, bias))  # the same bits
        assert torch.equal(kernels.linear_weight_only(x, qt, bias, cache), y)  # its plan
    assert [p.path for p in cache["cuda_plans"].values()] == ["cuda_dequant"]
    assert not tlin.failures()

