"""linquant's own CPU kernels, compiled on first use with the system's C compiler.

Four kernels, each in its own shared library with its own CPU requirement (Linux x86-64):

* ``w4a16`` (``csrc/w4a16_bf16.c``, path ``cpu_native_int4``): 4-bit group-wise or per-channel
  weights with bf16 activations, on CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
  Lake / Sapphire Rapids and later). It decodes the codes to bf16 inside the product and
  multiplies with ``vdpbf16ps``, reading the weight once per call: PyTorch's
  ``_weight_int4pack_mm_for_cpu`` spends about five vector instructions per weight and repeats
  its decoding for every 4 tokens, this kernel three per 64 weights, once per 8 tokens.
  Numerics: ``y = sum_g s * dot_g + (b - 128 s) * sum_g x`` with ``dot_g = sum x * (128 + q)``
  accumulated in fp32 from exact bf16 products; the dequantized weight is never rounded to bf16
  (the reference rounds it), the bias is added in fp32 after rounding it to bf16 as the
  reference does, and the sum is rounded once to bf16. The ``128`` offset costs about 4 of
  fp32's 24 bits, far below bf16's 8. ``vdpbf16ps`` treats bf16 subnormals (below 1.2e-38) as
  zero. Tokens whose group sums are not finite send the call to the reference.
* ``w8a8`` (``csrc/w8a8.c``, path ``cpu_native_w8a8``): int8 activations (dynamic per token or
  static) times int8 weights on CPUs with AVX512-VNNI: the activation quantization, the int8
  GEMM (``vpdpbusd``) and the rescale in one call, **bit-identical** to
  :func:`linquant.kernels.reference.linear_w8a8` (same float operations in the same order,
  exact int32 sums; compiled with ``-ffp-contract=off``). Dynamic tokens holding Inf or NaN
  send the call to the reference.
* ``w8a8_avx2`` (``csrc/w8a8_avx2.c``, path ``cpu_native_w8a8_avx2``): the same entry point,
  layout and bits as ``w8a8``, on any x86-64 CPU with AVX2: the int8 product by
  ``vpmaddubsw`` (u8 x s8, int16 pair sums with saturation), ``vpmaddwd`` and ``vpaddd``,
  three instructions per 32 products, with 8-bit activation codes and every sum exact. The u8
  operand is ``w + 128``; each token's codes are shifted to their midpoint where they span at
  most 128, and split into ``d' + e``: every pair of ``d'`` has opposite signs or
  ``|d0| + |d1| <= 128`` (so ``255 * 128`` bounds its sum), and the sparse remainder ``e``
  (0.3-3% of a token's 4-k chunks on all-MiniLM-L6-v2, about 1.5% for Gaussian codes) is
  multiplied against the same weight chunks. A call whose remainders exceed 30% of its chunks
  (codes spread evenly over the range) takes the sign form instead: ``|w|`` times the code
  carrying the weight's sign, four instructions per 32 products. Static asymmetric codes reach
  -128, which the sign form cannot take; past 50% (post-ReLU / GELU activations with a small
  zero point, most codes near ``a = z``) they take ``vpmaddwd`` on int16. All three forms are
  bit-identical. ``lq_w8a8_prepare`` (the quantization and split alone) and ``lq_w8a8_form``
  (the rule) are exported for the tests.
* ``avx2`` (``csrc/wa16_avx2.c``, path ``cpu_native_avx2``): 4- or 8-bit weights, any mode, in
  groups of whole 32-bit words of codes, per output channel or per tensor, with bf16, fp16 or
  fp32 activations, on any x86-64 CPU with AVX2, FMA and F16C (Intel Haswell and later, AMD
  Zen 1 and later): the weight-only kernel for CPUs without AVX-512, and for what the AVX-512
  kernels do not take (fp16 and fp32 activations, 8-bit asymmetric or group-wise weights).
  Each 32-bit word holds ``32 / bits`` codes of one output channel; ``(word & mask_j)`` is the
  code times ``2^(bits j)``, converted to fp32 exactly, and the ``2^-(bits j)`` is folded into
  a prepared copy of the activations, so each 8 weights cost one AND, one conversion and one
  FMA per token. Numerics: each token is first scaled by a power of two into ``[1, 2)``
  (exact); the products ``x u`` are exact for 16-bit activations (fp32 ones are rounded once,
  into the sum, by the FMA); sums are fp32 per group, ``y = 2^p (sum_g s dot_g + o xs_g) +
  bias`` in fp32, rounded once to ``x.dtype``; the dequantized weight is never rounded to 16
  bits. For fp32 activations the codes are centered (``u - 2^(bits - 1)``, one more
  subtraction per 8 weights), so that a symmetric weight's sums carry no offset times ``sum x``
  whose rounding would cost fp32 results about 4 bits. Tokens holding Inf or NaN send the call
  to the reference. The same library holds ``lq_dequant_rows``, the dequantizer of the
  large-M paths (``cpu_scratch``, ``cpu_blocked``; see :func:`_dequantizer`): any width, mode
  and granularity, read from the stored tensors in place, into bf16 / fp16 / fp32, **the same
  bits** as the PyTorch ops it replaces (NaN stays NaN), in one pass instead of several, with
  AVX-512 code chosen at run time where the CPU has it (:func:`wide_dequant`: 16 codes per
  vector, 4-bit groups by a 16-entry table per group; the library itself stays AVX2); and
  ``lq_dequant_gather``, the same per-row code for the rows an embedding lookup gathers
  (:func:`dequantize_rows`, the ``cpu_native_gather`` path of ``QuantEmbedding``).

Building: the first call that needs a kernel compiles its C source with ``$CC`` (default
``cc``) and ``-O3 -ffp-contract=off -fopenmp`` plus ``-mavx512f -mavx512bw -mavx512vl`` and
``-mavx512bf16`` / ``-mavx512vnni``, or ``-mavx2 -mfma -mf16c`` / ``-mavx2``, into
``$LINQUANT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/linquant`` or ``~/.cache/linquant``), under
a name hashed from the sources, flags and compiler, written to a temporary file and renamed
into place (older builds of the same kernel there are removed); later processes load it. Builds
take 0.5-1.5 s each with gcc 12 on the 2-core test VM, except ``avx2``'s (about 11 s: its
many specialised loops), once per installed version. The two W8A8 libraries also compile
``csrc/w8a8_layout.c``, their shared weight layout builder (``lq_w8a8_repack``); the W4A16
library builds its layout itself (``lq_w4a16_repack``). Both run once per layer, on its first
call, 5-10x faster than the same rearrangement with PyTorch ops.
The library then runs a probe against plain PyTorch (the W8A8 probe demands bit-identity).
``LINQUANT_NATIVE=0`` turns all four off; ``LINQUANT_MAX_CPU_ISA=avx2`` turns off the two that
need AVX-512 (and makes :func:`fast_half_matmul` say no), to see what a CPU without AVX-512
gets. Without a compiler, off Linux x86-64, without the CPU feature, or when the build or the
probe fails, :func:`available` is False, :func:`status` says why, and the dispatcher uses
PyTorch's kernels (a failed build also warns once). OpenMP threads
come from the ``libgomp`` that PyTorch loaded, so ``torch.set_num_threads`` applies.

Threads split the weight's row blocks (16 or 8 output channels each). ``w8a8``, ``w8a8_avx2``
and ``avx2`` take the tokens in chunks of about 1 MiB of prepared activations (``CHUNK_BYTES``
in each source; 248 tokens at K = 4096 for the int8 codes, 56 for ``avx2``'s fp32 copy): each
thread runs its row blocks over one chunk, which then stays in its L2, before the next, instead
of streaming every token again for each row block. The chunks are whole tiles of 8 tokens and
each thread keeps its row blocks, so the results are the same bits as in one pass. They
matter only past a few hundred tokens (``benchmarks/bench_chunks.py``: the same kernels built
with and without them, at K = 4096 1.0x up to 1024 tokens, 1.01-1.27x at 2048 and 1.22-1.32x
at 7680; see BENCHMARKS.md). ``w4a16`` runs up to 256 tokens only (the dispatcher's
cap) and has no chunks.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from linquant.errors import LinquantError
from linquant.kernels import _cpuinfo, cpu, reference
from linquant.tensor import QuantizedTensor

__all__ = [
    "W8A8_AVX2",
    "W8A8_MAX_K",
    "Runner",
    "available",
    "avx2_runner",
    "avx2_supported",
    "cache_dir",
    "dequantize_rows",
    "fast_half_matmul",
    "gather_supported",
    "int4_runner",
    "linear_avx2",
    "linear_int4",
    "linear_w8a8",
    "linear_w8a16",
    "repack",
    "repack_avx2",
    "repack_codes_torch",
    "repack_w8a8",
    "repack_w8a8_torch",
    "status",
    "supported",
    "w8a8_avx2_supported",
    "w8a8_supported",
    "w8a16_runner",
    "w8a16_supported",
    "wide_dequant",
]

BASE_FLAGS = ("-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp",
              "-shared", "-fPIC")
BLOCK_N = 16  # output channels per block (one fp32 / int32 vector)
W4A16, W8A8, AVX2, W8A8_AVX2 = "w4a16", "w8a8", "avx2", "w8a8_avx2"

_lock = threading.Lock()
_state: dict[str, dict[str, Any]] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LINQUANT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/linquant``, else ``~/.cache/linquant``."""
    env = os.environ.get("LINQUANT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "linquant"


def _cpu_has_avx512_bf16() -> bool:
    return _cpuinfo.has("avx512_bf16")


def _cpu_has_avx512_vnni() -> bool:
    return _cpuinfo.has("avx512") and _cpuinfo.has("vnni")


def _isa_capped() -> bool:
    """``LINQUANT_MAX_CPU_ISA=avx2``: behave as on a CPU without AVX-512 (benchmarks, tests)."""
    return os.environ.get("LINQUANT_MAX_CPU_ISA", "").strip().lower() == "avx2"


def fast_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16 / fp16) matrices in hardware: AVX512-BF16 or
    AMX for bf16, AMX-FP16 for fp16 (False under ``LINQUANT_MAX_CPU_ISA=avx2``). Without it
    PyTorch's half-precision matmul runs at a third of fp32's speed or less, and the AVX2
    kernel stays ahead of the dequantizing paths at every token count."""
    if _isa_capped():
        return False
    if dtype == torch.bfloat16:
        return _cpuinfo.has("avx512_bf16") or _cpuinfo.has("amx_tile")
    if dtype == torch.float16:
        return _cpuinfo.has("amx_fp16")
    return False


def wide_dequant() -> bool:
    """Whether the dequantizers (``lq_dequant_rows``, ``lq_dequant_gather``) run their AVX-512
    code (F, BW and VL: Intel Skylake-SP and later servers, AMD Zen 4 and later; not under
    ``LINQUANT_MAX_CPU_ISA=avx2``). Same bits either way; the AVX-512 code is about twice as
    fast (BENCHMARKS.md)."""
    return not _isa_capped() and _cpuinfo.has("avx512")


def _cpu_has_avx2_fma() -> bool:
    """AVX2 with FMA and F16C (every x86-64 CPU since Intel Haswell and AMD Zen 1)."""
    flags = _cpuinfo.cpuinfo_flags()
    return _cpuinfo.has("avx2") and "fma" in flags and "f16c" in flags


def _compile(compiler: str, flags: tuple[str, ...], src: Path | Sequence[Path],
             out: Path) -> None:
    """Compile ``src`` (one source or several) into ``out`` atomically: a temporary file in the
    same folder, flushed to disk, then renamed (a crash never leaves a half-written library
    under the final name)."""
    srcs = [str(src)] if isinstance(src, Path) else [str(p) for p in src]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, "-o", tmp, *srcs], capture_output=True,
                              text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prune(out: Path) -> None:
    """Remove builds of the same kernel from other sources, flags or compilers next to ``out``
    (a process still using one keeps its mapping; another linquant version rebuilds its own)."""
    stem = out.name.rsplit("_", 1)[0]
    for old in out.parent.glob(f"{stem}_*.so"):  # the hash only: w8a8's stem begins w8a8_avx2's
        if old != out and re.fullmatch(rf"{re.escape(stem)}_[0-9a-f]{{16}}\.so", old.name):
            with contextlib.suppress(OSError):
                old.unlink()


def _probe_weight_only(lib: ctypes.CDLL, run: Callable[..., torch.Tensor | None],
                       build: Callable[[QuantizedTensor], Any], schemes: tuple[str, ...],
                       dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> str | None:
    """Small products through a weight-only kernel (``run(lib, x, qt, build(qt), None)``)
    against plain PyTorch, with activations of each of ``dtypes``; the problem, or None."""
    from linquant.tensor import quantize

    g = torch.Generator().manual_seed(0)
    for scheme in schemes:
        qt = quantize(torch.randn(40, 64, generator=g), scheme)
        for dtype in dtypes:
            x = torch.randn(9, 64, generator=g).to(dtype)
            want = x.double() @ qt.dequantize(torch.float64).T
            got = run(lib, x, qt, build(qt), None)
            if got is None:
                return "probe: the kernel reported non-finite sums on finite input"
            err = float((got.double() - want).abs().max())
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            if not err <= tol * float(want.abs().max()):
                return f"probe ({scheme}, {dtype}): max error {err:.3g} against plain PyTorch"
    return None


def _probe_w8a8(lib: ctypes.CDLL) -> str | None:
    """Extreme and random codes through the kernel, bit-identical to the reference or not, on
    the library's layout (checked against PyTorch's: a ragged block of rows, K % 4 != 0)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (40, 70), generator=g, dtype=torch.int8)
    w[0], w[1] = 127, -128
    layout, want = repack_w8a8(w, lib), repack_w8a8_torch(w)
    if not all(torch.equal(a, b) for a, b in zip(layout[:2], want[:2], strict=True)):
        return "probe: the layout differs from PyTorch's"
    ws = torch.rand(40, 1, generator=g) + 0.5
    x = torch.randn(9, 70, generator=g) * 3
    x[0] = 5.0
    x[1] = -5.0
    # Gaussian codes, then codes spread evenly (w8a8_avx2.c's two forms)
    for xi in (x, torch.rand(9, 70, generator=g) * 6 - 3):
        got = _run_w8a8(lib, xi, w, ws, None, None, None, layout)
        if got is None or not torch.equal(got, reference.linear_w8a8(xi, w, ws)):
            return "probe: result differs from the reference"
    return None


