"""Quantized models under ``torch.compile``: every quantized layer runs outside the traced
graph (``torch.compiler.disable`` on its forward), so its kernels, native (ctypes) or Triton,
and its kernel cache see real tensors only, and the compiled model returns what the eager one
does. (Tracing into a native kernel's Python once crashed the process: Dynamo split
``native._run_avx2`` at the ctypes call and the kernel then wrote through pointers into
tensors of the traced half.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from linquant.nn import QuantConv2d, QuantEmbedding, QuantLinear, W8A8Linear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = QuantEmbedding.from_float(nn.Embedding(50, 64), "int4-sym-g32")
        self.conv = QuantConv2d.from_float(nn.Conv2d(1, 4, 3, padding=1), "int8-sym-ch0")
        self.a = QuantLinear.from_float(nn.Linear(64, 256), "int8-sym-ch0")
        self.b = QuantLinear.from_float(nn.Linear(256, 64), "int4-asym-g32")
        self.c = W8A8Linear.from_float(nn.Linear(64, 64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # [B, T, 64]
        h = h + self.conv(h[:, None])[:, 0]  # one channel in, the first of 4 out
        h = self.b(torch.nn.functional.gelu(self.a(h)))
        return self.c(h) + h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_matches_eager(dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    net = Net().to(dtype) if dtype != torch.float32 else Net()
    if dtype != torch.float32:
        net.c = W8A8Linear.from_float(nn.Linear(64, 64))  # W8A8 takes fp32 in
        net.c.forward = (lambda f: lambda x: f(x.float()).to(x.dtype))(net.c.forward)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = net(ids)
        compiled = torch.compile(net, backend="eager")
        for _ in range(3):  # first call traces, later ones run the compiled frames
            got = compiled(ids)
            assert torch.equal(got, want)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager() -> None:
    """The default backend (inductor: generated C++ around the quantized layers)."""
    torch._dynamo.reset()
    net = Net()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = net(ids)
        got = torch.compile(net)(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CRASHED = """
import torch
from linquant.nn import QuantLinear
torch.manual_seed(0)
q = QuantLinear.from_float(torch.nn.Linear(256, 512), "{scheme}")
x = torch.randn(4, 256)
with torch.no_grad():
    want = q(x)
    compiled = torch.compile(q, backend="eager")
    for _ in range(3):
        got = compiled(x)
print("same", torch.equal(got, want))
"""


@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g32"])
def test_compiled_layer_that_once_crashed(scheme: str) -> None:
    """The shape that aborted the process (``malloc(): unaligned tcache chunk detected``) when
    Dynamo traced into ``QuantLinear.forward`` on the native AVX2 path; in a subprocess, so a
    crash fails this test instead of ending the run."""
    out = subprocess.run([sys.executable, "-c", CRASHED.format(scheme=scheme)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "same True" in out.stdout, out.stderr[-2000:]


def test_importing_linquant_loads_neither_dynamo_nor_triton() -> None:
    """``eager_only`` defers ``torch.compiler.disable`` (which imports Dynamo, and Dynamo
    Triton) to the first call made after Dynamo was loaded: importing linquant stays fast
    (0.07 s against 1.3 s), and Triton is imported only by the GPU paths (its interpreter mode
    is read at import, which the Triton tests set first)."""
    code = ("import sys, linquant, linquant.nn, linquant.kernels, linquant.cli; "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
