"""W8A8 linear on CUDA with Triton: int8 activation quantization + int8 GEMM, fused rescale.

Two kernels per call (sources in :mod:`linquant.kernels._triton_jit`):

1. ``act_quant_kernel``: one read of ``x [M, K]``, int8 codes ``[M, K]`` out (plus fp32 scales
   ``[M]`` for dynamic activations). Dynamic: row ``amax``, ``s = max(amax / 127, tiny)``, codes
   ``clamp(round_half_even(x / s), -127, 127)``; static: the layer's scale (and zero point; the
   asymmetric uint8 codes are written minus 128, as the reference feeds its int8 matmul).
2. ``w8a8_gemm_kernel``: ``tl.dot`` int8 x int8 -> int32 over the ``[N, K]`` row-major weight
   (K-major for both operands, the layout Hopper's 8-bit ``wgmma`` takes), grouped tile order,
   and the rescale in the epilogue in the reference's order: dynamic ``(acc * s_a[m]) * s_w[n]``,
   static ``acc * (s_a * s_w[n])`` (asymmetric: ``acc - (z - 128) * rowsum(W)[n]`` first, the
   int32 row sums kept in the layer's cache), ``+ bias``, one cast to ``x.dtype``.

Exactness: codes and scales are bit-identical to
:func:`linquant.kernels.reference.quantize_activation_per_token` /
:func:`~linquant.kernels.reference.quantize_activation_per_tensor` on the same device (IEEE
division, round half to even, torch's CUDA rule for dividing by a Python number: multiply by the
fp32 reciprocal; see :mod:`linquant.kernels._triton_jit`), the int32 accumulation is exact and
the epilogue rounds each step as torch's separate ops do (no FMA contraction), so the output is
expected to equal :func:`linquant.kernels.reference.linear_w8a8` exactly. What was checked:
exact equality in Triton's interpreter (CPU, triton 3.9) for every config, and an ahead-of-time
compile of every kernel and config with triton 3.6 for sm_90 (PTX/SASS read: 64+-row tiles use
``wgmma ... s32.s8.s8``, no register spills, no FFMA in the epilogue), and on an NVIDIA H200
(Triton 3.6) the ``cuda`` tests: outputs identical to the reference.

Tile configs: large ``M`` (>= 128) autotunes among 128x256x128, 256x128x128, 128x128x128,
128x256x64, 64x256x128 and 128x128x64 (3-5 stages, 4-8 warps), chosen for Hopper (wgmma wants
``BLOCK_M`` a multiple of 64 per warpgroup; int8 tiles of 128 bytes along K fill a 128-byte
shared-memory swizzle); small ``M`` uses 16/32/64-row tiles with ``BLOCK_K`` 128-256 (memory
bound on the weight). The autotuning key is ``M`` rounded up to a power of two (capped at
8192), ``N`` and ``K``; the first call per key compiles and times every kept config (seconds),
and results are cached on disk (``cache_results``). ``K`` not a multiple of 16 is correct but
slow: rows are then not 16-byte aligned, Triton cannot pipeline the loads, and the sm_90 compile
spills registers. Measured on an H200 (BENCHMARKS.md, "GPU"), 8192 x 8192 with the activation
quantization: 1.39x / 1.53x / 1.53x cuBLAS bf16 at M = 1024 / 2048 / 4096 (CUDA graphs);
the 4-stage 128x256 / 256x128 tiles were added after the first run there.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from linquant.errors import LinquantError
from linquant.kernels import _triton_env
from linquant.kernels.cpu import _version
from linquant.kernels.reference import INT32_MAX_K, eager_probe

__all__ = [
    "CONFIGS",
    "divides_by_reciprocal",
    "interpreting",
    "linear_w8a8",
    "quantize_activations",
    "runner",
    "supported",
    "triton_available",
]

Cache = dict[str, Any]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); GROUP_M is 8 for all.
CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (128, 256, 128, 4, 8),
    (256, 128, 128, 4, 8),
    (128, 128, 128, 4, 4),
    (128, 256, 64, 4, 8),
    (64, 256, 128, 4, 4),
    (128, 128, 64, 5, 4),
    (16, 64, 256, 4, 4),
    (32, 64, 256, 4, 4),
    (64, 64, 256, 4, 4),
    (16, 128, 128, 4, 4),
)
GROUP_M = 8
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One row per tile while it fits (one read of x); longer rows take two passes over K.
MAX_SINGLE_K = 16384
_TILE = 8192  # elements per activation-quantization program
_TINY = float(torch.finfo(torch.float32).tiny)


def triton_available() -> bool:
    """Whether Triton imports and is recent enough (:mod:`linquant.kernels._triton_env`)."""
    return _triton_env.available()


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run in Triton's interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _int8_mma(index: int) -> bool:
    # Triton's int8 tl.dot needs int8 tensor-core MMA: Ampere (sm_80) or newer is assumed here
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _device_ok(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return _int8_mma(t.device.index if t.device.index is not None else
                         torch.cuda.current_device())
    return t.device.type == "cpu" and interpreting()


def supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether :func:`linear_w8a8` runs ``x [..., K]`` with the int8 weight ``[N, K]`` here.

    Needs triton, a CUDA device of compute capability 8.0 or newer (or CPU tensors under
    ``TRITON_INTERPRET=1``), fp32/fp16/bf16 ``x`` with elements, no autograd through ``x``, a
    row-major int8 ``[N, K]`` weight on the same device with ``K <= INT32_MAX_K``.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(w_int8, torch.Tensor)):
        return False
    if (w_int8.dtype != torch.int8 or w_int8.dim() != 2 or x.dim() == 0
            or x.dtype not in FLOAT_DTYPES or x.numel() == 0 or x.device != w_int8.device
            or not _device_ok(x)):
        return False
    n, k = (int(d) for d in w_int8.shape)
    if (n == 0 or k == 0 or x.shape[-1] != k or k > INT32_MAX_K or w_int8.stride(1) != 1
            or w_int8.stride(0) < k):
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    return triton_available()


def _jit() -> Any:
    from linquant.kernels import _triton_jit

    return _triton_jit


def divides_by_reciprocal(device: torch.device) -> bool:
    """torch's rule for ``tensor / python_number`` on ``device``, which the kernels follow: CUDA
    multiplies by the reciprocal rounded to fp32 (``BinaryDivTrueKernel.cu``), CPU divides."""
    return device.type == "cuda"


@eager_probe
def _recip127() -> float:
    # torch on CUDA divides by a Python number as a * (1 / b) with 1 / b rounded to fp32
    return float(torch.ones((), dtype=torch.float32) / 127)


def _act_launch(m: int, k: int) -> tuple[int, int, int, bool]:
    """``(rows per program, BLOCK_K, num_warps, single)`` for activations ``[m, k]``."""
    block = next_pow2(k)
    if block <= MAX_SINGLE_K:
        rows = max(1, min(_TILE // block, next_pow2(m)))
        warps = 8 if rows * block >= 4096 else 4
        return rows, block, warps, True
    return 1, 4096, 8, False


Launch = tuple[Any, dict[str, Any]]  # a kernel indexed by its grid, and its keyword arguments


def _act_launcher(m: int, k: int, mode: int, device: torch.device) -> Launch:
    """``act_quant_kernel`` for ``[m, k]`` activations in ``mode`` (0 dynamic, 1 static
    symmetric, 2 static asymmetric): called as ``kern(x2, q, scales, sa, za, m, k, x2.stride(0),
    **kw)``."""
    rows, block, warps, single = _act_launch(m, k)
    kern = _jit().act_quant_kernel[(_cdiv(m, rows),)]
    return kern, dict(INV=_recip127(), TINY=_TINY, MODE=mode,
                      RECIP=divides_by_reciprocal(device), ROWS=rows, BLOCK_K=block,
                      SINGLE=single, num_warps=warps, enable_fp_fusion=False)


def _gemm_launcher(m: int, n: int, k: int, mode: int, has_bias: bool,
                   config: tuple[int, int, int, int, int] | None) -> Launch:
    """``w8a8_gemm_kernel`` for ``M = m``: autotuned (``config`` None, on a GPU; the default
    config inside a CUDA graph capture before its first tuned launch), or ``config`` (in the
    interpreter, :func:`default_config`). Called with the arguments of :func:`gemm`'s
    ``args``."""
    tune = config is None and not interpreting()
    bm, bn, bk, stages, warps = config or default_config(m)
    fixed = _jit().w8a8_gemm_kernel[(_cdiv(m, bm) * _cdiv(n, bn),)]
    fixed_kw = dict(MODE=mode, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    GROUP_M=GROUP_M, EVEN_K=k % bk == 0, num_stages=stages, num_warps=warps,
                    enable_fp_fusion=False)
    if not tune:
        return fixed, fixed_kw

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    # the default config inside a CUDA graph capture before any tuned launch
    # (_triton_env.tuned_or_fixed): the autotuner cannot time its candidates there
    tuned = functools.partial(_tuned_kernel()[grid], MODE=mode, HAS_BIAS=has_bias,
                              enable_fp_fusion=False)
    return _triton_env.tuned_or_fixed(tuned, functools.partial(fixed, **fixed_kw)), {}


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def quantize_activations(
    x2: torch.Tensor,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[M, K]`` and scales of the 2-D ``x2`` (last dim contiguous), by the kernel.

    Dynamic (``act_scale is None``): ``(codes, scales fp32 [M, 1])``, bit-identical to
    :func:`linquant.kernels.reference.quantize_activation_per_token`. Static symmetric: the codes
    of :func:`~linquant.kernels.reference.quantize_activation_per_tensor`; static asymmetric: its
    uint8 codes minus 128 as int8. The second value is then ``act_scale`` as a 1-element fp32.
    """
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = (int(d) for d in x2.shape)
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    if act_scale is None:
        mode, scales = 0, torch.empty(m, dtype=torch.float32, device=x2.device)
        sa = za = scales
    else:
        scales = act_scale.reshape(1).to(device=x2.device, dtype=torch.float32)
        sa = scales
        if act_zero_point is None:
            mode, za = 1, scales
        else:
            mode, za = 2, act_zero_point.reshape(1).to(x2.device)
    kern, kw = _act_launcher(m, k, mode, x2.device)
    with on_device(x2):
        kern(x2, q, scales, sa, za, m, k, x2.stride(0), **kw)
    if act_scale is None:
        return q, scales.reshape(m, 1)
    return q, scales


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(t.device)`` for CUDA tensors (Triton launches on the current device),
    a no-op otherwise."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _rowsum(w_int8: torch.Tensor, cache: Cache | None) -> torch.Tensor:
    """int32 ``rowsum(W) [N]``, kept in ``cache["triton_w8a8_rowsum"]`` while ``w_int8`` is the
    same tensor object, unmodified (the entry holds a reference to it)."""
    name = "triton_w8a8_rowsum"
    if cache is not None:
        hit = cache.get(name)
        if hit is not None and hit[0] is w_int8 and hit[1] == _version(w_int8):
            return hit[2]  # type: ignore[no-any-return]
    rs = w_int8.sum(dim=1, dtype=torch.int32).contiguous()
    if cache is not None:
        cache[name] = (w_int8, _version(w_int8), rs)
    return rs


