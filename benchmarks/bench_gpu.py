"""One 8192x8192 linear on a CUDA GPU: cuBLAS bf16 vs linquant's Triton kernels vs tinygemm.

Weight-only rows (bf16 activations, bias, through ``QuantLinear`` and the dispatcher, which
picks ``cuda_tinygemm`` for one-token int4 calls and ``cuda_triton`` otherwise; where it picks
tinygemm, a second row runs the same layers on Triton): W4A16 ``int4-sym-g128``,
``int4-asym-g32`` (and ``int4-sym-g64`` with ``--schemes``), W8A16 ``int8-sym-ch0``; the same
int4-sym-g128 codes through PyTorch's tinygemm ``torch._weight_int4pack_mm``; torchao's int4
(group 128) / int8 weight-only configs when torchao imports. W8A8 rows: ``W8A8Linear`` (dynamic
per-token int8 activations, whatever path the dispatcher picks) at M = 1024, 2048, 4096.

Two timings per row, each with the ratio to bf16 ``nn.Linear`` at the same M (> 1 = faster):

* ``eager``: ``triton.testing.do_bench`` on one layer (median; L2 flushed before every call, so
  the weight comes from HBM). It includes the Python work of each call (dispatcher, launch)
  where that outlasts the flush, as a plain PyTorch model sees it.
* ``graph``: the calls captured in one CUDA graph, one call per distinct copy of the weight
  (enough copies for >= 256 MiB, so no call finds its weight in the 50-60 MB L2), replayed
  back to back; median over replays of the time per call. GPU time only: what a server that
  replays CUDA graphs (or ``torch.compile`` with CUDA graphs) sees.

``--compiled``: the weight copies chained in one ``nn.Sequential`` under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` at one token, cuBLAS the same way:
``QuantLinear`` is one custom-operator node there (``linquant.kernels.compiled``), so CUDA
graphs should capture its launches and the eager call should run near the graph column.

Then ``--sweep``: every config of linquant's kernels, forced, graph-timed the same way, for
``tiled`` at M = 2048, ``splitk`` at M = 16, ``gemv_t`` / ``gemv`` at M = 1 and ``splitk`` at
M = 1, per scheme, so the autotuner's choice and the headroom can be read off (configs with
``PA1`` decode 4-bit codes in packed bf16 pairs, ``PR1`` load the next K tile themselves with
Triton's pipeliner off; ``splitk`` at one token asks whether tensor cores beat the CUDA-core
``gemv`` there). The max error is relative to the output's
max magnitude against the reference (linquant's oracle on the same quantized weight; "vs
float" for torchao, which quantizes on its own). The first call of a shape autotunes (a few
seconds per scheme and M); that time is not in the medians.

    python benchmarks/bench_gpu.py [--ms 1,16,2048] [--w8a8-ms 1024,2048,4096] [--n 8192]
        [--k 8192] [--schemes int4-sym-g128,int4-asym-g32,int8-sym-ch0] [--no-extras]
        [--sweep] [--overhead] [--compiled]
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
from linquant.kernels import cuda as lq_cuda
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


def graph_ms(fns: list[Fn], replays: int = 30) -> float:
    """Median ms per call of ``fns`` captured back to back in one CUDA graph (each on its own
    weight copy, so the weights rotate through more memory than L2 holds)."""
    for f in fns:  # compile, autotune and build layouts outside the capture
        f()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2]


def copies_for(nbytes: int) -> int:
    """Distinct weight copies that together hold >= 256 MiB (2 to 8)."""
    return max(2, min(8, -(-(256 << 20) // max(nbytes, 1))))


def rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    return float((y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12))


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:90]


class Table:
    def __init__(self, title: str = "") -> None:
        self.base: dict[int, tuple[float, float | None]] = {}
        # (M, row) -> (eager, graph) ratio to bf16 at that M, None where not timed
        self.ratios: dict[tuple[int, str], tuple[float | None, float | None]] = {}
        if title:
            print(f"\n{title}")
        print(f"{'M':>5} {'row':<56} {'eager ms':>9} {'x bf16':>7} {'graph ms':>9} "
              f"{'x bf16':>7} {'max err':>10}  path")

    def row(self, m: int, name: str, fns: list[Fn] | None, check: Fn | None = None,
            path: str | Callable[[], str] = "", note: str = "", eager: bool = True) -> None:
        if not fns:
            print(f"{m:>5} {name:<56} {'n/a':>9} {'':>7} {'':>9} {'':>7} {'':>10}  {note}",
                  flush=True)
            return
        try:
            y = fns[0]()  # first call: compile / autotune, outside the timing
            torch.cuda.synchronize()
            err = "" if check is None else f"{rel_err(y, check()):.2e}"
            ms = bench_ms(fns[0]) if eager else float("nan")
        except Exception as e:  # one failing library must not end the run
            print(f"{m:>5} {name:<56} {'error':>9} {'':>7} {'':>9} {'':>7} {'':>10}  "
                  f"{_short(e)}", flush=True)
            return
        try:
            gms: float | None = graph_ms(fns)
            g_txt = f"{gms:>9.4f}"
        except Exception as e:
            gms, g_txt = None, f"{'n/a':>9}"
            note = f"{note} graph: {_short(e)}".strip()
        if callable(path):
            path = path()  # after the runs: e.g. the config the autotuner settled on
        if name.startswith("bf16"):
            self.base[m] = (ms, gms)
        r_e = r_g = ""
        if m in self.base:
            be, bg = self.base[m]
            r_e = f"{be / ms:.2f}" if eager else ""
            r_g = f"{bg / gms:.2f}" if (bg is not None and gms) else ""
            self.ratios[(m, name)] = (be / ms if eager else None,
                                      bg / gms if (bg is not None and gms) else None)
        e_txt = f"{ms:>9.4f}" if eager else f"{'-':>9}"
        print(f"{m:>5} {name:<56} {e_txt} {r_e:>7} {g_txt} {r_g:>7} {err:>10}  {path} "
              f"{note}".rstrip(), flush=True)


# issue 5's GPU targets: (row, M, least ratio to cuBLAS bf16)
TARGETS = [(f"linquant {s}", m, t) for s in ("int4-sym-g128", "int4-asym-g32")
           for m, t in ((1, 2.5), (16, 1.5), (2048, 0.9))] + [
    ("linquant int8-sym-ch0", 1, 1.6), ("linquant int8-sym-ch0", 16, 1.6)] + [
    ("linquant W8A8Linear (dynamic)", m, 1.3) for m in (1024, 2048, 4096)]


def target_lines(ratios: dict[tuple[int, str], tuple[float | None, float | None]]) -> list[str]:
    """One line per target of :data:`TARGETS` that was timed: the eager and graph ratios and
    whether each meets it."""
    out = []
    for row, m, least in TARGETS:
        if (m, row) not in ratios:
            continue
        cells = []
        for label, r in zip(("eager", "graph"), ratios[(m, row)], strict=True):
            if r is not None:
                cells.append(f"{label} {r:5.2f}x {'met' if r >= least else 'missed'}")
        print_row = f"  {row:<32} M={m:<5} target >= {least:.1f}x: " + ", ".join(cells)
        out.append(print_row)
    return out


def triton_config(kind: str) -> str:
    """The config linquant's autotuner last used for ``kind`` (empty if none)."""
    kern = tlin._kernels()
    tuned = {"gemv_t": kern.gemv_t_tuned, "gemv": kern.gemv_tuned,
             "splitk": kern.splitk_tuned, "tiled": kern.tiled_tuned}[kind]
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return ""
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_KW": "KW", "SPLIT_K": "S",
             "SWAP": "swap"}
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


