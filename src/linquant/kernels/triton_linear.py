"""Triton kernels for weight-only quantized linear layers (W4A16, W8A16) on CUDA GPUs.

``y = x @ dequantize(W).T + bias`` with the unpacking and dequantization fused into the
product: the float weight is never materialized, not even one tile in global memory. Formula
and oracle: :func:`linquant.kernels.reference.linear_weight_only`.

Layout (built once per weight by :func:`repack`, kept in the layer's ``cache`` dict, never in
``state_dict``):

* codes: the canonical packed stream (:mod:`linquant.ops.packing`) read in place as int32 words
  ``[N, K * bits / 32]``: row-major over ``[N, K]`` it already is a K-major layout, and word
  ``j`` of row ``n`` holds codes ``k = 32/bits * j + i`` at bits ``[bits * i, bits * (i + 1))``
  (little-endian). No copy is made unless the buffer is not 16-byte aligned.
* scales, integer zero points (uint8), float offsets: transposed to ``[G, N]`` (``G = K / g``
  groups; 1 for per-channel and per-tensor weights) so a tile's parameters are one contiguous
  load along ``N``. Scales and offsets keep their storage dtype and are widened to fp32 in
  the kernel (exact).

Dequantization, per code (fp32, no int-to-float instruction): symmetric codes are two's
complement, so ``word ^ 0x88888888`` (``0x80808080`` for 8 bits) turns every code ``c`` into
the unsigned ``u = c + 2**(bits-1)``; ``u | 0x4B000000`` read as fp32 is exactly ``2**23 + u``,
and subtracting ``C = 2**23 + 2**(bits-1)`` (symmetric), ``2**23 + z`` (integer zero point) or
``2**23`` (float offset) gives the exact integer ``q``; then ``w = s * q (+ m)``. Where the
scale is constant over a whole reduction (per-channel weights: the full ``K``; group-wise
weights with ``g % BLOCK_K == 0`` in the small-M dot kernel: one K tile) the integers ``q``
go into the product unscaled (they are exact in bf16 and fp16: ``|q| <= 255``) and the scale
(and ``m * sum(x)``) is applied once to the partial sums.
4-bit codes skip the shift: each is masked where it sits in the low or high half of its word,
so the OR gives ``2**23 + u * 16**j`` (``j`` its position in that half), and the power of two
``16**j`` is folded into the activation (``gemv``) or into one exact FFMA (the ``tl.dot``
kernels); the oracle tests check this bit for bit. 8-bit codes on a GPU take one byte permute
instead of the shift and the OR: ``prmt.b32 d, word, 0x4B000000, 0x765i`` (inline PTX) is
``2**23 + u`` with ``u`` byte ``i``, about 0.75 fewer instructions per code in every kernel
(sm_90 SASS). The interpreter cannot run PTX and keeps the shift and the OR, so this form has
only been compiled, not run: the CUDA tests check it against the oracle.
Configs with ``PACKED`` (``splitk`` and ``tiled``, 4-bit codes) decode two codes per instruction
instead, in bf16 / fp16 pairs: ``(word >> 4j) & 0x000F000F | 0x43004300`` holds codes ``j`` and
``j + 4`` as two bf16 values ``128 + u`` (``0x64006400``: fp16, ``1024 + u``), and one paired
subtraction (HADD2) leaves both ``q`` exactly; a scale is then applied in the activation dtype
(one more rounding of ``s`` and of ``q * s`` than the fp32 decode, far below the 4-bit
quantization error). Compiled for sm_90 the split-K loop takes about 4.2 instructions per code
instead of 5.1 (SASS counts, ``benchmarks/triton_static.py``); the autotuner times both forms.

Kernels (:func:`kernel_for` picks one by the number of tokens ``M`` and the weight):

``gemv_t``  ``M <= GEMV_MAX_M`` (1), group-wise weights with groups of at most
            ``GEMV_T_MAX_GROUP`` (64) codes. CUDA cores on a transposed copy of the words
            (``[K * bits / 32, N]``, built on the first one-token call and kept in the layer's
            cache under ``"triton_t"``: one more copy of the codes): each thread holds 4
            columns and ``BLOCK_KW`` words of K (one group) in registers, so a tile takes one
            parameter set per row, the activations are broadcast loads and nothing crosses
            threads until the end; K is split over the grid (fp32 atomics).
``gemv``    ``M <= GEMV_MAX_M`` (1), other weights. CUDA cores, no tensor cores: a program
            streams ``BLOCK_N`` weight rows (coalesced along K) and keeps
            ``[BLOCK_N, BLOCK_K / codes_per_word]`` fp32 partial sums; the 8 (4) codes of a
            word are reduced in registers. Split-K (fp32 atomics into a zeroed buffer, then
            one cast) only when ``N`` is too small to fill the GPU. fp32 activations are
            supported here and in ``gemv_t`` (W8A32 / W4A32 decode).
``splitk``  ``GEMV_MAX_M < M <= SKINNY_MAX_M`` (64). ``tl.dot`` with ``BLOCK_M = 16 / 32 / 64``
            and split-K (fp32 atomics, then one cast); optionally "swap AB" (the weight tile is
            the left operand, ``y^T = W x^T``, so it can feed the MMA from registers).
``tiled``   ``M > SKINNY_MAX_M``. Classic tiled ``tl.dot`` GEMM (bf16/fp16 in, fp32
            accumulate), grouped program order for L2 reuse, a few autotuned configs
            (:data:`CONFIGS`), also with swap-AB variants (there the weight tile feeds
            ``wgmma`` from registers instead of shared memory).
``dequant``  Not a GEMM: :func:`dequantize` decodes the whole weight into a bf16 / fp16 / fp32
            buffer (the reference's bits), for the opt-in ``cuda_dequant`` path of the
            dispatcher (:func:`linear_dequant`: then cuBLAS), chosen from
            ``LINQUANT_CUDA_DEQUANT_MIN_M`` tokens (:func:`dequant_chosen`).

Serialized wgmma: with the dequantized weight as the register operand and Triton's software
pipeliner on (``num_stages >= 2``), ptxas often reports C7515 ("wgmma.mma_async instructions are
serialized") and waits for each MMA before issuing the next: every swapped ``tiled`` config (so,
before ``PACKED`` tiles stayed unswapped, every ``tiled`` config for groups smaller than
``BLOCK_K``), and the 128-row ``splitk`` configs for some schemes (Triton 3.6 and 3.9, sm_90;
which ones depends on the version). ``PREFETCH`` configs avoid it: ``num_stages=1`` (no
pipeliner) and the kernel loads the next K tile's words and activations into registers itself
before decoding the current one. ``benchmarks/triton_static.py`` flags serialized configs.

Groups smaller than ``BLOCK_K`` (g32 with 64/128-wide K tiles) load one parameter set per 32-bit
word; unswapped ``tl.dot`` tiles other than ``PACKED`` ones are switched to the swapped form for
them (:func:`fit_config`). ``M`` is not specialized on (one binary per M range); the autotuning
keys are ``N``, ``K``, the scheme and ``M`` rounded up to a power of two (``BLOCK_M`` for
``splitk``). Kernel sources: :mod:`linquant.kernels._triton_kernels`, imported on the first
launch: ``TRITON_INTERPRET`` must be set before that.

If a kernel raises on the automatic path (a Triton compile error on a Triton version other
than the ones checked), :func:`linear` warns once, returns the reference result and
:func:`supported` is False for those inputs from then on (:func:`failures` lists them), so a
model keeps running; explicit ``kernel`` / ``config`` calls re-raise.

Support (:func:`supported`): 4- and 8-bit codes; group-wise (any group size that divides ``K``
and is a multiple of 8 / 4 codes, i.e. of a word), per-output-channel (axis 0) or per-tensor;
symmetric, asymmetric with integer zero point, asymmetric with float offset; activations bf16
/ fp16 at every ``M``, fp32 only at ``M <= GEMV_MAX_M`` (larger fp32 inputs use the
reference: fp32 ``tl.dot`` would be TF32 or a slow exact emulation); ``K`` a multiple of 8
(4-bit) / 4 (8-bit); any ``N``; CUDA tensors, or CPU tensors while Triton's interpreter is on
(``TRITON_INTERPRET=1``, for tests). Everything else falls back to the reference in the
dispatcher.

What is verified where: every kernel and every config in :data:`CONFIGS` against the
reference, in Triton's CPU interpreter (tests/kernels/test_triton_linear.py, small odd shapes,
all schemes, bf16 / fp16 / fp32; ``|y - ref| <= 2e-2 * max|ref|``, 1e-4 for fp32; in the
interpreter ``tl.dot`` runs on fp32 copies of the bf16/fp16 operands, exact, because Triton
3.9's interpreter mis-computes bf16 dots, and it rounds fp32 -> bf16 toward zero where the GPU
rounds to nearest). On an NVIDIA H200 with Triton 3.6 (BENCHMARKS.md, "GPU"): the tests marked
``cuda`` (real shapes, every config, the dispatcher's choices) and the interpreter tests
compiled for the GPU passed, and ``benchmarks/bench_gpu.py`` measured, for one 8192 x 8192
layer in CUDA graphs, 0.021 ms for int4 g128 at one token (1.78x cuBLAS bf16), 0.031 ms at 16
tokens (1.20x) and 0.61 ms at 2048 (0.59x). Found there and fixed: per-channel float offsets
summed the activations in the loop (the dot's pipelined operand), which gave wrong rows in
some configs; the sums are now computed per token before the launch (``xs_ptr``).
``benchmarks/triton_static.py`` compiles every config for sm_90 without a GPU and counts the
main loop's SASS instructions per weight code (4-bit codes are decoded in place, see
:mod:`linquant.kernels._triton_kernels`: about 5 per code).

Eager calls: a layer's first automatic call for an input signature keeps a plan in its cache
(``"triton_plans"``: the prepared tensors and a launch closure); later calls with the same
signature (shape, dtype, device, bias object) and unmodified weight tensors take
:func:`planned`, which skips the checks (about 90 -> 50 us of host time per call on the H200
machine; Triton's launch itself is 30 us there). ``QuantLinear.forward`` calls :func:`replay`
first, on its buffers, before building anything: linquant's Python per call, launch excluded,
fell from about 11 to 3.9 us on a 2-core VM (``benchmarks/bench_host.py``).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from linquant.errors import LinquantError
from linquant.kernels import _triton_env, plans, reference
from linquant.kernels.cpu import _cached, _key
from linquant.tensor import QuantizedTensor

__all__ = [
    "CONFIGS",
    "GEMV_KERNELS",
    "GEMV_MAX_M",
    "GEMV_T_MAX_GROUP",
    "KERNELS",
    "SKINNY_MAX_M",
    "TritonPack",
    "dequant_chosen",
    "dequant_min_m",
    "dequantize",
    "dequantize_runner",
    "failures",
    "fit_config",
    "kernel_for",
    "linear",
    "linear_dequant",
    "repack",
    "supported",
    "triton_available",
]

GEMV_MAX_M = 1
GEMV_T_MAX_GROUP = 64
SKINNY_MAX_M = 64
KERNELS = ("gemv_t", "gemv", "splitk", "tiled")
GEMV_KERNELS = ("gemv_t", "gemv")
HALF_DTYPES = (torch.bfloat16, torch.float16)
_INT32_LIMIT = 2**31 - 1

# Autotune candidates, by kernel. ``num_warps`` / ``num_stages`` are launch options, the rest
# are the kernels' compile-time block sizes. Reasoning (H100/H200; each set timed on an H200 in
# BENCHMARKS.md, "Every config, forced"):
# * gemv: weights stream once; 8-16 KiB of int32 codes per program and iteration, 128-512
#   programs for N = 8192 so several CTAs per SM keep loads in flight (the next tile is
#   prefetched into registers by the kernel itself). Shapes where each thread holds 4 rows of
#   16-byte word vectors: every x element it loads serves 4 rows. Compiled sm_90 PTX of the
#   first config: about 6 instructions per 4-bit code in the loop (bit-field extract, OR,
#   subtract, FMA, plus per-word scales and the x vector's trip through shared memory).
# * splitk: memory-bound; BLOCK_N 64-128 rows x split-K 2-4 so N / BLOCK_N * SPLIT_K programs
#   cover 132 SMs a few times (512 for 8192 x 8192); swap-AB makes the weight tile the MMA's
#   A operand (wgmma M = 64 rows of W, N = the 16-64 tokens) instead of a 16-row A of x.
# * tiled: tensor-core bound; 128x128 / 128x256 tiles (the shapes cuBLAS and Triton's own
#   Hopper matmuls favour), BLOCK_K 64 so a 4-bit row of a tile is one 32-byte sector.
# * PACKED: the same tiles with 4-bit codes decoded in bf16 / fp16 pairs (module docstring);
#   fewer instructions per code, not yet timed on a GPU: the autotuner decides.
# * PREFETCH (num_stages 1): swapped tiles whose wgmma ptxas does not serialize (module
#   docstring). Within a CTA the MMA still waits before the next tile's decoding (sm_90
#   SASS), so the two overlap only across CTAs: 8 warps (150-250 registers, one CTA per SM)
#   or 4 warps (about 255 registers, two CTAs per SM). Not yet timed on a GPU.
# Few configs on purpose: each is one compile (about a second) per scheme on first use.
CONFIGS: dict[str, tuple[dict[str, int], ...]] = {
    # gemv_t: 4 columns (16-byte word vectors) per thread, BLOCK_KW words of K per tile held
    # in registers (capped at one group for group-wise weights); K split over the grid's
    # second axis so about 4 programs per SM run (fp32 atomics)
    "gemv_t": (
        {"BLOCK_N": 512, "BLOCK_KW": 8, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 1024, "BLOCK_KW": 8, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 256, "BLOCK_KW": 8, "num_warps": 2, "num_stages": 1},
        {"BLOCK_N": 512, "BLOCK_KW": 4, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 512, "BLOCK_KW": 16, "num_warps": 4, "num_stages": 1},
        # 8 columns per thread: each activation load and pre-scale serves 8 columns (4.43
        # instructions per int4 code against 4.93, sm_90 SASS) at 200 registers
        {"BLOCK_N": 1024, "BLOCK_KW": 8, "num_warps": 4, "num_stages": 1},
    ),
    "gemv": (
        {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 1},
        {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1},
    ),
    "splitk": (
        {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 1, "num_warps": 4, "num_stages": 4},
        {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "SWAP": 1, "num_warps": 4, "num_stages": 4},
        {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 1, "num_warps": 4,
         "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 0, "num_warps": 4, "num_stages": 4},
        {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 1, "PACKED": 1, "num_warps": 4,
         "num_stages": 4},
        {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 1, "PACKED": 1, "num_warps": 4,
         "num_stages": 3},
        {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 1, "PREFETCH": 1, "num_warps": 4,
         "num_stages": 1},
        {"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4, "SWAP": 1, "PACKED": 1, "PREFETCH": 1,
         "num_warps": 4, "num_stages": 1},
    ),
    "tiled": (
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 0, "num_warps": 4,
         "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "SWAP": 0, "num_warps": 8,
         "num_stages": 3},
        {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 0, "num_warps": 8,
         "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "num_warps": 4,
         "num_stages": 4},
        {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "num_warps": 8,
         "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "PACKED": 1, "num_warps": 4,
         "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "SWAP": 0, "PACKED": 1, "num_warps": 8,
         "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "PREFETCH": 1, "num_warps": 8,
         "num_stages": 1},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "PACKED": 1, "PREFETCH": 1,
         "num_warps": 8, "num_stages": 1},
        {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "PACKED": 1, "PREFETCH": 1,
         "num_warps": 8, "num_stages": 1},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 1, "PACKED": 1, "PREFETCH": 1,
         "num_warps": 4, "num_stages": 1},
        # packed, unswapped, 4 warps: about 230 registers and 96-104 KiB of shared memory, so
        # two CTAs fit on an SM (one's MMA overlaps the other's decoding)
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": 0, "PACKED": 1, "num_warps": 4,
         "num_stages": 4},
    ),
}
_LAUNCH_KEYS = ("num_warps", "num_stages")
# Program-order grouping of the tiled kernel (tiles sharing a weight column block run together).
_GROUP_M = 8


# ---- availability ----------------------------------------------------------------------------


def triton_available() -> bool:
    """Whether Triton imports and is recent enough (:mod:`linquant.kernels._triton_env`; never
    raises)."""
    return _triton_env.available()


def _interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET``, read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def _device_ok(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _layout_ok(qt: QuantizedTensor) -> bool:
    if len(qt.shape) != 2:
        return False
    s = qt.scheme
    if s.bits not in (4, 8):
        return False
    cpw = 32 // s.bits
    k = int(qt.shape[1])
    if k % cpw:
        return False
    if s.granularity == "group":
        return int(s.group_size or 0) % cpw == 0
    return s.granularity == "tensor" or (s.granularity == "channel" and s.axis % 2 == 0)


def supported(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    """Whether :func:`linear` handles ``x [..., K]`` times ``qt [N, K]`` (never raises).

    Needs Triton; ``x`` and all of ``qt``'s tensors on one CUDA device (or on the CPU with
    ``TRITON_INTERPRET=1``); 4- or 8-bit codes; group-wise (group size a multiple of 8 codes
    for 4 bits, 4 for 8 bits), per-output-channel or per-tensor parameters; ``K`` a multiple of
    8 (4-bit) or 4 (8-bit); bf16 / fp16 activations (fp32 only when ``M <= GEMV_MAX_M``); a
    non-empty input that does not need a gradient; every index below 2**31; and the kernel
    that :func:`kernel_for` picks has not failed before for this kind of input (see
    :func:`failures`).
    """
    if not _supported(qt, x):
        return False
    return _failure_key(kernel_for(x.numel() // int(qt.shape[1]), qt), qt, x) not in _FAILED


def _supported(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    if not (isinstance(qt, QuantizedTensor) and isinstance(x, torch.Tensor)):
        return False
    if not triton_available() or not _device_ok(x.device) or not _layout_ok(qt):
        return False
    if any(t.device != x.device for t in qt.tensors().values()):
        return False
    n, k = (int(d) for d in qt.shape)
    if x.dim() == 0 or x.shape[-1] != k or x.numel() == 0 or n == 0:
        return False
    m = x.numel() // k
    if x.dtype not in HALF_DTYPES and not (x.dtype == torch.float32 and m <= GEMV_MAX_M):
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    return max(n * k, m * k, m * n) <= _INT32_LIMIT


def kernel_for(m: int, qt: QuantizedTensor | None = None) -> str:
    """Which kernel :func:`linear` runs for ``m`` tokens of ``qt``: ``gemv_t`` (one token,
    group-wise weights with groups of at most :data:`GEMV_T_MAX_GROUP`), ``gemv`` (one token,
    other weights), ``splitk`` or ``tiled``. On an H200 (graph-timed, 8192 x 8192, see
    BENCHMARKS.md) ``gemv_t`` took 0.024 ms for int4 g32 where ``gemv`` took 0.034 (its
    per-word parameter loads), and ``gemv`` 0.021 / 0.025 ms for int4 g128 / int8 per channel
    where ``gemv_t`` took 0.022 / 0.027 plus its zeroed buffer and cast."""
    if m <= GEMV_MAX_M:
        s = qt.scheme if qt is not None else None
        if (s is not None and s.granularity == "group"
                and int(s.group_size or 0) <= GEMV_T_MAX_GROUP):
            return "gemv_t"
        return "gemv"
    return "splitk" if m <= SKINNY_MAX_M else "tiled"


# Kernels that raised while compiling or launching on the automatic path, by the inputs that
# select one binary: (kernel, bits, symmetric, zero point, offset, group (0: per channel or
# tensor), dtype, device). Those inputs then use the reference (a RuntimeWarning the first time).
_FAILED: dict[tuple[object, ...], str] = {}


def _failure_key(kind: str, qt: QuantizedTensor, x: torch.Tensor) -> tuple[object, ...]:
    s = qt.scheme
    group = int(s.group_size or 0) if s.granularity == "group" else 0
    return (kind, s.bits, s.symmetric, qt.zero_point_packed is not None, qt.offset is not None,
            group, x.dtype, str(x.device))


def failures() -> dict[tuple[object, ...], str]:
    """Kernels that failed (to compile, most likely) on the automatic path in this process:
    ``{(kernel, bits, symmetric, zero point, offset, group, dtype, device): error}``. Those
    inputs fall back to the reference; the CUDA tests assert this stays empty."""
    return dict(_FAILED)


# ---- repacking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonPack:
    """The kernel layout of one weight (see the module docstring)."""

    words: torch.Tensor  # int32 [N, K * bits / 32]
    scale: torch.Tensor  # [G, N], storage dtype
    zero: torch.Tensor | None  # uint8 [G, N] (asymmetric, integer zero point)
    offset: torch.Tensor | None  # [G, N], storage dtype (asymmetric, float offset)
    group: int  # group size along K (K for per-channel / per-tensor)
    per_channel: bool  # one parameter set per output row (channel axis 0 or tensor)
    bits: int
    symmetric: bool


def _params_gn(p: torch.Tensor, n: int, k: int, group: int, per_tensor: bool) -> torch.Tensor:
    if per_tensor:
        return p.reshape(1, 1).expand(1, n).contiguous()
    return p.reshape(n, k // group).t().contiguous()


def repack(qt: QuantizedTensor) -> TritonPack:
    """Build the kernel layout of ``qt`` (a view of its codes plus transposed parameters)."""
    if not _layout_ok(qt):
        raise LinquantError(f"triton_linear.repack: unsupported weight {qt!r}")
    n, k = (int(d) for d in qt.shape)
    s = qt.scheme
    codes = qt.qdata.reshape(-1)
    if codes.storage_offset() % 16 or codes.data_ptr() % 16:
        codes = codes.clone()  # 16-byte aligned rows let Triton vectorize the loads
    words = codes.view(torch.int32).view(n, k * s.bits // 32)
    per_tensor = s.granularity == "tensor"
    per_channel = s.granularity != "group"
    group = k if per_channel else int(s.group_size or k)
    zp = qt.zero_point
    return TritonPack(
        words=words,
        scale=_params_gn(qt.scale, n, k, group, per_tensor),
        zero=None if zp is None else _params_gn(zp, n, k, group, per_tensor),
        offset=None if qt.offset is None else _params_gn(qt.offset, n, k, group, per_tensor),
        group=group,
        per_channel=per_channel,
        bits=s.bits,
        symmetric=s.symmetric,
    )


# ---- kernels (built on first use, so TRITON_INTERPRET is read when they are needed) ---------


@dataclass(frozen=True)
class _Kernels:
    gemv: Any  # raw @triton.jit functions (explicit config) ...
    mm: Any
    gemv_tuned: Any  # ... and their autotuned wrappers (CUDA only)
    splitk_tuned: Any
    tiled_tuned: Any
    gemv_t: Any = None
    gemv_t_tuned: Any = None
    dequant: Any = None


_BUILT: dict[bool, _Kernels] = {}


def _kernels() -> _Kernels:
    interp = _interpreting()
    if interp not in _BUILT:
        _BUILT[interp] = _build()
    return _BUILT[interp]


def _build(do_bench: Any = None, tune: bool | None = None) -> _Kernels:
    """The kernels and (on a GPU) their autotuned wrappers.

    ``do_bench`` / ``tune``: for tests, a stand-in for Triton's timer and ``True`` to wrap the
    interpreted kernels too (the interpreter has no timer and runs the raw kernels with an
    explicit config by default), so the autotuned launch (keys, pruning, the atomic outputs'
    restore) runs on the CPU.
    """
    import triton

    from linquant.kernels import _triton_kernels as tk

    if _interpreting() != tk.INTERPRETED:  # TRITON_INTERPRET changed since the first import
        tk = importlib.reload(tk)
    if tune is None:
        tune = not tk.INTERPRETED

    def configs(kind: str) -> list[Any]:
        return [triton.Config({k: v for k, v in c.items() if k not in _LAUNCH_KEYS},
                              num_warps=c["num_warps"], num_stages=c["num_stages"])
                for c in CONFIGS[kind]]

    scheme_keys = ["BITS", "SYM", "HAS_Z", "HAS_M", "PER_CHANNEL", "GROUP"]
    gemv_tuned = splitk_tuned = tiled_tuned = gemv_t_tuned = None
    if tune:
        opts = _triton_env.autotune_options(do_bench)
        gemv_t_tuned = triton.autotune(configs("gemv_t"), key=["N", "K", "ATOMIC", *scheme_keys],
                                       prune_configs_by={"early_config_prune": _pruner("gemv_t")},
                                       restore_value=["y_ptr"], **opts)(tk.gemv_t_kernel)
        # atomic outputs are restored after every timed run, so the real run starts at zero
        gemv_tuned = triton.autotune(configs("gemv"), key=["N", "K", "SPLIT_K", "ATOMIC",
                                                            *scheme_keys],
                                     restore_value=["y_ptr"], **opts)(tk.gemv_kernel)
        splitk_tuned = triton.autotune(configs("splitk"), key=["N", "K", "BLOCK_M",
                                                               *scheme_keys],
                                       prune_configs_by={"early_config_prune": _pruner("splitk")},
                                       restore_value=["y_ptr"], **opts)(tk.mm_kernel)
        tiled_tuned = triton.autotune(configs("tiled"), key=["N", "K", "M_BUCKET", *scheme_keys],
                                      prune_configs_by={"early_config_prune": _pruner("tiled")},
                                      **opts)(tk.mm_kernel)
    return _Kernels(tk.gemv_kernel, tk.mm_kernel, gemv_tuned, splitk_tuned, tiled_tuned,
                    tk.gemv_t_kernel, gemv_t_tuned, tk.dequant_kernel)


# ---- launch ----------------------------------------------------------------------------------


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a pretend GPU, so small tests exercise split-K
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _gemv_split(n: int, k: int, device: torch.device) -> int:
    """Split K only when N alone gives fewer programs (at 32 rows each) than SMs."""
    sms = _sms(device)
    programs = _cdiv(n, 32)
    if programs >= sms:
        return 1
    return max(1, min(_cdiv(2 * sms, programs), k // 512))


def _split_meta(config: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    meta = {k: v for k, v in config.items() if k not in _LAUNCH_KEYS}
    launch = {k: v for k, v in config.items() if k in _LAUNCH_KEYS}
    return meta, launch


def _check_config(kind: str, config: dict[str, int]) -> None:
    needed = {"gemv_t": ("BLOCK_N", "BLOCK_KW"), "gemv": ("BLOCK_N", "BLOCK_K"),
              "splitk": ("BLOCK_N", "BLOCK_K", "SPLIT_K", "SWAP"),
              "tiled": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP")}[kind]
    missing = [k for k in needed if k not in config]
    if missing:
        raise LinquantError(f"triton_linear.linear: config for {kind!r} lacks {missing}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_KW"):
        v = config.get(k, 16)
        if v < 1 or v & (v - 1):
            raise LinquantError(f"triton_linear.linear: {k} must be a power of 2, got {v}")
    if kind not in GEMV_KERNELS and (config["BLOCK_K"] < 16 or config["BLOCK_N"] < 16):
        raise LinquantError("triton_linear.linear: tl.dot needs BLOCK_N and BLOCK_K >= 16")


def fit_config(kind: str, config: dict[str, int], group: int,
               per_channel: bool, bits: int = 4) -> dict[str, int]:
    """``config`` adjusted to a weight: a non-swapped ``tl.dot`` tile never takes per-word
    parameters (groups smaller than, or straddling, ``BLOCK_K``); it is swapped instead.
    ``gemv_t``'s ``BLOCK_KW`` is capped at one group's words (``group * bits / 32``, when that is
    a power of two), so each tile takes one parameter set per row. ``PACKED`` is dropped for
    8-bit codes (the packed-pair decoding is 4-bit only).

    Triton's ``TritonGPUOptimizeDotOperands`` pass (3.6 and 3.9) crashes on several such wgmma
    kernels (the dequantized right operand mixing per-word parameter loads; found by compiling
    every config for sm_90 without a GPU), while the swapped form, whose dequantized weight is
    the left operand, compiled in every case tried. ``PACKED`` configs (4-bit codes, decoded
    on the K-ordered tile) are the exception: unswapped they compiled for groups of 8, 16, 32,
    48 and 96 codes, symmetric, zero point and float offset, fp16 / bf16 / fp32 parameters,
    with and without alignment (Triton 3.6 and 3.9), and they are kept unswapped: swapped
    tiles with Triton's pipeliner get their wgmma serialized (module docstring). Other configs
    are returned unchanged.
    """
    if kind == "gemv_t":
        words = group * bits // 32
        if not per_channel and words & (words - 1) == 0 and config["BLOCK_KW"] > words:
            return {**config, "BLOCK_KW": words}
        return config
    if kind == "gemv":
        return config
    if config.get("PACKED") and bits != 4:  # packed pairs decode 4-bit codes only
        config = {k: v for k, v in config.items() if k != "PACKED"}
    if per_channel or config.get("SWAP", 0) or group % config["BLOCK_K"] == 0:
        return config
    if config.get("PACKED"):  # 4-bit packed decoding: compiles unswapped (see the docstring)
        return config
    return {**config, "SWAP": 1}


def _pruner(kind: str) -> Any:
    """``early_config_prune`` for the autotuner: :func:`fit_config` on every candidate."""

    def prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        import triton

        args = {**named_args, **kwargs}
        out: list[Any] = []
        seen: set[tuple[object, ...]] = set()
        for c in configs:
            kw = fit_config(kind, dict(c.kwargs), int(args["GROUP"]), bool(args["PER_CHANNEL"]),
                            int(args["BITS"]))
            key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        return out

    return prune


def _scheme_args(pk: TritonPack, has_bias: bool) -> dict[str, Any]:
    return {
        "BITS": pk.bits,
        "SYM": pk.symmetric,
        "HAS_Z": pk.zero is not None,
        "HAS_M": pk.offset is not None,
        "HAS_BIAS": has_bias,
        "PER_CHANNEL": pk.per_channel,
        "GROUP": pk.group,
    }


def _gemv_t_atomic(n: int, device: torch.device) -> bool:
    """Whether ``gemv_t`` splits K (fp32 atomics): unless N alone gives every SM 2 programs of
    512 rows."""
    return _cdiv(n, 512) < 2 * _sms(device)


def _gemv_t_splits(n: int, kw: int, meta: dict[str, Any], device: torch.device) -> int:
    """K splits for ``gemv_t``: about 4 programs per SM, at least 2 tiles per split."""
    cols = _cdiv(n, int(meta["BLOCK_N"]))
    tiles = _cdiv(kw, int(meta["BLOCK_KW"]))
    return max(1, min(_cdiv(4 * _sms(device), cols), tiles // 2))


# ---- the eager fast path: one plan per layer and input signature -------------------------------
#
# Measured on the H200 machine's host (bench_gpu.py --overhead): a raw Triton launch took 30 us,
# the checks, layout lookups and argument building around it another 60-90 us per call, so an
# eager one-token call cost 4x its kernel. After the first automatic call for an input signature
# (shape, dtype, device, bias object), the layer's cache keeps a plan (linquant.kernels.plans):
# the weight's identity, the prepared tensors and a closure that allocates the output and
# launches. Later calls check that the weight tensors are the same objects at the same versions
# and launch.


def weight_tensors(qt: QuantizedTensor) -> tuple[torch.Tensor | None, ...]:
    """``qt``'s stored tensors in the order :func:`replay` takes them."""
    return plans.weight_tensors(qt)


