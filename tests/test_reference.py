"""``lq.quantize`` against a deliberately plain reference written from the formulas in DESIGN.md.

The reference walks the granules with Python loops (one slice of the tensor per scale), does the
per-granule math with fp32 torch scalars, and knows nothing of the library's lowering, blocking or
packing. Agreement is exact: codes, scales, zero points, offsets and dequantized values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import linquant as lq
from linquant import QuantScheme

SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MSE_RATIOS = [1.0 - 0.025 * i for i in range(29)]  # 1.0 down to 0.30, as documented


def eps_for(dtype: torch.dtype) -> float:
    """Smallest positive scale: the fp16 subnormal 2**-24, else finfo.tiny."""
    return 2.0**-24 if dtype == torch.float16 else float(torch.finfo(dtype).tiny)


# ---- the reference --------------------------------------------------------------------------

def granule_slices(
    shape: tuple[int, ...], scheme: QuantScheme
) -> Iterator[tuple[tuple[int, ...], tuple[object, ...]]]:
    """Yield ``(scale_index, slice_of_x)`` for every granule, in any order."""
    if scheme.granularity == "tensor":
        yield (), tuple(slice(None) for _ in shape)
    elif scheme.granularity == "channel":
        k = scheme.axis if scheme.axis >= 0 else scheme.axis + len(shape)
        for i in range(shape[k]):
            sidx = tuple(i if d == k else 0 for d in range(len(shape)))
            sl = tuple(i if d == k else slice(None) for d in range(len(shape)))
            yield sidx, sl
    else:
        g = scheme.group_size
        assert g is not None
        for prefix in itertools.product(*(range(n) for n in shape[:-1])):
            for j in range(shape[-1] // g):
                yield (*prefix, j), (*prefix, slice(j * g, (j + 1) * g))


@dataclass
class Ref:
    codes: torch.Tensor  # int64, x's shape
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    offset: torch.Tensor | None
    dq: torch.Tensor


def reference_granule(
    r: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """One granule ``r`` (fp32): (codes, stored scale, zero point, offset, fp32 reconstruction)."""
    b, sdt = scheme.bits, scheme.scale_dtype
    eps = eps_for(sdt)
    if scheme.symmetric:
        qmax = 2 ** (b - 1) - 1
        s = torch.clamp(r.abs().max() / qmax, min=eps).to(sdt)
        sf = s.float()
        q = torch.clamp(torch.round(r / sf), -qmax, qmax)
        return q, s, None, None, q * sf
    levels = 2**b - 1
    if scheme.zero_point == "int":
        lo = torch.clamp(r.min(), max=0.0)
        hi = torch.clamp(r.max(), min=0.0)
        s = torch.clamp((hi - lo) / levels, min=eps).to(sdt)
        sf = s.float()
        z = torch.clamp(torch.round(-lo / sf), 0, levels)
        q = torch.clamp(torch.round(r / sf) + z, 0, levels)
        return q, s, z.to(torch.uint8), None, (q - z) * sf
    lo, hi = r.min(), r.max()
    m = lo.to(sdt)  # the offset rounded down (never above r_min), the scale spanning the rest
    if m.float() > lo:
        m = torch.nextafter(m, torch.full_like(m, -math.inf))
    s = torch.clamp((hi - m.float()) / levels, min=eps).to(sdt)
    sf = s.float()
    q = torch.clamp(torch.round((r - m.float()) / sf), 0, levels)
    return q, s, None, m, q * sf + m.float()


def reference_quantize(x: torch.Tensor, scheme: QuantScheme) -> Ref:
    shape = tuple(x.shape)
    if scheme.granularity == "tensor":
        sshape: tuple[int, ...] = ()
    elif scheme.granularity == "channel":
        k = scheme.axis % len(shape)
        sshape = tuple(n if d == k else 1 for d, n in enumerate(shape))
    else:
        assert scheme.group_size is not None
        sshape = (*shape[:-1], shape[-1] // scheme.group_size)
    xf = x.float()
    codes = torch.zeros(shape, dtype=torch.int64)
    dq = torch.zeros(shape, dtype=torch.float32)
    scale = torch.zeros(sshape, dtype=scheme.scale_dtype)
    zp = torch.zeros(sshape, dtype=torch.uint8) if scheme.has_int_zero_point else None
    offset = torch.zeros(sshape, dtype=scheme.scale_dtype) if scheme.has_offset else None
    for sidx, sl in granule_slices(shape, scheme):
        r = xf[sl]
        q, s, z, m, rec = reference_granule(r.reshape(-1), scheme)
        codes[sl] = q.to(torch.int64).reshape(r.shape)
        dq[sl] = rec.reshape(r.shape)
        scale[sidx] = s
        if zp is not None:
            assert z is not None
            zp[sidx] = z
        if offset is not None:
            assert m is not None
            offset[sidx] = m
    return Ref(codes, scale, zp, offset, dq.to(x.dtype))


def assert_matches_reference(x: torch.Tensor, scheme: QuantScheme) -> lq.QuantizedTensor:
    qt = lq.quantize(x, scheme)
    ref = reference_quantize(x, scheme)
    codes = qt.codes()
    assert codes.dtype == (torch.int8 if scheme.symmetric else torch.uint8)
    assert codes.shape == x.shape
    mismatch = (codes.to(torch.int64) != ref.codes).nonzero()
    assert mismatch.numel() == 0, f"codes differ at {mismatch[:5].tolist()}"
    assert qt.scale.dtype == scheme.scale_dtype
    assert qt.scale.shape == ref.scale.shape
    assert torch.equal(qt.scale, ref.scale)
    if ref.zero_point is None:
        assert qt.zero_point is None and qt.zero_point_packed is None
    else:
        assert qt.zero_point is not None
        assert qt.zero_point.dtype == torch.uint8
        assert torch.equal(qt.zero_point, ref.zero_point)
    if ref.offset is None:
        assert qt.offset is None
    else:
        assert qt.offset is not None
        assert qt.offset.dtype == scheme.scale_dtype
        assert torch.equal(qt.offset, ref.offset)
    dq = qt.dequantize()
    assert dq.dtype == x.dtype and dq.shape == x.shape
    assert torch.equal(dq, ref.dq)
    return qt


# ---- test data ------------------------------------------------------------------------------

def make_2d(seed: int = 0) -> torch.Tensor:
    """6x16 with every kind of row: Gaussian, positive-only, all-zero, negative-only,
    constant, tiny magnitudes plus one outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, generator=g)
    x[1] = x[1].abs() + 0.1
    x[2] = 0.0
    x[3] = -x[3].abs()
    x[4] = 0.3
    x[5] = x[5] * 1e-6
    x[5, 3] = 8.0
    x[0, 4:8] = 0.0  # an all-zero group of 4 inside a Gaussian row
    return x


