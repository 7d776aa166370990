"""Whether linquant's Triton kernels can run here: Triton imports and is recent enough.

The kernels are tested on Triton 3.2 and later: the kernel tests pass in the CPU interpreter
of Triton 3.2, 3.3, 3.4, 3.5, 3.6 and 3.9, and Triton 3.6 ran them compiled on an H200
(BENCHMARKS.md). In the interpreters of Triton 3.0 and 3.1 (what PyTorch 2.4 and 2.5 install)
most of them fail (``tl.arange`` rejects the kernels' block sizes, some results differ), so
those are not used. With an older Triton, or none, the CUDA dispatcher takes its other paths
(PyTorch's tinygemm int4 kernel, the reference) and :func:`status` says why.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from linquant.errors import LinquantError

MIN_TRITON = (3, 2)


def parse_version(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``"3.4.0"`` or ``"3.5.0+git1234"``."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.cache
def status() -> str:
    """``"available: triton X"``, or ``"unavailable: <why>"`` (never raises)."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # ImportError, or a broken install
        return f"unavailable: triton does not import ({type(e).__name__}: {e})"
    version = str(getattr(triton, "__version__", "?"))
    parsed = parse_version(version)
    if parsed is None or parsed < MIN_TRITON:
        return (f"unavailable: triton {version} is older than "
                f"{'.'.join(map(str, MIN_TRITON))}, the oldest the kernels are tested with")
    if not (hasattr(tl, "math") and hasattr(tl.math, "div_rn")):
        return f"unavailable: triton {version} lacks tl.math.div_rn"
    return f"available: triton {version}"


def available() -> bool:
    """Whether the Triton kernels can run (see :func:`status`)."""
    return status().startswith("available")


def autotune_options(do_bench: Any = None, cache_results: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for ``triton.autotune`` that this Triton takes: ``do_bench`` (a
    stand-in timer, for tests) and ``cache_results`` (keep timings on disk; Triton 3.4 and
    later: older ones keep none, which is what False asks for)."""
    import triton

    params = inspect.signature(triton.autotune).parameters
    opts: dict[str, Any] = {}
    if do_bench is not None:
        if "do_bench" not in params:
            raise LinquantError(f"triton {triton.__version__}: triton.autotune takes no do_bench")
        opts["do_bench"] = do_bench
    if cache_results is not None and "cache_results" in params:
        opts["cache_results"] = cache_results
    return opts


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tuned_or_fixed(tuned: Callable[..., Any], fixed: Callable[..., Any]) -> Callable[..., Any]:
    """A launch that runs ``tuned`` (an autotuned kernel, launch bound) except inside a CUDA
    graph capture before this launch first ran outside one: there it runs ``fixed`` (the same
    kernel with its default config). Triton's autotuner times its candidates with calls that
    synchronize the device, which a capture forbids, so a graph captured before any warm-up
    call would fail; one captured after a warm-up replays the tuned config (the autotuner then
    has the key and times nothing). The returned launch keeps that one flag; plans keep it."""
    ran = False

    def launch(*args: Any, **kwargs: Any) -> Any:
        nonlocal ran
        if ran:
            return tuned(*args, **kwargs)
        if capturing():
            return fixed(*args, **kwargs)
        out = tuned(*args, **kwargs)
        ran = True
        return out

    return launch
