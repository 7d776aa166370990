"""Plain-PyTorch reference kernels: the oracles every fast path is tested against.

Shapes: ``x [..., K]`` activations (any number of leading dims), weights ``[N, K]`` (rows are
output features, as in ``nn.Linear``), outputs ``[..., N]``.

Weight-only (W8A32 / W8A16 / W4A16)::

    y = F.linear(x, dequantize(W_q) in x.dtype, bias)        compute dtype = x.dtype

W8A8 (int8 weights symmetric per output channel, scale ``s_w [N, 1]``)::

    dynamic (per token)   s_a[t] = max_k |x[t, k]| / 127,  A_q = clamp(round(x / s_a), -127, 127)
                          y = (A_q · W_q^T) * s_a * s_w^T + bias
    static, symmetric     A_q = clamp(round(x / s_a), -127, 127)            (s_a one scalar)
                          y = (A_q · W_q^T) * (s_a * s_w^T) + bias
    static, asymmetric    A_q = clamp(round(x / s_a) + z_a, 0, 255)         (z_a one integer)
                          acc = A_q · W_q^T - z_a * rowsum(W_q)             exact, int32
                          y = acc * (s_a * s_w^T) + bias

The integer products accumulate in int32 (``torch._int_mm``) and are rescaled once, in fp32;
the result is cast to ``x.dtype``. For the asymmetric path the unsigned codes are fed to the
int8 matmul shifted by 128: ``A_q · W^T - z·rowsum(W) = (A_q - 128) · W^T - (z - 128)·rowsum(W)``,
an identity in integers, so the result is exactly the formula above.

Example::

    >>> w = torch.randn(64, 32)
    >>> qw = linquant.quantize(w, "int8-sym-ch0")
    >>> y = linear_weight_only(torch.randn(5, 32), qw, None)     # == F.linear(x, qw.dequantize())
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from linquant.errors import LinquantError
from linquant.ops.affine import sign_extend
from linquant.ops.packing import unpack
from linquant.tensor import QuantizedTensor

_T = TypeVar("_T")

__all__ = [
    "COMPUTE_DTYPES",
    "INT32_MAX_K",
    "conv1d_weight_only",
    "conv2d_weight_only",
    "conv_weight_only",
    "cpu_int_mm_exact",
    "dequantize_rows",
    "eager_probe",
    "embedding_weight_only",
    "int8_matmul",
    "int_mm_supported",
    "linear_w8a8",
    "linear_weight_only",
    "quantize_activation_per_tensor",
    "quantize_activation_per_token",
]

# Input dtypes the kernels compute in (fp64 too, so model.double() keeps working).
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACT_QMAX = 127  # symmetric int8 activations use the restricted range [-127, 127]
_TINY = float(torch.finfo(torch.float32).tiny)
# |a*w| <= 128*128 = 2**14, so K * 2**14 must stay below 2**31 for an int32 accumulator.
INT32_MAX_K = (2**31 - 1) // (128 * 128)


# ---- weight-only -----------------------------------------------------------------------------


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in COMPUTE_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise LinquantError(f"{what}: expected a float input (fp32, fp16, bf16, fp64), got {got}")


def _bias_as(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype)


def linear_weight_only(
    x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, qweight.dequantize(x.dtype), bias)``: weight ``[N, K]``, ``x [..., K]``.

    The compute dtype is the input's: fp32 input gives W8A32, bf16/fp16 give W8A16 / W4A16.
    """
    _check_float(x, "linear_weight_only")
    w = qweight.dequantize(x.dtype)
    return F.linear(x, w, _bias_as(bias, x.dtype))


def conv_weight_only(
    x: torch.Tensor,
    qweight: QuantizedTensor,
    weight_shape: tuple[int, ...],
    bias: torch.Tensor | None,
    stride: tuple[int, ...] | int,
    padding: tuple[int, ...] | int | str,
    dilation: tuple[int, ...] | int,
    groups: int,
) -> torch.Tensor:
    """``F.conv1d`` / ``F.conv2d`` (by the rank of ``weight_shape``) on the dequantized weight;
    ``qweight`` may hold any view of ``weight_shape`` (QuantConv1d / QuantConv2d store the 2-D
    ``[out, in/groups * prod(kernel)]`` view)."""
    _check_float(x, "conv_weight_only")
    w = qweight.dequantize(x.dtype).reshape(weight_shape)
    conv: Any = F.conv1d if len(weight_shape) == 3 else F.conv2d
    out: torch.Tensor = conv(x, w, _bias_as(bias, x.dtype), stride, padding, dilation, groups)
    return out