def _probe_dequant(lib: ctypes.CDLL) -> str | None:
    """The dequantizer against PyTorch's (``cpu._RowDequant``), bit for bit: AVX2, one code at
    a time, and the AVX-512 code (table and arithmetic) where the CPU has it."""
    from linquant.tensor import quantize

    g = torch.Generator().manual_seed(0)
    for wide in sorted({False, wide_dequant()}):
        for scheme, k in (("int4-asym-g32-fp16", 64), ("int8-sym-ch0", 64), ("int3-sym-g8", 24),
                          ("int4-sym-g16", 64)):
            qt = quantize(torch.randn(12, k, generator=g), scheme)
            torch_deq = cpu._RowDequant(qt, native=False)
            fast = _dequantizer(qt, lib, wide)
            for dtype in (torch.bfloat16, torch.float32):
                want = torch.empty(12, k, dtype=dtype)
                got = torch.empty(12, k, dtype=dtype)
                torch_deq.into(want, 0, 12)
                how = f"{scheme}, {dtype}, {'AVX-512' if wide else 'AVX2'}"
                if fast is None or not fast(got, 0, 12) or not torch.equal(got, want):
                    return f"probe: dequantized {how} differs from PyTorch's"
                rows = torch.tensor([11, 0, 5, 5, 3])
                gathered = dequantize_rows(qt, rows, dtype, lib, wide)
                if gathered is None or not torch.equal(gathered, want[rows]):
                    return f"probe: gathered rows of {how} differ from PyTorch's"
    return None