def planned_with(q: QuantLinear, x: torch.Tensor, env: dict[str, str]) -> QuantLinear:
    """A copy of ``q`` whose plan for ``x``'s signature was made under the environment
    variables ``env`` (the dispatcher reads them when it makes a plan)."""
    import copy
    import os

    qt = copy.deepcopy(q)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        qt(x)
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return qt


def triton_only(q: QuantLinear, x: torch.Tensor) -> QuantLinear:
    """A copy of ``q`` whose plan for ``x`` runs the Triton kernels (``LINQUANT_TINYGEMM=0``)."""
    qt = planned_with(q, x, {"LINQUANT_TINYGEMM": "0"})
    assert "triton_plans" in qt.kernel_cache() and "cuda_plans" not in qt.kernel_cache()
    return qt


def dequant_traffic(q: QuantLinear) -> str:
    """What one dequantization moves: the stored weight read, the bf16 weight written."""
    stored = sum(t.numel() * t.element_size() for t in q.qweight.tensors().values())
    n, k = (int(d) for d in q.qweight.shape)
    return f"reads {stored / 2**20:.0f} MiB, writes {n * k * 2 / 2**20:.0f} MiB"


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
                    help="skip tinygemm and torchao")
    ap.add_argument("--sweep", action="store_true",
                    help="also time every config of every kernel, forced")
    ap.add_argument("--overhead", action="store_true",
                    help="also measure the host time per eager call, layer by layer")
    ap.add_argument("--compiled", action="store_true",
                    help="also time the weight copies as one torch.compile'd nn.Sequential "
                         "(mode='reduce-overhead', fullgraph=True) at one token")
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
    print(f"linear {n}x{k} (out x in), bf16 activations, bias; triton: "
          f"{kernels.triton_status()}; tinygemm: {lq_cuda.status(dev)}")

    n_lin = copies_for(n * k * 2)
    lins = [nn.Linear(k, n, device=dev, dtype=torch.bfloat16) for _ in range(n_lin)]
    layers: dict[str, list[QuantLinear]] = {}
    for s in schemes:
        first = QuantLinear.from_float(lins[0], s).to(dev)
        nbytes = sum(t.numel() * t.element_size() for t in first.qweight.tensors().values())
        layers[s] = [first] + [QuantLinear.from_float(lins[i % n_lin], s).to(dev)
                               for i in range(1, copies_for(nbytes))]
    print("weight copies per row (>= 256 MiB): bf16 " + str(n_lin) + ", "
          + ", ".join(f"{s} {len(v)}" for s, v in layers.items()))
    extras = not args.no_extras
    ao = {kind: torchao_layer(lins[0], kind) for kind in ("int4", "int8")} if extras else {}

    torch.set_grad_enabled(False)  # inference: no autograd bookkeeping in any row
    table = Table()
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        table.row(m, "bf16 nn.Linear (cuBLAS)",
                  [lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias) for lin in lins])
        for s, qs in layers.items():
            q0 = qs[0]
            path = kernels.select_path(x, q0.qweight)
            kind = tlin.kernel_for(m, q0.qweight) if path == "cuda_triton" else ""

            def describe(path: str = path, kind: str = kind) -> str:
                return f"{path} {kind} {triton_config(kind) if kind else ''}".strip()

            table.row(m, f"linquant {s}", [lambda q=q, x=x: q(x) for q in qs],
                      lambda q=q0, x=x: ref.linear_weight_only(x, q.qweight, q.bias),
                      path=describe)
            if m >= 256 and path == "cuda_triton":
                # the opt-in strategy for many tokens: decode the weight, then cuBLAS
                qds = [planned_with(q, x, {"LINQUANT_CUDA_DEQUANT_MIN_M": "1"}) for q in qs]
                table.row(m, f"linquant {s} dequantize + cuBLAS (opt-in)",
                          [lambda q=q, x=x: q(x) for q in qds],
                          lambda q=q0, x=x: ref.linear_weight_only(x, q.qweight, q.bias),
                          path=lambda q=qds[0]: ",".join(
                              p.path for p in q.kernel_cache()["cuda_plans"].values()))
                del qds
                dq = [lambda q=q: tlin.dequantize(q.qweight, torch.bfloat16,
                                                   q.kernel_cache()) for q in qs]
                table.row(m, f"  {s}: the dequantize kernel alone", dq,
                          lambda q=q0: q.qweight.dequantize(torch.bfloat16),
                          path=dequant_traffic(q0))
            if path == "cuda_tinygemm" and tlin.supported(q0.qweight, x):
                # the same layers as the dispatcher would run them without tinygemm
                qts = [triton_only(q, x) for q in qs]
                kind = tlin.kernel_for(m, q0.qweight)
                table.row(m, f"linquant {s} on Triton (LINQUANT_TINYGEMM=0)",
                          [lambda q=q, x=x: q(x) for q in qts],
                          lambda q=q0, x=x: ref.linear_weight_only(x, q.qweight, q.bias),
                          path=lambda kind=kind: f"cuda_triton {kind} {triton_config(kind)}")
                del qts
        if not extras:
            continue
        q4s = layers.get("int4-sym-g128")
        if q4s is not None:
            fns: list[Fn] = []
            note = ""
            for q in q4s:
                fn, note = tinygemm_setup(q, x)
                if fn is None:
                    fns = []
                    break
                fns.append(fn)

            def check(q4: QuantLinear = q4s[0], x: torch.Tensor = x) -> torch.Tensor:
                return ref.linear_weight_only(x, q4.qweight, None)

            table.row(m, "tinygemm _weight_int4pack_mm g128", fns, check,
                      note=note or "no bias")
        for kind, (layer, note) in ao.items():
            label = f"torchao {kind} weight-only" + (" g128" if kind == "int4" else "")
            if layer is None:
                table.row(m, label, None, note=note)
            else:
                table.row(m, label, [lambda layer=layer, x=x: layer(x)],
                          lambda x=x: F.linear(x, lins[0].weight, lins[0].bias),
                          path="vs float (one copy: L2-warm in the graph column)")

    if w8a8_ms:
        w8s = [W8A8Linear.from_float(lins[i % n_lin]).to(dev)
               for i in range(copies_for(n * k))]
        for m in w8a8_ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            table.row(m, "bf16 nn.Linear (cuBLAS)",
                      [lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias) for lin in lins])
            path = kernels.select_w8a8_path(x, w8s[0].weight_qdata)
            table.row(m, "linquant W8A8Linear (dynamic)", [lambda x=x, w=w: w(x) for w in w8s],
                      lambda x=x, w8=w8s[0]: ref.linear_w8a8(x, w8.weight_qdata,
                                                             w8.weight_scale, w8.bias),
                      path=path)

    if args.compiled:
        compiled_rows(layers, lins, k)
    if args.overhead:
        overhead()
    if args.sweep:
        sweep(layers, lins, k)
        if w8a8_ms:
            sweep_w8a8(w8s, lins, k, w8a8_ms[:2])
    lines = target_lines(table.ratios)
    if lines:
        print("\nissue 5's GPU targets (ratio = cuBLAS bf16 ms / row ms at the same M):")
        print("\n".join(lines))
    if lq_cuda.failures():
        print(f"tinygemm calls that failed (those weights used the other paths): "
              f"{lq_cuda.failures()}")
    if tlin.failures():
        print("Triton kernels that failed (those rows used the reference):")
        for key, err in tlin.failures().items():
            print(f"  {key}: {err.splitlines()[0][:200]}")
    print(f"total {time.perf_counter() - t_start:.0f} s (compilation and autotuning included)")