def planned(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
            cache: dict[str, Any] | None) -> torch.Tensor | None:
    """The result of :func:`linear` by a plan built on an earlier call with the same input
    signature, the same weight tensors and bias (unmodified), or None: no such plan (the
    caller then takes the checked path, which builds one). Inputs that need a gradient are
    never planned."""
    if cache is None:
        return None
    return replay(x, weight_tensors(qt), bias, cache)


def replay(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...],
           bias: torch.Tensor | None, cache: dict[str, Any]) -> torch.Tensor | None:
    """:func:`planned` for a caller that holds the weight's tensors (:func:`weight_tensors`)
    rather than a :class:`QuantizedTensor`: ``QuantLinear.forward`` calls it first on CUDA
    inputs, before any check or object is built. The checks it keeps: an input signature seen
    before (shape, dtype, device, bias object), no autograd, the same weight tensors and bias
    at the same versions."""
    p = plans.find(x, tensors, bias, cache, "triton_plans")
    if p is None:
        return None
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, p.k)
    if x2.stride(-1) != 1 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    y = p.run(x2)
    return y if flat else y.reshape(*x.shape[:-1], p.n)


def _make_run(kind: str, x2: torch.Tensor, pk: TritonPack, words_t: torch.Tensor | None,
              b: torch.Tensor | None, n: int, k: int,
              config: dict[str, int] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A closure ``run(x2) -> y`` that allocates the output and launches ``kind`` with
    everything but ``x2 [M, K]`` bound: the autotuned kernel, or ``config`` (``gemv`` also
    takes ``SPLIT_K``), or in the interpreter the kind's first config."""
    kern = _kernels()
    dev = x2.device
    dtype = x2.dtype
    m = int(x2.shape[0])
    # absent zero points, offsets and bias get pk.scale as a placeholder pointer (never read)
    words, scale = pk.words, pk.scale
    zero = pk.zero if pk.zero is not None else scale
    offset = pk.offset if pk.offset is not None else scale
    bb = b if b is not None else scale
    kw = _scheme_args(pk, b is not None)
    cfg = dict(config) if config is not None else None

    def pick(raw: Any, tuned: Any, grid: Any) -> tuple[Any, dict[str, Any]]:
        meta, lk = _split_meta(cfg or CONFIGS[kind][0])
        meta = fit_config(kind, meta, pk.group, pk.per_channel, pk.bits)
        if kind == "splitk":
            meta.pop("BLOCK_M", None)
        elif kind == "tiled":
            meta.pop("SPLIT_K", None)
        if cfg is None and tuned is not None:  # the first config inside an untuned capture
            return _triton_env.tuned_or_fixed(
                tuned[grid], functools.partial(raw[grid], **meta, **lk)), {}
        return raw[grid], {**meta, **lk}

    if kind in GEMV_KERNELS:
        if kind == "gemv_t":
            assert words_t is not None
            w, kwn = words_t, int(words_t.shape[0])
            atomic = _gemv_t_atomic(n, dev)
            split = 0
        else:
            w, kwn = words, int(words.shape[1])
            split = _gemv_split(n, k, dev)
            if cfg is not None and "SPLIT_K" in cfg:
                split = int(cfg.pop("SPLIT_K"))
            atomic = split > 1
        kw["ATOMIC"] = atomic

        def grid_g(meta: dict[str, Any]) -> tuple[int, int]:
            if kind == "gemv_t":
                return (_cdiv(n, meta["BLOCK_N"]),
                        _gemv_t_splits(n, kwn, meta, dev) if atomic else 1)
            return (_cdiv(n, meta["BLOCK_N"]), split)

        if kind == "gemv_t":
            launch, extra = pick(kern.gemv_t, kern.gemv_t_tuned, grid_g)
            tail: tuple[int, ...] = ()
        else:
            launch, extra = pick(kern.gemv, kern.gemv_tuned, grid_g)
            tail = (split,)

        def run_g(x2: torch.Tensor) -> torch.Tensor:
            y = (torch.zeros(1, n, dtype=torch.float32, device=dev) if atomic
                 else torch.empty(1, n, dtype=dtype, device=dev))
            launch(x2, w, scale, zero, offset, bb, y, n, k, kwn, *tail, **kw, **extra)
            return y.to(dtype) if atomic else y

        return run_g
    atomic = kind == "splitk"
    kw.update(ATOMIC=atomic, INTERP=_interpreting(), GROUP_M=_GROUP_M)
    if kind == "splitk":
        kw["BLOCK_M"] = max(16, _next_pow2(m))
    else:
        kw["SPLIT_K"] = 1
    offset_sums = pk.per_channel and pk.offset is not None
    bucket = min(_next_pow2(m), 8192)
    kwn = int(words.shape[1])

    def grid_m(meta: dict[str, Any]) -> tuple[int, int]:
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    launch, extra = pick(kern.mm, kern.splitk_tuned if kind == "splitk" else kern.tiled_tuned,
                         grid_m)

    def run_m(x2: torch.Tensor) -> torch.Tensor:
        y = (torch.zeros(m, n, dtype=torch.float32, device=dev) if atomic
             else torch.empty(m, n, dtype=dtype, device=dev))
        # per-channel float offsets: m * sum_k x is added in the epilogue (fp32 sums per token)
        xs = x2.float().sum(1) if offset_sums else y
        launch(x2, words, scale, zero, offset, bb, xs, y, m, n, k, kwn, x2.stride(0), bucket,
               **kw, **extra)
        return y.to(dtype) if atomic else y

    return run_m


# ---- dequantize, then cuBLAS: opt-in for many tokens --------------------------------------------
#
# At 2048 tokens the tiled kernel ran at 0.59x cuBLAS bf16 on the H200 (int4 g128; 0.41x g32):
# it reaches about 450 TFLOP/s where cuBLAS reaches 760-810. Decoding the whole weight into a
# bf16 buffer first costs one pass over it (8192 x 8192 int4: 32 MiB read, 128 MiB written, an
# estimated 0.04-0.05 ms at H200 bandwidth) before cuBLAS's 0.36 ms. That materializes the
# float weight, which the fused kernels exist to avoid, and it has not been timed on a GPU, so
# it is off unless LINQUANT_CUDA_DEQUANT_MIN_M sets the number of tokens from which to use it.

DEQUANT_BLOCK_N = 16
DEQUANT_WORDS = 64  # words of codes per row of a program's tile


def dequant_min_m() -> int | None:
    """``LINQUANT_CUDA_DEQUANT_MIN_M`` as a number of tokens (unset, empty or 0: off)."""
    raw = os.environ.get("LINQUANT_CUDA_DEQUANT_MIN_M", "").strip()
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError as e:
        raise LinquantError(
            f"LINQUANT_CUDA_DEQUANT_MIN_M must be a whole number of tokens, got {raw!r}"
        ) from e
    return v if v > 0 else None


def _dequantize_pk(pk: TritonPack, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, k, dtype=dtype, device=pk.words.device)
    kw = int(pk.words.shape[1])
    block_k = DEQUANT_WORDS * 32 // pk.bits
    grid = (_cdiv(n, DEQUANT_BLOCK_N), _cdiv(kw, DEQUANT_WORDS))
    scale = pk.scale
    args = {k_: v for k_, v in _scheme_args(pk, False).items() if k_ != "HAS_BIAS"}
    _kernels().dequant[grid](
        pk.words, scale, pk.zero if pk.zero is not None else scale,
        pk.offset if pk.offset is not None else scale, out, n, k, kw, **args,
        BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False)
    return out


def dequantize(qt: QuantizedTensor, dtype: torch.dtype,
               cache: dict[str, Any] | None = None) -> torch.Tensor:
    """``qt.dequantize(dtype)`` (fp32 / fp16 / bf16) in one Triton kernel, the same bits: for
    the 2-D weights :func:`supported` takes, on a CUDA device (or the CPU in the interpreter).
    ``cache``: as for :func:`linear` (the same layout)."""
    if not (isinstance(qt, QuantizedTensor) and _layout_ok(qt) and _device_ok(qt.device)
            and dtype in (torch.float32, *HALF_DTYPES) and triton_available()):
        raise LinquantError(f"triton_linear.dequantize: unsupported weight {qt!r} or dtype "
                            f"{dtype} (4/8-bit group/channel-0/tensor weights, fp32/fp16/bf16)")
    n, k = (int(d) for d in qt.shape)
    pk = _cached(cache, "triton", _key(qt, torch.int32), lambda: repack(qt))
    return _dequantize_pk(pk, n, k, dtype)


def dequantize_runner(qt: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                      cache: dict[str, Any] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> F.linear(x, dequantize(qt, dtype), bias)`` with the layout and the bias (in
    ``dtype``) bound: the ``cuda_dequant`` path, bit-identical to the reference (the weight is
    decoded into a fresh buffer from PyTorch's caching allocator on every call). A bias that
    needs a gradient keeps it (``F.linear`` is differentiable in the bias)."""
    n, k = (int(d) for d in qt.shape)
    pk = _cached(cache, "triton", _key(qt, torch.int32), lambda: repack(qt))
    b = None if bias is None else bias.to(dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _dequantize_pk(pk, n, k, dtype), b)

    return run


def dequant_chosen(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    """Whether the ``cuda_dequant`` path takes ``x``: ``LINQUANT_CUDA_DEQUANT_MIN_M`` is set and
    ``x`` has at least that many tokens, bf16 / fp16, :func:`supported` inputs, and the dequant
    kernel has not failed before for this kind of input."""
    least = dequant_min_m()
    if least is None or not isinstance(x, torch.Tensor) or x.dtype not in HALF_DTYPES:
        return False
    if not _supported(qt, x) or x.numel() // int(qt.shape[1]) < least:
        return False
    return _failure_key("dequant", qt, x) not in _FAILED


def linear_dequant(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                   cache: dict[str, Any] | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(qt, x.dtype), bias)``: the ``cuda_dequant`` path, bit-identical
    to the reference. Without autograd, a plan is kept in ``cache["cuda_plans"]``. If the
    kernel raises (a compile error on an untested Triton), it warns once and the reference
    runs, for these inputs from then on."""
    fkey = _failure_key("dequant", qt, x)
    try:
        run = dequantize_runner(qt, bias, x.dtype, cache)
        y = run(x)
    except torch.cuda.OutOfMemoryError:
        raise  # the reference would need the same buffer
    except Exception as e:
        _FAILED[fkey] = f"{type(e).__name__}: {e}"[:2000]
        warnings.warn(
            f"linquant: the Triton dequant kernel failed for {qt.scheme} weights and {x.dtype} "
            f"inputs ({type(e).__name__}); using the reference for them from now on",
            RuntimeWarning, stacklevel=2)
        return reference.linear_weight_only(x, qt, bias)
    grad = torch.is_grad_enabled()
    if cache is not None and not (x.requires_grad and grad) and not (
            bias is not None and bias.requires_grad and grad):
        plans.keep(cache, "cuda_plans", x, qt, bias, run, "cuda_dequant")
    return y


def linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    cache: dict[str, Any] | None = None,
    *,
    kernel: str | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Weight-only linear ``x [..., K] -> [..., N]`` in ``x.dtype`` with fused dequantization.

    Same formula as :func:`linquant.kernels.reference.linear_weight_only`; see
    :func:`supported` for the inputs it takes (anything else raises :class:`LinquantError`).

    ``cache``: a dict owned by the caller (a layer); the repacked layout (:func:`repack`) is
    kept there under ``"triton"``. ``kernel`` (``"gemv"``, ``"splitk"``, ``"tiled"``) and
    ``config`` (one entry shaped like those in :data:`CONFIGS`; ``gemv`` also takes
    ``SPLIT_K``) override the automatic choice and the autotuner: for tests and benchmarks.
    """
    if not _supported(qt, x):
        got = (f"x {tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise LinquantError(
            f"triton_linear.linear: unsupported input ({got}, weight {qt!r}); check supported() "
            "first (needs Triton, CUDA or TRITON_INTERPRET=1, 4/8-bit group/channel-0/tensor "
            "weights, bf16/fp16 activations)"
        )
    n, k = (int(d) for d in qt.shape)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        got_b = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise LinquantError(f"triton_linear.linear: bias must have shape ({n},), got {got_b}")
    if bias is not None and bias.device != x.device:
        raise LinquantError(f"triton_linear.linear: bias on {bias.device}, x on {x.device}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = int(x2.shape[0])
    kind = kernel or kernel_for(m, qt)
    if kind not in KERNELS:
        raise LinquantError(f"triton_linear.linear: kernel must be one of {KERNELS}, got {kind!r}")
    if kind in GEMV_KERNELS and m != 1:
        raise LinquantError(f"triton_linear.linear: the {kind} kernel takes one token, got {m}")
    if kind not in GEMV_KERNELS and x.dtype not in HALF_DTYPES:
        raise LinquantError(f"triton_linear.linear: {kind} needs bf16/fp16 input, got {x.dtype}")
    if config is not None:
        _check_config(kind, config)
    pk = _cached(cache, "triton", _key(qt, torch.int32), lambda: repack(qt))
    # A bias that needs a gradient is added outside the kernel, where autograd sees it.
    bias_after = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    b = None if bias is None or bias_after else bias.detach().to(x.dtype).contiguous()
    auto = kernel is None and config is None
    fkey = _failure_key(kind, qt, x)
    if auto and fkey in _FAILED:
        return reference.linear_weight_only(x, qt, bias)
    try:
        words_t = None
        if kind == "gemv_t":
            # the transposed words: a second copy of the codes, built on the first one-token call
            words_t = _cached(cache, "triton_t", _key(qt, torch.int32),
                              lambda: pk.words.t().contiguous())
        run = _make_run(kind, x2, pk, words_t, b, n, k, config)
        y = run(x2)
        if auto and cache is not None and not bias_after and not (
                x.requires_grad and torch.is_grad_enabled()):
            plans.keep(cache, "triton_plans", x, qt, bias, run)
    except torch.cuda.OutOfMemoryError:
        raise  # not the kernel's fault: no fallback, no note against the kernel
    except Exception as e:  # a Triton compile error must not take the model down
        if not auto:
            raise
        _FAILED[fkey] = f"{type(e).__name__}: {e}"[:2000]
        warnings.warn(
            f"linquant: the Triton {kind} kernel failed for {qt.scheme} weights and {x.dtype} "
            f"inputs ({type(e).__name__}); using the reference for them from now on (see "
            "linquant.kernels.triton_linear.failures())", RuntimeWarning, stacklevel=2)
        return reference.linear_weight_only(x, qt, bias)
    if bias_after:
        assert bias is not None
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
