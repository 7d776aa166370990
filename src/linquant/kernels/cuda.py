"""A CUDA weight-only path that needs no Triton: PyTorch's tinygemm int4 kernel (``cuda_tinygemm``).

``torch._weight_int4pack_mm`` (tinygemm: the kernel behind torchao's int4 weight-only layout
and gpt-fast) multiplies bf16 activations ``[M, K]`` by a 4-bit group-wise weight kept in a
tensor-core layout that ``torch._convert_weight_to_int4pack`` builds once, with
``w = scale * (q - 8) + zero`` for unsigned codes ``q`` and one bf16 ``(scale, zero)`` pair per
group. Both are aten operators, so a call costs the host one C++ dispatch instead of Triton's
Python launch.

Why, and where: one-token calls. On the H200 (BENCHMARKS.md, "GPU", run 4; 8192 x 8192,
int4-sym-g128) tinygemm took 0.0211 ms per call in a CUDA graph and linquant's Triton ``gemv``
0.0210: the same GPU time. Called eagerly, tinygemm took 0.0239 ms and ``QuantLinear`` on the
Triton kernel 0.1136 ms: a Triton launch alone cost 30-34 us of host time there, more than
the kernel. So the dispatcher sends one-token bf16 calls here (:data:`TINYGEMM_MAX_M`; up to
:data:`TINYGEMM_MAX_M_NO_TRITON` tokens where Triton cannot take the input: tinygemm took
0.079 ms at 16 tokens, where dequantize-then-cuBLAS reads and writes the whole weight several
times). At 16 tokens in a CUDA graph Triton's split-K kernel was 2.5x faster (0.031 ms), and
tinygemm falls far behind from there (9.3 ms at 2048 tokens against 0.61).

Layout (built once per weight, kept in the layer's cache under ``"tinygemm"``, never in
``state_dict``): the operator takes the codes as uint8 ``[N, K / 2]``, two unsigned codes per
byte. linquant's stored stream already is that, low nibble first (symmetric codes ``c`` become
``c + 8`` by XOR-ing every byte with ``0x88``: ``c + 8 == c ^ 8`` in four bits); which nibble
the operator reads first has changed between PyTorch versions, and PyTorch 2.4 takes int32
``[N, K]``, one code per element (its CPU operator says so: "expect weight to be kInt"; a
temporary of 4 bytes per weight while the layout is built). So a probe on the GPU decides the
format, once per device (:func:`status`), and turns the path off if no format (:data:`FORMATS`)
reproduces the formula. The probe copies its result to the host, which a CUDA graph capture
forbids: a call inside a capture before any probe takes another path and leaves the probe to
the first call outside one. Parameters ``[K / g, N, 2]`` bf16 from the stored ones (symmetric
``zero = 0``; integer zero point ``zero = scale * (8 - z)``; float offset ``zero = 8 * scale + m``).

Numerics: the scales (and zeros) are rounded to bf16, and tinygemm dequantizes in bf16 with
fp32 accumulation, so results differ from the reference's by bf16 rounding (tests:
``|y - ref| <= 2e-2 * max|ref|``, as for the Triton kernels); the bias is added to the bf16
product.

Memory: the tinygemm layout is a second copy of the codes (half a byte per weight, plus 4 bytes
per group), next to the stored codes that the Triton kernels read for more tokens. A layout is
only built while the device has room for it and a margin (:func:`room_for`); a layer whose
layout does not fit runs its one-token calls on the Triton GEMV, which needs no copy, so a
large model fills the memory it has rather than running out. ``LINQUANT_TINYGEMM=0`` turns
the path off (read when a path is chosen; plans keep theirs until
``linquant.nn.clear_kernel_caches``).

Support (:func:`supported`): CUDA compute capability 8.0 or newer (not ROCm), PyTorch whose
conversion takes uint8 codes (2.5 and later), bf16 activations, 4-bit group-wise weights with
groups of 32, 64, 128 or 256, ``K % 128 == 0``, ``N % 8 == 0``, no autograd through ``x``.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from linquant.kernels import _triton_env
from linquant.kernels.cpu import (
    FORMATS,
    _cached,
    _key,
    _same,
    find_int4_format,
    int4_scale_zero,
    pack_codes,
)
from linquant.tensor import QuantizedTensor

__all__ = [
    "FORMATS",
    "INNER_K_TILES",
    "TINYGEMM_GROUPS",
    "TINYGEMM_MAX_M",
    "TINYGEMM_MAX_M_NO_TRITON",
    "TinyPack",
    "available",
    "failures",
    "fits",
    "has_layout",
    "layout_nbytes",
    "linear_tinygemm",
    "note_failure",
    "pack_codes",
    "repack",
    "room_for",
    "runner",
    "scales_and_zeros",
    "status",
    "supported",
    "weight_bytes",
]

TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_MAX_M = 1  # where Triton takes the input too: one-token calls
TINYGEMM_MAX_M_NO_TRITON = 16  # where it does not (no Triton, or an input Triton cannot take)
INNER_K_TILES = 8  # torchao's choice: 16-byte loads; needs K % 128 == 0
ROOM_MARGIN = 1 << 30  # bytes a device keeps free beyond a new layout (see room_for)
_INT32_LIMIT = 2**31 - 1


def _convert(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    return torch._convert_weight_to_int4pack(codes, inner_k_tiles)


def _mm(x2: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    return torch._weight_int4pack_mm(x2, packed, group, sz)


# ---- availability: a probe per device ---------------------------------------------------------

_lock = threading.Lock()
_state: dict[str, tuple[str | None, str]] = {}  # device -> (code format or None, reason)
_FAILED: dict[tuple[object, ...], str] = {}


def _off() -> bool:
    return os.environ.get("LINQUANT_TINYGEMM", "1").strip().lower() in ("0", "false", "off", "no")


def _why_not(device: torch.device) -> str:
    if torch.version.hip is not None:
        return "ROCm builds use another tinygemm layout"
    if not all(hasattr(torch, op) for op in ("_weight_int4pack_mm",
                                             "_convert_weight_to_int4pack")):
        return "this PyTorch has no _weight_int4pack_mm"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability 8.0 or newer"
    return ""


def _probe(device: torch.device) -> tuple[str | None, str]:
    """Which code format (:data:`FORMATS`) makes the operator compute ``scale * (q - 8) + zero``
    on ``device``."""
    why = _why_not(device)
    if why:
        return None, why
    order, errors = find_int4_format(_convert, _mm, device, INNER_K_TILES)
    if order is not None:
        return order, ""
    if len(errors) == len(FORMATS):
        first = errors[0]
        return None, f"probe failed: {type(first).__name__}: {str(first).splitlines()[0][:120]}"
    return None, ("the operator matched scale * (q - 8) + zero in no code format "
                  f"({', '.join(FORMATS)})")


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return _triton_env.capturing()


def _order(device: torch.device) -> str | None:
    name = str(device)
    hit = _state.get(name)
    if hit is None:
        if _capturing():
            # The probe copies to the host, which a graph capture forbids: it would fail (and
            # break the capture), and its failure would switch the path off for good. Not
            # decided yet: this call takes another path; the first call outside a capture probes.
            return None
        with _lock:
            hit = _state.get(name)
            if hit is None:
                hit = _probe(device)
                _state[name] = hit
    return hit[0]


def available(device: torch.device | str) -> bool:
    """Whether the tinygemm path runs on ``device`` (a CUDA device; probes on first call)."""
    device = torch.device(device)
    if device.type != "cuda" or _off() or not torch.cuda.is_available():
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _order(device) is not None


def status(device: torch.device | str = "cuda") -> str:
    """``"available: code format <hi|lo|int32>"`` or ``"unavailable: <reason>"`` (probes on first
    call)."""
    device = torch.device(device)
    if _off():
        return "unavailable: turned off by LINQUANT_TINYGEMM"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "unavailable: no CUDA device"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    order = _order(device)
    if order is None:
        hit = _state.get(str(device))
        if hit is None:
            return "unavailable: not probed yet (a CUDA graph capture is in progress)"
        return f"unavailable: {hit[1]}"
    return f"available: code format {order}"


def _reset() -> None:
    """Forget the probes and failures (tests)."""
    with _lock:
        _state.clear()
        _FAILED.clear()


def _layout_ok(qt: QuantizedTensor) -> bool:
    s = qt.scheme
    if len(qt.shape) != 2 or s.bits != 4 or s.granularity != "group":
        return False
    n, k = (int(d) for d in qt.shape)
    g = int(s.group_size or 0)
    return (g in TINYGEMM_GROUPS and k % g == 0 and k % (INNER_K_TILES * 16) == 0
            and n % 8 == 0 and n > 0 and n * k // 2 <= _INT32_LIMIT)


def _failure_key(qt: QuantizedTensor, device: torch.device) -> tuple[object, ...]:
    return (str(device), *(int(d) for d in qt.shape), int(qt.scheme.group_size or 0))


def supported(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    """Whether :func:`linear_tinygemm` handles ``x [..., K]`` times ``qt [N, K]`` (never
    raises; probes the device on first call): see the module docstring."""
    if not (isinstance(qt, QuantizedTensor) and isinstance(x, torch.Tensor)):
        return False
    if (x.device.type != "cuda" or x.dtype != torch.bfloat16 or not _layout_ok(qt)
            or x.dim() == 0 or x.shape[-1] != qt.shape[1] or x.numel() == 0
            or (x.requires_grad and torch.is_grad_enabled())):
        return False
    if any(t.device != x.device for t in qt.tensors().values()):
        return False
    return _failure_key(qt, x.device) not in _FAILED and available(x.device)


def note_failure(qt: QuantizedTensor, x: torch.Tensor, error: Exception) -> None:
    """Record that the operator raised for this weight shape on ``x``'s device: those inputs
    take the other paths from then on (a RuntimeWarning the first time)."""
    key = _failure_key(qt, x.device)
    if key not in _FAILED:
        _FAILED[key] = f"{type(error).__name__}: {error}"
        warnings.warn(f"linquant: tinygemm failed for a {tuple(qt.shape)} weight on {x.device} "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); using "
                      "the other paths for it", RuntimeWarning, stacklevel=3)


def failures() -> dict[tuple[object, ...], str]:
    """``{(device, N, K, group): error}`` for weights whose tinygemm call raised."""
    return dict(_FAILED)


# ---- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyPack:
    packed: torch.Tensor  # int32 [N / 8, K / (16 * INNER_K_TILES), 32, INNER_K_TILES / 2]
    sz: torch.Tensor  # bf16 [K / g, N, 2]: (scale, zero) per group
    group: int


def weight_bytes(qt: QuantizedTensor, order: str) -> torch.Tensor:
    """The weight's unsigned codes in the operator's format ``order`` (see :func:`pack_codes`),
    straight from the stored stream: uint8 ``[N, K / 2]`` with no unpacking, or for ``"int32"``
    the nibbles split into int32 ``[N, K]``."""
    n, k = (int(d) for d in qt.shape)
    b = qt.qdata.reshape(n, k // 2)
    if qt.scheme.symmetric:
        b = b ^ 0x88  # two's complement c -> c + 8 in each nibble
    if order == "int32":
        return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n, k).to(torch.int32)
    if order == "hi":
        b = (b << 4) | (b >> 4)
    return b.contiguous()


def scales_and_zeros(qt: QuantizedTensor) -> torch.Tensor:
    """bf16 ``[K / g, N, 2]``: ``(scale, zero)`` per group with ``w = scale * (q - 8) + zero``."""
    scale, zero = int4_scale_zero(qt)
    return torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()


def repack(qt: QuantizedTensor) -> TinyPack:
    """The tinygemm layout of ``qt`` (on its device; probes the device's code format)."""
    order = _order(qt.device) or "hi"
    packed = _convert(weight_bytes(qt, order), INNER_K_TILES)
    return TinyPack(packed, scales_and_zeros(qt), int(qt.scheme.group_size or 0))


def layout_nbytes(qt: QuantizedTensor) -> int:
    """Bytes of the tinygemm layout of ``qt``: the codes again, plus 4 per group."""
    n, k = (int(d) for d in qt.shape)
    return n * k // 2 + (k // int(qt.scheme.group_size or k)) * n * 4


def has_layout(qt: QuantizedTensor, cache: dict[str, Any] | None) -> bool:
    """Whether ``cache`` already holds the layout of ``qt`` (the same, unmodified tensors)."""
    hit = None if cache is None else cache.get("tinygemm")
    return hit is not None and _same(hit[0], _key(qt, torch.bfloat16))


def room_for(qt: QuantizedTensor) -> bool:
    """Whether ``qt``'s device has room for its layout and a margin: free memory (the
    driver's, plus what PyTorch's allocator holds unused) at least the layout's size plus
    ``max(ROOM_MARGIN, 5%)`` of the device. Otherwise the dispatcher keeps the one-token call on
    the Triton GEMV, which reads the stored codes and needs no copy."""
    device = qt.device
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return fits(layout_nbytes(qt), free + unused, total)


def fits(need: int, free: int, total: int) -> bool:
    """``need`` bytes fit in ``free`` with ``max(ROOM_MARGIN, total / 20)`` left over."""
    return free >= need + max(ROOM_MARGIN, total // 20)


def _pack(qt: QuantizedTensor, cache: dict[str, Any] | None) -> TinyPack:
    pk: TinyPack = _cached(cache, "tinygemm", _key(qt, torch.bfloat16), lambda: repack(qt))
    return pk


def runner(qt: QuantizedTensor, bias: torch.Tensor | None,
           cache: dict[str, Any] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`linear_tinygemm` for ``qt`` and ``bias`` as a function of ``x`` alone, the layout
    and the bf16 bias bound: what a plan runs (inputs and bias without autograd)."""
    pk = _pack(qt, cache)
    n, k = (int(d) for d in qt.shape)
    b = None if bias is None else bias.detach().to(torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _mm(x2, pk.packed, pk.group, pk.sz)
        if b is not None:
            y.add_(b)
        return y.reshape(*x.shape[:-1], n)

    return run


def linear_tinygemm(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                    cache: dict[str, Any] | None = None) -> torch.Tensor:
    """Weight-only linear ``x [..., K] -> [..., N]`` (bf16) on tinygemm; the formula of
    :func:`linquant.kernels.reference.linear_weight_only` within bf16 rounding. A bias that
    needs a gradient is added where autograd sees it."""
    y = runner(qt, None, cache)(x)
    if bias is not None:
        y = y + bias.to(torch.bfloat16)
    return y