def compiled_ms(mods: list[nn.Module], x: torch.Tensor, timer: Callable[[Fn], float],
                mode: str | None = "reduce-overhead") -> tuple[float, float]:
    """``(ms per layer, max error against the eager Sequential)`` for ``mods`` chained in one
    ``nn.Sequential`` (square layers), compiled with ``mode`` and ``fullgraph=True``; timed by
    ``timer`` on the compiled callable (with CUDA graphs: replays, the host's launch work
    gone). The first calls compile, autotune and record, outside the timing."""
    seq = nn.Sequential(*mods)
    torch._dynamo.reset()
    compiled = torch.compile(seq, mode=mode, fullgraph=True)
    for _ in range(3):
        y = compiled(x)
    err = rel_err(y, seq(x))
    return timer(lambda: compiled(x)) / len(mods), err


def compiled_rows(layers: dict[str, list[QuantLinear]], lins: list[nn.Linear], k: int) -> None:
    """Each row's weight copies as one compiled Sequential at M = 1: whether torch.compile
    with CUDA graphs turns linquant's one-token layers (one custom-operator node each, see
    linquant.kernels.compiled) into graph-speed calls without a hand-made CUDA graph."""
    print("\ntorch.compile(nn.Sequential(copies), mode='reduce-overhead', fullgraph=True), "
          "M = 1, ms per layer (do_bench on the compiled call)")
    x = torch.randn(1, k, device=lins[0].weight.device, dtype=torch.bfloat16)
    try:
        base, _ = compiled_ms(list(lins), x, bench_ms)
        print(f"  {'bf16 nn.Linear (cuBLAS)':40} {base:9.4f}")
    except Exception as e:
        base = float("nan")
        print(f"  {'bf16 nn.Linear (cuBLAS)':40} error {_short(e)}")
    for s, qs in layers.items():
        try:
            ms, err = compiled_ms(list(qs), x, bench_ms)
            print(f"  {'linquant ' + s:40} {ms:9.4f} {base / ms:7.2f}x bf16   max err {err:.2e}")
        except Exception as e:
            print(f"  {'linquant ' + s:40} error {_short(e)}")


