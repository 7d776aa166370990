"""Static check of the Triton weight-only kernels for Hopper, without a GPU.

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

``--odd``: also compile without the divisibility-by-16 hints Triton adds for aligned pointers
and sizes (as for K not a multiple of 16). Takes about a second per compile on one core.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from linquant.kernels import _triton_kernels as tk
from linquant.kernels.triton_linear import CONFIGS, DEQUANT_BLOCK_N, DEQUANT_WORDS, fit_config

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


def analyse(k: object, codes_per_thread: float) -> str:
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
    if back:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="gemv_t,gemv,splitk,tiled",
                    help="comma-separated, of gemv_t, gemv, splitk, tiled and dequant")
    ap.add_argument("--all-configs", action="store_true", help="default: the first of each")
    ap.add_argument("--configs", default="",
                    help="comma-separated config indices (of each kind) instead of the first")
    ap.add_argument("--odd", action="store_true", help="also compile without alignment hints")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90 (no GPU needed), "
          f"python {sys.version.split()[0]}")
    failed = 0
    for kind in args.kinds.split(","):
        if args.configs:
            picked = [int(i) for i in args.configs.split(",")]
        else:
            picked = list(range(len(CONFIGS[kind]) if args.all_configs else 1))
        for ci in picked:
            cfg = DEQUANT_CONFIG if kind == "dequant" else CONFIGS[kind][ci]
            for name, scheme in SCHEMES.items():
                for hints in (True, False) if args.odd else (True,):
                    label = f"{kind:6} c{ci} {name:20} {'aligned' if hints else 'odd    '}"
                    try:
                        k, meta = build(kind, dict(cfg), scheme, hints)
                    except Exception as e:
                        failed += 1
                        print(f"{label} FAILED {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1][:200]}", flush=True)
                        continue
                    # codes of the weight tile per thread and loop iteration
                    bk = meta.get("BLOCK_K") or meta["BLOCK_KW"] * 32 // scheme[0]
                    codes = meta["BLOCK_N"] * bk / (32 * cfg["num_warps"])
                    print(f"{label} {analyse(k, codes)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
