"""The one seam for quantized compute: every layer's forward calls one function here.

Each function dispatches to the fastest implementation measured for its inputs (device, dtype,
shape, scheme); :func:`select_path` names the choice and tests assert on it. The formulas are
those of the plain-PyTorch oracle :mod:`linquant.kernels.reference`; the CPU fast paths live in
:mod:`linquant.kernels.cpu` (see its docstring for layouts and tolerances). ``M`` below is the
number of tokens (``x.numel() // K``).

Weight-only linear (:func:`linear_weight_only`) on CPU, first match wins:

1. ``cpu_native_int4``: 4-bit group-wise (a group that is a multiple of 4) or per output
   channel, any mode, ``K % 4 == 0``, **bf16** activations, ``M <= NATIVE_INT4_MAX_M`` (256),
   where :func:`linquant.kernels.native.available` (Linux x86-64 with AVX512-BF16 and a C
   compiler: linquant's own kernel, compiled on first use; see :mod:`linquant.kernels.native`).
   It decodes the codes inside the product and reads the weight once per call: on 4096 x 4096
   it was 1.3x faster than ``cpu_int4pack`` at M = 1 and 2.1-2.4x at M = 16-64, and 1.7x faster
   than bf16 ``nn.Linear`` at M = 16 (0.9x at M = 128-256, where ``cpu_scratch`` reaches
   0.75x). From about 500 tokens ``cpu_scratch`` (dequantize once, one bf16 matmul) is level
   or up to 20% faster on 4096 x 4096 and MiniLM's shapes.
2. ``cpu_native_w8a16``: 8-bit symmetric per-output-channel or per-tensor, bf16 / fp16
   activations, ``M <= NATIVE_W8A16_MAX_M`` (256; one token on weights under
   ``SMALL_WEIGHT_NUMEL`` elements stays on ``cpu_int8pack``, 10-20% faster there), where the
   native W8A8 library builds (AVX512-VNNI, a C compiler): ``cpu_int8split``'s two-digit scheme
   fused into one native call. On 4096 x 4096: 0.36-0.52 ms at M = 1 (``cpu_int8pack``
   0.63-0.69), 1.9x bf16 ``nn.Linear`` at M = 16, 1.0-1.2x at M = 64-256 (``cpu_scratch``
   0.45-0.77x); on MiniLM's shapes 0.7-2.6x bf16 up to 64 tokens, ahead of every other
   quantized path. From a few hundred tokens on MiniLM's small weights ``cpu_scratch`` wins
   (the model at 480 and 1920 tokens per layer ran 1.5-1.9x fp32 on it, 1.26-1.28x on the
   native kernel).
3. ``cpu_native_avx2``: 4- or 8-bit, any mode, group-wise with a group of whole 32-bit words (a
   multiple of 8 / 4 codes), per output channel or per tensor, ``K`` a multiple of 8 / 4, where
   :func:`linquant.kernels.native.available` ``("avx2")`` (x86-64 with AVX2, FMA and F16C and a
   C compiler): bf16 / fp16 activations at every ``M`` where the CPU has no hardware matmul for
   ``x.dtype`` (:func:`linquant.kernels.native.fast_half_matmul`: AVX512-BF16 or AMX for bf16,
   AMX-FP16 for fp16), else at ``M <= NATIVE_AVX2_MAX_M`` (32); **fp32** activations at ``M <=
   NATIVE_AVX2_MAX_M_FP32`` (64), with fp32 math (exact products of the codes centered at each
   row's zero, fp32 sums: within 1.5e-6 of the reference's max here, also with outlier weights;
   the blocked path's tolerance is 1e-5). linquant's AVX2 kernel: it decodes each code with one
   AND and one conversion per 8 weights and multiplies in fp32, reading the weight once per
   call. It takes what rows 1 and 2 leave: every 4- and 8-bit layer on CPUs without AVX-512
   (there it beat the previous paths at every ``M`` measured, 1-1024: on 4096 x 4096 4-bit 0.38
   ms at one token against 1.14 for ``cpu_int4pack``, 3.2 ms against 5.0 at 16 tokens, 55 ms
   against 184 for ``cpu_scratch`` at 256), and on every CPU fp16 activations (``cpu_int4pack``
   runs fp16 at a thirtieth of its bf16 speed: 15.6 ms at one token on 4096 x 4096, the AVX2
   kernel 0.5), 8-bit asymmetric or group-wise weights (0.49 ms at one token instead of 5.5 for
   ``cpu_blocked``) and fp32 activations (W8A32 on 4096 x 4096: 0.56 ms at one token, 6x fp32
   ``nn.Linear``, where ``cpu_blocked`` takes 2.3; level with it at 64 tokens, behind from 128).
   Where bf16 matmuls run in hardware, ``cpu_blocked`` / ``cpu_scratch`` overtake it between 16
   and 64 tokens (``benchmarks/bench_avx2_crossover.py``, which also shows how to cap every
   library at AVX2). One token on weights under ``SMALL_WEIGHT_NUMEL`` that ``cpu_int8pack``
   takes stays there (a tie or up to 15% faster on MiniLM's shapes).
4. ``cpu_int4pack``: 4-bit group-wise (group 32/64/128/256, ``N % 16 == 0``), bf16 / fp16
   activations, ``M < INT4PACK_MAX_M`` (64).
5. ``cpu_int8split``: 8-bit symmetric per-output-channel or per-tensor, bf16 / fp16
   activations, weights of ``SMALL_WEIGHT_NUMEL`` (1M) elements or more,
   ``INT8SPLIT_MIN_M <= M <= INT8SPLIT_MAX_M`` (2..128; also ``M = 1`` when ``cpu_int8pack``
   cannot take the weight), where fbgemm is available (as for W8A8 below): the activations are
   split into two exact-enough int8 digits and multiplied by fbgemm's int8 GEMM
   (:func:`linquant.kernels.cpu.linear_int8split`). On 4096 x 4096 and 4096 x 11008 it is
   1.5-2.6x faster than bf16 ``nn.Linear`` at M = 2-16 and 0.9x at M = 64-128, where the
   dequantizing paths reach 0.5-0.8x; at M = 1 it ties ``cpu_int8pack``, which needs no second
   copy of the weight. On MiniLM's small weights its dozen small ops cost more than they save
   (0.4-0.8x bf16), so those keep the paths below (``benchmarks/bench_w8a16_crossover.py``).
6. ``cpu_int8pack``: 8-bit symmetric per-output-channel, ``K % 16 == 0``, bf16 / fp16
   activations, ``M < INT8PACK_MAX_M`` (32).
7. ``cpu_blocked``: ``M < BLOCKED_MAX_M`` (128), and fp32 / fp64 activations at every ``M``
   (fp32 from 65 tokens where row 3 applies)
   for weights of ``SMALL_WEIGHT_NUMEL`` (1M) elements or more (W8A32 etc. keep fp32 math; on
   4096 x 4096, 2048 x 2048 and 4096 x 1024 weights this beat ``cpu_scratch`` and fp32
   ``nn.Linear`` at M = 128 and 256).
8. ``cpu_scratch``: ``M >= BLOCKED_MAX_M`` otherwise: bf16 / fp16 activations, and fp32 / fp64
   on smaller weights, whose dequantized copy stays in cache (MiniLM's 1536 x 384 at M = 480:
   4.4 ms instead of 6.7 for ``cpu_blocked``). Outside autograd it is the reference's own
   computation, bit for bit.

Rows 7 and 8 dequantize with the AVX2 library's ``lq_dequant_rows`` where it builds (the same
bits as the PyTorch ops, in one pass; ``benchmarks/bench_dequant.py``). Under
``torch.compile``, ``QuantLinear`` calls :func:`linear_weight_only` through the custom operator
of :mod:`linquant.kernels.compiled`.

The thresholds are crossovers measured with benchmarks/bench_linear.py (BENCHMARKS.md).
``torch._weight_int4pack_mm_for_cpu`` and ``torch._weight_int8pack_mm`` need bf16 / fp16
activations. Weights with fewer than ``MIN_FAST_NUMEL`` elements (they fit in L2; dequantize
then matmul costs microseconds) and every other device use ``reference``, bit-identical to
``F.linear(x, qweight.dequantize(x.dtype))``; so do empty inputs. A float bias that requires
grad is added after the product, by autograd-visible torch ops, on the native paths too, which
otherwise add it inside the kernel. An input that requires grad while grad is enabled (every
layer after the first in a model run outside ``torch.no_grad``, whose parameters need grads)
takes the path the same input without grad would, inside an autograd function
(:class:`_KernelLinear`) whose backward is the reference's: ``grad_x = grad_y @ W``, ``W``
dequantized to ``x.dtype`` (the fast paths use ``out=`` ops, aten ops without a backward and
reused buffers, so autograd cannot see through them). Before, such inputs took ``reference``:
all-MiniLM-L6-v2 at batch 1 outside ``no_grad`` ran at 0.36-0.52x the float model
(``benchmarks/bench_plans.py --grad``).

Weight-only linear on CUDA, first match wins:

1. ``cuda_tinygemm``: 4-bit group-wise weights (group 32 / 64 / 128 / 256, ``K % 128 == 0``,
   ``N % 8 == 0``), **bf16** activations, one token (``M <= cuda.TINYGEMM_MAX_M``), or up to
   ``cuda.TINYGEMM_MAX_M_NO_TRITON`` (16) tokens where ``cuda_triton`` cannot take the input,
   where :func:`linquant.kernels.cuda.available` (compute capability 8.0+, PyTorch 2.5+, a
   probe on the device passed; ``LINQUANT_TINYGEMM=0`` turns it off): PyTorch's tinygemm
   (``torch._weight_int4pack_mm``) on a layout built once (:mod:`linquant.kernels.cuda`). In a
   CUDA graph it matched the Triton GEMV at one token on the H200 (0.0211 against 0.0210 ms,
   8192 x 8192 g128), and eagerly it took 0.024 ms where a Triton launch alone cost the host
   30 us (``QuantLinear`` on Triton: 0.114 ms).
2. ``cuda_dequant``, opt-in: where ``LINQUANT_CUDA_DEQUANT_MIN_M`` is set and ``x`` has at
   least that many tokens (bf16 / fp16, inputs ``cuda_triton`` takes): one Triton kernel
   decodes the whole weight into a bf16 / fp16 buffer (the reference's bits), then cuBLAS
   (``F.linear``): the output is the reference's, bit for bit. This materializes the float
   weight per call, which the fused kernels avoid; estimated at about 0.87x cuBLAS bf16 at
   2048 tokens on 8192 x 8192 against the tiled kernel's measured 0.59x, not yet timed
   (:func:`linquant.kernels.triton_linear.linear_dequant`).
3. ``cuda_triton`` whenever Triton 3.2 or later imports (:func:`triton_status`) and
   :func:`linquant.kernels.triton_linear.supported` holds (4- / 8-bit codes, group-wise with a
   group of whole 32-bit words, per-output-channel or per-tensor parameters, any mode:
   symmetric, integer zero point, float offset; bf16 / fp16 activations, fp32 only for one
   token; ``K`` a multiple of 8 / 4; no autograd through ``x``): Triton kernels that unpack and
   dequantize inside the matmul (a GEMV for one token, a split-K ``tl.dot`` kernel up to 64
   tokens, a tiled autotuned ``tl.dot`` GEMM beyond), on a layout cached in the layer's
   ``cache``. Checked against the reference in Triton's interpreter (half-precision
   tolerance) and on an H200 (BENCHMARKS.md, "GPU").
4. Otherwise ``reference``.

W8A8 (:func:`linear_w8a8`, chosen by :func:`select_w8a8_path`) on CPU, first match wins (the
int8 paths need a CPU with VNNI and ``K <= cpu.ONEDNN_MAX_K``; an input that needs its gradient
takes the same path inside an autograd function whose backward is straight-through,
:class:`_KernelW8A8`):

0. ``cpu_native_w8a8``, every ``M``, where :func:`linquant.kernels.native.w8a8_supported`
   (Linux x86-64 with AVX512-VNNI and a C compiler: linquant's own kernel, compiled on first
   use): activation quantization (dynamic or static), an int8 GEMM with ``vpdpbusd`` and the
   rescale in one call, bit-identical to the reference. It replaces the dozen small torch ops
   around the GEMMs below: on 4096 x 4096 1.1-1.3x faster than the dispatcher's choice among
   them at M = 1-256 (and 1.0-1.1x ``quantize_dynamic``), on MiniLM's 1536 x 384 and
   384 x 1536 1.5-3x faster at M = 13-1920 (``benchmarks/bench_w8a8_crossover.py``).
0b. ``cpu_native_w8a8_avx2``, every ``M`` (``NATIVE_W8A8_AVX2_MAX_M``), where the VNNI kernel
   does not run and :func:`linquant.kernels.native.w8a8_avx2_supported` holds (any x86-64 CPU
   with AVX2 and a C compiler): the same call, layout and bits with ``vpmaddubsw`` /
   ``vpmaddwd`` / ``vpaddd``, exact with 8-bit activation codes because each token's codes are
   split so that no int16 pair sum can saturate (a sparse remainder is multiplied separately;
   see :mod:`linquant.kernels.native`). On CPUs without VNNI the paths below are unavailable
   or slow:
   oneDNN's int8 GEMM (behind ``torch._int_mm`` and ``cpu_onednn``) saturates int16 pair sums
   there, so ``reference`` falls back to an exact int32 product
   (:func:`linquant.kernels.reference.cpu_int_mm_exact`), 20-50x slower. With every library
   capped at AVX2 on this machine it ran 0.99x / 0.93x / 0.97x the speed of fbgemm's
   ``quantize_dynamic`` at M = 1 / 16 / 256 (head to head, Gaussian activations; fbgemm there
   quantizes activations to 7 bits so its own AVX2 sums cannot saturate).
1. ``reference`` at ``M < ONEDNN_MIN_M`` (one token): one ``torch._int_mm`` plus a rescale. It
   streams the weight at memory speed and needs no second copy of it; fbgemm measured about the
   same (4096 x 4096: 0.71-0.84 vs 0.68-0.85 ms over three runs) and oneDNN slower (1.0-1.15).
2. ``cpu_fbgemm``: ``M <= FBGEMM_MAX_M`` (8), or ``M <= FBGEMM_MAX_M_SMALL`` (32) for weights
   under ``SMALL_WEIGHT_NUMEL`` (1M) elements, and PyTorch's quantized engine is ``x86`` or
   ``fbgemm`` (the default): fbgemm's int8 GEMM, the one behind
   ``torch.ao.quantization.quantize_dynamic``, on a weight prepacked once. Against oneDNN
   (``benchmarks/bench_w8a8_crossover.py``, three runs): on 4096 x 4096 and 4096 x 11008
   fbgemm is 1.1-1.6x faster at M = 2-8 and even to 0.9x from M = 12 to 32; on MiniLM's
   1536 x 384 and 384 x 1536 it is 1.1-1.6x faster up to M = 32 in most runs (0.83-0.9x in
   two of eighteen cells). ``torch._int_mm`` takes 3-5 ms at M = 2-16 on 4096 x 4096.
3. ``cpu_onednn``: oneDNN's int8 GEMM (``torch.ops.onednn.qlinear_pointwise``) on a weight
   prepacked once into its blocked layout. 3.5x faster than ``torch._int_mm`` at M = 16 and
   1.4x at M = 256 here (``_int_mm`` appears to re-layout the ``[N, K]`` weight on every call:
   the same weight stored as ``[K, N]`` made it 1.9x faster at M = 16, and 3x slower at
   M = 1), and 5-15% faster than fbgemm from M = 64 up.

The ``M`` thresholds come from ``python benchmarks/bench_linear.py`` and a sweep of both
backends over M = 2..32 on four shapes (BENCHMARKS.md).

All three are bit-identical to the reference. Each prepacked weight is kept in the layer's
cache: a second copy of the int8 weight per backend, so a layer run both below and above the
fbgemm threshold holds two (``layer.kernel_cache().clear()`` drops them).

W8A8 on CUDA: ``cuda_triton_w8a8`` whenever Triton 3.2 or later imports and
:func:`linquant.kernels.triton_w8a8.supported` holds (fp32 / fp16 / bf16 activations, a row-major
int8 weight on the same device, no autograd through ``x``): a Triton activation-quantization
kernel and an int8 ``tl.dot`` GEMM with the rescale in its epilogue, bit-identical to the
reference by construction (checked in Triton's interpreter and on an H200; 1.39-1.53x cuBLAS
bf16 from 1024 tokens there). Eager calls keep a plan per input signature
(:func:`linquant.kernels.triton_w8a8.runner`), as on the CPU. Otherwise ``reference``.

Embedding lookups (:func:`embedding_weight_only`, chosen by :func:`select_embedding_path`):
``cpu_native_gather`` for CPU tables where the AVX2 library builds, in eager mode (the AVX2
library's ``lq_dequant_gather``: the gathered rows only, in one pass, the reference's bits);
otherwise, and while ``torch.compile`` traces, ``reference`` (PyTorch ops over the gathered
rows' bytes, group parameters applied per group). An eager ``QuantEmbedding`` checks its
indices once and then runs its plan for the index signature (:func:`embedding_runner`). On
all-MiniLM-L6-v2's int4 g32 word table (30522 x 384), 480 / 1920 ids: native 0.13 / 0.48 ms,
reference 0.9 / 1.9 ms (2.0 / 10.2 ms before it gathered whole rows' bytes; BENCHMARKS.md).

Layers pass a ``cache`` dict they own (:class:`linquant.nn.base.KernelCache`, which
``copy.deepcopy`` and pickling leave empty): repacked kernel layouts are built on first use and
kept there (never in ``state_dict``; the file format stays canonical). The cache key includes the
weight tensors' storage pointers and version counters, so a device move or an in-place load
rebuilds it. The same cache keeps plans (:mod:`linquant.kernels.plans`): the first eager call
for an input signature (shape, dtype, device, bias object) on a CPU or CUDA input keeps the
chosen path as a closure with the weight's layout and the bias bound, and repeat calls with
the same, unmodified weight tensors and bias run it without the checks above
(:func:`linear_weight_only`, on CUDA for both paths, and :func:`linear_w8a8`;
``QuantLinear.forward`` looks its plan up before building anything). Inputs or a bias that
need a gradient never use or make a plan.
"""

