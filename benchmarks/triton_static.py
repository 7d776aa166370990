"""Static check of the Triton kernels for Hopper, without a GPU.

Compiles every config of :data:`linquant.kernels.triton_linear.CONFIGS` for sm_90 (Triton's
NVIDIA backend, with the ``ptxas`` and ``cuobjdump`` its wheel ships) and prints, per kernel,
config and scheme: whether it compiled, registers, spilled bytes, shared memory, whether the
tensor cores are used (``wgmma``; ``wgmma SERIALIZED`` where ptxas reports C7515,
"wgmma.mma_async instructions are serialized": it then waits for each MMA before issuing the
next), and the instructions of the main loop's compiled SASS per weight code and thread (all,
and those on the integer pipe: LOP3, SHF, SGXT, IADD3, LEA, PRMT, ...; on Hopper that pipe
issues at half the rate of the fp32 one). Counts, not timings: what it shows is how much work
each code costs, which bounds the memory-bound small-M kernels when it exceeds the bandwidth's
share. The GPU itself (benchmarks/gpu_check.sh) measures speed.

    python benchmarks/triton_static.py [--kinds gemv,splitk,tiled] [--all-configs]
        [--configs 0,4] [--odd]

``--kinds dequant`` compiles the whole-weight dequantize kernel of the opt-in ``cuda_dequant``
path instead (one launch shape, into bf16; it has no loop to count).

    python benchmarks/triton_static.py --kinds act_quant,w8a8,weight_quant [--all-configs]
        [--configs 0,4] [--odd]

compiles the kernels of :mod:`linquant.kernels._triton_jit` (not in the default ``--kinds``)
with the constexprs and options their launchers pass on a CUDA device: ``act_quant``
(W8A8 activation quantization; MODE 0 dynamic, 1 static symmetric, 2 static asymmetric; one
tile per row, ``single``, and two passes, ``2pass``), ``w8a8`` (the int8 GEMM: each MODE, with
and without bias, ``K`` a multiple of ``BLOCK_K`` or not, for the first of
:data:`linquant.kernels.triton_w8a8.CONFIGS`, the picked ones with ``--configs``, or all) and
``weight_quant`` (the weight quantization: 4 and 8 bits, MODE 0 symmetric, 1 integer zero
point, 2 float offset, ``single`` / ``2pass``). Activations, weights and outputs are bf16,
scales fp32. The loop count of the quantization kernels is per element (code) of their longest
loop (two-pass variants only: the single-tile ones have no loop); the GEMM's is not counted.

``--odd``: also compile without the divisibility-by-16 hints Triton adds for aligned pointers
and sizes (as for K not a multiple of 16). Takes about a second per compile on one core.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from linquant.kernels import _triton_jit as tj
from linquant.kernels import _triton_kernels as tk
from linquant.kernels import triton_quant as tq
from linquant.kernels import triton_w8a8 as tw
from linquant.kernels.triton_linear import CONFIGS, DEQUANT_BLOCK_N, DEQUANT_WORDS, fit_config
from linquant.scheme import QuantScheme

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# name: (BITS, SYM, HAS_Z, HAS_M, PER_CHANNEL, GROUP, parameter dtype)
SCHEMES = {
    "int4-sym-g128": (4, True, False, False, False, 128, "fp32"),
    "int4-asym-g32-fp16": (4, False, True, False, False, 32, "fp16"),
    "int4-asymf-g64-bf16": (4, False, False, True, False, 64, "bf16"),
    "int8-sym-ch0": (8, True, False, False, True, 8192, "fp32"),
    "int8-asym-g128": (8, False, True, False, False, 128, "fp32"),
}
INT_PIPE = ("LOP3", "SHF", "SGXT", "IADD3", "LEA", "PRMT", "BMSK", "ISETP", "SEL", "VIADD")


def build(kind: str, cfg: dict[str, int], scheme: tuple, hints: bool) -> tuple[object, dict]:
    bits, sym, hz, hm, pc, group, pdt = scheme
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    if kind == "dequant":
        return build_dequant(cfg, scheme, hints)
    meta = fit_config(kind, meta, group, pc, bits)
    consts: dict[str, object] = dict(BITS=bits, SYM=sym, HAS_Z=hz, HAS_M=hm, PER_CHANNEL=pc,
                                     GROUP=group, HAS_BIAS=True)
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": f"*{pdt}", "z_ptr": "*u8",
           "m_ptr": f"*{pdt}", "b_ptr": "*bf16", "N": "i32", "K": "i32", "KW": "i32"}
    aligned = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "m_ptr", "b_ptr", "y_ptr", "N", "K", "KW"]
    if kind == "gemv_t":
        fn = tk.gemv_t_kernel
        sig.update(y_ptr="*fp32")
        consts.update(ATOMIC=True, **meta)
    elif kind == "gemv":
        fn = tk.gemv_kernel
        sig.update(y_ptr="*bf16", SPLIT_K="i32")
        consts.update(ATOMIC=False, **meta)
    else:
        fn = tk.mm_kernel
        sig.update(y_ptr="*fp32" if kind == "splitk" else "*bf16", M="i32", stride_xm="i32",
                   M_BUCKET="i32", xs_ptr="*fp32")
        meta.setdefault("BLOCK_M", 16)
        meta.setdefault("SPLIT_K", 1)
        meta.setdefault("PACKED", 0)
        meta.setdefault("PREFETCH", 0)
        consts.update(ATOMIC=kind == "splitk", INTERP=False, GROUP_M=8, **meta)
        aligned.append("stride_xm")
    sig.update({k: "constexpr" for k in consts})
    sig = {a: sig[a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned} if hints else {}
    k = compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return k, meta


# the dequantize kernel (the opt-in cuda_dequant path) has one launch shape, no autotuning
DEQUANT_CONFIG = {"num_warps": 4, "num_stages": 1, "BLOCK_N": DEQUANT_BLOCK_N}


def build_dequant(cfg: dict[str, int], scheme: tuple, hints: bool) -> tuple[object, dict]:
    bits, sym, hz, hm, pc, group, pdt = scheme
    meta = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": DEQUANT_WORDS * 32 // bits}
    consts = dict(BITS=bits, SYM=sym, HAS_Z=hz, HAS_M=hm, PER_CHANNEL=pc, GROUP=group, **meta)
    fn = tk.dequant_kernel
    sig: dict[str, str] = {"w_ptr": "*i32", "s_ptr": f"*{pdt}", "z_ptr": "*u8",
                           "m_ptr": f"*{pdt}", "out_ptr": "*bf16", "N": "i32", "K": "i32",
                           "KW": "i32"}
    aligned = list(sig)
    sig.update({k: "constexpr" for k in consts})
    sig = {a: sig[a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned} if hints else {}
    k = compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                         "enable_fp_fusion": False})  # as launched: the reference's roundings
    return k, meta


# ---- the kernels of _triton_jit (W8A8 linear, weight quantization) ---------------------------

JIT_KINDS = ("act_quant", "w8a8", "weight_quant")
CUDA = torch.device("cuda")  # only its type is read: the launchers' rule for a CUDA device
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
# launch shapes: (M, K) of the activations, one row per tile (single) or two passes over K
ACT_SHAPES = {True: (4096, 4096), False: (16, 32768)}
W8A8_SHAPE = (4096, 4096)  # (M, N); K is 4096 (even) or 4112 (not a multiple of any BLOCK_K)
# (R, L) of the weight's granules: groups of 128 (single), or rows of 32768 (two passes)
WQ_SHAPES = {True: (131072, 128), False: (4096, 32768)}


def compile_jit(fn: object, sig: dict[str, str], kw: dict[str, object],
                aligned: list[str], hints: bool) -> object:
    """Compile ``fn`` for sm_90 as its launcher would launch it: ``sig`` the runtime arguments'
    types, ``kw`` the launcher's keywords (constexprs and compile options)."""
    consts = {k: v for k, v in kw.items() if k not in OPTIONS}
    opts = {k: v for k, v in kw.items() if k in OPTIONS}
    names = fn.arg_names  # type: ignore[attr-defined]
    full = {**sig, **{k: "constexpr" for k in consts}}
    full = {a: full[a] for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned} if hints else {}
    return compile(ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options=opts)


