"""Host (Python) time of linquant's eager CUDA fast path, measurable without a GPU.

An eager one-token call on a GPU runs at the host's pace: on the H200 machine the kernel took
21 us and the host about 90 us per ``QuantLinear`` call, of which Triton's own launch was 30-34
us (BENCHMARKS.md, "Host time per eager call"). This script times the rest, linquant's own
Python around the launch, on any machine: Triton's CPU interpreter (``TRITON_INTERPRET=1``)
builds a layer's plan as on a GPU, then every plan's launch is replaced by a no-op that returns
a preallocated output, so what is timed is exactly the code between ``layer(x)`` and the
launch. Rows (best of 5 rounds of 20000 calls, in microseconds):

* ``QuantLinear(x)``: the layer's forward, which checks its cache's plan against its buffers
  first (``triton_linear.replay``);
* ``kernels.linear_weight_only``: the dispatcher's entry on CUDA, ``triton_linear.planned`` on
  a :class:`~linquant.tensor.QuantizedTensor` built by ``layer.qweight`` (the forward's path
  before ``replay``), plus the forward's own checks;
* ``linquant::linear_weight_only`` (the operator ``torch.compile``'d graphs call): its
  dispatch cost, the operator call minus its implementation called directly;
* ``W8A8Linear(x)`` (16 tokens; dynamic and static activations): the planned forward against
  the dispatcher's unplanned path (both Triton kernels replaced by no-ops);
* for scale: an empty ``nn.Module`` call and one ``torch.empty``.

    python benchmarks/bench_host.py
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch
from _common import machine
from torch import nn

from linquant.kernels import triton_linear as tlin
from linquant.nn import QuantLinear


def best_us(fn: Callable[[], object], n: int = 20000, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    if not tlin.triton_available():
        sys.exit("needs Triton (its CPU interpreter builds the plans)")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    print(machine())
    print("host time per eager one-token call, Triton's launch replaced by a no-op "
          "(best of 5 x 20000 calls)")
    for scheme in ("int4-sym-g128", "int4-asym-g32", "int8-sym-ch0"):
        lin = nn.Linear(256, 128).to(torch.bfloat16)
        q = QuantLinear.from_float(lin, scheme)
        x = torch.randn(1, 256, dtype=torch.bfloat16)
        cache = q.kernel_cache()
        tlin.linear(x, q.qweight, q.bias, cache)  # the automatic path keeps a plan
        out = torch.empty(1, 128, dtype=torch.bfloat16)
        plans = cache["triton_plans"]
        for key, p in list(plans.items()):
            plans[key] = dataclasses.replace(p, run=lambda x2, out=out: out)
        # (false for linquant before the forward's own plan check: it went through the
        # dispatcher, which is what that version's first row then times)
        print(f"  {scheme}: QuantLinear.forward replays the plan itself: {q(x) is out}")

        def dispatcher(q: QuantLinear = q, x: torch.Tensor = x) -> object:
            xx = q._check_last_dim(x, q.in_features)
            return tlin.planned(xx, q.qweight, q.bias, q.kernel_cache())

        print(f"  {scheme:16} QuantLinear(x) {best_us(lambda q=q, x=x: q(x)):6.2f} us   "
              f"dispatcher's planned() path {best_us(dispatcher):6.2f} us")
    w8a8_rows()
    # the custom operator that torch.compile'd graphs call (linquant.kernels.compiled): its
    # dispatch, on top of the same work called directly
    from linquant.kernels import compiled

    q = QuantLinear.from_float(nn.Linear(256, 128), "int8-sym-ch0")
    x = torch.randn(1, 256)
    b = q._buffers
    args = (x, b["weight_qdata"], b["weight_scale"], b.get("weight_zero_point"),
            b.get("weight_offset"), q.bias, str(q.scheme), list(q.qweight_shape),
            q.weight_dtype)
    t_op = best_us(lambda: compiled.linear_weight_only(*args), n=3000)
    t_impl = best_us(lambda: compiled._impl(*args), n=3000)
    print(f"  linquant::linear_weight_only, fp32 256 -> 128: operator call {t_op:6.2f} us, "
          f"its implementation called directly {t_impl:6.2f} us: dispatch {t_op - t_impl:5.2f} us")
    ident = nn.Identity()
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    print(f"  for scale: nn.Identity()(x) {best_us(lambda: ident(x)):.2f} us, torch.empty "
          f"{best_us(lambda: torch.empty(1, 128, dtype=torch.bfloat16)):.2f} us")


def w8a8_rows() -> None:
    """``W8A8Linear`` on CUDA, 16 tokens, 256 -> 128: the dispatcher's unplanned path (what
    every eager call ran before W8A8 plans on CUDA) and the planned forward. Both Triton
    kernels are replaced by no-ops, and the dispatcher is made to pick the Triton path for CPU
    tensors (it does so only for CUDA ones)."""
    import types

    from linquant import kernels
    from linquant.kernels import triton_w8a8 as tw
    from linquant.nn import W8A8Linear

    class NoLaunch:
        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *args, **kw: None

    stub = types.SimpleNamespace(act_quant_kernel=NoLaunch(), w8a8_gemm_kernel=NoLaunch())
    real_jit, real_select = tw._jit, kernels.select_w8a8_path
    tw._jit = lambda: stub  # type: ignore[assignment]
    kernels.select_w8a8_path = lambda x, w, s=None: (  # type: ignore[assignment]
        "cuda_triton_w8a8" if tw.supported(x, w) else real_select(x, w, s))
    try:
        for act in ("dynamic", "static"):
            q = W8A8Linear.from_float(nn.Linear(256, 128), activation=act)  # type: ignore[arg-type]
            if act == "static":
                q.set_activation_range(-3.0, 3.0)
            x = torch.randn(16, 256)
            sa = q._buffers.get("input_scale")

            def unplanned(q: W8A8Linear = q, x: torch.Tensor = x,
                          sa: torch.Tensor | None = sa) -> object:
                return kernels.linear_w8a8(q._check_last_dim(x, q.in_features), q.weight_qdata,
                                           q.weight_scale, q.bias, sa, None)

            q(x)  # keeps the plan
            paths = [p.path for p in q.kernel_cache()["w8a8_plans"].values()]
            assert paths == ["cuda_triton_w8a8"], paths
            print(f"  W8A8Linear {act:7}, 16 tokens: unplanned dispatcher + Triton path "
                  f"{best_us(unplanned):6.2f} us   planned W8A8Linear(x) "
                  f"{best_us(lambda q=q, x=x: q(x)):6.2f} us")
    finally:
        tw._jit, kernels.select_w8a8_path = real_jit, real_select  # type: ignore[assignment]


if __name__ == "__main__":
    main()
