"""Kernel tests: without a GPU, Triton kernels run in Triton's CPU interpreter.

``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated. linquant's Triton kernel
modules are imported lazily, on the first launch, so setting the variable here (at collection,
before any test runs) is early enough even though other test modules import linquant first.
With a CUDA device the variable is left alone and the same tests compile for the GPU. Setting
it has no effect on the CPU dispatch: only CUDA inputs are routed to Triton kernels.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fresh_native(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A forgotten native-kernel state (linquant.kernels.native) with its own cache folder and
    no switches or ISA cap from the environment; forgotten again afterwards."""
    from linquant.kernels import native

    monkeypatch.setenv("LINQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LINQUANT_NATIVE", raising=False)
    monkeypatch.delenv("LINQUANT_MAX_CPU_ISA", raising=False)
    native._reset()
    yield tmp_path / "cache"
    native._reset()


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch
                   ) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context in which ``torch.empty`` fills its tensors (NaN, or 0x5A bytes): what a native
    kernel leaves unwritten in the output its wrapper allocates then cannot pass for a correct
    result left in reused memory by an earlier call."""
    real = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 0x5A)

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with monkeypatch.context() as mp:
            mp.setattr(torch, "empty", empty)
            yield

    return context


@pytest.fixture
def one_signed_qt() -> Callable[[str], Any]:
    """``make(scheme)``: a 100 x 256 weight quantized under ``scheme`` whose rows are of one
    sign by thirds (positive, negative, mixed), so that an asymmetric scheme's zero points reach
    both ends of their range (asserted): what a compact layout's zero point bytes must hold."""
    import linquant as lq

    def make(scheme: str) -> Any:
        w = torch.randn(100, 256, generator=torch.Generator().manual_seed(0))
        w[0::3], w[1::3] = w[0::3].abs(), -w[1::3].abs()
        qt = lq.quantize(w, scheme)
        if qt.zero_point is not None:
            z = qt.zero_point
            assert int(z.min()) == 0 and int(z.max()) == 2**qt.scheme.bits - 1
        return qt

    return make