from __future__ import annotations

from typing import Any

import torch

from linquant.kernels import (
    _triton_env,
    cpu,
    cuda,
    native,
    plans,
    reference,
    triton_linear,
    triton_w8a8,
)
from linquant.kernels.reference import (
    int8_matmul,
    int_mm_supported,
    quantize_activation_per_tensor,
    quantize_activation_per_token,
)
from linquant.tensor import QuantizedTensor

__all__ = [
    "BLOCKED_MAX_M",
    "EMBEDDING_PATHS",
    "FBGEMM_MAX_M",
    "FBGEMM_MAX_M_SMALL",
    "INT4PACK_MAX_M",
    "INT8PACK_MAX_M",
    "INT8SPLIT_MAX_M",
    "INT8SPLIT_MIN_M",
    "MIN_FAST_NUMEL",
    "NATIVE_AVX2_MAX_M",
    "NATIVE_AVX2_MAX_M_FP32",
    "NATIVE_INT4_MAX_M",
    "NATIVE_W8A8_AVX2_MAX_M",
    "NATIVE_W8A16_MAX_M",
    "ONEDNN_MIN_M",
    "PATHS",
    "SMALL_WEIGHT_NUMEL",
    "W8A8_PATHS",
    "conv1d_weight_only",
    "conv2d_weight_only",
    "conv_weight_only",
    "embedding_runner",
    "embedding_weight_only",
    "int8_matmul",
    "int_mm_supported",
    "linear_w8a8",
    "linear_weight_only",
    "quantize_activation_per_tensor",
    "quantize_activation_per_token",
    "reference",
    "select_embedding_path",
    "select_path",
    "select_w8a8_path",
    "triton_status",
]