def _probe_avx2(lib: ctypes.CDLL) -> str | None:
    return (_probe_weight_only(lib, _run_avx2, repack_avx2,
                               ("int4-asym-g32-fp16", "int8-sym-ch0", "int8-asymf-g32"),
                               (torch.bfloat16, torch.float32))
            or _probe_dequant(lib))


_PROBES: dict[str, Callable[[ctypes.CDLL], str | None]] = {
    W4A16: lambda lib: _probe_weight_only(lib, _run, lambda qt: repack(qt, lib=lib),
                                          ("int4-asym-g32-fp16", "int4-sym-g32-fp16")),
    W8A8: _probe_w8a8,
    AVX2: _probe_avx2,
    W8A8_AVX2: _probe_w8a8,
}


@dataclasses.dataclass(frozen=True)
class _Spec:
    source: str
    flags: tuple[str, ...]
    cpu_ok: Any  # () -> bool
    cpu_need: str
    symbols: dict[str, tuple[Any, ...]]  # function name -> argtypes (all return int64)
    extra: tuple[str, ...] = ()  # more sources compiled into the library (shared code)


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_REPACK_W8A8 = (_P, _P, _P, _I, _I, _I)
_SPECS = {
    W4A16: _Spec("w4a16_bf16.c", (*BASE_FLAGS, "-mavx512bf16"), lambda: _cpu_has_avx512_bf16(),
                 "AVX512-BF16",
                 {"lq_w4a16_bf16": (_P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I),
                  "lq_w4a16_repack": (_P, _P, _I, _I, _I)}),
    W8A8: _Spec("w8a8.c", (*BASE_FLAGS, "-mavx512vnni"), lambda: _cpu_has_avx512_vnni(),
                "AVX512-VNNI",
                {"lq_w8a8": (_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _F, _I),
                 "lq_w8a16": (_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I),
                 "lq_w8a8_repack": _REPACK_W8A8}, ("w8a8_layout.c",)),
    AVX2: _Spec("wa16_avx2.c",
                (*(f for f in BASE_FLAGS if not f.startswith("-mavx512")),
                 "-mavx2", "-mfma", "-mf16c"),
                lambda: _cpu_has_avx2_fma(), "AVX2, FMA and F16C",
                {"lq_wa16_avx2": (_P, _P, _P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _I, _I, _I,
                                  _I, _I),
                 "lq_dequant_rows": (_P, _P, _I, _P, _P, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I,
                                     _I, _I),
                 "lq_dequant_gather": (_P, _P, _I, _P, _P, _I, _I, _I, _I, _P, _I, _P, _I, _I,
                                       _I, _I, _I),
                 "lq_dequant_kind": (_I, _I, _I, _I, _I)}),
    W8A8_AVX2: _Spec("w8a8_avx2.c",
                     (*(f for f in BASE_FLAGS if not f.startswith("-mavx512")), "-mavx2"),
                     lambda: _cpuinfo.has("avx2"), "AVX2",
                     {"lq_w8a8": (_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _F, _I),
                      "lq_w8a8_prepare": (_P, _P, _P, _I, _I, _I, _F, _I),
                      "lq_w8a8_form": (_I, _I, _I, _I),
                      "lq_w8a8_repack": _REPACK_W8A8}, ("w8a8_layout.c",)),
}


def _load(kernel: str = W4A16) -> ctypes.CDLL | None:
    st = _state.get(kernel)
    if st is not None:
        lib: ctypes.CDLL | None = st["lib"]
        return lib
    if reference.functorch_active():
        # not built, nor probed, inside vmap / grad: the probe's PyTorch ops would fail there
        # and the failure would turn the kernel off for the process (not cached: a later
        # call outside the transform builds it)
        return None
    with _lock:
        if kernel in _state:
            return _state[kernel]["lib"]  # type: ignore[no-any-return]
        spec = _SPECS[kernel]
        st = {"lib": None, "reason": "", "path": ""}
        _state[kernel] = st
        reason = _why_not(spec)
        if reason:
            st["reason"] = reason
            return None
        compiler = shutil.which(os.environ.get("CC") or "cc")
        assert compiler is not None
        try:
            csrc = resources.files("linquant.kernels") / "csrc"
            srcs = [csrc / name for name in (spec.source, *spec.extra)]
            text = b"".join(s.read_bytes() for s in srcs)
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                     timeout=60, check=False).stdout.splitlines()[:1]
            tag = hashlib.sha256(text + repr((spec.flags, version, compiler)).encode())
            out = cache_dir() / f"linquant_{spec.source[:-2]}_{tag.hexdigest()[:16]}.so"
            if not out.exists():
                with contextlib.ExitStack() as stack:
                    paths = [Path(stack.enter_context(resources.as_file(s))) for s in srcs]
                    _compile(compiler, spec.flags, paths, out)
                _prune(out)
            lib = ctypes.CDLL(str(out))
            for symbol, argtypes in spec.symbols.items():
                fn = getattr(lib, symbol)
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int64
            with torch.autocast("cpu", enabled=False):  # the probe's own dtypes: under a
                # caller's autocast its ops failed, and the kernel was off for the process
                problem = _PROBES[kernel](lib)
        except Exception as e:  # a build problem must not break the library: fall back
            problem = f"build failed: {type(e).__name__}: {e}"
        if problem:
            st["reason"] = problem
            warnings.warn(f"linquant: native {kernel.upper()} kernel disabled ({problem}); using "
                          "PyTorch's kernels", RuntimeWarning, stacklevel=3)
            return None
        st["lib"], st["path"] = lib, str(out)
        return lib


