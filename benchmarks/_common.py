"""Shared timing helpers for the benchmark scripts (median of repeats after warm-up)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def rotate(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One callable that runs the next of ``fns`` on each call: with one function per distinct
    weight (enough to hold >= 256 MiB), every call finds its weight cold in the cache."""
    state = {"i": 0}

    def call(x: torch.Tensor) -> torch.Tensor:
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f(x)

    return call


def median_ms(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cold_ms(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, *,
            repeats: int, runs: int) -> float:
    """One warm-up pass over ``fns`` (prepacks, scratch buffers), then the lowest of ``runs``
    medians of ``repeats`` calls rotating through them (each call on its next cold weight)."""
    call = rotate(fns)
    for f in fns:
        f(x)
    return min(median_ms(lambda: call(x), repeats=repeats, warmup=0) for _ in range(runs))


def alternate(*fns: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Median ms of each function, called in turn (the order reversed every other round), so
    drift of a shared machine hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        order = list(enumerate(fns))
        for j, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[j].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def shapes_arg(text: str | None, default: tuple[tuple[int, int], ...]
               ) -> tuple[tuple[int, int], ...]:
    """``--shapes`` (``"4096x4096,1536x384"``: ``N x K`` pairs), or ``default`` when not given."""
    if text is None:
        return default
    return tuple((int(a), int(b)) for a, b in (s.split("x") for s in text.split(",")))


def cases_arg(text: str | None, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """``--cases`` (comma-separated scheme names): the entries of ``cases`` (tuples whose first
    item is the scheme name) that it names, or all of them when not given."""
    return cases if text is None else tuple(c for c in cases if c[0] in text.split(","))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")
