"""``linquant quantize SRC -o DST``: stream a checkpoint through quantization.

Parsing and printing only; the work is :func:`linquant.io.stream.quantize_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from linquant.commands import UsageError, check_output_file, size_arg
from linquant.config import QuantConfig, get_config, preset_names
from linquant.errors import LinquantError
from linquant.io.atomic import write_text_atomic
from linquant.scheme import Granularity, QuantScheme

__all__ = ["add_arguments", "config_from_args", "layer_configs", "run"]

DEFAULT_PRESET = "w8a32"
DEFAULT_MAX_SHARD = "2GB"
_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, metavar="SRC",
                   help="a .safetensors file or a model folder (single file or sharded)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DST",
                   help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--preset", choices=preset_names(), default=None, type=str.lower,
                   help=f"a named config (default {DEFAULT_PRESET} when no scheme flag is given)")
    p.add_argument("--config", metavar="TEXT",
                   help="a config's text form, as the report's scheme column prints it: "
                        "'int4-asym-g64-fp16, compute bf16', 'int8-sym-ch0-fp32, act "
                        "int8-asym-tensor static' (or a preset name)")
    p.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}",
                   help="code width of a custom weight scheme")
    p.add_argument("--mode", choices=("sym", "asym"), help="symmetric or asymmetric codes")
    p.add_argument("--granularity", choices=("tensor", "channel", "group"))
    p.add_argument("--group-size", type=int, metavar="N", help="elements per group")
    p.add_argument("--scale-dtype", choices=tuple(_SCALE_DTYPES))
    p.add_argument("--clip", choices=("minmax", "mse"))
    p.add_argument("--layer-config", action="append", default=[], metavar="PATTERN=CONFIG",
                   help="mixed precision: layers matching PATTERN get CONFIG (a preset or a "
                        "config's text form; 'float' keeps them float), e.g. "
                        "'*.down_proj=w8a16'; repeatable, the first match wins; the other "
                        "layers get --preset / --config / the scheme flags")
    p.add_argument("--strict", action="store_true",
                   help="refuse (write nothing) when a group size does not divide a layer's "
                        "rows, instead of quantizing it with the largest group size below that "
                        "does")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="quantize only layers matching this name pattern (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep layers matching this name pattern float (repeatable)")
    p.add_argument("--max-shard-size", type=size_arg, default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help=f"largest output shard, e.g. 500MB, 2GB (default {DEFAULT_MAX_SHARD})")
    p.add_argument("--report", type=Path, metavar="FILE", help="write the report (.json or .csv)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="also draw the report: each layer's weight SQNR and bytes before / "
                        "after (needs matplotlib: pip install 'linquant[plot]')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pt checkpoints with torch.load(weights_only=True)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The preset, the config text, or a weight-only config from the scheme flags (defaults:
    int8 sym ch0)."""
    custom = [args.bits, args.mode, args.granularity, args.group_size, args.scale_dtype,
              args.clip]
    given = [flag for flag, v in (("--preset", args.preset), ("--config", args.config),
                                  ("scheme flags (--bits, --mode, ...)",
                                   any(v is not None for v in custom) or None)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one of --preset, --config or scheme flags, not "
                         f"{' and '.join(given)}")
    if args.config is not None:
        try:
            return get_config(args.config)
        except LinquantError as e:
            raise UsageError(f"--config {args.config!r}: {e}") from None
    if all(v is None for v in custom):
        return get_config(args.preset or DEFAULT_PRESET)
    granularity: Granularity = args.granularity or (
        "group" if args.group_size is not None else "channel")
    if granularity == "group" and args.group_size is None:
        raise UsageError("--granularity group needs --group-size N")
    if granularity != "group" and args.group_size is not None:
        raise UsageError(f"--group-size goes with --granularity group, not {granularity}")
    try:
        scheme = QuantScheme(  # a --group-size 0 is refused here
            bits=8 if args.bits is None else args.bits,
            symmetric=(args.mode or "sym") == "sym",
            granularity=granularity,
            group_size=args.group_size,
            scale_dtype=_SCALE_DTYPES[args.scale_dtype or "fp32"],
            clip=args.clip or "minmax",
        )
    except LinquantError as e:
        raise UsageError(f"scheme flags: {e}") from None
    return QuantConfig(scheme)


def layer_configs(specs: list[str], rest: QuantConfig) -> dict[str, QuantConfig | None]:
    """``--layer-config PATTERN=CONFIG`` options as the config dict ``quantize_model`` takes,
    in the order given, ending with ``"*"``: ``rest`` (a pattern ``*`` given by the user wins,
    as the first match does)."""
    rules: dict[str, QuantConfig | None] = {}
    for spec in specs:
        pattern, sep, text = (part.strip() for part in spec.partition("="))
        if not sep or not pattern or not text:
            raise UsageError(f"--layer-config {spec!r}: expected PATTERN=CONFIG, e.g. "
                                "'*.down_proj=w8a16' or 'lm_head=float'")
        if pattern in rules:
            raise UsageError(f"--layer-config {spec!r}: pattern {pattern!r} given twice")
        try:
            rules[pattern] = None if text == "float" else get_config(text)
        except LinquantError as e:
            raise UsageError(f"--layer-config {spec!r}: {e}") from None
    rules.setdefault("*", rest)
    return rules


def run(args: argparse.Namespace) -> int:
    from linquant.io.stream import quantize_checkpoint, source_path

    base = config_from_args(args)
    config: QuantConfig | dict[str, QuantConfig | None] = base
    if args.layer_config:
        config = layer_configs(args.layer_config, base)
    if args.report is not None and args.report.suffix.lower() not in (".json", ".csv"):
        raise UsageError(f"--report {args.report}: the file must end in .json or .csv")
    src = source_path(args.src)  # (an index file: its folder)
    check_output_file(args.report, "--report", (src,))
    check_output_file(args.plot, "--plot", (src,))
    if args.plot is not None:
        from linquant.report import plot_format

        plot_format(args.plot)  # matplotlib and the suffix, before the long part
    result = quantize_checkpoint(
        args.src, args.output, config,
        include=args.include or ("*",), exclude=args.exclude,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, strict=args.strict,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    report = result.report
    # the files first: a closed stdout (`| head`) must not cost them
    if args.report is not None:
        text = report.to_csv() if args.report.suffix.lower() == ".csv" else report.to_json()
        write_text_atomic(args.report, text)
        print(f"report: {args.report}", file=sys.stderr)
    if args.plot is not None:
        rules = f" + {len(args.layer_config)} layer config(s)" if args.layer_config else ""
        report.plot(args.plot, f"{Path(args.src).name}, {args.preset or base}{rules}: "
                    f"{len(report.quantized)} of {len(report.layers)} layers quantized, "
                    f"{report.ratio:.2f}x smaller")
        print(f"plot: {args.plot}", file=sys.stderr)
    print(report)
    print(f"rule: {result.rule}")
    if result.left_out:
        print(f"left out (weight files that are not the model's checkpoint): "
              f"{', '.join(result.left_out)}")
    print(f"wrote {len(result.files)} shard(s) to {args.output}")
    if any((r.scheme or "").endswith(" static") for r in report.quantized):
        print("static W8A8: the input scales are not calibrated yet (a file cannot be run "
              f"here): `linquant calibrate {args.output} -o DST2 --text SAMPLES.txt`, or in "
              "Python model = linquant.load(DST), then `with linquant.calibrate(model): "
              "model(sample_batch)`, then linquant.save(model, ...)")
    return 0