def sweep(layers: dict[str, list[QuantLinear]], lins: list[nn.Linear], k: int) -> None:
    """Every config of each kernel, forced, graph-timed (see the module docstring)."""
    dev = lins[0].weight.device
    # splitk at one token too: tensor cores (15 of 16 rows padding) against the CUDA-core gemv.
    # The tl.dot kernels first: they have the most configs not yet timed on a GPU (a time
    # limit that cuts the sweep short then cuts the one-token tables)
    for kind, m in (("tiled", 2048), ("splitk", 16), ("gemv_t", 1), ("gemv", 1), ("splitk", 1)):
        table = Table(f"sweep: {kind} kernel at M = {m}, every config (graph-timed)")
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        table.row(m, "bf16 nn.Linear (cuBLAS)",
                  [lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias) for lin in lins],
                  eager=False)
        for s, qs in layers.items():
            for cfg in tlin.CONFIGS[kind]:
                short = " ".join(f"{kk[6:] if kk.startswith('BLOCK') else kk[:2]}{v}"
                                 for kk, v in cfg.items()
                                 if kk.startswith(("BLOCK", "SPLIT", "SWAP", "PACKED",
                                                   "PREFETCH")))
                short += f" w{cfg['num_warps']} s{cfg['num_stages']}"
                table.row(m, f"{s} [{short}]",
                          [lambda q=q, x=x, cfg=cfg, kind=kind: tlin.linear(
                              x, q.qweight, q.bias, q.kernel_cache(), kernel=kind,
                              config=dict(cfg)) for q in qs],
                          lambda q=qs[0], x=x: ref.linear_weight_only(x, q.qweight, q.bias),
                          eager=False)