Variant = tuple[str, Callable[[bool], tuple[object, "float | None"]]]  # label, build(hints)


def variant(fn: object, sig: dict[str, str], kw: dict[str, object], aligned: list[str],
            codes: float | None) -> Callable[[bool], tuple[object, float | None]]:
    """The build of one variant, as a function of ``hints`` (aligned or odd)."""
    return lambda hints: (compile_jit(fn, sig, kw, aligned, hints), codes)


def act_quant_variants() -> Iterator[Variant]:
    """``act_quant_kernel``, as :func:`linquant.kernels.triton_w8a8._act_launcher` launches it:
    bf16 ``x``, int8 codes, fp32 scales; the zero point is uint8 (MODE 2), else the scales."""
    for mode in (0, 1, 2):
        for single in (True, False):
            m, k = ACT_SHAPES[single]
            _, kw = tw._act_launcher(m, k, mode, CUDA)
            assert kw["SINGLE"] is single, kw
            sig = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "sa_ptr": "*fp32",
                   "za_ptr": "*u8" if mode == 2 else "*fp32", "M": "i32", "K": "i32",
                   "stride_xm": "i32"}
            aligned = ["x_ptr", "q_ptr", "s_ptr", "sa_ptr", "za_ptr", "K", "stride_xm"]
            codes = None if single else kw["ROWS"] * kw["BLOCK_K"] / (32 * kw["num_warps"])
            label = (f"act_quant mode{mode} {'single' if single else '2pass '} "
                     f"{kw['ROWS']:>2}x{kw['BLOCK_K']:<5} w{kw['num_warps']}")
            yield label, variant(tj.act_quant_kernel, sig, kw, aligned, codes)


