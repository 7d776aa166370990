"""One 8192x8192 linear on a CUDA GPU: cuBLAS bf16 vs linquant's Triton kernels vs tinygemm.

Weight-only rows (bf16 activations, bias, through ``QuantLinear`` and the dispatcher, which
picks ``cuda_triton``): W4A16 ``int4-sym-g128``, ``int4-asym-g32`` (and ``int4-sym-g64`` with
``--schemes``), W8A16 ``int8-sym-ch0``; the same int4-sym-g128 codes through PyTorch's tinygemm
``torch._weight_int4pack_mm``; torchao's int4 (group 128) / int8 weight-only configs when
torchao imports; and, for one token, linquant's split-K kernel forced instead of the GEMV (for
16 tokens, the tiled kernel) so the crossover can be checked. W8A8 rows: ``W8A8Linear``
(dynamic per-token int8 activations, whatever path the dispatcher picks) at M = 1024, 2048,
4096.

Each row prints the median ms (``triton.testing.do_bench``: warm-up, L2 flushed before every
run, so the weight comes from HBM as in a real model), the ratio to bf16 ``nn.Linear`` at the
same M (> 1 = faster), the max error relative to the output's max magnitude against the
reference (linquant's oracle on the same quantized weight; "vs float" for torchao, which
quantizes on its own), and the kernel / path used. The first call of a shape autotunes (a few
seconds per scheme and M); that time is not in the medians.

    python benchmarks/bench_gpu.py [--ms 1,16,2048] [--w8a8-ms 1024,2048,4096] [--n 8192]
        [--k 8192] [--schemes int4-sym-g128,int4-asym-g32,int8-sym-ch0] [--no-extras]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from linquant import kernels
from linquant.kernels import reference as ref
from linquant.kernels import triton_linear as tlin
from linquant.nn import QuantLinear, W8A8Linear

Fn = Callable[[], torch.Tensor]


def machine() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {tv}, "
            f"python {platform.python_version()}")


def bench_ms(fn: Fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    return float((y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12))


class Table:
    def __init__(self) -> None:
        self.base: dict[int, float] = {}
        print(f"{'M':>5} {'row':<40} {'ms':>9} {'x bf16':>7} {'max err':>10}  path")

    def row(self, m: int, name: str, fn: Fn | None, check: Fn | None = None,
            path: str | Callable[[], str] = "", note: str = "") -> None:
        if fn is None:
            print(f"{m:>5} {name:<40} {'n/a':>9} {'':>7} {'':>10}  {note}", flush=True)
            return
        try:
            y = fn()  # first call: compile / autotune, outside the timing
            torch.cuda.synchronize()
            ms = bench_ms(fn)
            err = "" if check is None else f"{rel_err(y, check()):.2e}"
        except Exception as e:  # one failing library must not end the run
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:90]
            print(f"{m:>5} {name:<40} {'error':>9} {'':>7} {'':>10}  {msg}", flush=True)
            return
        if callable(path):
            path = path()  # after the runs: e.g. the config the autotuner settled on
        if name.startswith("bf16"):
            self.base[m] = ms
        ratio = f"{self.base[m] / ms:.2f}" if m in self.base else ""
        print(f"{m:>5} {name:<40} {ms:>9.4f} {ratio:>7} {err:>10}  {path} {note}".rstrip(),
              flush=True)


def triton_config(kind: str) -> str:
    """The config linquant's autotuner last used for ``kind`` (empty if none)."""
    kern = tlin._kernels()
    tuned = {"gemv": kern.gemv_tuned, "splitk": kern.splitk_tuned,
             "tiled": kern.tiled_tuned}[kind]
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return ""
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "SPLIT_K": "S", "SWAP": "swap"}
    kw = " ".join(f"{short.get(k, k)}{v}" for k, v in cfg.kwargs.items())
    return f"[{kw} w{cfg.num_warps} s{cfg.num_stages}]"


# ---- tinygemm ----------------------------------------------------------------------------------


