"""Entry point of the ``linquant`` console script: :func:`linquant.cli.main` behind one guard.

``import linquant`` imports PyTorch, about a second. A console script that named
``linquant.cli:main`` would run that import before any linquant code could catch Ctrl-C, and
print a ``KeyboardInterrupt`` traceback. This module lives outside the package, so the import
happens inside the guard, and Ctrl-C exits 130 with the one line the command prints once running.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    try:
        from linquant.cli import main as run
    except KeyboardInterrupt:
        print("linquant: interrupted", file=sys.stderr)
        return 130
    return run()
