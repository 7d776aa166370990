"""all-MiniLM-L6-v2 under ``torch.compile`` on the CPU: the compiled quantized model against the
same model eager, one process, calls alternating.

``QuantLinear`` and ``W8A8Linear`` enter the compiled graph as custom operators
(``linquant.kernels.compiled``) whose implementations are the eager kernels, so what compile
can change is the float code around them (attention, LayerNorm, GELU). Per preset: the largest
difference of the embeddings between the compiled and the eager model, the first compiled
call's time (tracing and code generation), and the median time per forward of each, timed
alternately after 2 warm-up calls.

    python benchmarks/bench_compile.py [--presets w8a32,w4a16-g32] [--sentences 8]
        [--repeats 9] [--backend inductor]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from _common import machine

from linquant.config import get_config
from linquant.convert import quantize_model
from linquant.demo import encode, load_model, load_sentences, tokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--presets", default="w8a32,w8a8,w4a16-g32")
    ap.add_argument("--sentences", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(machine())
    model = load_model()
    sentences = load_sentences()
    feats = tokenize(model, [sentences[i % len(sentences)] for i in range(args.sentences)])
    print(f"all-MiniLM-L6-v2, {args.sentences} sentences, torch.compile(backend="
          f"{args.backend!r}); ms per forward, medians of {args.repeats} alternating calls")
    for preset in [p for p in args.presets.split(",") if p]:
        q = copy.deepcopy(model)
        quantize_model(q, get_config(preset))
        want = encode(q, feats)
        torch._dynamo.reset()
        compiled = torch.compile(q, backend=args.backend)
        t0 = time.perf_counter()
        got = encode(compiled, feats)
        first = time.perf_counter() - t0
        for _ in range(2):
            encode(compiled, feats)
            encode(q, feats)
        tc: list[float] = []
        te: list[float] = []
        for i in range(args.repeats):
            order = ((compiled, tc), (q, te)) if i % 2 == 0 else ((q, te), (compiled, tc))
            for m, out in order:
                t0 = time.perf_counter()
                encode(m, feats)
                out.append((time.perf_counter() - t0) * 1e3)
        c, e = statistics.median(tc), statistics.median(te)
        print(f"  {preset:12} max |compiled - eager| {float((got - want).abs().max()):.1e}  "
              f"first call {first:5.1f} s   compiled {c:7.1f}  eager {e:7.1f}  "
              f"(eager / compiled {e / c:4.2f})")


if __name__ == "__main__":
    main()
