"""``linquant calibrate QUANTIZED -o DST``: give a static W8A8 model its activation scales.

A folder quantized with a static W8A8 config (``linquant quantize --preset w8a8-static``, or
``lq.save`` of a model never calibrated) cannot run: its layers' input scales are unknown until
sample inputs have gone through the model. This command loads the folder, runs sample text
through it inside :func:`linquant.calibrate.calibrate` (min/max, or ``--percentile``), and saves
the calibrated model to ``DST`` (atomically; the input folder is never changed). Inputs are
tokenized as ``linquant eval`` tokenizes them: a sentence-transformers folder through its own
tokenizer, in batches; any other transformers folder with its tokenizer (UTF-8 bytes where it
has none), one sample at a time, cut to the model's length (an encoder-decoder model gets the
same ids, shifted right, as its decoder input). Layers already calibrated are
calibrated again on these inputs. The table's ``tokens`` column counts the input vectors each
layer saw (padding included; for a MoE experts projection, each token once per expert it was
routed to).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linquant.commands import percentile_arg, size_arg
from linquant.errors import LinquantError

__all__ = ["CalibrationResult", "add_arguments", "calibrate_folder", "run"]

BATCH = 32  # sentences per forward for sentence-embedding models


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, metavar="QUANTIZED",
                   help="a linquant folder with static W8A8 layers (linquant quantize --preset "
                        "w8a8-static, or lq.save)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DST",
                   help="output folder (must not exist, unless --overwrite); QUANTIZED is not "
                        "changed")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sentences", type=Path, metavar="FILE",
                     help="sample sentences, one per line (default: the bundled ones)")
    src.add_argument("--text", type=Path, metavar="FILE",
                     help="sample text, one sample per line (the same as --sentences)")
    p.add_argument("--percentile", type=percentile_arg, default=None, metavar="P",
                   help="each layer's range from the P-th percentile of its inputs (e.g. "
                        "99.99; 50 < P <= 100; default: min/max)")
    p.add_argument("--unreached", choices=("error", "dynamic"), default="error",
                   help="a static layer no sample reaches (a vision tower fed text, "
                        "cross-attention without encoder states): error (default: write "
                        "nothing, name them) or dynamic (give those layers dynamic per-token "
                        "activations, calibrate the rest)")
    p.add_argument("--max-shard-size", type=size_arg, default="2GB", metavar="SIZE",
                   help="largest output shard, e.g. 500MB, 2GB (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")


@dataclass
class CalibrationResult:
    """What :func:`calibrate_folder` did: one row per static layer (name, batches seen, the
    range, the scale and zero point it got), the inputs, how they were tokenized, the files."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    inputs: int = 0
    tokenized_with: str = ""
    files: list[Path] = field(default_factory=list)


def _feed(model: nn.Module, folder: Path, kind: str, texts: list[str]) -> str:
    """Run ``texts`` through ``model``; returns how they were tokenized."""
    from linquant import demo
    from linquant.commands.eval import _token_ids, model_inputs

    if kind == "sentence-embedding":
        for i in range(0, len(texts), BATCH):
            demo.encode(model, demo.tokenize(model, texts[i:i + BATCH]))
        return "the folder's sentence-transformers tokenizer"
    ids, how = _token_ids(folder, model, texts)
    with torch.inference_mode():
        for x in ids:
            model(**model_inputs(model, x))
    return how


def calibrate_folder(
    src: str | Path,
    dst: str | Path,
    sentences: str | Path | None = None,
    *,
    percentile: float | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    unreached: str = "raise",
) -> CalibrationResult:
    """Load the linquant folder ``src``, calibrate its static W8A8 layers on ``sentences`` (a
    file, one sample per line; default: the bundled sentences) and save the model to ``dst``.

    Raises :class:`LinquantError` (nothing written) when ``dst`` is ``src`` or inside it, exists
    without ``overwrite``, when ``src`` is not a linquant folder or has no static W8A8 layer,
    and when a static layer saw no input, unless ``unreached="dynamic"`` (those layers then
    get dynamic per-token activations).
    """
    from linquant import demo
    from linquant.calibrate import calibrate
    from linquant.commands.eval import _is_linquant, load_model, model_kind
    from linquant.io.save import parse_size, save
    from linquant.io.stream import _check_paths

    src_p, dst_p = Path(src), Path(dst)
    _check_paths(src_p, dst_p, overwrite)
    parse_size(max_shard_size)  # before the long part
    if not src_p.is_dir() or not _is_linquant(src_p):
        raise LinquantError(f"{src_p}: not a linquant folder; quantize the model first "
                            "(linquant quantize SRC -o DST --preset w8a8-static)")
    kind = model_kind(src_p)
    texts = demo.load_sentences(sentences, minimum=1)
    model = load_model(src_p, kind)
    result = CalibrationResult(inputs=len(texts))
    with calibrate(model, percentile, unreached=unreached) as observers:
        try:
            result.tokenized_with = _feed(model, src_p, kind, texts)
        except LinquantError:
            raise
        except Exception as e:  # a model that needs other inputs than token ids (pixels, ...)
            raise LinquantError(
                f"{src_p}: running the model on the samples failed ({type(e).__name__}: {e}); "
                "this command feeds token ids only: calibrate in Python with inputs the "
                "model takes (lq.load, lq.calibrate, lq.save)") from e
    for name, obs in observers.items():
        layer: Any = model.get_submodule(name)
        if not obs.batches:  # unreached="dynamic": it computes its own scale per token
            result.layers.append({"layer": name, "batches": 0, "tokens": 0, "lo": None,
                                  "hi": None, "scale": None, "zero_point": None,
                                  "activation": "dynamic (no sample reached it)"})
            continue
        zp = layer._buffers.get("input_zero_point")
        lo, hi = obs.range()
        result.layers.append({"layer": name, "batches": obs.batches, "tokens": obs.rows,
                              "lo": lo, "hi": hi,
                              "scale": float(layer.input_scale),
                              "zero_point": None if zp is None else int(zp),
                              "activation": "static"})
    result.files = save(model, dst_p, max_shard_size=max_shard_size, overwrite=overwrite)
    return result


def run(args: argparse.Namespace) -> int:
    from linquant.report import Column, format_table

    res = calibrate_folder(args.src, args.output, args.text or args.sentences,
                           percentile=args.percentile, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite,
                           unreached="dynamic" if args.unreached == "dynamic" else "raise")
    cols: list[Column] = [("layer", "layer", ""), ("tokens", "tokens", ""),
                          ("lo", "input min", ".4g"), ("hi", "input max", ".4g"),
                          ("scale", "scale", ".4g"), ("zero_point", "zero point", "")]
    dynamic = [r for r in res.layers if r["activation"] != "static"]
    if dynamic:
        cols.append(("activation", "activation", ""))
    print(format_table(res.layers, cols))
    how = "min/max" if args.percentile is None else f"percentile {args.percentile:g}"
    print(f"calibrated {len(res.layers) - len(dynamic)} static layer(s) ({how}) on "
          f"{res.inputs} inputs ({res.tokenized_with})"
          + (f"; {len(dynamic)} that no sample reached now use dynamic activations"
             if dynamic else ""))
    print(f"wrote {len(res.files)} shard(s) to {args.output}")
    return 0
