"""One module per CLI command: ``add_arguments(parser)`` and ``run(args) -> int``.

Commands only parse and print; the work is done by library functions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from linquant.errors import LinquantError

__all__ = ["UsageError", "add_text_arguments", "check_output_file", "percentile_arg",
           "positive_int", "size_arg"]


class UsageError(LinquantError):
    """Options that do not go together or do not make sense: the command exits 2, as for
    argparse's own usage errors."""


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts (``--threads``, ``--repeats``): an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def size_arg(text: str) -> str:
    """argparse ``type=`` for ``--max-shard-size``: a size :func:`parse_size` reads (kept as
    text, which the library takes)."""
    from linquant.io.save import parse_size

    try:
        parse_size(text)
    except LinquantError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def percentile_arg(text: str) -> float:
    """argparse ``type=`` for ``--percentile``: a float in (50, 100]."""
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 50 < p <= 100:
        raise argparse.ArgumentTypeError(f"must be in (50, 100] (the share of inputs the range "
                                         f"covers, e.g. 99.99), got {p:g}")
    return p


def check_output_file(path: Path | None, option: str,
                      inputs: tuple[str | os.PathLike[str] | None, ...] = ()) -> None:
    """Fail before a command's long part, not after it, when the file ``option`` names
    cannot be written: its folder is missing or read-only, it is a folder, or its name is too
    long for the file system; or it is one of the command's ``inputs`` or inside one (a
    report written over the source's config.json destroyed the source)."""
    if path is None:
        return
    real = path.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if real == src or (src.is_dir() and src in real.parents):
            raise LinquantError(f"{option} {path}: is inside the input {given}; write it "
                                "elsewhere (a command never writes into its inputs)")
    folder = path.parent
    if not folder.is_dir():
        raise LinquantError(f"{option} {path}: folder {folder} does not exist")
    if path.is_dir():
        raise LinquantError(f"{option} {path}: is a folder; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LinquantError(f"{option} {path}: folder {folder} is not writable")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such query here (Windows)
        limit = 255
    # the file is written as a temp file named after it (".NAME.tmp-xxxxxxxx") first
    if len(os.fsencode(path.name)) + 14 > limit:
        raise LinquantError(f"{option} {path}: file name too long for {folder} (at most "
                            f"{limit - 14} bytes here)")


def add_text_arguments(p: argparse.ArgumentParser, when: str = "") -> None:
    """``--sentences FILE`` / ``--text FILE`` (one of them): the texts a command runs a model
    on; ``when`` prefixes their help (``"with --eval: "``)."""
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--sentences", type=Path, metavar="FILE",
                       help=f"{when}sentences, one per line (default: the bundled ones)")
    texts.add_argument("--text", type=Path, metavar="FILE",
                       help=f"{when}text for perplexity, one sample per line (default: the "
                            "bundled sentences)")
