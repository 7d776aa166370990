"""One-kernel weight quantization (linquant.kernels.triton_quant) against the torch-ops path.

Without a GPU the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
tests/kernels/conftest.py and again below) on CPU tensors and is compared with
``linquant.quantize`` on CPU; with a GPU the same comparisons run on CUDA (the torch path forced
with ``triton_quant.ENABLED = False``). Every comparison is exact: packed codes, scales, zero
points and offsets must be the same bytes. Skipped without triton.

Interpreter run time: a few seconds on one CPU thread. Tests marked ``cuda`` need a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first kernel launch (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import linquant as lq
from linquant.errors import LinquantError
from linquant.kernels import _triton_env
from linquant.kernels import triton_quant as tq
from linquant.kernels import triton_w8a8 as tw
from linquant.ops.affine import quantize_packed
from linquant.ops.grouping import granules
from linquant.ops.packing import pack
from linquant.ops.qparams import QParams, smallest_scale
from linquant.scheme import QuantScheme

if not _triton_env.available():  # Triton older than the kernels are tested with
    pytest.skip(_triton_env.status(), allow_module_level=True)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]

if not CUDA and not tw.interpreting():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

pytestmark = [  # numpy warnings from the interpreter on NaN / overflowing values
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _oracle(x: torch.Tensor, scheme: QuantScheme) -> lq.QuantizedTensor:
    old, tq.ENABLED = tq.ENABLED, False
    try:
        return lq.quantize(x, scheme)
    finally:
        tq.ENABLED = old


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges, an off-centre row, an all-zero row, a near-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)),
                                                    generator=g) * 3
    w[0] += 2.0  # all positive: asymmetric zero point 0, offset > 0
    if shape[0] > 2:
        w[1] = 0.0  # scale = smallest value of the scale dtype
        w[2] *= 1e-6
    return w.to(dtype).to(DEV)


def _check(x: torch.Tensor, scheme: QuantScheme) -> None:
    out = tq.quantize(x, scheme)
    assert out is not None, f"{scheme} not covered for {tuple(x.shape)}"
    qdata, scale, zp, offset = out
    r = _oracle(x, scheme)
    assert qdata.dtype == torch.uint8 and scale.dtype == scheme.scale_dtype
    assert torch.equal(qdata, r.qdata), "codes differ"
    assert torch.equal(scale, r.scale.reshape(-1)), "scales differ"
    assert torch.equal(scale.view(torch.uint8), r.scale.reshape(-1).view(torch.uint8))
    if r.zero_point_packed is None:
        assert zp is None
    else:
        assert zp is not None and torch.equal(zp, r.zero_point_packed), "zero points differ"
    if r.offset is None:
        assert offset is None
    else:
        assert offset is not None and torch.equal(offset, r.offset.reshape(-1)), "offsets differ"


CASES = [  # (shape, scheme): R, L odd and even, several rows per program, one row per program
    ((48, 96), "int8-sym-ch0"),
    ((33, 66), "int8-asym-ch0-bf16"),
    ((7, 10), "int8-asymf-ch0-fp16"),
    ((3, 4, 64), "int8-sym-ch0"),  # channel axis 0 of a 3-D tensor: rows of 256
    ((9, 40), "int8-asym-g8-bf16"),
    ((17, 256), "int4-sym-g128-fp16"),
    ((48, 96), "int4-asym-g32"),
    ((30, 64), "int4-asymf-g16-bf16"),
    ((7, 10), "int4-asym-ch0"),  # 7 zero points: odd count, packed with a pad nibble
    ((5, 2, 64), "int4-asym-g64-fp16"),
    ((40, 1024), "int4-asym-ch0-fp16"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_matches_torch_path(case: tuple[tuple[int, ...], str], dtype: torch.dtype) -> None:
    shape, text = case
    _check(_weight(shape, dtype), QuantScheme.parse(text))


@pytest.mark.parametrize("text", ["int8-sym-ch0-bf16", "int4-asym-ch0", "int4-asymf-ch0-fp16"])
def test_long_rows_two_passes(text: str) -> None:
    _check(_weight((3, tq.MAX_SINGLE_L + 36), torch.bfloat16), QuantScheme.parse(text))


def test_ties_and_subnormals() -> None:
    # x / s lands exactly on .5 (s = 1 for this row), tiny and subnormal inputs
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.0])
    x = torch.stack([row, row * 1e-38, torch.full((8,), 1e-40), -row]).to(DEV)
    for text in ("int8-sym-ch0", "int8-asym-ch0", "int8-asymf-ch0", "int4-sym-ch0-fp16",
                 "int4-asym-g4-bf16"):
        _check(x, QuantScheme.parse(text))
    xb = torch.tensor([[1e-39, -2e-39, 5e-40, 0.0, 3.0, -1.0]]).bfloat16().to(DEV)
    _check(xb, QuantScheme.parse("int8-asym-ch0-bf16"))


def test_reciprocal_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA rule (range * fp32(1 / q_max)), run through the interpreter, against an emulation
    with the library's own apply half (:func:`quantize_packed`)."""
    monkeypatch.setattr(tw, "divides_by_reciprocal", lambda device: True)
    x = _weight((33, 64), torch.float32, seed=5)
    for text in ("int8-sym-ch0", "int4-asym-g16-fp16", "int4-asymf-g32-bf16"):
        s = QuantScheme.parse(text)
        out = tq.quantize(x, s)
        assert out is not None
        qdata, scale, zp, offset = out
        g = granules(tuple(x.shape), s)
        x3 = x.reshape(g.shape3)
        lo, hi = x3[0].amin(dim=1), x3[0].amax(dim=1)
        inv = (torch.ones((), dtype=torch.float32) / s.qmax).to(DEV)
        if s.symmetric:
            rng = torch.maximum(-lo, hi)
        elif s.zero_point == "int":
            lo = lo.clamp_max(0.0)
            rng = hi.clamp_min(0.0) - lo
        else:  # the offset rounded down, the scale spanning what is above it
            em0 = lo.to(s.scale_dtype)
            below = torch.nextafter(em0, torch.full_like(em0, -math.inf))
            em0 = torch.where(em0.float() > lo, below, em0)
            rng = hi - em0.float()
        es = (rng * inv).clamp_min(smallest_scale(s.scale_dtype)).to(s.scale_dtype)
        assert torch.equal(scale, es)
        ez = None
        if s.has_int_zero_point:
            ez = torch.round(0 - lo / es.float()).clamp(0, s.qmax).to(torch.uint8)
            assert zp is not None and torch.equal(zp, pack(ez, s.bits))
        em = em0 if s.has_offset else None
        if em is not None:
            assert offset is not None and torch.equal(offset, em)
        assert torch.equal(qdata, quantize_packed(x3, QParams(es, ez, em), s))


