"""A decoder LLM on the CPU: prefill time, decode tokens/s and memory per preset against float.

The model is a transformers ``LlamaForCausalLM`` built from a config (default: TinyLlama-1.1B's
shape, 1.1B parameters; ``--size small`` is 156M) with seeded random weights: nothing is
downloaded, and the timing and memory of a layer do not depend on what its weights hold. The
accuracy column therefore only compares presets with each other: the SQNR of the logits after
the prompt against the fp32 float model's. A network with random weights amplifies any error
(the bf16 float model's own rounding leaves about 30 dB), so the figure is far below what a
trained model keeps, and greedy tokens would say even less.

One process, one float model; each preset quantizes a copy of the fp32 model (``quantize_model``,
then the preset's cast: ``*a16`` presets run in bf16), saves it with ``linquant.save`` to a
temporary folder and runs the model ``linquant.load`` gives back, as a deployment would (its
codes are views of the mapped files: :mod:`linquant.io.mapped`); ``--in-memory`` runs the
quantized models as ``quantize_model`` left them instead. Every model first runs one warm-up
prefill + decode; then ``--repeats`` rounds in which each model, in turn (the order reversed
every other round), prefills the same ``--prompt`` random token ids and decodes ``--new``
tokens greedily with transformers' ``DynamicCache``, under ``torch.inference_mode``. Reported:
median prefill ms, median decode ms per token and tokens/s, each against the bf16 float model;
and the warm-up's prefill ("1st prefill ms"): what the first request after loading waits,
kernel layouts built and mapped pages read included (the native libraries are built, or
loaded from their cache, before anything is timed: a build happens once per installed version).

Memory per row, after its runs: the bytes of the model's parameters and buffers; the kernel
layouts its quantized layers built while running (``linquant.nn.kernel_cache_nbytes``); what of
it all is resident in the process ("resident": the parameters and buffers read into memory, the
pages of the mapped checkpoint files this process holds (``/proc/self/smaps``), and the
layouts); and the largest scratch weight the CPU paths keep for reuse (``linquant.kernels.cpu``:
the whole weight in the compute dtype, for layers run on ``cpu_scratch`` at many tokens; one
per thread, shared by all models). The weights are far larger than the caches, so every decode
step reads them from memory.

    python benchmarks/bench_generate.py [--size 1b|small] [--prompt 128] [--new 32]
        [--repeats 3] [--presets w8a32,w8a16,w8a8,w4a16-g128,w4a16-g32] [--in-memory]
        [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from _common import machine
from torch import nn

import linquant as lq
from linquant.config import get_config
from linquant.convert import model_nbytes, quantize_model
from linquant.io import mapped
from linquant.kernels import cpu, native
from linquant.nn import kernel_cache_nbytes
from linquant.ops.metrics import sqnr
from linquant.report import format_table

SIZES = {
    # TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}
MIB = 2**20


@dataclass
class Row:
    label: str
    model: nn.Module
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)  # seconds per token
    logits: torch.Tensor | None = None


def build(size: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SIZES[size])
    return LlamaForCausalLM(config).eval()


def scratch_nbytes() -> int:
    bufs: dict[torch.dtype, torch.Tensor] = getattr(cpu._local, "bufs", None) or {}
    return sum(b.numel() * b.element_size() for b in bufs.values())


def resident_nbytes(model: nn.Module) -> int:
    """Bytes of ``model`` resident in this process: its parameters and buffers read into
    memory, the pages of mapped checkpoint files it holds, and its kernel layouts."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    views = [t for t in tensors if mapped.is_mapped(t)]
    in_memory = sum(t.numel() * t.element_size() for t in tensors if not mapped.is_mapped(t))
    resident_views = (mapped.mapped_rss(views) or 0) if views else 0
    return in_memory + resident_views + kernel_cache_nbytes(model)