def sweep_w8a8(w8s: list[W8A8Linear], lins: list[nn.Linear], k: int, ms: list[int]) -> None:
    """Every W8A8 GEMM config (forced), and the activation quantization alone, graph-timed."""
    from linquant.kernels import triton_w8a8 as tw

    dev = lins[0].weight.device
    for m in ms:
        table = Table(f"sweep: W8A8 at M = {m}, every GEMM config (graph-timed; rows include "
                      "the activation quantization)")
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        table.row(m, "bf16 nn.Linear (cuBLAS)",
                  [lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias) for lin in lins],
                  eager=False)
        table.row(m, "activation quantization only",
                  [lambda x=x: tw.quantize_activations(x)[0]] * len(w8s), eager=False)
        for cfg in tw.CONFIGS:
            if m >= 128 and cfg[0] < 64:
                continue
            table.row(m, f"w8a8 {'x'.join(map(str, cfg[:3]))} s{cfg[3]} w{cfg[4]}",
                      [lambda x=x, w=w, cfg=cfg: tw.linear_w8a8(
                          x, w.weight_qdata, w.weight_scale, w.bias, config=cfg) for w in w8s],
                      lambda x=x, w8=w8s[0]: ref.linear_w8a8(x, w8.weight_qdata,
                                                             w8.weight_scale, w8.bias),
                      eager=False)



