"""all-MiniLM-L6-v2 end to end on the CPU: encode throughput per preset against the float model.

One process, one model load, the same tokenized inputs for every model. For each batch size
(``--batch``, sentences cycled to fill the batch, tokenized once per batch size, padded to the
batch's longest sentence as sentence-transformers does) every model runs one untimed warm-up
forward, then ``--repeats`` rounds in which each model runs once (round robin, alternating
direction, so a change of machine load hits every row alike). A forward is the demo's
:func:`linquant.demo.encode`: encoder, mean pooling and normalization under
``torch.inference_mode``. Reported per row and batch: median sentences/s, its ratio to the fp32
and bf16 float models (> 1 = faster), mean / min cosine similarity of the embeddings to the fp32
float model's on the same batch, and the path the kernel dispatcher picked for one
representative linear layer (the largest, ``encoder.layer.0.intermediate.dense``) with the dtype
of its input, seen by a hook during the warm-up forward. Per row: bytes of the linear layers
(weights, scales, biases) and of the whole model, against fp32 float.

Rows: the float model in fp32 and in bf16; then each preset with the activation dtype its name
promises -- ``*a32`` in fp32, ``*a16`` in bf16 (their ``compute_dtype``: ``quantize_model``
casts the model; ``QuantLinear`` keeps codes and scales and computes in its input's dtype),
``w8a8*`` with fp32 activations quantized to int8 per token (dynamic) or per tensor (static,
calibrated on all the sentences in one batch, the data it is then measured on). Each ``*a16``
preset is followed by the same quantized weights run in fp32 ("fp32 act"), to show what the
16-bit activations buy (``w8a16`` in fp32 is ``w8a32``, so that row is left out when ``w8a32``
is shown).

    python benchmarks/bench_model.py [--batch 1,32,128] [--repeats 9] [--presets A,B,...]
        [--sentences FILE] [--threads N] [--json PATH] [--fbgemm-max-m M]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import machine
from torch import nn

from linquant import kernels
from linquant.config import PRESETS, QuantConfig, get_config
from linquant.convert import ModelReport, model_nbytes, quantize_model
from linquant.demo import MODEL_NAME, encode, load_model, load_sentences, tokenize
from linquant.nn import QuantLinear, W8A8Linear, kernel_cache_nbytes
from linquant.report import Column, format_table, write_json

LINEAR_TYPES = (nn.Linear, QuantLinear, W8A8Linear)
DTYPE_TEXT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Row:
    label: str
    preset: str | None
    act: str  # what the activations are, as shown in the table
    dtype: torch.dtype  # float dtype of the model (and of the representative layer's input)
    model: nn.Module
    report: ModelReport | None = None
    quantize_s: float = 0.0
    # filled per batch size
    times: dict[int, list[float]] = field(default_factory=dict)
    emb: dict[int, torch.Tensor] = field(default_factory=dict)
    path: dict[int, str] = field(default_factory=dict)


def linear_nbytes(model: nn.Module) -> int:
    """Bytes of the linear layers (weights, scales, zero points, biases), each tensor once."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        if isinstance(mod, LINEAR_TYPES):
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def representative_layer(model: nn.Module) -> str:
    """Name of the linear layer with the most weight elements (the first such)."""
    best, best_n = "", -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight.numel() > best_n:
            best, best_n = name, mod.weight.numel()
    if not best:
        raise SystemExit("no nn.Linear in the model")
    return best


def probe(model: nn.Module, layer: str, found: dict[str, str]) -> Any:
    """A forward pre-hook on ``layer`` recording the dispatcher's choice for its real input."""
    mod = model.get_submodule(layer)

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(m, W8A8Linear):
            path = f"w8a8 {kernels.select_w8a8_path(x, m.weight_qdata)} ({m.activation})"
        elif isinstance(m, QuantLinear):
            path = kernels.select_path(x, m.qweight)
        else:
            path = f"{type(m).__name__} (float)"
        found["path"] = f"{path}, {DTYPE_TEXT.get(x.dtype, str(x.dtype))} in"
        found["dtype"] = str(x.dtype)

    return mod.register_forward_pre_hook(hook)