def make_3d(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, generator=g)
    x[1, 2] = 0.0
    x[2, :, :4] = -1.5
    x[0, 0, 0] = 25.0
    return x


CASES: dict[str, tuple[str, dict[str, object]]] = {
    "tensor": ("2d", {"granularity": "tensor"}),
    "ch0": ("2d", {"granularity": "channel", "axis": 0}),
    "ch1": ("2d", {"granularity": "channel", "axis": 1}),
    "3d-ch1": ("3d", {"granularity": "channel", "axis": 1}),
    "3d-ch-1": ("3d", {"granularity": "channel", "axis": -1}),
    "g4": ("2d", {"granularity": "group", "group_size": 4}),
    "3d-g8": ("3d", {"granularity": "group", "group_size": 8}),
}
MODES: dict[str, dict[str, object]] = {
    "sym": {"symmetric": True},
    "asym": {"symmetric": False, "zero_point": "int"},
    "asymf": {"symmetric": False, "zero_point": "float"},
}
DATA = {"2d": make_2d(), "3d": make_3d()}


def scheme_of(mode: str, case: str, bits: int, sdt: str, **extra: object) -> QuantScheme:
    return QuantScheme(bits=bits, scale_dtype=SCALE_DTYPES[sdt],  # type: ignore[arg-type]
                       **MODES[mode], **CASES[case][1], **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize("sdt", list(SCALE_DTYPES))
@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"int{b}")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference(mode: str, case: str, bits: int, sdt: str) -> None:
    x = DATA[CASES[case][0]]
    assert_matches_reference(x, scheme_of(mode, case, bits, sdt))


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("case", ["tensor", "ch1", "3d-ch-1", "g4"])
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_input(mode: str, case: str, bits: int, input_dtype: torch.dtype) -> None:
    """fp16/bf16 inputs: the math runs in fp32, so the result is that of ``x.float()`` with the
    reconstruction cast back to the input dtype."""
    x = DATA[CASES[case][0]].to(input_dtype)
    scheme = scheme_of(mode, case, bits, "fp16")
    qt = assert_matches_reference(x, scheme)
    q32 = lq.quantize(x.float(), scheme)
    assert torch.equal(qt.qdata, q32.qdata)
    assert torch.equal(qt.scale, q32.scale)
    assert torch.equal(qt.dequantize(), q32.dequantize().to(input_dtype))
    assert torch.equal(qt.dequantize(torch.float32), q32.dequantize())