def _m_key(m: int) -> int:
    return min(max(16, next_pow2(m)), 8192)


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Configs worth timing for this ``M``: tiles no taller than M (16 at least); for M >= 128
    only the 64+ row tiles (Hopper wgmma)."""
    mk = int(named_args["M_KEY"])
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mk)
            and (mk < 128 or c.kwargs["BLOCK_M"] >= 64)]
    return keep or list(configs)


def default_config(m: int) -> tuple[int, int, int, int, int]:
    """The config used without autotuning (interpreter): the first that :func:`_prune` keeps."""
    mk = _m_key(m)
    for c in CONFIGS:
        if c[0] <= max(16, mk) and (mk < 128 or c[0] >= 64):
            return c
    return CONFIGS[0]


@functools.cache
def _tuned_kernel() -> Any:
    return build_tuned_kernel()


def build_tuned_kernel(do_bench: Any = None, cache_results: bool = True) -> Any:
    """The autotuned GEMM (configs :data:`CONFIGS` pruned by ``M``, ``EVEN_K`` by heuristic).
    ``do_bench``: triton's timing function by default (tests pass a stand-in: the interpreter
    has no timer). ``cache_results``: keep the timings in Triton's on-disk cache (a test that
    counts the timed candidates turns it off: on a GPU another process may have tuned the same
    key already)."""
    import triton

    jit = _jit()
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
                      num_stages=st, num_warps=nw)
        for bm, bn, bk, st, nw in CONFIGS
    ]
    heur = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(
        jit.w8a8_gemm_kernel)
    return triton.autotune(configs=configs, key=["M_KEY", "N", "K"],
                           prune_configs_by={"early_config_prune": _prune},
                           **_triton_env.autotune_options(do_bench, cache_results))(heur)


def gemm(
    a_q: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    mode: int,
    rowsum: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """The GEMM + epilogue kernel on int8 codes ``a_q [M, K]``: ``y [M, N]`` in ``out_dtype``.

    ``mode`` 0 dynamic (``a_scale`` fp32 ``[M]``), 1 static symmetric, 2 static asymmetric
    (``a_scale`` fp32 ``[1]``; mode 2 needs ``rowsum`` int32 ``[N]`` and ``zero_point``).
    ``config``: one of :data:`CONFIGS` to skip autotuning (the interpreter never autotunes).
    """
    m, k = (int(d) for d in a_q.shape)
    n = int(w_int8.shape[0])
    y = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    ws = w_scale.reshape(n).to(device=a_q.device, dtype=torch.float32).contiguous()
    b = ws if bias is None else bias.reshape(n).to(a_q.device).contiguous()
    rs = ws if rowsum is None else rowsum
    za = ws if zero_point is None else zero_point.reshape(1).to(a_q.device)
    kern, kw = _gemm_launcher(m, n, k, mode, bias is not None, config)
    with on_device(a_q):
        kern(a_q, w_int8, y, a_scale, ws, b, rs, za, m, n, k, _m_key(m),
             a_q.stride(0), w_int8.stride(0), y.stride(0), **kw)
    return y


def linear_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    cache: Cache | None = None,
    *,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """:func:`linquant.kernels.reference.linear_w8a8` by the Triton kernels (same arguments;
    call only where :func:`supported` is True). ``cache``: a dict owned by the layer, where the
    weight's int32 row sums (static asymmetric activations) are kept. ``config``: force one of
    :data:`CONFIGS` (tests)."""
    return runner(x, w_int8, w_scale, bias, act_scale, act_zero_point, cache, config=config)(x)


def runner(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    cache: Cache | None = None,
    *,
    config: tuple[int, int, int, int, int] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`linear_w8a8` for inputs of ``x``'s shape, dtype and device, as a function of the
    input alone: the launch shapes, the weight scales and bias as the kernels read them, the
    row sums and both kernels (grid bound) are prepared here once; each call allocates the codes,
    scales and output and launches the two kernels. What a W8A8 plan on CUDA runs
    (:func:`linquant.kernels.linear_w8a8`): a plan is kept per input signature, and replayed
    only while the weight tensors and the bias are the same objects, unmodified."""
    if act_scale is None and act_zero_point is not None:
        raise LinquantError("linear_w8a8: act_zero_point needs act_scale (static activations)")
    n, k = (int(d) for d in w_int8.shape)
    dev, out_dtype, lead = x.device, x.dtype, tuple(x.shape[:-1])
    m = x.numel() // k
    if act_scale is None:
        mode, sa, za, rowsum = 0, None, None, None
    else:
        sa = act_scale.reshape(1).to(device=dev, dtype=torch.float32)
        if act_zero_point is None:
            mode, za, rowsum = 1, sa, None
        else:
            mode, za = 2, act_zero_point.reshape(1).to(dev)
            rowsum = _rowsum(w_int8, cache)
    act, act_kw = _act_launcher(m, k, mode, dev)
    ws = w_scale.reshape(n).to(device=dev, dtype=torch.float32).contiguous()
    b = ws if bias is None else bias.reshape(n).to(dev).contiguous()
    rs = ws if rowsum is None else rowsum
    zg = ws if mode != 2 else za
    mm_kern, mm_kw = _gemm_launcher(m, n, k, mode, bias is not None, config)
    mkey = _m_key(m)

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(m, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        q = torch.empty(m, k, dtype=torch.int8, device=dev)
        y = torch.empty(m, n, dtype=out_dtype, device=dev)
        with on_device(x2):
            if sa is None:
                scales = torch.empty(m, dtype=torch.float32, device=dev)
                act(x2, q, scales, scales, scales, m, k, x2.stride(0), **act_kw)
            else:
                scales = sa
                act(x2, q, sa, sa, za, m, k, x2.stride(0), **act_kw)
            mm_kern(q, w_int8, y, scales, ws, b, rs, zg, m, n, k, mkey, q.stride(0),
                    w_int8.stride(0), y.stride(0), **mm_kw)
        return y.reshape(*lead, n)

    return run
