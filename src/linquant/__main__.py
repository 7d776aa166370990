"""``python -m linquant ARGS``: the ``linquant`` command, for environments without its script."""

from __future__ import annotations

from linquant.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