def w8a8_variants(picked: list[int]) -> Iterator[Variant]:
    """``w8a8_gemm_kernel``, as :func:`linquant.kernels.triton_w8a8._gemm_launcher` launches
    config ``ci`` and :func:`~linquant.kernels.triton_w8a8.gemm` passes its arguments: int8 codes
    and weight, bf16 output; fp32 scales; bias bf16 (else the weight scales); the row sums int32
    and the zero point uint8 in MODE 2 (else the weight scales)."""
    m, n = W8A8_SHAPE
    for ci in picked:
        for mode in (0, 1, 2):
            for bias in (True, False):
                for even in (True, False):
                    k = 4096 if even else 4112
                    _, kw = tw._gemm_launcher(m, n, k, mode, bias, tw.CONFIGS[ci])
                    assert kw["EVEN_K"] is even, kw
                    sig = {"a_ptr": "*i8", "w_ptr": "*i8", "y_ptr": "*bf16", "as_ptr": "*fp32",
                           "ws_ptr": "*fp32", "bias_ptr": "*bf16" if bias else "*fp32",
                           "rowsum_ptr": "*i32" if mode == 2 else "*fp32",
                           "za_ptr": "*u8" if mode == 2 else "*fp32", "M": "i32", "N": "i32",
                           "K": "i32", "M_KEY": "i32", "stride_am": "i32", "stride_wn": "i32",
                           "stride_ym": "i32"}
                    aligned = [a for a in sig if a != "M"]  # K % 16 == 0 in both shapes
                    label = (f"w8a8   c{ci} mode{mode} {'bias  ' if bias else 'nobias'} "
                             f"{'even  ' if even else 'uneven'}")
                    yield label, variant(tj.w8a8_gemm_kernel, sig, kw, aligned, None)


def weight_quant_variants() -> Iterator[Variant]:
    """``weight_quant_kernel``: bf16 weight, uint8 packed codes, fp32 scales (the default
    scale dtype) and offsets, uint8 zero points (MODE 1, else the scales), int32 flag."""
    for bits in (4, 8):
        for mode in (0, 1, 2):
            for single in (True, False):
                r, length = WQ_SHAPES[single]
                scheme = QuantScheme(bits=bits, symmetric=mode == 0,
                                     zero_point="float" if mode == 2 else "int")
                kw = tq.launch_keywords(scheme, r, length, CUDA)
                assert kw["MODE"] == mode, kw
                assert kw["SINGLE"] is single, kw
                sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32",
                       "z_ptr": "*u8" if mode == 1 else "*fp32", "m_ptr": "*fp32",
                       "bad_ptr": "*i32", "R": "i32", "L": "i32"}
                aligned = [a for a in sig if a != "R"]
                codes = None if single else kw["ROWS"] * kw["BLOCK_L"] / (32 * kw["num_warps"])
                label = (f"weight_quant int{bits} mode{mode} {'single' if single else '2pass '} "
                         f"{kw['ROWS']:>2}x{kw['BLOCK_L']:<5} w{kw['num_warps']}")
                yield label, variant(tj.weight_quant_kernel, sig, kw, aligned, codes)