def tinygemm_op(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The operator alone on the layer's tinygemm layout (built by its first call)."""
    pk = q.kernel_cache()["tinygemm"][1]
    return torch._weight_int4pack_mm(x, pk.packed, pk.group, pk.sz)


def overhead() -> None:
    """Host time per eager call, layer by layer of linquant's stack, on a 1024 x 1024 weight
    (GPU work of a few microseconds, so back-to-back calls run at the host's pace), then the
    Python functions that take it (cProfile)."""
    import cProfile
    import pstats

    dev = torch.device("cuda")
    lin = nn.Linear(1024, 1024, device=dev, dtype=torch.bfloat16)
    q = QuantLinear.from_float(lin, "int4-sym-g128").to(dev)
    w8 = W8A8Linear.from_float(lin).to(dev)
    x = torch.randn(1, 1024, device=dev, dtype=torch.bfloat16)
    x16 = torch.randn(16, 1024, device=dev, dtype=torch.bfloat16)
    q(x)  # the dispatcher's plan: tinygemm where cuda.available(), else Triton
    q_t = triton_only(q, x)
    pk = q_t.kernel_cache()["triton"][1]
    cache = q_t.kernel_cache()
    kern = tlin._kernels()
    y = torch.empty(1, 1024, device=dev, dtype=torch.bfloat16)
    meta, launch = tlin._split_meta(tlin.CONFIGS["gemv"][0])
    gargs = (x, pk.words, pk.scale, pk.scale, pk.scale, lin.bias, y, 1024, 1024,
             pk.words.shape[1], 1)
    gkw = {**tlin._scheme_args(pk, True), "ATOMIC": False}

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (-(-1024 // meta["BLOCK_N"]), 1)

    rows: list[tuple[str, Fn]] = [
        ("torch.empty", lambda: torch.empty(1, 1024, device=dev)),
        ("torch._weight_int4pack_mm, 1 token", lambda: tinygemm_op(q, x)),
        ("F.linear bf16, 1 token", lambda: F.linear(x, lin.weight, lin.bias)),
        ("triton launch, explicit config", lambda: kern.gemv[grid](*gargs, **gkw, **meta,
                                                                    **launch)),
        ("triton launch, autotuned", lambda: kern.gemv_tuned[grid](*gargs, **gkw)),
        ("tlin.linear, 1 token", lambda: tlin.linear(x, q_t.qweight, q_t.bias, cache)),
        ("kernels.linear_weight_only, 1 token, Triton",
         lambda: kernels.linear_weight_only(x, q_t.qweight, q_t.bias, cache)),
        ("QuantLinear int4-sym-g128, 1 token, Triton", lambda: q_t(x)),
        (f"QuantLinear int4-sym-g128, 1 token, {kernels.select_path(x, q.qweight)}",
         lambda: q(x)),
        ("W8A8Linear dynamic, 16 tokens", lambda: w8(x16)),
    ]
    print("\nhost time per eager call (1024 x 1024 weight, 300 calls back to back):")
    for name, fn in rows:
        try:
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            print(f"  {name:40} {(t1 - t0) / 300 * 1e6:8.1f} us")
        except Exception as e:
            print(f"  {name:40} error {_short(e)}")
    print(f"tinygemm: {lq_cuda.status(dev)}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        q(x)
    prof.disable()
    torch.cuda.synchronize()
    print("cProfile of 300 QuantLinear calls (1 token), by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