def build_rows(float_model: nn.Module, presets: list[str], calib: dict[str, Any],
               say: Any) -> list[Row]:
    rows = [Row("float fp32", None, "fp32", torch.float32, float_model)]
    rows.append(Row("float bf16", None, "bf16", torch.bfloat16,
                    copy.deepcopy(float_model).to(torch.bfloat16)))
    for preset in presets:
        say(f"quantizing with {preset}")
        config = get_config(preset)
        qmodel = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        fp32_config = dataclasses.replace(config, compute_dtype=None)
        report = quantize_model(qmodel, fp32_config)  # same codes as the preset's own cast
        quantize_s = time.perf_counter() - t0
        if config.is_w8a8:
            assert config.activation is not None
            if config.activation_mode == "static":
                from linquant.calibrate import calibrate

                with calibrate(qmodel):
                    encode(qmodel, calib)
            gran = "token" if config.activation_mode == "dynamic" else "tensor"
            rows.append(Row(preset, preset, f"int8/{gran} (fp32 in)", torch.float32, qmodel,
                            report, quantize_s))
            continue
        a16 = _is_a16(preset, config)
        if not a16:
            rows.append(Row(preset, preset, "fp32", torch.float32, qmodel, report, quantize_s))
            continue
        dtype = config.compute_dtype or torch.bfloat16
        qcast = copy.deepcopy(qmodel).to(dtype)
        rows.append(Row(preset, preset, DTYPE_TEXT[dtype], dtype, qcast, report, quantize_s))
        if preset == "w8a16" and "w8a32" in presets:
            continue  # w8a16 with fp32 activations is w8a32
        rows.append(Row(f"{preset} (fp32 act)", preset, "fp32", torch.float32, qmodel, report,
                        quantize_s))
    return rows


def _is_a16(preset: str, config: QuantConfig) -> bool:
    return config.compute_dtype in (torch.bfloat16, torch.float16) or "a16" in preset


def cycled(sentences: list[str], n: int) -> list[str]:
    return [sentences[i % len(sentences)] for i in range(n)]