def analyse(k: object, codes_per_thread: float | None) -> str:
    asm = k.asm  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(asm["cubin"])
        res = ""
        for exe in ("ptxas", "ptxas-blackwell"):  # Triton 3.9's PTX needs the newer one
            if os.path.exists(os.path.join(BIN, exe)) and "Used" not in res:
                res = subprocess.run([os.path.join(BIN, exe), "--gpu-name", "sm_90a", "-v", ptx,
                                      "-o", os.devnull], capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", res)
    spill = re.search(r"(\d+) bytes spill stores", res)
    ins = [(int(m.group(1), 16), m.group(2).split()[-1].split(".")[0]) for line in
           sass.splitlines() if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+ )?"
                                               r"[A-Z0-9_.]+)", line))]
    back = [(int(m.group(1), 16), int(m.group(2), 16)) for line in sass.splitlines()
            if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+@!?U?P\w+ BRA (0x[0-9a-f]+)", line))]
    back = [(s, d) for s, d in back if d < s]
    loop = ""
    if back and codes_per_thread:
        src, dst = max(back, key=lambda p: p[0] - p[1])  # the longest backward branch
        body = collections.Counter(op for a, op in ins if dst <= a <= src)
        total = sum(body.values())
        integer = sum(body[o] for o in INT_PIPE)
        loop = (f"{total / codes_per_thread:5.2f} instr/code ({integer / codes_per_thread:4.2f} "
                f"integer)")
    mma = "wgmma" if "wgmma" in asm["ptx"] else ("mma" if "mma.sync" in asm["ptx"] else "-")
    if mma == "wgmma" and "C7515" in res:  # ptxas waits for each wgmma before the next
        mma = "wgmma SERIALIZED"
    return (f"regs {regs.group(1) if regs else '?':>3} spill {spill.group(1) if spill else '?':>4}"
            f" smem {k.metadata.shared:>6} {mma:16} {loop}")  # type: ignore[attr-defined]


def report(label: str, make: Callable[[], tuple[object, float | None]]) -> bool:
    """Compile (``make``) and print one row; False (after printing ``FAILED``) on an error."""
    try:
        k, codes = make()
    except Exception as e:
        print(f"{label} FAILED {type(e).__name__}: "
              f"{str(e).strip().splitlines()[-1][:200]}", flush=True)
        return False
    print(f"{label} {analyse(k, codes)}", flush=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="gemv_t,gemv,splitk,tiled",
                    help="comma-separated, of gemv_t, gemv, splitk, tiled, dequant, act_quant, "
                         "w8a8 and weight_quant")
    ap.add_argument("--all-configs", action="store_true", help="default: the first of each")
    ap.add_argument("--configs", default="",
                    help="comma-separated config indices (of each kind) instead of the first")
    ap.add_argument("--odd", action="store_true", help="also compile without alignment hints")
    args = ap.parse_args()
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:  # Triton < 3.3
        # the caller (tests/kernels/test_triton_linear.py) skips on an ImportError
        raise ImportError(f"triton {triton.__version__}: ASTSource takes no constexprs")
    print(f"triton {triton.__version__}, target sm_90 (no GPU needed), "
          f"python {sys.version.split()[0]}")
    failed = 0
    hint_modes = (True, False) if args.odd else (True,)
    for kind in args.kinds.split(","):
        # act_quant and weight_quant have one launch config per variant (dequant: one)
        n_configs = (len(tw.CONFIGS) if kind == "w8a8" else len(CONFIGS[kind])
                     if kind in CONFIGS else 1)
        if args.configs and n_configs > 1:
            picked = [int(i) for i in args.configs.split(",")]
        else:
            picked = list(range(n_configs if args.all_configs else 1))
        if kind in JIT_KINDS:
            variants = (act_quant_variants() if kind == "act_quant" else w8a8_variants(picked)
                        if kind == "w8a8" else weight_quant_variants())
            for label, build_it in variants:
                for hints in hint_modes:
                    failed += not report(f"{label} {'aligned' if hints else 'odd    '}",
                                         partial(build_it, hints))
            continue
        for ci in picked:
            cfg = DEQUANT_CONFIG if kind == "dequant" else CONFIGS[kind][ci]
            for name, scheme in SCHEMES.items():
                for hints in hint_modes:
                    label = f"{kind:6} c{ci} {name:20} {'aligned' if hints else 'odd    '}"

                    def make(cfg: dict[str, int] = cfg, scheme: tuple[Any, ...] = scheme,
                             hints: bool = hints, kind: str = kind) -> tuple[object, float]:
                        k, meta = build(kind, dict(cfg), scheme, hints)
                        # codes of the weight tile per thread and loop iteration
                        bk = meta.get("BLOCK_K") or meta["BLOCK_KW"] * 32 // scheme[0]
                        return k, meta["BLOCK_N"] * bk / (32 * cfg["num_warps"])

                    failed += not report(label, make)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
