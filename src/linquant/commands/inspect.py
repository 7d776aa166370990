"""``linquant inspect PATH``: what a linquant checkpoint holds; validates it (exit 1 if damaged)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from linquant.errors import FormatError
from linquant.nn.w8a8 import is_calibrated_scale
from linquant.report import format_table

__all__ = ["add_arguments", "inspect_checkpoint", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="PATH",
                   help="a linquant folder, .safetensors file or index")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """Read and validate every tensor; a summary of the checkpoint."""
    from linquant.io.checkpoint import checkpoint_files
    from linquant.io.save import read_checkpoint

    ck = read_checkpoint(path)
    files = checkpoint_files(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if config.is_file():  # what lq.load builds the model from
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FormatError(f"{config}: not valid JSON ({e}); lq.load cannot build the "
                              "model from it") from e
    rows: list[dict[str, Any]] = []
    for name, qt in ck.quantized.items():
        row: dict[str, Any] = {"name": name, "shape": list(qt.shape),
                               "dtype": str(qt.dtype)[6:], "scheme": str(qt.scheme),
                               "bits_per_weight": qt.bits_per_weight, "bytes": qt.nbytes}
        entry = ck.modules.get(name.removesuffix(".weight"))
        if isinstance(entry, dict) and isinstance(entry.get("num_experts"), int):
            row["experts"] = entry["num_experts"]  # an MoE projection, stored [E*out, in]
        rows.append(row)
    for name, t in ck.plain.items():
        rows.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype)[6:],
                     "scheme": "plain", "bits_per_weight": t.element_size() * 8.0,
                     "bytes": t.numel() * t.element_size()})
    rows.sort(key=lambda r: str(r["name"]))
    schemes = Counter(r["scheme"] for r in rows if r["scheme"] != "plain")
    w8a8: dict[str, Any] = {"dynamic": 0, "static_calibrated": 0, "static_uncalibrated": []}
    for name, entry in sorted(ck.modules.items()):
        # W8A8Linear, and experts projections with int8 activations
        if not isinstance(entry, dict) or entry.get("activation") not in ("dynamic", "static"):
            continue
        if entry.get("activation") != "static":
            w8a8["dynamic"] += 1
            continue
        scale = ck.plain.get(f"{name}.input_scale")
        if scale is not None and is_calibrated_scale(scale):
            w8a8["static_calibrated"] += 1
        else:  # NaN until calibrated (linquant quantize --preset w8a8-static writes it so)
            w8a8["static_uncalibrated"].append(name)
    return {
        "path": str(path),
        "format_version": ck.format_version,
        "files": [f.name for f in files],
        "total_bytes": sum(f.stat().st_size for f in files),
        "tensor_bytes": sum(int(r["bytes"]) for r in rows),
        "model": ck.model,
        "schemes": dict(schemes),
        "quantized_tensors": len(ck.quantized),
        "plain_tensors": len(ck.plain),
        "aliases": ck.aliases,
        "w8a8_layers": w8a8,
        "tensors": rows,
    }


def run(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for r in info["tensors"]:
        shape = "x".join(str(n) for n in r["shape"]) or "scalar"
        r["shape_text"] = f"{shape} ({r['experts']} experts)" if "experts" in r else shape
    table = format_table(info["tensors"], [
        ("name", "tensor", ""),
        ("shape_text", "shape", ""),
        ("dtype", "dtype", ""),
        ("scheme", "scheme", ""),
        ("bits_per_weight", "bits/w", ".3f"),
        ("bytes", "bytes", ","),
    ])
    print(table)
    schemes = ", ".join(f"{s} x{n}" for s, n in info["schemes"].items()) or "none"
    print(f"linquant format_version {info['format_version']}; {len(info['files'])} file(s), "
          f"{info['total_bytes']:,} bytes; model: {info['model'].get('kind', '?')} "
          f"{info['model'].get('class') or ''}".rstrip())
    print(f"{info['quantized_tensors']} quantized tensors ({schemes}); "
          f"{info['plain_tensors']} plain tensors; {len(info['aliases'])} aliases; "
          "all tensors valid")
    w8a8 = info["w8a8_layers"]
    uncalibrated = w8a8["static_uncalibrated"]
    static = w8a8["static_calibrated"] + len(uncalibrated)
    if w8a8["dynamic"] or static:
        print(f"W8A8 layers: {w8a8['dynamic']} with dynamic activations, {static} static "
              f"({w8a8['static_calibrated']} calibrated)")
    if uncalibrated:
        print(f"not calibrated: {', '.join(uncalibrated[:3])}"
              + (f" and {len(uncalibrated) - 3} more" if len(uncalibrated) > 3 else "")
              + f"; they cannot run until `linquant calibrate {args.path} -o DST` (or "
              "lq.calibrate in Python) gives them input scales")
    return 0