def triton_status() -> str:
    """Whether the CUDA paths' Triton kernels can run: ``"available: triton X"``, or
    ``"unavailable: <why>"`` (not installed, or older than 3.2, the oldest they are tested
    with); see :mod:`linquant.kernels._triton_env`."""
    return _triton_env.status()


PATHS = ("reference", "cpu_native_int4", "cpu_native_w8a16", "cpu_native_avx2", "cpu_int4pack",
         "cpu_int8split", "cpu_int8pack", "cpu_blocked", "cpu_scratch", "cuda_tinygemm",
         "cuda_dequant", "cuda_triton")
EMBEDDING_PATHS = ("reference", "cpu_native_gather")
W8A8_PATHS = ("reference", "cpu_native_w8a8", "cpu_native_w8a8_avx2", "cpu_fbgemm", "cpu_onednn",
              "cuda_triton_w8a8")
INT4PACK_MAX_M = 64
NATIVE_INT4_MAX_M = 256
NATIVE_W8A16_MAX_M = 256
NATIVE_AVX2_MAX_M = 32  # where the CPU multiplies x.dtype in hardware; no limit otherwise
NATIVE_AVX2_MAX_M_FP32 = 64
INT8PACK_MAX_M = 32
INT8SPLIT_MIN_M = 2
INT8SPLIT_MAX_M = 128
BLOCKED_MAX_M = 128
SMALL_WEIGHT_NUMEL = 1 << 20
MIN_FAST_NUMEL = 1 << 16
ONEDNN_MIN_M = 2
FBGEMM_MAX_M = 8
FBGEMM_MAX_M_SMALL = 32
NATIVE_W8A8_AVX2_MAX_M = 1 << 30  # every M (see select_w8a8_path's table)


