"""Mixture-of-experts layers on the CPU: linquant's QuantExperts against transformers' float
experts, side by side in one process.

One MoE layer's experts in the shape of a scaled-down Mixtral (``--experts 8``, top-2,
hidden 1024, expert FFN 2816 by default), as transformers' own ``MixtralExperts`` module. Rows:

* float, transformers' implementations: ``eager`` (the module's loop over the experts that got
  tokens) and ``grouped_mm`` (``transformers.integrations.moe``), in fp32 and bf16
  (``--impls eager,grouped_mm,batched_mm`` adds ``batched_mm``, which gathers a copy of the
  weights for every token-expert pair: 17 GiB at M=256 with the default shapes, which the 24 GiB
  VM could not hold);
* linquant, from the same float weights: ``w8a32`` (fp32 activations), ``w8a16``,
  ``w4a16-g32`` and ``w4a16-g128`` (bf16 activations), ``w8a8`` (fp32 in and out, int8
  per-token activations and int8 x int8 products inside; ``--presets`` picks some):
  ``quantize_model`` on a copy of the layer, which becomes a ``QuantExperts``.

Each row holds ``--layers`` distinct layers (different weights; the float fp32 ones take
>= 256 MiB by default) and every timed call runs the next one, so no call finds its weights in
the cache (``_common.cold_ms``: one warm-up pass over all layers, then the lowest of ``--runs``
medians of ``--repeats`` calls). The routing is random top-k per token (fixed seed) and the same
for every row. Printed per token count M: median ms, and the ratio to the fp32 and bf16 eager
float rows (> 1 = faster); the output SQNR of each row against the fp32 eager row on the same
input; and each row's bytes of expert weights.

    python benchmarks/bench_moe.py [--tokens 1,16,256] [--layers 4] [--experts 8] [--top-k 2]
        [--hidden 1024] [--ffn 2816] [--repeats 9] [--runs 3] [--impls eager,grouped_mm]
        [--presets w8a32,w8a16,w4a16-g32,w4a16-g128,w8a8] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from typing import Any

import torch
from _common import cold_ms, machine
from torch import nn

from linquant.convert import model_nbytes, quantize_model
from linquant.ops.metrics import sqnr
from linquant.report import Column, format_table, write_json

PRESETS = ("w8a32", "w8a16", "w4a16-g32", "w4a16-g128", "w8a8")


def _float_layers(args: argparse.Namespace, n: int) -> list[nn.Module]:
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = transformers.MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k)
    config._experts_implementation = "eager"
    layers = []
    for _ in range(n):
        m = MixtralExperts(config).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        layers.append(m)
    return layers


def _with_impl(layers: list[nn.Module], impl: str, dtype: torch.dtype) -> list[nn.Module]:
    out = []
    for m in layers:
        c = copy.deepcopy(m).to(dtype)
        c.config = copy.copy(m.config)
        c.config._experts_implementation = impl
        out.append(c)
    return out


class _Holder(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts


def _quantized(layers: list[nn.Module], preset: str) -> list[nn.Module]:
    out = []
    for m in layers:
        holder = _Holder(copy.deepcopy(m))
        quantize_model(holder, preset)
        out.append(holder.experts)
    return out


def _bind(layer: nn.Module, idx: torch.Tensor, w: torch.Tensor
          ) -> Any:
    return lambda t: layer(t, idx, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--impls", default="eager,grouped_mm")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)

    base = _float_layers(args, args.layers)
    rows: list[tuple[str, torch.dtype, list[nn.Module]]] = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for impl in args.impls.split(","):
            rows.append((f"float {tag} {impl}", dtype, _with_impl(base, impl, dtype)))
    for preset in args.presets.split(","):
        dtype = torch.float32 if preset in ("w8a32", "w8a8") else torch.bfloat16
        rows.append((f"linquant {preset}", dtype, _quantized(base, preset)))
    nbytes = {label: model_nbytes(layers[0]) for label, _, layers in rows}

    print(f"machine: {machine()}")
    print("command: " + shlex.join(["python", *sys.argv]))
    print(f"experts: {args.experts} x (gate_up {2 * args.ffn}x{args.hidden}, down "
          f"{args.hidden}x{args.ffn}), top-{args.top_k}; {args.layers} layers per row "
          f"(fp32: {nbytes[rows[0][0]] * args.layers / 2**20:.0f} MiB)")
    results: list[dict[str, Any]] = []
    for m in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(m, args.hidden)
        logits = torch.randn(m, args.experts)
        w, idx = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        with torch.inference_mode():
            ref = base[0](x, idx, w)
            times: dict[str, float] = {}
            table = []
            for label, dtype, layers in rows:
                xd, wd = x.to(dtype), w.to(dtype)
                fns = [_bind(layer, idx, wd) for layer in layers]
                times[label] = cold_ms(fns, xd, repeats=args.repeats, runs=args.runs)
                out = layers[0](xd, idx, wd).float()
                table.append({"path": label, "M": m, "ms": times[label],
                              "sqnr_db": sqnr(ref, out), "mib": nbytes[label] / 2**20})
        for r in table:
            r["vs_fp32"] = times["float fp32 eager"] / r["ms"]
            r["vs_bf16"] = times["float bf16 eager"] / r["ms"]
        results += table
        cols: list[Column] = [("path", "path", ""), ("M", "M", ""), ("ms", "median ms", ".3f"),
                              ("vs_fp32", "x fp32 eager", ".2f"),
                              ("vs_bf16", "x bf16 eager", ".2f"),
                              ("sqnr_db", "SQNR dB", ".1f"), ("mib", "MiB/layer", ".1f")]
        print()
        print(format_table(table, cols))
    if args.json:
        write_json(args.json, {"machine": machine(), "argv": sys.argv, "results": results})


if __name__ == "__main__":
    main()
