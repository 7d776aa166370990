"""linquant: linear quantization for PyTorch.

>>> import torch, linquant as lq
>>> qt = lq.quantize(torch.randn(256, 256), "int4-sym-g32-fp16")
>>> qt.bits_per_weight
4.5
"""

from linquant.errors import FormatError, LinquantError
from linquant.ops.metrics import cosine_similarity, max_abs_error, mse, sqnr
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor, compare, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "FormatError",
    "LinquantError",
    "QuantScheme",
    "QuantizedTensor",
    "__version__",
    "compare",
    "cosine_similarity",
    "dequantize",
    "max_abs_error",
    "mse",
    "quantize",
    "sqnr",
]