def _why_not(spec: _Spec) -> str:
    if os.environ.get("LINQUANT_NATIVE", "1").strip() in ("0", "false", "off", "no"):
        return "turned off by LINQUANT_NATIVE"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    if _isa_capped() and any(f.startswith("-mavx512") for f in spec.flags):
        return "capped at AVX2 by LINQUANT_MAX_CPU_ISA"
    if not spec.cpu_ok():
        return f"this CPU lacks {spec.cpu_need}"
    if shutil.which(os.environ.get("CC") or "cc") is None:
        return f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH"
    return ""


def available(kernel: str = W4A16) -> bool:
    """The kernel (``"w4a16"`` or ``"w8a8"``) is built (or was already), loaded and passed its
    probe (builds on first call)."""
    return _load(kernel) is not None


def status(kernel: str = W4A16) -> str:
    """``"available: <path>"`` or ``"unavailable: <reason>"`` (builds on first call)."""
    if kernel not in _SPECS:
        raise LinquantError(f"native.status: unknown kernel {kernel!r}; one of "
                            f"{', '.join(sorted(_SPECS))}")
    if _load(kernel) is not None:
        return f"available: {_state[kernel]['path']}"
    return f"unavailable: {_state[kernel]['reason']}"


def _reset() -> None:
    """Forget the loaded libraries and the reasons (tests)."""
    with _lock:
        _state.clear()


def supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether :func:`linear_int4` handles ``qt`` with ``dtype`` activations (builds the kernel on
    first call): 4-bit, group-wise (group a multiple of 4 dividing ``K``) or per output channel,
    any mode (symmetric, integer zero point, float offset), ``K % 4 == 0``, bf16 activations."""
    s = qt.scheme
    if not (qt.device.type == "cpu" and dtype == torch.bfloat16 and len(qt.shape) == 2
            and s.bits == 4
            and (s.granularity == "group" or (s.granularity == "channel" and s.axis % 2 == 0))):
        return False
    k = int(qt.shape[1])
    g = int(s.group_size or k)
    return k % 4 == 0 and g % 4 == 0 and k % g == 0 and available()


Layout = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]


def repack(qt: QuantizedTensor, compact: bool | None = None,
           lib: ctypes.CDLL | None = None) -> Layout:
    """``(codes, scales, offsets, compact)`` in the kernel's layout (see the C source): codes
    uint8 ``[ceil(N / 16), K / 4, 32]``; per group and row, as ``[ceil(N / 16), K / g, 16]``:
    fp32 scales ``s`` and fp32 offsets ``b - 128 s`` (with ``w = s q + b``), or, ``compact``,
    when the scales are exact in fp16 and there is no float offset: fp16 scales and uint8
    ``128 + z`` (zero point ``z``; 8 for symmetric codes), 3 bytes instead of 8. Rows past ``N``
    are zero. ``compact=None`` picks it where possible; False forces the fp32 format. The codes
    are rearranged by the library's ``lq_w4a16_repack`` (``lib``, else the loaded library), or
    by :func:`repack_codes_torch` where there is none: the same bytes."""
    n, k = (int(d) for d in qt.shape)
    g = int(qt.scheme.group_size or k)
    nb = -(-n // BLOCK_N)
    pad = nb * BLOCK_N - n
    lib = lib or _load(W4A16)
    if lib is None:
        codes = repack_codes_torch(qt)
    else:
        src = qt.qdata.contiguous()
        assert src.dtype == torch.uint8 and src.numel() * 2 >= n * k  # the rows it reads
        codes = torch.empty(nb, k // 4, 2 * BLOCK_N, dtype=torch.uint8)
        lib.lq_w4a16_repack(src.data_ptr(), codes.data_ptr(), n, k, int(qt.scheme.symmetric))
    scale, zero = cpu.int4_scale_zero(qt)
    half = scale.half()
    possible = qt.offset is None and bool(torch.equal(half.float(), scale))
    if compact and not possible:
        raise LinquantError(f"native.repack: the compact layout needs scales exact in fp16 and no "
                            f"float offset; this weight ({qt.scheme}) has neither or one")
    compact = possible if compact is None else compact
    if compact:
        z = qt.zero_point
        c = (torch.full_like(scale, 136.0) if z is None
             else 128.0 + z.float().reshape(n, k // g))
        scale, offset = half, c.to(torch.uint8)
    else:
        offset = zero - 136.0 * scale  # b - 128 s, with b = zero - 8 s
    if pad:
        scale = torch.cat([scale, scale.new_zeros(pad, k // g)])
        offset = torch.cat([offset, offset.new_zeros(pad, k // g)])

    def per_block(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(nb, BLOCK_N, k // g).permute(0, 2, 1).contiguous()

    return codes, per_block(scale), per_block(offset), compact


def repack_codes_torch(qt: QuantizedTensor) -> torch.Tensor:
    """:func:`repack`'s codes with PyTorch ops (several times slower than the library's)."""
    n, k = (int(d) for d in qt.shape)
    nb = -(-n // BLOCK_N)
    q = cpu.int4_codes(qt)
    if nb * BLOCK_N > n:
        q = torch.cat([q, q.new_zeros(nb * BLOCK_N - n, k)])
    blocks = q.view(nb, BLOCK_N, k // 4, 4)
    lo = blocks[..., 0:2].permute(0, 2, 1, 3).reshape(nb, k // 4, 2 * BLOCK_N)
    hi = blocks[..., 2:4].permute(0, 2, 1, 3).reshape(nb, k // 4, 2 * BLOCK_N)
    return lo.bitwise_or(hi.bitwise_left_shift(4)).contiguous()


def _bias_int4(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the W4A16 kernel takes it: rounded to bf16 as the reference does, in fp32."""
    return None if bias is None else bias.detach().to(torch.bfloat16).float().contiguous()


