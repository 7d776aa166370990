"""The ``linquant`` command line: argument parsing and printing only.

``main(argv) -> int`` is what the console script calls and what the tests call in-process.
Exit codes: 0 success, 2 usage error, 1 anything else (one clear line on stderr; ``--debug``
shows the traceback), 130 interrupted, 141 stdout closed early (``| head``; quietly, with every
file the command writes already written).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from types import ModuleType

from linquant import __version__
from linquant.commands import UsageError
from linquant.errors import LinquantError

__all__ = ["main"]

# name -> (module implementing add_arguments/run, one-line help). Imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": (
        "linquant.commands.sweep",
        "quantize every weight matrix of a model under a grid of schemes; print the trade-off",
    ),
    "demo": ("linquant.commands.demo",
             "quantize the bundled all-MiniLM-L6-v2 with each preset and compare embeddings"),
    "quantize": ("linquant.commands.quantize",
                 "quantize a checkpoint on disk, streaming tensor by tensor; print the report"),
    "inspect": ("linquant.commands.inspect",
                "show what a linquant checkpoint holds and validate it (exit 1 if damaged)"),
    "eval": ("linquant.commands.eval",
             "compare a quantized model with its reference (cosine; perplexity and KL "
             "divergence; or SQNR)"),
    "calibrate": ("linquant.commands.calibrate",
                  "set the input scales of a static W8A8 folder from sample text; save it"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name][0])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="linquant", description="Linear quantization for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"linquant {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        _load(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    interrupted: list[bool] = []
    with _signals_unwind(interrupted):
        try:
            return _main(args_list, interrupted)
        except KeyboardInterrupt:
            print("linquant: interrupted", file=sys.stderr)
            return 130
        except _Terminated:
            print("linquant: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM


# torch's messages when an allocation or a mapping fails for lack of memory
_OUT_OF_MEMORY = re.compile(r"Cannot allocate memory|can't allocate memory|out of memory",
                            re.IGNORECASE)


def _main(args_list: list[str], interrupted: list[bool]) -> int:
    try:
        args = build_parser().parse_args(args_list)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    try:
        code = int(_load(args.command).run(args))
        sys.stdout.flush()  # here, where a closed stdout is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:  # stdout closed early (`linquant inspect DIR | head`): stop
        return _stdout_closed()  # quietly, as `yes | head` does; files are written first
    except Exception as e:
        if interrupted:  # Ctrl-C, turned into another error on its way out
            raise KeyboardInterrupt from None
        if debug:
            traceback.print_exc()
        if isinstance(e, (LinquantError, OSError)):
            print(f"linquant {args.command}: error: {e}", file=sys.stderr)
            return 2 if isinstance(e, UsageError) else 1
        if isinstance(e, MemoryError) or _OUT_OF_MEMORY.search(str(e)):
            print(f"linquant {args.command}: error: out of memory ({type(e).__name__}: "
                  f"{' '.join(str(e).split())})", file=sys.stderr)
            return 1
        print(f"linquant {args.command}: internal error: {type(e).__name__}: {e} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``) raised in the main thread, so that what is being written
    is cleaned up as on Ctrl-C (a temp folder removed) before the process ends."""


@contextlib.contextmanager
def _signals_unwind(interrupted: list[bool]) -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated`; SIGINT raises KeyboardInterrupt, as Python's own
    handler does, and is recorded in ``interrupted``: the KeyboardInterrupt can land inside a
    library's import (transformers' lazy modules, numpy), which turns it into another error
    ("Could not import module 'BertModel'"); the command then still exits 130 as interrupted,
    not 1 with an internal error."""
    def on_term(signum: int, frame: object) -> None:
        raise _Terminated

    def on_int(signum: int, frame: object) -> None:
        interrupted.append(True)
        raise KeyboardInterrupt

    try:
        previous = (signal.signal(signal.SIGTERM, on_term),
                    signal.signal(signal.SIGINT, on_int)
                    if signal.getsignal(signal.SIGINT) is signal.default_int_handler
                    else signal.getsignal(signal.SIGINT))  # ignored (`cmd &` in a script): kept
    except ValueError:  # not the main thread: leave the signals as they are
        yield
        return
    try:
        yield
    except Exception:
        if not interrupted:
            raise
        raise KeyboardInterrupt from None  # reported as interrupted, exit 130
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def _stdout_closed() -> int:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still
    buffered does not fail again ("Exception ignored ... BrokenPipeError"); the status is the
    shell's for a process ended by SIGPIPE."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + 13


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