def tinygemm_setup(q: QuantLinear, x: torch.Tensor) -> tuple[Fn | None, str]:
    """``torch._weight_int4pack_mm`` on the same int4-sym-g128 codes (w = (u - 8) * s + 0, u =
    c + 8). The nibble order of the uint8 input changed across torch versions; both are tried
    and the one that reproduces the reference is kept."""
    qt = q.qweight
    n, k = (int(d) for d in qt.shape)
    g = int(qt.scheme.group_size or k)
    try:
        u = (qt.codes().to(torch.int32) + 8).reshape(n, k)
        sz = torch.stack([qt.scale.float().reshape(n, k // g).t(),
                          torch.zeros(k // g, n, device=u.device)], dim=-1)
        sz = sz.to(torch.bfloat16).contiguous()
        r = ref.linear_weight_only(x, qt, None)
        best: tuple[float, Fn] | None = None
        for hi_even in (True, False):
            a, b = (u[:, ::2], u[:, 1::2]) if hi_even else (u[:, 1::2], u[:, ::2])
            packed = torch._convert_weight_to_int4pack(((a << 4) | b).to(torch.uint8), 8)

            def fn(packed: torch.Tensor = packed) -> torch.Tensor:
                return torch._weight_int4pack_mm(x, packed, g, sz)

            e = rel_err(fn(), r)
            if best is None or e < best[0]:
                best = (e, fn)
        assert best is not None
        return best[1], ""
    except Exception as e:
        return None, f"tinygemm unavailable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"


# ---- torchao -----------------------------------------------------------------------------------


def torchao_layer(lin: nn.Linear, kind: str) -> tuple[nn.Module | None, str]:
    try:
        import torchao.quantization as tq
    except Exception:
        return None, "torchao not importable"
    import copy

    layer = copy.deepcopy(lin)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "int4":
                cfg = (tq.Int4WeightOnlyConfig(group_size=128)
                       if hasattr(tq, "Int4WeightOnlyConfig") else tq.int4_weight_only(128))
            else:
                cfg = (tq.Int8WeightOnlyConfig() if hasattr(tq, "Int8WeightOnlyConfig")
                       else tq.int8_weight_only())
            tq.quantize_(layer, cfg)
    except Exception as e:
        return None, f"torchao {kind}: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return layer, ""


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,16,2048")
    ap.add_argument("--w8a8-ms", default="1024,2048,4096")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--schemes", default="int4-sym-g128,int4-asym-g32,int8-sym-ch0")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip tinygemm, torchao and the forced-kernel rows")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU; none is visible to torch (nothing measured)")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    n, k = args.n, args.k
    ms = [int(v) for v in args.ms.split(",") if v]
    w8a8_ms = [int(v) for v in args.w8a8_ms.split(",") if v]
    schemes = [s for s in args.schemes.split(",") if s]
    print(f"machine: {machine()}")
    print(f"linear {n}x{k} (out x in), bf16 activations, bias; triton available: "
          f"{tlin.triton_available()}")

    lin = nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    layers = {s: QuantLinear.from_float(lin, s).to(dev) for s in schemes}
    extras = not args.no_extras
    ao = {kind: torchao_layer(lin, kind) for kind in ("int4", "int8")} if extras else {}

    torch.set_grad_enabled(False)  # inference: no autograd bookkeeping in any row
    table = Table()
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        table.row(m, "bf16 nn.Linear (cuBLAS)", lambda x=x: F.linear(x, lin.weight, lin.bias))
        for s, q in layers.items():
            path = kernels.select_path(x, q.qweight)
            kind = tlin.kernel_for(m) if path == "cuda_triton" else ""

            def describe(path: str = path, kind: str = kind) -> str:
                return f"{path} {kind} {triton_config(kind) if kind else ''}".strip()

            table.row(m, f"linquant {s}", lambda q=q, x=x: q(x),
                      lambda q=q, x=x: ref.linear_weight_only(x, q.qweight, q.bias),
                      path=describe)
        if not extras:
            continue
        q4 = layers.get("int4-sym-g128")
        if q4 is not None and m in (1, 16) and kernels.select_path(x, q4.qweight) == "cuda_triton":
            alt = "splitk" if m == 1 else "tiled"
            cache: dict[str, object] = {}
            table.row(m, f"linquant int4-sym-g128 [{alt} forced]",
                      lambda q4=q4, x=x, alt=alt, cache=cache: tlin.linear(
                          x, q4.qweight, q4.bias, cache, kernel=alt),
                      lambda q4=q4, x=x: ref.linear_weight_only(x, q4.qweight, q4.bias),
                      path="cuda_triton")
        if q4 is not None:
            fn, note = tinygemm_setup(q4, x)

            def check(q4: QuantLinear = q4, x: torch.Tensor = x) -> torch.Tensor:
                return ref.linear_weight_only(x, q4.qweight, None)

            table.row(m, "tinygemm _weight_int4pack_mm g128", fn, check, note=note or "no bias")
        for kind, (layer, note) in ao.items():
            label = f"torchao {kind} weight-only" + (" g128" if kind == "int4" else "")
            if layer is None:
                table.row(m, label, None, note=note)
            else:
                table.row(m, label, lambda layer=layer, x=x: layer(x),
                          lambda x=x: F.linear(x, lin.weight, lin.bias), path="vs float")

    if w8a8_ms:
        w8 = W8A8Linear.from_float(lin).to(dev)
        for m in w8a8_ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            table.row(m, "bf16 nn.Linear (cuBLAS)", lambda x=x: F.linear(x, lin.weight, lin.bias))
            path = kernels.select_w8a8_path(x, w8.weight_qdata)
            table.row(m, "linquant W8A8Linear (dynamic)", lambda x=x: w8(x),
                      lambda x=x: ref.linear_w8a8(x, w8.weight_qdata, w8.weight_scale, w8.bias),
                      path=path)
    if tlin.failures():
        print("Triton kernels that failed (those rows used the reference):")
        for key, err in tlin.failures().items():
            print(f"  {key}: {err.splitlines()[0][:200]}")
    print(f"total {time.perf_counter() - t_start:.0f} s (compilation and autotuning included)")


if __name__ == "__main__":
    main()