def _avx2_max_m(dtype: torch.dtype) -> int | float:
    """Up to how many tokens ``cpu_native_avx2`` runs ``dtype`` activations."""
    if dtype == torch.float32:
        return NATIVE_AVX2_MAX_M_FP32
    return NATIVE_AVX2_MAX_M if native.fast_half_matmul(dtype) else float("inf")


def select_path(x: torch.Tensor, qweight: QuantizedTensor) -> str:
    """Which implementation :func:`linear_weight_only` uses for ``x`` and ``qweight``."""
    if x.device.type == "cuda":
        ok = triton_linear.triton_available() and triton_linear.supported(qweight, x)
        if cuda.supported(qweight, x) and x.numel() // int(qweight.shape[1]) <= (
                cuda.TINYGEMM_MAX_M if ok else cuda.TINYGEMM_MAX_M_NO_TRITON):
            return "cuda_tinygemm"
        if ok and triton_linear.dequant_chosen(qweight, x):
            return "cuda_dequant"
        return "cuda_triton" if ok else "reference"
    if (x.device.type != "cpu" or qweight.device.type != "cpu" or len(qweight.shape) != 2
            or x.numel() == 0 or x.dtype not in reference.COMPUTE_DTYPES
            or qweight.numel < MIN_FAST_NUMEL
            or (x.requires_grad and torch.is_grad_enabled())):
        return "reference"
    m = x.numel() // int(qweight.shape[1])
    if m <= NATIVE_INT4_MAX_M and native.supported(qweight, x.dtype):
        return "cpu_native_int4"
    if m <= NATIVE_W8A16_MAX_M and native.w8a16_supported(qweight, x.dtype) and (
            m > 1 or qweight.numel >= SMALL_WEIGHT_NUMEL
            or not cpu.int8pack_supported(qweight, x.dtype)):
        return "cpu_native_w8a16"
    if (m <= _avx2_max_m(x.dtype) and native.avx2_supported(qweight, x.dtype)
            and (m > 1 or qweight.numel >= SMALL_WEIGHT_NUMEL
                 or not cpu.int8pack_supported(qweight, x.dtype))):
        return "cpu_native_avx2"
    if cpu.int4pack_supported(qweight, x.dtype) and m < INT4PACK_MAX_M:
        return "cpu_int4pack"
    if (qweight.numel >= SMALL_WEIGHT_NUMEL and m <= INT8SPLIT_MAX_M
            and cpu.int8split_supported(qweight, x.dtype)
            and (m >= INT8SPLIT_MIN_M or not cpu.int8pack_supported(qweight, x.dtype))):
        return "cpu_int8split"
    if cpu.int8pack_supported(qweight, x.dtype) and m < INT8PACK_MAX_M:
        return "cpu_int8pack"
    if m < BLOCKED_MAX_M or (x.dtype in (torch.float32, torch.float64)
                             and qweight.numel >= SMALL_WEIGHT_NUMEL):
        return "cpu_blocked"
    return "cpu_scratch"