def _run(lib: ctypes.CDLL, x: torch.Tensor, qt: QuantizedTensor, layout: Layout,
         bias: torch.Tensor | None, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """The kernel on bf16 ``x [..., K]``; None when some group sum is not finite. ``b``: the
    bias already prepared (:func:`_bias_int4`), else it is prepared from ``bias``."""
    n, k = (int(d) for d in qt.shape)
    g = int(qt.scheme.group_size or k)
    codes, scales, offsets, compact = layout
    x2 = x.reshape(-1, k).contiguous()
    m = int(x2.shape[0])
    sums = torch.empty(m, k // g, dtype=torch.float32)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if b is None:
        b = _bias_int4(bias)
    bad = lib.lq_w4a16_bf16(codes.data_ptr(), scales.data_ptr(), offsets.data_ptr(),
                            int(compact), x2.data_ptr(), sums.data_ptr(),
                            None if b is None else b.data_ptr(), y.data_ptr(), m, n, k, g)
    if bad:
        return None
    return y.reshape(*x.shape[:-1], n)


Runner = Callable[[torch.Tensor], torch.Tensor]


def int4_runner(qt: QuantizedTensor, bias: torch.Tensor | None,
                cache: dict[str, Any] | None = None) -> Runner:
    """:func:`linear_int4` for ``qt`` and ``bias`` as a function of ``x`` alone (the library,
    the layout and the prepared bias bound; see :mod:`linquant.kernels.plans`)."""
    lib = _load(W4A16)
    assert lib is not None, "linear_int4 needs available()"
    layout = cpu._cached(cache, "native_int4", cpu._key(qt, torch.bfloat16),
                         lambda: repack(qt))
    b = _bias_int4(bias)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = _run(lib, x, qt, layout, bias, b)
        if y is None:  # Inf / NaN activations (or sums past fp32's range): the reference's result
            return reference.linear_weight_only(x, qt, bias)
        return y

    return run


def linear_int4(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                cache: dict[str, Any] | None = None) -> torch.Tensor:
    """:func:`linquant.kernels.reference.linear_weight_only` for bf16 ``x`` and a 4-bit weight
    (:func:`supported`), on the layout of :func:`repack`, built once and kept in ``cache``."""
    return int4_runner(qt, bias, cache)(x)


# ---- W8A8 ----------------------------------------------------------------------------------------

# u8 x s8 products summed in int32: |sum a w| <= 255 * 128 * K must fit.
W8A8_MAX_K = (2**31 - 1) // (255 * 128)

LayoutW8 = tuple[torch.Tensor, torch.Tensor, int]


def w8a8_supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether :func:`linear_w8a8` handles ``x`` and the int8 weight ``[N, K]`` (builds the
    kernel on first call): CPU tensors, a float ``x``, ``2 <= K <= W8A8_MAX_K``."""
    return (x.device.type == "cpu" and w_int8.device.type == "cpu"
            and x.dtype in reference.COMPUTE_DTYPES and w_int8.dtype == torch.int8
            and w_int8.dim() == 2 and 2 <= int(w_int8.shape[1]) <= W8A8_MAX_K
            and available(W8A8))


def w8a8_avx2_supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether :func:`linear_w8a8` with ``kernel=W8A8_AVX2`` handles ``x`` and the int8 weight
    (builds the AVX2 W8A8 library on first call): as :func:`w8a8_supported`."""
    return (x.device.type == "cpu" and w_int8.device.type == "cpu"
            and x.dtype in reference.COMPUTE_DTYPES and w_int8.dtype == torch.int8
            and w_int8.dim() == 2 and 2 <= int(w_int8.shape[1]) <= W8A8_MAX_K
            and available(W8A8_AVX2))


def repack_w8a8(w_int8: torch.Tensor, lib: ctypes.CDLL | None = None) -> LayoutW8:
    """``(codes, column sums, padded K)``: int8 ``[ceil(N / 16), Kp / 4, 16, 4]`` with ``K``
    padded by zeros to ``Kp``, a multiple of 4 (see the C source), and int32 ``sum_k w[n, k]``
    over ``ceil(N / 16) * 16`` rows (zero past ``N``). Built by ``lq_w8a8_repack``
    (``w8a8_layout.c``) of ``lib``, a W8A8 library, or with PyTorch ops without one: the same
    bytes."""
    n, k = (int(d) for d in w_int8.shape)
    nb, kp = -(-n // BLOCK_N), -(-k // 4) * 4
    if lib is not None:
        src = w_int8.contiguous()
        assert src.dtype == torch.int8
        codes = torch.empty(nb, kp // 4, BLOCK_N, 4, dtype=torch.int8)
        colsum = torch.empty(nb * BLOCK_N, dtype=torch.int32)
        lib.lq_w8a8_repack(src.data_ptr(), codes.data_ptr(), colsum.data_ptr(), n, k, kp)
        return codes, colsum, kp
    return repack_w8a8_torch(w_int8)


def repack_w8a8_torch(w_int8: torch.Tensor) -> LayoutW8:
    """:func:`repack_w8a8` with PyTorch ops (several times slower than the library's)."""
    n, k = (int(d) for d in w_int8.shape)
    nb, kp = -(-n // BLOCK_N), -(-k // 4) * 4
    padded = torch.zeros(nb * BLOCK_N, kp, dtype=torch.int8)
    padded[:n, :k] = w_int8
    codes = padded.view(nb, BLOCK_N, kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    return codes, padded.sum(dim=1, dtype=torch.int32), kp


ParamsW8 = tuple[torch.Tensor, float, int, torch.Tensor | None]


def _w8a8_params(w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 act_scale: torch.Tensor | None, act_zero_point: torch.Tensor | None
                 ) -> ParamsW8 | None:
    """``(per-channel scales, static scale, static zero point, fp32 bias)`` as ``lq_w8a8``
    takes them, or None: a static scale that is not positive (the reference handles it)."""
    n = int(w_int8.shape[0])
    ws = w_scale.reshape(n).float()
    if act_scale is None:
        scale_n, s, z = ws.contiguous(), 0.0, -1
    else:  # the reference's act_scale * ws, in fp32
        scale_n = (act_scale.reshape(1).float() * ws).contiguous()
        s = float(act_scale.reshape(()).float())
        z = -1 if act_zero_point is None else int(act_zero_point.reshape(()).item())
        if not s > 0.0:
            return None
    b = None if bias is None else bias.detach().float().contiguous()
    return scale_n, s, z, b


def _run_w8a8(lib: ctypes.CDLL, x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, act_scale: torch.Tensor | None,
              act_zero_point: torch.Tensor | None, layout: LayoutW8,
              params: ParamsW8 | None = None) -> torch.Tensor | None:
    """The kernel on ``x [..., K]``; None where the reference must answer (a dynamic token
    holding Inf or NaN, a static scale that is not positive). ``params``: prepared by
    :func:`_w8a8_params`, else prepared here."""
    n, k = (int(d) for d in w_int8.shape)
    codes, colsum, kp = layout
    if params is None:
        params = _w8a8_params(w_int8, w_scale, bias, act_scale, act_zero_point)
        if params is None:
            return None
    scale_n, s, z, b = params
    x2 = x.reshape(-1, k).float().contiguous()
    m = int(x2.shape[0])
    # w8a8_avx2.c's Acts at most (w8a8.c uses m * kp); pages are touched only as used
    a = torch.empty(5 * m * kp + 16 * m + 128, dtype=torch.uint8)
    tok = torch.empty(m, dtype=torch.float32)
    zsum = torch.empty(colsum.numel(), dtype=torch.int32)
    y = torch.empty(m, n, dtype=torch.float32)
    bad = lib.lq_w8a8(codes.data_ptr(), colsum.data_ptr(), scale_n.data_ptr(),
                      None if b is None else b.data_ptr(), x2.data_ptr(), a.data_ptr(),
                      tok.data_ptr(), zsum.data_ptr(), y.data_ptr(), m, n, k, kp, s, z)
    if bad:
        return None
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def linear_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    cache: dict[str, Any] | None = None,
    kernel: str = W8A8,
) -> torch.Tensor:
    """:func:`linquant.kernels.reference.linear_w8a8`, bit-identical, in one native call:
    activation quantization (dynamic per token, or static with the given scale and zero point)
    fused with an int8 GEMM and the rescale, on the layout of :func:`repack_w8a8` kept in
    ``cache``: ``kernel`` ``W8A8`` (AVX512-VNNI ``vpdpbusd``) or ``W8A8_AVX2`` (AVX2:
    ``vpmaddubsw`` + ``vpmaddwd`` on split activation codes, exact; see the module docstring).
    Dynamic tokens holding Inf or NaN (and a non-positive static scale) send the call to the
    reference."""
    return w8a8_runner(w_int8, w_scale, bias, act_scale, act_zero_point, cache, kernel)(x)


def w8a8_runner(w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                act_scale: torch.Tensor | None, act_zero_point: torch.Tensor | None,
                cache: dict[str, Any] | None = None, kernel: str = W8A8) -> Runner:
    """:func:`linear_w8a8` for these weights, bias and activation parameters as a function of
    ``x`` alone (the library, the layout and the prepared scales and bias bound). ``kernel``:
    ``W8A8`` (AVX512-VNNI) or ``W8A8_AVX2``; both read the same layout."""
    lib = _load(kernel)
    assert lib is not None, f"linear_w8a8 needs available({kernel!r})"
    layout = cpu._cached(cache, "native_w8a8", cpu._w8a8_key(w_int8),
                         lambda: repack_w8a8(w_int8, lib))
    params = _w8a8_params(w_int8, w_scale, bias, act_scale, act_zero_point)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = None if params is None else _run_w8a8(lib, x, w_int8, w_scale, bias, act_scale,
                                                  act_zero_point, layout, params)
        if y is None:
            return reference.linear_w8a8(x, w_int8, w_scale, bias, act_scale, act_zero_point)
        return y

    return run


# ---- W8A16 (the W8A8 library: activations split into two int8 digits) ---------------------------


def w8a16_supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether :func:`linear_w8a16` handles ``qt`` with ``dtype`` activations (builds the W8A8
    library on first call): 8-bit symmetric weights per output channel or per tensor, bf16 /
    fp16 activations, ``2 <= K <= W8A8_MAX_K``."""
    s = qt.scheme
    return (qt.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and len(qt.shape) == 2 and s.bits == 8 and s.symmetric
            and (s.granularity == "tensor" or (s.granularity == "channel" and s.axis % 2 == 0))
            and 2 <= int(qt.shape[1]) <= W8A8_MAX_K and available(W8A8))


def linear_w8a16(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                 cache: dict[str, Any] | None = None) -> torch.Tensor:
    """W8A16 (:func:`linquant.kernels.reference.linear_weight_only` with bf16 / fp16 ``x`` and
    8-bit symmetric weights) as :func:`linquant.kernels.cpu.linear_int8split` computes it, in one
    native call: each token split into two int8 digits (``x ~= 2**p (d1 + d2 / 128)``, exact for
    bf16 elements within a factor 127 of the token's max, off by at most ``max|x| / 16256``
    otherwise), both digit rows through the VNNI int8 GEMM on the W8A8 layout, combined and
    rescaled in fp32, bias added in fp32, one rounding to ``x.dtype``. Tokens holding Inf or NaN
    send the call to the reference."""
    return w8a16_runner(qt, bias, cache)(x)


def w8a16_runner(qt: QuantizedTensor, bias: torch.Tensor | None,
                 cache: dict[str, Any] | None = None) -> Runner:
    """:func:`linear_w8a16` for ``qt`` and ``bias`` as a function of ``x`` alone (the layout,
    the per-channel scales and the fp32 bias bound)."""
    lib = _load(W8A8)
    assert lib is not None, "linear_w8a16 needs available('w8a8')"
    n, k = (int(d) for d in qt.shape)
    w = qt.qdata.view(torch.int8).view(n, k)
    codes, colsum, kp = cpu._cached(cache, "native_w8a8", cpu._key(qt, torch.int8),
                                    lambda: repack_w8a8(w, lib))
    scale_n = qt.scale.float().reshape(-1).expand(n).contiguous()
    b = None if bias is None else bias.detach().float().contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, k).float().contiguous()
        m = int(x2.shape[0])
        a = torch.empty(2 * m, kp, dtype=torch.uint8)
        pw = torch.empty(m, dtype=torch.float32)
        zsum = torch.empty(colsum.numel(), dtype=torch.int32)
        y = torch.empty(m, n, dtype=torch.float32)
        bad = lib.lq_w8a16(codes.data_ptr(), colsum.data_ptr(), scale_n.data_ptr(),
                           None if b is None else b.data_ptr(), x2.data_ptr(), a.data_ptr(),
                           pw.data_ptr(), zsum.data_ptr(), y.data_ptr(), m, n, k, kp)
        if bad:
            return reference.linear_weight_only(x, qt, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    return run


# ---- weight-only on AVX2 (CPUs without AVX-512) ------------------------------------------------

BLOCK_N_AVX2 = 8  # output channels per block (one fp32 AVX2 vector)
AVX2_MAX_GROUP = 256  # longer groups are split (repack_avx2)
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def avx2_supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether :func:`linear_avx2` handles ``qt`` with ``dtype`` activations (builds the kernel
    on first call): 4- or 8-bit codes, group-wise (a group of whole 32-bit words: a multiple of
    8 / 4 codes) or per output channel or per tensor, any mode, ``K`` a multiple of 8 / 4, bf16,
    fp16 or fp32 activations."""
    s = qt.scheme
    if not (qt.device.type == "cpu" and dtype in _DTYPE_CODES
            and len(qt.shape) == 2 and s.bits in (4, 8)
            and (s.granularity in ("group", "tensor")
                 or (s.granularity == "channel" and s.axis % 2 == 0))):
        return False
    k = int(qt.shape[1])
    g = int(s.group_size or k)
    per = 32 // s.bits
    return k % per == 0 and g % per == 0 and k % g == 0 and available(AVX2)


# the AVX2 layout's formats of the per-group parameters (see its C source)
AVX2_FMT_OFFSET, AVX2_FMT_COMPACT, AVX2_FMT_CENTER = 0, 1, 2
Avx2Layout = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def repack_avx2(qt: QuantizedTensor, compact: bool | None = None) -> Avx2Layout:
    """``(codes, scales, params, fmt)`` in the AVX2 kernel's layout (see its C source): codes
    int32 ``[ceil(N / 8), K * bits / 32, 8]``, the codes of each row and 32-bit word packed from
    the low bits up; per group and row, with ``w = s (u - c) + o_c`` for the unsigned codes
    ``u`` (symmetric codes ``q`` become ``u = q + 2**(bits - 1)``) and ``c`` the code nearest to
    ``w = 0`` (an integer zero point; ``2**(bits - 1)`` for symmetric codes), in one of three
    formats ``fmt``:

    * ``AVX2_FMT_COMPACT`` (scales exact in fp16, no float offset): fp16 scales ``[ceil(N / 8),
      K / g', 8]`` and uint8 centers (the zero points) of the same shape; ``o_c = 0``: 3 bytes;
    * ``AVX2_FMT_CENTER`` (other scales, no float offset): fp32 scales and uint8 centers;
      ``o_c = 0``: 5 bytes;
    * ``AVX2_FMT_OFFSET`` (float offsets ``m``, ``w = s u + m``): fp32 scales, and uint8
      ``[ceil(N / 8), K / g', 40]``: records of 8 rows' fp32 ``o_c = m + c s`` (from fp64,
      ``|o_c| <= s / 2``), then their 8 uint8 centers: 9 bytes.

    ``g'`` is the group, or for groups longer than ``AVX2_MAX_GROUP`` codes (per channel, per
    tensor) the largest divisor of it up to that many, each part with the group's parameters.
    Rows past ``N`` are zero. ``compact=None`` picks the compact format where possible; False
    forces fp32 scales. The codes need no unpacking: see the comment below."""
    n, k = (int(d) for d in qt.shape)
    bits = qt.scheme.bits
    per, g = 32 // bits, int(qt.scheme.group_size or k)
    groups = k // g
    # Groups of more than AVX2_MAX_GROUP codes (per channel, per tensor) are split, each part
    # with the group's parameters: shorter fp32 sums.
    sub = max(d for d in range(per, min(g, AVX2_MAX_GROUP) + 1, per) if g % d == 0)

    def per_row(t: torch.Tensor) -> torch.Tensor:  # per tensor / channel / group -> [N, K / sub]
        return t.float().reshape(-1, groups).expand(n, groups).repeat_interleave(g // sub, dim=1)

    scale = per_row(qt.scale)
    half = scale.half()
    possible = qt.offset is None and bool(torch.equal(half.float(), scale))
    if compact and not possible:
        raise LinquantError(f"native.repack_avx2: the compact layout needs scales exact in fp16 "
                            f"and no float offset; this weight ({qt.scheme}) has neither or one")
    compact = possible if compact is None else compact
    if qt.offset is not None:  # w = s u + m: the code nearest to w = 0 (0 for a zero scale)
        m = per_row(qt.offset).double()
        sd = scale.double()
        c = torch.where(sd > 0, (-m / sd.clamp_min(torch.finfo(torch.float64).tiny)).round(),
                        torch.zeros_like(sd)).clamp_(0, (1 << bits) - 1)
        fmt = AVX2_FMT_OFFSET
    else:
        z = qt.zero_point
        c = per_row(z).double() if z is not None else torch.full_like(
            scale, float(1 << (bits - 1)), dtype=torch.float64)
        fmt = AVX2_FMT_COMPACT if compact else AVX2_FMT_CENTER
    center = c.to(torch.uint8)
    # The stored codes are a little-endian bit stream (linquant.ops.packing), so with K a
    # multiple of P each row is whole 32-bit words already in the kernel's order; symmetric
    # (two's complement) codes c become c + 2^(bits - 1) by flipping each code's top bit.
    data = qt.qdata.reshape(-1)
    if data.data_ptr() % 4:
        data = data.clone()
    words = data.view(torch.int32).view(n, k // per)
    if qt.scheme.symmetric:
        flip = sum((1 << (bits - 1)) << (bits * j) for j in range(per))
        words = words.bitwise_xor(flip - (1 << 32) if flip >= 1 << 31 else flip)
    nb = -(-n // BLOCK_N_AVX2)
    pad = nb * BLOCK_N_AVX2 - n

    def blocked(t: torch.Tensor) -> torch.Tensor:
        if pad:
            t = torch.cat([t, t.new_zeros(pad, int(t.shape[1]))])
        return t.reshape(nb, BLOCK_N_AVX2, -1).permute(0, 2, 1).contiguous()

    params = blocked(center.contiguous())
    if fmt == AVX2_FMT_OFFSET:  # one record per group of 8 rows: 8 fp32 offsets, 8 centers
        offset = (m + c * scale.double()).float()
        params = torch.cat([blocked(offset.contiguous()).view(torch.uint8), params], dim=-1)
    return blocked(words), blocked((half if compact else scale).contiguous()), params, fmt


def _run_avx2(lib: ctypes.CDLL, x: torch.Tensor, qt: QuantizedTensor, layout: Avx2Layout,
              bias: torch.Tensor | None, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """The AVX2 kernel on ``x [..., K]``; None when some token holds Inf or NaN. ``b``: the
    bias already prepared (rounded to ``x.dtype``, in fp32), else prepared from ``bias``."""
    n, k = (int(d) for d in qt.shape)
    codes, scales, params, fmt = layout
    g = k // int(scales.shape[1])  # the layout's (possibly split) group
    x2 = x.reshape(-1, k).contiguous()
    m = int(x2.shape[0])
    # rows 16 floats longer than K: the kernel's 8-token tile reads 8 rows at once, which would
    # share L1 sets when 4 K is a multiple of 4 KiB
    ldx = k + 16
    xp = torch.empty(m, ldx, dtype=torch.float32)
    xs = torch.empty(m, k // g, dtype=torch.float32)
    ts = torch.empty(m, dtype=torch.float32)
    y = torch.empty(m, n, dtype=torch.float32)
    if b is None and bias is not None:
        b = bias.detach().to(x.dtype).float().contiguous()
    bad = lib.lq_wa16_avx2(codes.data_ptr(), scales.data_ptr(), params.data_ptr(), fmt,
                           x2.data_ptr(), _DTYPE_CODES[x2.dtype], xp.data_ptr(),
                           ldx, xs.data_ptr(), ts.data_ptr(),
                           None if b is None else b.data_ptr(), y.data_ptr(), m, n, k, g,
                           qt.scheme.bits)
    assert bad >= 0, "lq_wa16_avx2: activation rows shorter than K"
    if bad:
        return None
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def linear_avx2(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
                cache: dict[str, Any] | None = None) -> torch.Tensor:
    """:func:`linquant.kernels.reference.linear_weight_only` for bf16 / fp16 / fp32 ``x`` and a
    4- or 8-bit weight (:func:`avx2_supported`), on the layout of :func:`repack_avx2`, built
    once and kept in ``cache``. fp32 activations get fp32 math on centered codes (no
    ``2^(bits - 1)`` offset in the sums)."""
    return avx2_runner(qt, bias, x.dtype, cache)(x)


def avx2_runner(qt: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                cache: dict[str, Any] | None = None) -> Runner:
    """:func:`linear_avx2` for ``qt``, ``bias`` and ``dtype`` activations as a function of
    ``x`` alone (the library, the layout and the prepared bias bound)."""
    lib = _load(AVX2)
    assert lib is not None, "linear_avx2 needs available('avx2')"
    layout = cpu._cached(cache, "native_avx2", cpu._key(qt, torch.int32),
                         lambda: repack_avx2(qt))
    b = None if bias is None else bias.detach().to(dtype).float().contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        y = _run_avx2(lib, x, qt, layout, bias, b)
        if y is None:  # Inf / NaN activations: the reference's IEEE result
            return reference.linear_weight_only(x, qt, bias)
        return y

    return run


# ---- dequantization into a float buffer (cpu_scratch, cpu_blocked) ---------------------------

_DEQ_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _deq_head(qt: QuantizedTensor) -> tuple[Any, ...] | None:
    """The leading arguments of ``lq_dequant_rows`` / ``lq_dequant_gather`` for ``qt`` (its
    stored tensors' pointers, dtypes and parameter strides), or None: not a 2-D CPU weight with
    contiguous tensors in the stored dtypes those functions read."""
    if len(qt.shape) != 2 or qt.device.type != "cpu":
        return None
    s = qt.scheme
    k = int(qt.shape[1])
    codes, scale, zero, offset = (qt.qdata, qt.scale, qt.zero_point_packed, qt.offset)
    if any(t is not None and not t.is_contiguous() for t in (codes, scale, zero, offset)) or (
            codes.dtype != torch.uint8 or scale.dtype not in _DEQ_DTYPES
            or (offset is not None and offset.dtype not in _DEQ_DTYPES)
            or (zero is not None and zero.dtype != torch.uint8)):
        return None
    if s.granularity == "group":
        gs = int(s.group_size or k)
        sn, sg, g = k // gs, 1, gs
    elif s.granularity == "channel" and s.axis % 2 == 0:
        sn, sg, g = 1, 0, k
    elif s.granularity == "channel":
        sn, sg, g = 0, 1, 1
    else:
        sn, sg, g = 0, 0, k
    return (codes.data_ptr(), scale.data_ptr(), _DEQ_DTYPES[scale.dtype],
            None if zero is None else zero.data_ptr(),
            None if offset is None else offset.data_ptr(),
            2 if offset is None else _DEQ_DTYPES[offset.dtype], sn, sg, g)


def _dequantizer(qt: QuantizedTensor, lib: ctypes.CDLL | None = None, wide: bool | None = None
                 ) -> Callable[[torch.Tensor, int, int], bool] | None:
    """A function ``(out, r0, r1) -> bool`` that writes rows ``[r0, r1)`` of ``qt``
    dequantized into ``out`` (contiguous ``[r1 - r0, K]``, bf16 / fp16 / fp32) with the AVX2
    library's ``lq_dequant_rows``, bit-identical to ``cpu._RowDequant`` (False: ``out`` not
    taken, nothing written), or None: not for this weight (not a 2-D CPU weight with
    contiguous tensors in the stored dtypes, or no AVX2 library). It reads the stored codes,
    scales, packed zero points and offsets in place: nothing is converted or copied. ``wide``:
    run the AVX-512 code (default :func:`wide_dequant`; tests force either)."""
    if lib is None:
        lib = _load(AVX2)
    wide_flag = int(wide_dequant() if wide is None else wide)
    head = None if lib is None else _deq_head(qt)
    if lib is None or head is None:
        return None
    s = qt.scheme
    k = int(qt.shape[1])
    tensors = (qt.qdata, qt.scale, qt.zero_point_packed, qt.offset)
    fn = lib.lq_dequant_rows

    def run(out: torch.Tensor, r0: int, r1: int,
            _keep: tuple[torch.Tensor | None, ...] = tensors) -> bool:  # alive while run is
        code = _DEQ_DTYPES.get(out.dtype)
        if code is None or not out.is_contiguous() or out.numel() != (r1 - r0) * k:
            return False
        fn(*head, out.data_ptr(), code, r0, r1, k, s.bits, int(s.symmetric), wide_flag)
        return True

    return run


def _dequant_code(qt: QuantizedTensor, wide: bool | None = None) -> str | None:
    """Which code of the dequantizers takes ``qt``'s rows: ``"avx512"``, ``"avx2"`` (vectors
    of 16 / 8 codes), ``"scalar"`` (one code at a time), or None (not taken at all)."""
    lib = _load(AVX2)
    head = None if lib is None else _deq_head(qt)
    if lib is None or head is None:
        return None
    sg, g = head[7], head[8]
    kind = lib.lq_dequant_kind(int(wide_dequant() if wide is None else wide), qt.scheme.bits,
                               int(qt.shape[1]), g, sg)
    return ("scalar", "avx2", "avx512")[kind]


def gather_supported(qt: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize_rows` takes rows of ``qt`` into ``dtype`` (builds the AVX2
    library on first call): a 2-D CPU table of any width, mode and granularity, bf16 / fp16 /
    fp32 out."""
    return dtype in _DEQ_DTYPES and _deq_head(qt) is not None and available(AVX2)


def dequantize_rows(qt: QuantizedTensor, rows: torch.Tensor, dtype: torch.dtype,
                    lib: ctypes.CDLL | None = None, wide: bool | None = None
                    ) -> torch.Tensor | None:
    """Rows ``rows`` of the 2-D table ``qt`` dequantized to ``dtype`` (``[rows.numel(), K]``)
    by the AVX2 library's ``lq_dequant_gather``: the same bits as
    :func:`linquant.kernels.reference.dequantize_rows`, one pass over the gathered rows'
    codes, read in place. None: not taken (no AVX2 library, ``dtype`` not bf16 / fp16 / fp32,
    ``rows`` not on the CPU, or a table the dequantizer does not read in place). Indices out
    of ``[0, N)`` raise :class:`LinquantError` (they are checked before any read). ``wide``:
    as for :func:`_dequantizer`."""
    if rows.device.type != "cpu":
        return None
    run = _gatherer(qt, dtype, lib, wide)
    if run is None:
        return None
    num, k = (int(d) for d in qt.shape)
    if rows.numel():
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= num:
            raise LinquantError(f"dequantize_rows: row indices must be in [0, {num}) for a table "
                                f"of shape {tuple(qt.shape)}, got values in [{lo}, {hi}]")
    return run(rows).reshape(-1, k)


def _gatherer(qt: QuantizedTensor, dtype: torch.dtype, lib: ctypes.CDLL | None = None,
              wide: bool | None = None) -> Runner | None:
    """``ids -> [*ids.shape, K]``: :func:`dequantize_rows` for ``qt`` and ``dtype`` with the
    library, the table's pointers and the flags bound, **for CPU indices the caller has
    checked** to be in ``[0, N)`` (``dequantize_rows`` does; ``QuantEmbedding`` does before
    its plan runs this). None where ``dequantize_rows`` would not take ``qt``."""
    if lib is None:
        lib = _load(AVX2)
    code = _DEQ_DTYPES.get(dtype)
    head = None if lib is None or code is None else _deq_head(qt)
    if lib is None or head is None:
        return None
    k = int(qt.shape[1])
    bits, sym = qt.scheme.bits, int(qt.scheme.symmetric)
    flag = int(wide_dequant() if wide is None else wide)
    fn = lib.lq_dequant_gather
    tensors = (qt.qdata, qt.scale, qt.zero_point_packed, qt.offset)

    def run(ids: torch.Tensor, _keep: tuple[torch.Tensor | None, ...] = tensors
            ) -> torch.Tensor:  # the table's tensors stay alive while run is
        idx = ids.reshape(-1)
        if idx.dtype != torch.int64 or not idx.is_contiguous():
            idx = idx.to(torch.int64).contiguous()
        out = torch.empty(idx.numel(), k, dtype=dtype)
        if idx.numel():
            fn(*head, out.data_ptr(), code, idx.data_ptr(), idx.numel(), k, bits, sym, flag)
        return out.view(*ids.shape, k)

    return run
