"""Kernel tests: without a GPU, Triton kernels run in Triton's CPU interpreter.

``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated. linquant's Triton kernel
modules are imported lazily, on the first launch, so setting the variable here (at collection,
before any test runs) is early enough even though other test modules import linquant first.
With a CUDA device the variable is left alone and the same tests compile for the GPU. Setting
it has no effect on the CPU dispatch: only CUDA inputs are routed to Triton kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
