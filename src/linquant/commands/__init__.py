"""One module per CLI command: ``add_arguments(parser)`` and ``run(args) -> int``.

Commands only parse and print; the work is done by library functions.
"""