def run(model: nn.Module, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """Prefill ``ids`` then decode ``new`` tokens greedily: (prefill s, decode s per token,
    the logits after the prompt). The prefill computes the logits of the last position only,
    as ``generate`` does."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        logits = out.logits
        tok = logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b",
                    help="model shape (default 1b: TinyLlama-1.1B's)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens (default 32)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds; medians are reported (default 3)")
    ap.add_argument("--presets", default="w8a32,w8a16,w8a8,w4a16-g128,w4a16-g32",
                    help="comma-separated (default w8a32,w8a16,w8a8,w4a16-g128,w4a16-g32)")
    ap.add_argument("--in-memory", action="store_true",
                    help="run the quantized models as quantize_model leaves them (default: "
                         "saved and loaded back with linquant.load)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    print(f"machine: {machine()}")
    t0 = time.perf_counter()  # build (or load) the native libraries before anything is timed
    status = {k: native.status(k) for k in (native.W4A16, native.W8A8, native.AVX2)}
    print(f"native libraries ready in {time.perf_counter() - t0:.1f} s: "
          + "; ".join(f"{k} {v.split(':')[0]}" for k, v in status.items()))
    print(f"model: LlamaForCausalLM, {args.size} shape {SIZES[args.size]}, random weights; "
          f"prompt {args.prompt} tokens, {args.new} decoded")
    tmp = tempfile.TemporaryDirectory(prefix="bench_generate_")
    float_model = build(args.size)
    n_params = sum(p.numel() for p in float_model.parameters())
    print(f"{n_params / 1e9:.2f}B parameters")
    rows = [Row("float fp32", float_model),
            Row("float bf16", copy.deepcopy(float_model).to(torch.bfloat16))]
    for preset in [p for p in args.presets.split(",") if p]:
        config = get_config(preset)
        if config.is_w8a8 and config.activation_mode == "static":
            raise SystemExit(f"{preset}: static W8A8 needs calibration data; not benchmarked here")
        q = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        quantize_model(q, config)
        print(f"quantized {preset} in {time.perf_counter() - t0:.1f} s")
        if not args.in_memory:
            folder = f"{tmp.name}/{preset}"
            lq.save(q, folder)
            del q
            q = lq.load(folder)
        rows.append(Row(preset, q))

    ids = torch.randint(0, int(SIZES[args.size]["vocab_size"]), (1, args.prompt),
                        generator=torch.Generator().manual_seed(1))
    scratch: dict[str, int] = {}
    layouts: dict[str, int] = {}
    first: dict[str, float] = {}
    for row in rows:  # warm-up: layouts, plans, scratch buffers, compiled kernels
        cpu.release_scratch()
        first[row.label], _, row.logits = run(row.model, ids, args.new)
        scratch[row.label] = scratch_nbytes()
        layouts[row.label] = kernel_cache_nbytes(row.model)
    for r in range(args.repeats):
        for row in rows if r % 2 == 0 else rows[::-1]:
            p, d, _ = run(row.model, ids, args.new)
            row.prefill.append(p)
            row.decode.append(d)

    resident = {row.label: resident_nbytes(row.model) for row in rows}
    ref = rows[0].logits
    assert ref is not None
    bf16 = rows[1]
    bf16_pre, bf16_dec = statistics.median(bf16.prefill), statistics.median(bf16.decode)
    table = []
    for row in rows:
        pre, dec = statistics.median(row.prefill), statistics.median(row.decode)
        assert row.logits is not None
        table.append(dict(
            row=row.label,
            model=model_nbytes(row.model) / MIB,
            layouts=layouts[row.label] / MIB,
            resident=resident[row.label] / MIB,
            scratch=scratch[row.label] / MIB,
            first=first[row.label] * 1e3, prefill=pre * 1e3, pre_x=bf16_pre / pre,
            decode=dec * 1e3, tok_s=1.0 / dec, dec_x=bf16_dec / dec,
            sqnr=None if row is rows[0] else sqnr(ref.float(), row.logits.float()),
        ))
    print(format_table(table, [
        ("row", "model", str), ("model", "model MiB", ".1f"),
        ("layouts", "layouts", ".1f"), ("resident", "resident", ".1f"),
        ("scratch", "+ scratch", ".1f"),
        ("first", "1st prefill ms", ".0f"), ("prefill", "prefill ms", ".0f"),
        ("pre_x", "vs bf16", ".2f"),
        ("decode", "ms/token", ".1f"), ("tok_s", "tok/s", ".1f"),
        ("dec_x", "vs bf16", ".2f"), ("sqnr", "logits SQNR dB", ".1f"),
    ]))
    print(f"medians of {args.repeats} rounds; 'vs bf16' > 1 is faster than the bf16 float model")


if __name__ == "__main__":
    main()