conv1d_weight_only = conv2d_weight_only = conv_weight_only


def _gather_packed(stream: torch.Tensor, bits: int, index: torch.Tensor) -> torch.Tensor:
    """Codes number ``index`` (int64, any shape) of a packed ``bits``-bit stream, as uint8.

    Code ``i`` sits at stream bits ``[i*bits, (i+1)*bits)`` (see :mod:`linquant.ops.packing`), so
    it lies in bytes ``p // 8`` and ``p // 8 + 1`` with ``p = i * bits`` (``bits <= 8``).
    """
    if bits == 8:
        return stream[index]
    pos = index * bits
    byte = pos >> 3
    lo = stream[byte].to(torch.int32)
    nxt = (byte + 1).clamp_max_(stream.numel() - 1)  # the last code never needs a byte past the end
    hi = stream[nxt].to(torch.int32)
    word = (hi << 8) | lo
    return ((word >> (pos & 7)) & ((1 << bits) - 1)).to(torch.uint8)


def _row_params(p: torch.Tensor, rows: torch.Tensor, num: int, dim: int, key: str,
                groups: int) -> torch.Tensor:
    """The parameters (one per granule, in ``p``) of rows ``rows``, shaped to broadcast against
    their codes viewed as ``[n, groups, dim // groups]`` (``groups`` is 1 unless group-wise)."""
    if key == "tensor":
        return p.reshape(1, 1, 1)
    if key == "channel0":
        return p.reshape(-1)[rows].view(-1, 1, 1)
    if key == "channel1":
        return p.reshape(1, 1, dim)
    return p.reshape(num, groups)[rows].unsqueeze(2)  # group-wise: [n, groups, 1]


def _param_key(qt: QuantizedTensor) -> str:
    s = qt.scheme
    if s.granularity == "channel":
        return f"channel{s.axis % 2}"
    return s.granularity