def _same(a: lq.QuantizedTensor, b: lq.QuantizedTensor) -> None:
    assert torch.equal(a.qdata, b.qdata)
    assert torch.equal(a.scale, b.scale)
    for t, u in ((a.zero_point_packed, b.zero_point_packed), (a.offset, b.offset)):
        assert (t is None) == (u is None)
        if t is not None:
            assert u is not None and torch.equal(t, u)
    assert torch.equal(a.dequantize(), b.dequantize())


VIEWS = {
    "transpose": lambda: torch.randn(16, 6).t(),
    "column-slice": lambda: torch.randn(6, 32)[:, ::2],
    "permute-3d": lambda: torch.randn(8, 3, 4).permute(1, 2, 0),
    "expand": lambda: torch.randn(1, 16).expand(6, 16),
}


@pytest.mark.parametrize("scheme", ["int4-sym-g4-fp16", "int3-asym-ch1-fp32",
                                    "int5-asymf-ch0-bf16", "int8-sym-tensor-fp32",
                                    "int2-asym-ch-1-fp16-mse"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_input(view: str, scheme: str) -> None:
    x = VIEWS[view]()
    assert not x.is_contiguous()
    qt = lq.quantize(x, scheme)
    _same(qt, lq.quantize(x.contiguous(), scheme))
    if not scheme.endswith("mse"):
        assert_matches_reference(x, QuantScheme.parse(scheme))


@pytest.mark.parametrize("clip", ["minmax", "mse"])
@pytest.mark.parametrize("mode", list(MODES))
def test_input_never_modified(mode: str, clip: str) -> None:
    for case in CASES:
        before = DATA[CASES[case][0]]
        x = before.clone()
        lq.quantize(x, scheme_of(mode, case, 3, "fp16", clip=clip)).dequantize()
        assert torch.equal(x, before)
        # a non-contiguous view of the same values: its storage is untouched too
        storage = before.transpose(0, -1).contiguous()
        lq.quantize(storage.transpose(0, -1), scheme_of(mode, case, 5, "bf16", clip=clip))
        assert torch.equal(storage, before.transpose(0, -1))
        x16 = before.half()
        lq.quantize(x16, scheme_of(mode, case, 4, "fp32", clip=clip))
        assert torch.equal(x16, before.half())


# ---- hand-worked examples -------------------------------------------------------------------

def test_round_half_to_even() -> None:
    x = torch.tensor([-7.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 7.0])  # s = 7/7 = 1
    qt = lq.quantize(x, "int4-sym-tensor-fp32")
    assert float(qt.scale) == 1.0
    assert qt.codes().tolist() == [-7, -2, -2, 0, 0, 2, 2, 4, 7]


def test_docstring_examples() -> None:
    qt = lq.quantize(torch.tensor([-1.0, 0.5]), "int8-sym-tensor-fp32")
    assert torch.equal(qt.scale, torch.tensor(1.0) / 127)
    assert qt.codes().tolist() == [-127, 64]  # 0.5 * 127 = 63.5 -> 64 (even)
    qt = lq.quantize(torch.tensor([-1.0, 0.5]), "int4-asym-tensor-fp32")
    assert torch.equal(qt.scale, torch.tensor(1.5) / 15)
    assert int(qt.zero_point) == 10  # type: ignore[arg-type]
    assert qt.codes().tolist() == [0, 15]
    qt = lq.quantize(torch.tensor([1.0, 2.5, 4.0]), "int2-asymf-tensor-fp32")
    assert (float(qt.scale), float(qt.offset)) == (1.0, 1.0)  # type: ignore[arg-type]
    assert qt.codes().tolist() == [0, 2, 3]  # 1.5 -> 2 (even)
    assert qt.dequantize().tolist() == [1.0, 3.0, 4.0]


@pytest.mark.parametrize("sdt", list(SCALE_DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
def test_all_zero_scale_is_smallest_positive(mode: str, sdt: str) -> None:
    qt = lq.quantize(torch.zeros(2, 8), scheme_of(mode, "ch0", 4, sdt))
    assert torch.equal(qt.scale, torch.full((2, 1), eps_for(SCALE_DTYPES[sdt]),
                                            dtype=SCALE_DTYPES[sdt]))
    assert torch.equal(qt.dequantize(), torch.zeros(2, 8))


# ---- big tensors: the blocked code path against the reference ------------------------------

BIG = {
    # name: (shape, scheme); each spans several 256K-element blocks of ops.affine
    "ch0-600x1001-int3-sym": ((600, 1001), "int3-sym-ch0-fp16"),
    "ch1-1001x300-int5-asym": ((1001, 300), "int5-asym-ch1-fp32"),
    "3d-ch1-40x13x1001-int7-asymf": ((40, 13, 1001), "int7-asymf-ch1-bf16"),
    "g250-300x1000-int2-asymf": ((300, 1000), "int2-asymf-g250-fp16"),
    "g250-300x1000-int8-asym": ((300, 1000), "int8-asym-g250-fp32"),
    "tensor-700x401-int6-sym": ((700, 401), "int6-sym-tensor-fp32"),
}


@pytest.mark.parametrize(("shape", "scheme"), list(BIG.values()), ids=list(BIG))
def test_big_tensor_matches_reference(shape: tuple[int, ...], scheme: str) -> None:
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    x = torch.randn(shape, generator=g)
    x.view(-1)[::997] *= 10.0  # sprinkle outliers so granules differ
    assert_matches_reference(x, QuantScheme.parse(scheme))


# ---- clip="mse": an independent search over the documented ratios ---------------------------

def mse_candidates(r: torch.Tensor, scheme: QuantScheme) -> list[tuple[float, float]]:
    """(sse in fp64, stored scale) for each documented clipping ratio of granule ``r``."""
    out = []
    lo0, hi0 = r.min(), r.max()
    for ratio in MSE_RATIOS:
        if ratio == 1.0:  # no clipping: the min-max range itself
            lo, hi = lo0, hi0
        elif scheme.has_offset:
            mid, half = (lo0 + hi0) * 0.5, (hi0 - lo0) * (0.5 * ratio)
            lo, hi = mid - half, mid + half
        else:
            lo, hi = lo0 * ratio, hi0 * ratio
        clipped = torch.stack([lo, hi])
        # the reference granule math on the clipped range, applied to the real values
        _, s, z, m, _ = reference_granule(clipped, scheme)
        sf = s.float()
        if scheme.symmetric:
            qmax = 2 ** (scheme.bits - 1) - 1
            rec = torch.clamp(torch.round(r / sf), -qmax, qmax) * sf
        elif z is not None:
            zf = z.float()
            rec = (torch.clamp(torch.round(r / sf) + zf, 0, 2**scheme.bits - 1) - zf) * sf
        else:
            assert m is not None
            rec = torch.clamp(torch.round((r - m.float()) / sf), 0, 2**scheme.bits - 1) * sf
            rec = rec + m.float()
        out.append((float((rec.double() - r.double()).pow(2).sum()), float(sf)))
    return out


@pytest.mark.parametrize("sdt", ["fp32", "fp16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("mode", list(MODES))
def test_mse_clip_picks_best_documented_ratio(mode: str, bits: int, sdt: str) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 64, generator=g)
    x[:, 0] *= 6.0  # heavy tails make clipping worthwhile
    x[3] = x[3].abs() + 2.0  # a group far from zero (float offset shrinks to the middle)
    scheme = scheme_of(mode, "ch0", bits, sdt, clip="mse")
    qt = lq.quantize(x, scheme)
    dq = qt.dequantize()
    for row in range(x.shape[0]):
        r = x[row]
        cands = mse_candidates(r, scheme)
        best = min(e for e, _ in cands)
        got = float((dq[row].double() - r.double()).pow(2).sum())
        assert got <= best * (1 + 1e-5) + 1e-30, (row, got, best)
        assert float(qt.scale[row, 0]) in {s for _, s in cands}


@pytest.mark.parametrize("sdt", ["fp16", "bf16"])
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"int{b}")
def test_float_offset_is_never_above_the_minimum(bits: int, sdt: str) -> None:
    """Groups far from zero and narrow (what a float offset is for): the offset rounded to
    nearest could land above the group's minimum, and values below it clamped at code 0, 30
    steps off under int8 with bf16 storage. Rounded down, every value is within half a step,
    plus what rounding the scale moved the top of the range (``levels * |s_exact - s|``)."""
    torch.manual_seed(0)
    x = 0.5 + 0.02 * torch.rand(64, 32)
    qt = lq.quantize(x, f"int{bits}-asymf-g32-{sdt}")
    assert qt.offset is not None
    m, s = qt.offset.float(), qt.scale.float()
    lo, hi = x.reshape(64, 1, 32).amin(-1), x.reshape(64, 1, 32).amax(-1)
    assert bool((m <= lo).all())
    levels = 2**bits - 1
    slack = levels * ((hi - m) / levels - s).abs()
    err = (qt.dequantize() - x).abs().reshape(64, 1, 32).amax(-1)
    assert bool((err <= s / 2 + slack + 1e-7).all())


@pytest.mark.parametrize("scheme", ["int4-sym-g32-fp16", "int4-asym-g32-fp16",
                                    "int8-sym-ch0-fp16", "int4-sym-g32-bf16",
                                    "int4-asymf-g32-bf16", "int3-sym-tensor-bf16",
                                    "int8-asym-ch0-bf16", "int2-asym-g32-fp16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_values_at_a_16_bit_maximum_dequantize_finite(scheme: str, dtype: torch.dtype) -> None:
    """A finite fp16 / bf16 tensor holding its dtype's largest values dequantized to inf: the
    scale rounded up into 16 bits (65504 / 7 is stored as 9360, and 7 * 9360 is inf in fp16),
    or the zero point's rounding, put the top of the range past the maximum. Those granules
    get a lower scale (or the zero point one code over): finite, within a step or two."""
    top = float(torch.finfo(dtype).max)
    x = (torch.randn(4, 64) * (top / 8)).to(dtype)
    x[0, 0], x[1, 5], x[2, 40] = top, -top, top
    x[3, 0], x[3, 1] = top, -top  # one granule (per channel, tensor) spanning both maxima
    if dtype == torch.bfloat16:  # bf16's range is fp32's: max - min of both signs overflows
        x = x.abs()  # fp32 (an error, tested elsewhere); one sign here
    if "fp16" in scheme and dtype == torch.bfloat16:
        pytest.skip("fp16 scales cannot hold bf16's range: an error, tested elsewhere")
    qt = lq.quantize(x, scheme)
    dq = qt.dequantize()
    assert dq.dtype == dtype and bool(torch.isfinite(dq).all())
    step = qt.scale.float().max()
    # within one step, or two where a coarse (bf16) scale had to come down for a granule
    # spanning both maxima (its range shrinks by codes x the scale's rounding)
    assert float((dq.float() - x.float()).abs().max()) <= 2 * float(step)