def measure(rows: list[Row], features: dict[str, Any], batch: int, repeats: int,
            warmup: int, layer: str) -> None:
    for row in rows:
        found: dict[str, str] = {}
        handle = probe(row.model, layer, found)
        try:
            row.emb[batch] = encode(row.model, features)
        finally:
            handle.remove()
        if found.get("dtype") != str(row.dtype):
            raise SystemExit(f"{row.label}: {layer} got {found.get('dtype')} input, "
                             f"expected {row.dtype}")
        row.path[batch] = found["path"]
        for _ in range(warmup - 1):
            encode(row.model, features)
        row.times[batch] = []
    for r in range(repeats):
        for row in rows if r % 2 == 0 else rows[::-1]:
            t0 = time.perf_counter()
            encode(row.model, features)
            row.times[batch].append(time.perf_counter() - t0)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batch", default="1,32,128",
                    help="batch sizes in sentences, comma-separated (default 1,32,128)")
    ap.add_argument("--repeats", type=int, default=9,
                    help="timed forwards per model and batch; the median is reported (default 9)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed forwards per model and batch first (default 1)")
    ap.add_argument("--presets", default=",".join(PRESETS),
                    help=f"comma-separated (default: all: {','.join(PRESETS)})")
    ap.add_argument("--sentences", metavar="FILE",
                    help="sentences, one per line (default: linquant's bundled 32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (atomically)")
    ap.add_argument("--fbgemm-max-m", type=int, default=None, metavar="M",
                    help="A/B of the W8A8 CPU backends: set the dispatcher's fbgemm token "
                         "thresholds (kernels.FBGEMM_MAX_M and FBGEMM_MAX_M_SMALL) to M; "
                         "1 sends every W8A8 call of 2+ tokens to oneDNN")
    args = ap.parse_args()
    if args.fbgemm_max_m is not None:
        kernels.FBGEMM_MAX_M = kernels.FBGEMM_MAX_M_SMALL = args.fbgemm_max_m
    warnings.filterwarnings("ignore")
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    presets = [p.strip().lower() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        get_config(p)  # fail on a typo before loading anything
    if not batches or min(batches) < 1 or args.repeats < 1 or args.warmup < 1:
        raise SystemExit("--batch values, --repeats and --warmup must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def say(msg: str) -> None:
        print(f"bench_model: {msg}", file=sys.stderr, flush=True)

    sentences = load_sentences(args.sentences)
    say(f"loading {MODEL_NAME} (offline)")
    float_model = load_model()
    layer = representative_layer(float_model)
    calib = tokenize(float_model, sentences)
    rows = build_rows(float_model, presets, calib, say)

    print(f"machine: {machine()}")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    src = args.sentences or "bundled sentences.txt"
    print(f"model: {MODEL_NAME}; {len(sentences)} sentences from {src}, cycled to each batch "
          f"size; median of {args.repeats} forwards per cell (round robin over the rows, after "
          f"{args.warmup} warm-up forward(s))")
    print(f"path: what linquant's dispatcher chose for {layer} "
          f"(the largest linear) on that batch, and its input dtype")
    print(f"native kernels: W4A16 {kernels.native.status('w4a16')}; "
          f"W8A8 / W8A16 {kernels.native.status('w8a8')}; AVX2 {kernels.native.status('avx2')}")

    results: dict[str, Any] = {
        "machine": machine(), "command": sys.argv, "model": MODEL_NAME,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
        "sentences": src, "n_sentences": len(sentences), "representative_layer": layer,
        "models": [], "batches": [],
    }

    # ---- sizes ----
    f32_lin, f32_all = linear_nbytes(float_model), model_nbytes(float_model)
    size_rows = []
    for row in rows:
        lin, tot = linear_nbytes(row.model), model_nbytes(row.model)
        rep = row.report
        float_types = sorted({r.type for r in rep.skipped}) if rep else []
        d = {
            "row": row.label, "act": row.act, "linear_mb": lin / 1e6, "linear_ratio": f32_lin / lin,
            "model_mb": tot / 1e6, "model_ratio": f32_all / tot,
            "layers": f"{len(rep.quantized)}/{len(rep.layers)}" if rep else "-",
            "float_layers": ", ".join(float_types) if rep else "-",
            "quantize_s": row.quantize_s if rep else None,
        }
        size_rows.append(d)
        results["models"].append({**d, "preset": row.preset, "linear_bytes": lin,
                                  "model_bytes": tot, "dtype": str(row.dtype)})
    print("\nsizes (MB = 10**6 bytes; x = fp32 float bytes / row bytes)")
    print(format_table(size_rows, [
        ("row", "row", ""), ("act", "activations", ""),
        ("linear_mb", "linear MB", ".2f"), ("linear_ratio", "x", ".2f"),
        ("model_mb", "model MB", ".2f"), ("model_ratio", "x", ".2f"),
        ("layers", "quantized", ""), ("float_layers", "left float", ""),
        ("quantize_s", "quantize s", ".2f"),
    ]), flush=True)

    # ---- throughput ----
    columns: list[Column] = [
        ("row", "row", ""), ("act", "activations", ""),
        ("sps", "sent/s", ".1f"), ("x_fp32", "x fp32", lambda v: f"{v:.2f}x"),
        ("x_bf16", "x bf16", lambda v: f"{v:.2f}x"),
        ("mean_cos", "mean cos", ".5f"), ("min_cos", "min cos", ".5f"), ("path", "path", ""),
    ]
    for batch in batches:
        features = tokenize(float_model, cycled(sentences, batch))
        ids = features["input_ids"]
        seq, tokens = int(ids.shape[1]), int(ids.numel())
        say(f"batch {batch}: timing {len(rows)} models")
        measure(rows, features, batch, args.repeats, args.warmup, layer)
        ref = rows[0].emb[batch]
        sps = {row.label: batch / statistics.median(row.times[batch]) for row in rows}
        table = []
        for row in rows:
            cos = cosines(row.emb[batch], ref)
            table.append({
                "row": row.label, "preset": row.preset, "act": row.act,
                "sps": sps[row.label], "x_fp32": sps[row.label] / sps["float fp32"],
                "x_bf16": sps[row.label] / sps["float bf16"],
                "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                "path": row.path[batch], "times_s": row.times[batch],
            })
        print(f"\nbatch {batch}: {batch} x {seq} tokens = {tokens} tokens per forward"
              + (" (one sentence: cos is that sentence's)" if batch == 1 else ""))
        print(format_table(table, columns), flush=True)
        results["batches"].append({"batch": batch, "seq_len": seq, "tokens": tokens,
                                   "rows": table})
    # ---- memory the runs added: the kernels' repacked layouts ----
    mem = []
    for row in rows:
        held = kernel_cache_nbytes(row.model)
        tot = model_nbytes(row.model)
        mem.append({"row": row.label, "model_mb": tot / 1e6, "layouts_mb": held / 1e6,
                    "ram_mb": (tot + held) / 1e6, "ram_ratio": f32_all / (tot + held)})
    print("\nmemory after the timed runs (MB; layouts: the kernels' repacked copies, freed by "
          "linquant.nn.clear_kernel_caches; fbgemm's and oneDNN's packed weights not counted)")
    print(format_table(mem, [
        ("row", "row", ""), ("model_mb", "model MB", ".2f"), ("layouts_mb", "layouts MB", ".2f"),
        ("ram_mb", "model + layouts MB", ".2f"), ("ram_ratio", "x", ".2f"),
    ]), flush=True)
    results["memory"] = mem
    if args.json:
        write_json(args.json, results)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