def _cpu_runner(path: str, x: torch.Tensor, qweight: QuantizedTensor,
                bias: torch.Tensor | None, cache: dict[str, Any]) -> native.Runner:
    """``path`` (a CPU path of :func:`select_path`) for ``qweight`` and ``bias`` as a function
    of inputs of ``x``'s signature, everything weight-dependent bound: what a plan runs."""
    if path == "cpu_native_int4":
        return native.int4_runner(qweight, bias, cache)
    if path == "cpu_native_w8a16":
        return native.w8a16_runner(qweight, bias, cache)
    if path == "cpu_native_avx2":
        return native.avx2_runner(qweight, bias, x.dtype, cache)
    if path == "cpu_scratch":
        return cpu.scratch_runner(qweight, bias, x.dtype)
    if path == "cpu_blocked":
        return cpu.blocked_runner(qweight, bias)
    if path == "cpu_int4pack":
        return lambda x: cpu.linear_int4pack(x, qweight, bias, cache)
    if path == "cpu_int8split":
        return lambda x: cpu.linear_int8split(x, qweight, bias, cache)
    if path == "cpu_int8pack":
        return lambda x: cpu.linear_int8pack(x, qweight, bias, cache)
    return lambda x: reference.linear_weight_only(x, qweight, bias)


def select_w8a8_path(
    x: torch.Tensor, w_int8: torch.Tensor, act_scale: torch.Tensor | None = None
) -> str:
    """Which implementation :func:`linear_w8a8` uses for ``x`` and the int8 weight ``[N, K]``."""
    if x.device.type == "cuda" and triton_w8a8.supported(x, w_int8):
        return "cuda_triton_w8a8"
    if (x.device.type != "cpu" or x.numel() == 0 or w_int8.numel() < MIN_FAST_NUMEL
            or (x.requires_grad and torch.is_grad_enabled())):
        return "reference"
    if native.w8a8_supported(x, w_int8):
        return "cpu_native_w8a8"
    m = x.numel() // int(w_int8.shape[1])
    if m <= NATIVE_W8A8_AVX2_MAX_M and native.w8a8_avx2_supported(x, w_int8):
        return "cpu_native_w8a8_avx2"
    if not cpu.onednn_supported(x, w_int8):
        return "reference"
    if m < ONEDNN_MIN_M:
        return "reference"
    small = w_int8.numel() < SMALL_WEIGHT_NUMEL
    if m <= (FBGEMM_MAX_M_SMALL if small else FBGEMM_MAX_M) and cpu.fbgemm_available():
        return "cpu_fbgemm"
    return "cpu_onednn"


