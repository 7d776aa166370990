"""The library's exceptions: every bad input ends in one of these, never in an ``assert``."""

from __future__ import annotations

__all__ = ["FormatError", "LinquantError"]


class LinquantError(ValueError):
    """Bad input to linquant: the message names the tensor, module or file and what was expected."""


class FormatError(LinquantError):
    """A file on disk is not a valid linquant (or safetensors) file."""
