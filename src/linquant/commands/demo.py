"""``linquant demo``: quantize the bundled all-MiniLM-L6-v2 with each preset, compare embeddings.

Parsing and printing only; the work is :func:`linquant.demo.run_demo`.
"""

from __future__ import annotations

import argparse
import sys

from linquant.commands import positive_int
from linquant.config import preset_names

DEFAULT_K = 5
DEFAULT_REPEATS = 5


def _preset_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of preset names")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from linquant.demo import DEFAULT_PRESETS

    parser.add_argument(
        "--presets", type=_preset_list, default=list(DEFAULT_PRESETS), metavar="A,B,...",
        help=f"presets to compare (default: {','.join(DEFAULT_PRESETS)}; "
             f"available: {', '.join(preset_names())})",
    )
    parser.add_argument("--sentences", metavar="FILE",
                        help="sentences to encode, one per line (default: the bundled set)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("-k", type=positive_int, default=DEFAULT_K, metavar="K",
                        help=f"number of most similar sentence pairs compared "
                             f"(default {DEFAULT_K})")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--repeats", type=positive_int, default=DEFAULT_REPEATS, metavar="N",
                        help=f"timed runs per model; the median is reported "
                             f"(default {DEFAULT_REPEATS})")


def run(args: argparse.Namespace) -> int:
    from linquant.demo import load_sentences, run_demo
    from linquant.report import write_json

    sentences = load_sentences(args.sentences) if args.sentences else None
    if args.json:
        from pathlib import Path

        from linquant.commands import check_output_file

        check_output_file(Path(args.json), "--json", (args.sentences,))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = run_demo(
        args.presets, sentences, k=args.k, repeats=args.repeats,
        progress=lambda msg: print(f"linquant demo: {msg}", file=sys.stderr, flush=True),
    )
    if args.json:  # the file first: a closed stdout (`| head`) must not cost it
        write_json(args.json, result.to_dict())
        print(f"wrote {args.json}", file=sys.stderr)
    print(f"{result.model}: {result.n_sentences} sentences, {result.threads} CPU thread(s); "
          f"sent/s: median of {args.repeats} forward passes over the tokenized batch, timed\n"
          "alternately with the float model (speed = ratio to it)")
    print(result.table())
    from linquant.kernels import native

    print(f"native kernels: W4A16 {native.status('w4a16')}; W8A8 / W8A16 {native.status('w8a8')}"
          f"; AVX2 {native.status('avx2')}; W8A8 on AVX2 {native.status('w8a8_avx2')}")
    k = result.k
    print(f"top-{k} order: whether the float model's {k} most similar sentence pairs come out in "
          f"the same order;\ntop-{k} kept: how many of them stay in the top {k}. "
          "The float model's pairs:")
    for line in result.top_pairs_text():
        print(f"  {line}")
    return 0