def _bias_needs_grad(bias: torch.Tensor | None) -> bool:
    return bias is not None and bias.requires_grad and torch.is_grad_enabled()


def _through_autograd_function(x: torch.Tensor, empty: bool = False) -> bool:
    """Whether ``x`` needs its gradient and goes through :class:`_KernelLinear` /
    :class:`_KernelW8A8` (eager, a float input with elements, or ``empty`` too: the static W8A8
    reference has no path from an empty ``x`` to its output, so ``x.grad`` stayed None)."""
    return (x.requires_grad and torch.is_grad_enabled() and x.dtype in reference.COMPUTE_DTYPES
            and (empty or x.numel() > 0) and not torch.compiler.is_compiling())


def _versions(tensors: tuple[torch.Tensor | None, ...]) -> list[int | None]:
    """The version counters alone (a move of the bytes, ``share_memory_()``, changes no value
    the backward reads)."""
    return [None if v is None else v[0] for v in (cpu._version(t) for t in tensors
                                                  if t is not None)]


def _check_unmodified(tensors: tuple[torch.Tensor | None, ...], versions: list[int | None]
                      ) -> None:
    """Raise where a weight tensor a backward reads changed in place since its forward, as
    autograd does for the tensors it saves."""
    if _versions(tensors) != versions:
        raise RuntimeError("linquant: a quantized weight needed for gradient computation was "
                           "modified in place between the forward and the backward")


class _KernelLinear(torch.autograd.Function):
    """``linear_weight_only(x, qweight, bias, cache)`` for an ``x`` that needs its gradient: the
    forward runs the dispatcher's fast path (grad is off inside ``forward``), the backward the
    reference's ``grad_x = grad_y @ qweight.dequantize(x.dtype)`` (the weight dequantized then,
    not kept from the forward: an in-place change in between raises, as autograd's saved
    tensors do). ``bias`` must not need a gradient (the caller adds such a bias after). The
    backward is plain PyTorch ops, so it is differentiable itself: Hessians, Hessian-vector
    products and gradient penalties (``create_graph=True``) see through the layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: QuantizedTensor,  # type: ignore[override]
                bias: torch.Tensor | None, cache: dict[str, Any] | None) -> torch.Tensor:
        ctx.qweight = qweight
        ctx.x_dtype = x.dtype
        ctx.versions = _versions(plans.weight_tensors(qweight))
        return linear_weight_only(x, qweight, bias, cache)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        _check_unmodified(plans.weight_tensors(ctx.qweight), ctx.versions)
        w = ctx.qweight.dequantize(ctx.x_dtype)
        return grad_y.to(ctx.x_dtype) @ w, None, None, None


def linear_weight_only(
    x: torch.Tensor,
    qweight: QuantizedTensor,
    bias: torch.Tensor | None = None,
    cache: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Weight-only linear ``x [..., K] -> [..., N]`` in ``x.dtype``; see
    :func:`reference.linear_weight_only` (the formula) and :func:`select_path` (the choice).

    ``cache``: a dict owned by the caller (a layer) where repacked layouts are kept."""
    device = x.device.type if isinstance(x, torch.Tensor) else None
    if cache is not None and device == "cuda":
        p = plans.find(x, plans.weight_tensors(qweight), bias, cache, "cuda_plans")
        if p is not None:
            return p.run(x)
        y = triton_linear.planned(x, qweight, bias, cache)  # a repeat call: no checks again
        if y is not None:
            return y
    elif cache is not None and device == "cpu":
        y = plans.replay(x, plans.weight_tensors(qweight), bias, cache, "cpu_plans")
        if y is not None:
            return y
    if device == "cpu" and _through_autograd_function(x):
        after = _bias_needs_grad(bias)
        out: torch.Tensor = _KernelLinear.apply(  # type: ignore[no-untyped-call]
            x, qweight, None if after else bias, cache)
        return out + bias.to(x.dtype) if after and bias is not None else out
    path = select_path(x, qweight) if device is not None else "reference"
    plan = (cache is not None and not _bias_needs_grad(bias)
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling())
    if (path == "cuda_tinygemm" and not cuda.has_layout(qweight, cache)
            and not cuda.room_for(qweight)):
        # no room for another copy of the codes: what the dispatcher would pick without it
        ok = triton_linear.triton_available() and triton_linear.supported(qweight, x)
        path = "cuda_triton" if ok else "reference"
    if path == "cuda_tinygemm":
        try:
            if not plan:
                return cuda.linear_tinygemm(x, qweight, bias, cache)
            assert cache is not None
            run = cuda.runner(qweight, bias, cache)
            y = run(x)
        except torch.cuda.OutOfMemoryError:
            raise  # not the operator's fault: no note against it
        except RuntimeError as e:  # not seen; a model keeps running on the other paths
            cuda.note_failure(qweight, x, e)
            return linear_weight_only(x, qweight, bias, cache)
        plans.keep(cache, "cuda_plans", x, qweight, bias, run, path)
        return y
    if plan and device == "cpu":
        assert cache is not None
        run = _cpu_runner(path, x, qweight, bias, cache)
        plans.keep(cache, "cpu_plans", x, qweight, bias, run, path)
        return run(x)
    if path.startswith("cpu_native") and _bias_needs_grad(bias):
        assert bias is not None  # the native kernels add the bias inside, out of autograd's view
        return linear_weight_only(x, qweight, None, cache) + bias.to(x.dtype)
    if path == "cuda_triton":
        return triton_linear.linear(x, qweight, bias, cache)
    if path == "cuda_dequant":
        return triton_linear.linear_dequant(x, qweight, bias, cache)
    if path == "cpu_native_int4":
        return native.linear_int4(x, qweight, bias, cache)
    if path == "cpu_native_w8a16":
        return native.linear_w8a16(x, qweight, bias, cache)
    if path == "cpu_native_avx2":
        return native.linear_avx2(x, qweight, bias, cache)
    if path == "cpu_int4pack":
        return cpu.linear_int4pack(x, qweight, bias, cache)
    if path == "cpu_int8split":
        return cpu.linear_int8split(x, qweight, bias, cache)
    if path == "cpu_int8pack":
        return cpu.linear_int8pack(x, qweight, bias, cache)
    if path == "cpu_blocked":
        return cpu.linear_blocked(x, qweight, bias)
    if path == "cpu_scratch":
        return cpu.linear_scratch(x, qweight, bias)
    return reference.linear_weight_only(x, qweight, bias)


