"""``linquant sweep``: quantize every weight matrix under a grid of schemes, print the trade-off.

Parsing and printing only; the work is :func:`linquant.sweep.sweep`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from linquant.errors import LinquantError
from linquant.sweep import (
    CSV_FIELDS,
    DEFAULT_BITS,
    DEFAULT_GRANULARITIES,
    DEFAULT_MODES,
    DEFAULT_SCALE_DTYPE,
    MODES,
    default_grid,
    parse_granularity,
    sweep,
)

__all__ = ["add_arguments", "run"]

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
        raise LinquantError(f"bits must be integers in 2..8, got {text!r}") from None
    if not 2 <= b <= 8:
        raise LinquantError(f"bits must be in 2..8, got {b}")
    return b


def _granularity(text: str) -> str:
    parse_granularity(text)
    return text.strip().lower()


def _mode(text: str) -> str:
    if text not in MODES:
        raise LinquantError(f"unknown mode {text!r}: expected {', '.join(MODES)}")
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
    p.add_argument("--json", metavar="FILE", type=Path,
                   help="also write the full result (per-tensor SQNR included) as JSON")
    p.add_argument("--csv", metavar="FILE", type=Path, help="also write the table as CSV")
    p.add_argument("--plot", metavar="FILE.png", type=Path,
                   help="also plot SQNR against bits per weight (needs matplotlib: "
                        "pip install 'linquant[plot]')")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def _check_output(path: Path | None) -> None:
    """Fail before the sweep, not after it, when an output cannot be written."""
    if path is None:
        return
    folder = path.parent
    if not folder.is_dir():
        raise LinquantError(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise LinquantError(f"{path}: is a folder; give a file name")


def run(args: argparse.Namespace) -> int:
    from linquant.report import plot_format, plot_sweep, write_csv

    for out in (args.json, args.csv, args.plot):
        _check_output(out)
    if args.plot is not None:
        plot_format(args.plot)
    schemes = default_grid(modes=args.mode, granularities=args.granularity, bits=args.bits,
                           clips=CLIPS[args.clip], scale_dtype=args.scale_dtype)
    result = sweep(args.model, schemes, progress=args.progress)
    if args.json is not None:  # the files first: a closed stdout (`| head`) must not cost them
        from linquant.io.atomic import write_text_atomic

        write_text_atomic(args.json, result.to_json())
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv is not None:
        write_csv(args.csv, result.table_rows(), CSV_FIELDS)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot is not None:
        plot_sweep(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(result.format(), flush=True)
    return 0