def dequantize_rows(qt: QuantizedTensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` (int64 ``[n]``) of the 2-D quantized table ``qt``, dequantized: ``[n, dim]``.

    Only the gathered rows' codes (and parameters) are unpacked and converted; the table is never
    dequantized as a whole. Works for every granularity and bit width (rows need not start on a
    byte boundary). Equals ``qt.dequantize(dtype)[rows]`` exactly. Group parameters are applied
    per group (codes viewed as ``[n, groups, group]``), never expanded to one per code.
    """
    num, dim = (int(d) for d in qt.shape)
    n_params = qt.scale.numel()
    rows = rows.reshape(-1).to(torch.int64)
    n = rows.numel()
    bits = qt.scheme.bits
    if dim * bits % 8 == 0:  # whole bytes per row: gather the rows' bytes, unpack those
        u = unpack(qt.qdata.reshape(num, dim * bits // 8)[rows], bits, n * dim)
    else:
        index = rows.unsqueeze(1) * dim + torch.arange(dim, device=rows.device)  # [n, dim]
        u = _gather_packed(qt.qdata, bits, index)
    codes = sign_extend(u, bits) if qt.scheme.symmetric else u
    key = _param_key(qt)
    groups = n_params // num if key == "group" else 1
    t = codes.to(torch.float32).view(n, groups, dim // groups)
    if qt.zero_point_packed is not None:
        granule = _row_params(torch.arange(n_params, device=rows.device), rows, num, dim, key,
                              groups)  # granule numbers of the zero points, broadcastable
        t = t - _gather_packed(qt.zero_point_packed, bits, granule).to(torch.float32)
    t = t * _row_params(qt.scale, rows, num, dim, key, groups).float()
    if qt.offset is not None:
        t = t + _row_params(qt.offset, rows, num, dim, key, groups).float()
    return t.view(n, dim).to(dtype)


def embedding_weight_only(
    ids: torch.Tensor, qweight: QuantizedTensor, dtype: torch.dtype
) -> torch.Tensor:
    """``F.embedding(ids, qweight.dequantize(dtype))`` without dequantizing the whole table."""
    out = dequantize_rows(qweight, ids.reshape(-1), dtype)
    return out.reshape(*ids.shape, qweight.shape[1])


# ---- W8A8 ------------------------------------------------------------------------------------


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization, one scale per token (row of the last dim).

    Returns ``(codes int8 [..., K], scales fp32 [..., 1])`` with ``s = max|x| / 127`` (an
    all-zero token gets the smallest normal fp32 scale) and
    ``codes = clamp(round(x / s), -127, 127)``. A token holding NaN/Inf gets a NaN/Inf scale, so
    its output row is NaN, as the float layer's would be.
    """
    _check_float(x, "quantize_activation_per_token")
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / ACT_QMAX).clamp_min_(_TINY)
    codes = torch.round(xf / scale).nan_to_num_(0.0).clamp_(-ACT_QMAX, ACT_QMAX).to(torch.int8)
    return codes, scale


def quantize_activation_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Static int8 quantization with one scale (and zero point).

    Symmetric (``zero_point is None``): int8 codes ``clamp(round(x / s), -127, 127)``.
    Asymmetric: uint8 codes ``clamp(round(x / s) + z, 0, 255)``.
    """
    _check_float(x, "quantize_activation_per_tensor")
    t = torch.round(x.float() / scale.float()).nan_to_num_(0.0)
    if zero_point is None:
        return t.clamp_(-ACT_QMAX, ACT_QMAX).to(torch.int8)
    return t.add_(zero_point.float()).clamp_(0, 255).to(torch.uint8)


def int_mm_supported(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._int_mm(a, w.t())`` is valid and exact for ``a [M, K]``, ``w [N, K]`` here.

    Rules by device (torch 2.13):

    * cpu: any ``M, N >= 0`` but ``K >= 2``: with ``K == 1`` and ``N > 1`` torch 2.13 returns
      uninitialised memory instead of the product (measured), so ``K == 1`` takes the fallback;
      and only where the product is exact (:func:`cpu_int_mm_exact`: CPUs with VNNI).
    * cuda: ``M > 16``, ``K`` and ``N`` positive multiples of 8 (checks in ``_int_mm_out_cuda``).
    * other devices: not used.
    """
    rule = _INT_MM_RULES.get(a.device.type)
    return rule is not None and rule(a.shape[0], a.shape[1], w.shape[0])


def eager_probe(fn: Callable[[], _T]) -> Callable[[], _T]:
    """``functools.cache`` for a probe that runs a few ops on real tensors once, run outside
    any tracing dispatch mode: under ``torch.export`` (fake tensors) or ``make_fx`` (proxies)
    the first call of a quantized layer would otherwise trace the probe's own ops, and its
    ``torch.equal`` on fake tensors failed the export (a data-dependent output)."""

    @functools.cache
    @functools.wraps(fn)
    def probe() -> _T:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.autocast("cpu", enabled=False):
            return fn()  # (not under a caller's autocast either: the probe's own dtypes)

    return probe


@eager_probe
def cpu_int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on the CPU returns exact int32 sums here. It runs oneDNN's
    ``gemm_s8s8s32``, which on CPUs without VNNI (AVX2 only, or AVX-512 before Cascade Lake)
    shifts ``a`` to u8 and multiplies with ``vpmaddubsw``, whose int16 pair sums saturate:
    with ``ONEDNN_MAX_CPU_ISA=AVX2`` on this project's CPU, sums of random int8 codes came out
    off by up to 1.1e6. Checked once, on codes that saturate; where it fails, the CPU takes the
    exact int32 fallback."""
    a = torch.tensor([[127] * 64, [-127] * 64, [127, -127] * 32, [-128] * 64], dtype=torch.int8)
    try:
        got = torch._int_mm(a, a.t().contiguous())
    except RuntimeError:
        return False
    return bool(torch.equal(got, _exact_mm_int32(a, a)))


_INT_MM_RULES: dict[str, Callable[[int, int, int], bool]] = {
    "cpu": lambda m, k, n: k >= 2 and cpu_int_mm_exact(),
    "cuda": lambda m, k, n: m > 16 and k > 0 and k % 8 == 0 and n > 0 and n % 8 == 0,
}


def _exact_mm_int32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.to(torch.int32), w.to(torch.int32).t())


def _exact_mm_float64(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Every product is an integer below 2**14 in size and every partial sum below 2**31, far
    # inside fp64's exact integer range, so the result is exact whatever the summation order.
    return torch.mm(a.to(torch.float64), w.to(torch.float64).t()).to(torch.int32)


# Devices whose matmul supports int32 use it; others (CUDA has no integer GEMM) use fp64.
_EXACT_FALLBACK: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cpu": _exact_mm_int32,
}


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ...) is
    running: the layers then compute with the reference's PyTorch ops, which every transform
    goes through (the kernels' ctypes calls, autograd functions and host-side checks do not).
    False while Dynamo traces (which cannot trace the query itself on PyTorch 2.4)."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._are_functorch_transforms_active())


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` for int8 ``a [M, K]`` and int8 ``w [N, K]``, as int32 ``[M, N]``.

    Uses ``torch._int_mm`` where its shape rules allow (:func:`int_mm_supported`), else an
    exact integer (CPU: int32 matmul) or fp64 (other devices) product. Both give identical
    results. ``K`` is limited to :data:`INT32_MAX_K` so the int32 accumulator cannot overflow.
    """
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise LinquantError(f"int8_matmul: expected int8 inputs, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise LinquantError(
            "int8_matmul: expected a [M, K] and w [N, K], got "
            f"{tuple(a.shape)} and {tuple(w.shape)}"
        )
    if a.shape[1] > INT32_MAX_K:
        raise LinquantError(
            f"int8_matmul: K = {a.shape[1]} could overflow the int32 accumulator "
            f"(at most {INT32_MAX_K})"
        )
    if functorch_active():  # vmap has no rule for _int_mm
        return _exact_mm_float64(a, w)
    if int_mm_supported(a, w):
        return torch._int_mm(a, w.t())
    return _EXACT_FALLBACK.get(a.device.type, _exact_mm_float64)(a, w)


def linear_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 x int8 linear with one fp32 rescale (see the module docstring for the formulas).

    Args:
        x: ``[..., K]`` fp32/fp16/bf16; the output has its dtype.
        w_int8: ``[N, K]`` int8 codes (symmetric, restricted range).
        w_scale: ``[N, 1]`` (or ``[N]``) fp32 per-output-channel scales.
        bias: ``[N]`` float or None.
        act_scale: None for dynamic per-token quantization, else the static per-tensor scale
            (a 0-d or 1-element fp32 tensor).
        act_zero_point: static asymmetric only: the integer zero point in ``[0, 255]``.
    """
    _check_float(x, "linear_w8a8")
    if act_scale is None and act_zero_point is not None:
        raise LinquantError("linear_w8a8: act_zero_point needs act_scale (static activations)")
    n, k = w_int8.shape
    x2 = x.reshape(-1, k)  # [M, K]
    ws = w_scale.reshape(1, n).float()
    if act_scale is None:
        a_q, a_s = quantize_activation_per_token(x2)
        acc = int8_matmul(a_q, w_int8)
        y = acc.to(torch.float32) * a_s * ws
    elif act_zero_point is None:
        a_q = quantize_activation_per_tensor(x2, act_scale)
        acc = int8_matmul(a_q, w_int8)
        y = acc.to(torch.float32) * (act_scale.reshape(1, 1).float() * ws)
    else:
        a_u = quantize_activation_per_tensor(x2, act_scale, act_zero_point)
        a_shift = (a_u.to(torch.int16) - 128).to(torch.int8)  # [0, 255] -> [-128, 127]
        z_shift = act_zero_point.reshape(1, 1).to(torch.int32) - 128
        rowsum = w_int8.sum(dim=1, dtype=torch.int32).reshape(1, n)
        acc = int8_matmul(a_shift, w_int8) - z_shift * rowsum
        y = acc.to(torch.float32) * (act_scale.reshape(1, 1).float() * ws)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