def _inside(x: torch.Tensor, act_scale: torch.Tensor | None,
            act_zero_point: torch.Tensor | None) -> torch.Tensor | None:
    """Static activations: where ``x``'s code was not clamped (None for dynamic ones)."""
    if act_scale is None:
        return None
    t = torch.round(x.float() / act_scale.float()).nan_to_num(0.0)
    if act_zero_point is None:
        return t.abs() <= reference.ACT_QMAX
    t = t + act_zero_point.float()
    return (t >= 0) & (t <= 255)


def linear_w8a8_functional(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                           bias: torch.Tensor | None = None,
                           act_scale: torch.Tensor | None = None,
                           act_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_w8a8` in PyTorch ops alone, for ``torch.func`` transforms (``vmap``,
    ``grad``, ``jacrev``, ...), with :class:`_KernelW8A8`'s straight-through gradient: the
    reference's product as the value, ``x @ (w_int8 * w_scale).T`` (masked where a static
    code clamped) for the gradient, the bias added after."""
    y = reference.linear_w8a8(x, w_int8, w_scale, None, act_scale, act_zero_point).detach()
    w = (w_int8.float() * w_scale.float().reshape(-1, 1)).to(x.dtype)
    inside = _inside(x, act_scale, act_zero_point)
    lin = torch.nn.functional.linear(x if inside is None else x * inside.to(x.dtype), w)
    y = y + (lin - lin.detach())
    return y if bias is None else y + bias.to(y.dtype)


class _KernelW8A8(torch.autograd.Function):
    """``linear_w8a8`` for an ``x`` that needs its gradient: the forward is the dispatcher's
    (grad is off inside ``forward``; the int8 codes of the activations carry no gradient, so
    autograd through the reference's ops reached ``x`` only through the per-token scales: one
    element per row got a gradient). The backward is the straight-through estimator:
    ``grad_x = grad_y @ (w_int8 * w_scale)`` in fp32, the activations' rounding taken as the
    identity, and for static scales zero where ``x`` fell outside the calibrated range (its
    code clamped), as ``torch.fake_quantize_per_tensor_affine`` does. ``bias`` must not need a
    gradient (the caller adds such a bias after)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_int8: torch.Tensor,  # type: ignore[override]
                w_scale: torch.Tensor, bias: torch.Tensor | None,
                act_scale: torch.Tensor | None, act_zero_point: torch.Tensor | None,
                cache: dict[str, Any] | None) -> torch.Tensor:
        ctx.weight = (w_int8, w_scale)
        ctx.versions = _versions(ctx.weight)
        ctx.x_dtype = x.dtype
        ctx.inside = _inside(x, act_scale, act_zero_point)
        return linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        w_int8, w_scale = ctx.weight
        _check_unmodified(ctx.weight, ctx.versions)
        n = int(w_int8.shape[0])
        w = w_int8.float() * w_scale.float().reshape(n, 1)
        gx = grad_y.float() @ w
        if ctx.inside is not None:
            gx = gx * ctx.inside
        return gx.to(ctx.x_dtype), None, None, None, None, None, None


def linear_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    cache: dict[str, Any] | None = None,
) -> torch.Tensor:
    """int8 weights x int8 activations; see :func:`reference.linear_w8a8` (the formula) and
    :func:`select_w8a8_path` (the choice). ``cache``: as for :func:`linear_weight_only`
    (plans included: every path for CPU inputs, ``cuda_triton_w8a8`` for CUDA inputs)."""
    device = x.device.type if isinstance(x, torch.Tensor) else None
    if cache is not None and device in ("cpu", "cuda"):
        y = plans.replay(x, (w_int8, w_scale, act_scale, act_zero_point), bias, cache,
                         "w8a8_plans")
        if y is not None:
            return y
    if device is not None and _through_autograd_function(x, empty=True):
        after = _bias_needs_grad(bias)
        out: torch.Tensor = _KernelW8A8.apply(  # type: ignore[no-untyped-call]
            x, w_int8, w_scale, None if after else bias, act_scale, act_zero_point, cache)
        return out + bias.to(x.dtype) if after and bias is not None else out
    path = select_w8a8_path(x, w_int8, act_scale) if device is not None else "reference"
    if (cache is not None and (device == "cpu" or path == "cuda_triton_w8a8")
            and not _bias_needs_grad(bias)
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()):
        run = _w8a8_runner(path, x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)
        n, k = (int(d) for d in w_int8.shape)
        plans.keep(cache, "w8a8_plans", x, ((w_int8, w_scale, act_scale, act_zero_point), n, k),
                   bias, run, path)
        return run(x)
    if path.startswith("cpu_native_w8a8") and _bias_needs_grad(bias):
        assert bias is not None
        return (linear_w8a8(x, w_int8, w_scale, None, act_scale, act_zero_point, cache)
                + bias.to(x.dtype))
    if path == "cpu_native_w8a8":
        return native.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)
    if path == "cpu_native_w8a8_avx2":
        return native.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache,
                                  native.W8A8_AVX2)
    if path == "cpu_fbgemm":
        return cpu.linear_w8a8_fbgemm(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)
    if path == "cpu_onednn":
        return cpu.linear_w8a8_onednn(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)
    if path == "cuda_triton_w8a8":
        return triton_w8a8.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)
    return reference.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point)


def _w8a8_runner(path: str, x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, act_scale: torch.Tensor | None,
                 act_zero_point: torch.Tensor | None, cache: dict[str, Any]) -> native.Runner:
    """``path`` (a path of :func:`select_w8a8_path`) as a function of inputs of ``x``'s
    signature alone: what a W8A8 plan runs."""
    if path == "cuda_triton_w8a8":
        return triton_w8a8.runner(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache)
    if path == "cpu_native_w8a8":
        return native.w8a8_runner(w_int8, w_scale, bias, act_scale, act_zero_point, cache)
    if path == "cpu_native_w8a8_avx2":
        return native.w8a8_runner(w_int8, w_scale, bias, act_scale, act_zero_point, cache,
                                  native.W8A8_AVX2)
    if path == "cpu_fbgemm":
        return lambda x: cpu.linear_w8a8_fbgemm(x, w_int8, w_scale, bias, act_scale,
                                                act_zero_point, cache)
    if path == "cpu_onednn":
        return lambda x: cpu.linear_w8a8_onednn(x, w_int8, w_scale, bias, act_scale,
                                                act_zero_point, cache)
    return lambda x: reference.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point)


def select_embedding_path(ids: torch.Tensor, qweight: QuantizedTensor, dtype: torch.dtype) -> str:
    """Which implementation :func:`embedding_weight_only` uses: ``cpu_native_gather`` for CPU
    indices into a CPU table with bf16 / fp16 / fp32 output, where the AVX2 library builds
    (:func:`linquant.kernels.native.gather_supported`), else ``reference`` (also while
    ``torch.compile`` traces: the reference's ops compile with the rest of the model)."""
    if (ids.device.type == "cpu" and not torch.compiler.is_compiling()
            and native.gather_supported(qweight, dtype)):
        return "cpu_native_gather"
    return "reference"


def embedding_weight_only(
    ids: torch.Tensor, qweight: QuantizedTensor, dtype: torch.dtype
) -> torch.Tensor:
    """Gather and dequantize rows of a quantized table: ``F.embedding(ids,
    qweight.dequantize(dtype))``, without dequantizing the whole table.

    Paths (:func:`select_embedding_path`): ``cpu_native_gather``, the AVX2 library's
    ``lq_dequant_gather``, one pass over the gathered rows' codes (the same bits as the
    reference; on all-MiniLM-L6-v2's 30522 x 384 int4 g32 table, 480 ids: see
    BENCHMARKS.md); ``reference`` (:func:`reference.embedding_weight_only`: a handful of
    PyTorch ops over the gathered codes) elsewhere. Both raise on indices outside the table.
    """
    if select_embedding_path(ids, qweight, dtype) == "cpu_native_gather":
        out = native.dequantize_rows(qweight, ids, dtype)
        if out is not None:
            return out.reshape(*ids.shape, qweight.shape[1])
    return reference.embedding_weight_only(ids, qweight, dtype)


def embedding_runner(ids: torch.Tensor, qweight: QuantizedTensor, dtype: torch.dtype
                     ) -> tuple[str, native.Runner]:
    """The path :func:`embedding_weight_only` takes for ``ids`` and a function ``ids ->
    rows`` that runs it with the table bound: what ``QuantEmbedding``'s plans run. **The
    native gather reads the indices unchecked**: the caller checks they are in ``[0, N)``
    first (``QuantEmbedding.forward`` does, with the layer's name in the error)."""
    path = select_embedding_path(ids, qweight, dtype)
    if path == "cpu_native_gather":
        run = native._gatherer(qweight, dtype)
        if run is not None:
            return path, run
    return "reference", lambda ids: reference.embedding_weight_only(ids, qweight, dtype)


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
    """1-D or 2-D convolution with a quantized weight (by the rank of ``weight_shape``); see
    :func:`reference.conv_weight_only`."""
    return reference.conv_weight_only(
        x, qweight, weight_shape, bias, stride, padding, dilation, groups
    )


conv1d_weight_only = conv2d_weight_only = conv_weight_only