@pytest.mark.parametrize("bad", ["nan", "inf", "scale-overflow", "offset-overflow"])
def test_non_finite_falls_back_and_raises(bad: str) -> None:
    x = _weight((6, 32), torch.float32)
    text = "int8-sym-ch0"
    if bad == "nan":
        x[3, 5] = float("nan")
    elif bad == "inf":
        x[4, 0] = -float("inf")
    elif bad == "scale-overflow":
        x[2, 1], text = 1e7, "int8-sym-ch0-fp16"  # 1e7 / 127 > fp16 max
    else:
        x[2] = -7e4 + torch.rand(32, device=DEV) * 100  # offset -7e4 overflows fp16
        text = "int8-asymf-ch0-fp16"
    scheme = QuantScheme.parse(text)
    assert tq.covers(x, scheme)
    assert tq.quantize(x, scheme) is None
    with pytest.raises(LinquantError):
        lq.quantize(x, scheme)


@pytest.mark.parametrize("text", ["int4-sym-g32-fp16", "int4-asym-g32-fp16",
                                  "int8-asymf-ch0-bf16"])
def test_values_at_the_fp16_maximum_take_the_torch_path(text: str) -> None:
    """An fp16 weight holding 65504: the kernel's scale (rounded to nearest) would dequantize
    that group to inf; the call returns None and the torch path lowers the scale
    (``ops.qparams.fit_dtype``). Groups far from the maximum stay on the kernel, with the
    torch path's bytes."""
    scheme = QuantScheme.parse(text)
    x = _weight((6, 64), torch.float16)
    _check(x, scheme)
    x[1, 3], x[4, 60] = 65504.0, -65504.0
    assert tq.covers(x, scheme) and tq.quantize(x, scheme) is None
    assert bool(torch.isfinite(lq.quantize(x, scheme).dequantize()).all())


def test_not_covered() -> None:
    x = _weight((8, 30), torch.float32)
    for text in ("int3-sym-ch0", "int2-asym-g2", "int8-sym-ch0-mse", "int8-sym-tensor",
                 "int8-sym-ch1", "int4-sym-g5"):  # g5: odd rows of 4-bit codes
        s = QuantScheme.parse(text)
        assert not tq.covers(x, s), text
        assert tq.quantize(x, s) is None
    assert not tq.covers(x.double(), QuantScheme.parse("int8-sym-ch0"))
    assert not tq.covers(torch.randint(0, 9, (4, 4)), QuantScheme.parse("int8-sym-ch0"))
    assert tq.covers(x.t(), QuantScheme.parse("int8-sym-ch0"))  # made contiguous first
    _check(x.t(), QuantScheme.parse("int8-asym-ch0"))


def test_cpu_quantize_does_not_use_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("triton path used for a CPU tensor")

    monkeypatch.setattr(tq, "quantize", boom)
    qt = lq.quantize(torch.randn(16, 32), "int4-asym-g32")
    assert qt.qdata.numel() == 16 * 32 // 2


# ---- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int8-sym-ch0", "int4-asym-g32", "int4-asym-g128-bf16",
                                  "int4-sym-g32-fp16", "int8-asymf-ch0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_quantize_uses_kernel_and_matches(text: str, dtype: torch.dtype,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = tq.quantize

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tq, "quantize", spy)
    w = _weight((4096, 4096), dtype)
    qt = lq.quantize(w, text)
    assert calls and qt.qdata.device.type == "cuda"
    r = _oracle(w, QuantScheme.parse(text))
    assert torch.equal(qt.qdata, r.qdata) and torch.equal(qt.scale, r.scale)
    for a, b in ((qt.zero_point_packed, r.zero_point_packed), (qt.offset, r.offset)):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_bad_input_raises_like_torch_path() -> None:
    w = torch.randn(64, 64, device="cuda")
    w[3, 3] = float("nan")
    with pytest.raises(LinquantError, match="NaN/Inf"):
        lq.quantize(w, "int8-sym-ch0")
