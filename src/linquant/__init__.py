"""linquant: linear quantization for PyTorch.

>>> import torch, linquant as lq
>>> qt = lq.quantize(torch.randn(256, 256), "int4-sym-g32-fp16")
>>> qt.bits_per_weight
4.5
"""

from linquant.calibrate import calibrate
from linquant.config import PRESETS, QuantConfig, get_config
from linquant.convert import LayerReport, ModelReport, quantize_model
from linquant.errors import FormatError, LinquantError
from linquant.io import hf as _hf
from linquant.io.save import load, load_into, save
from linquant.io.stream import quantize_checkpoint
from linquant.layer_errors import compare_layers
from linquant.ops.metrics import cosine_similarity, max_abs_error, mse, sqnr
from linquant.restore import dequantize_model
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor, compare, dequantize, quantize

__version__ = "0.1.0"

_hf.register_if_loaded()  # from_pretrained of a linquant folder then names linquant.load

__all__ = [
    "PRESETS",
    "FormatError",
    "LayerReport",
    "LinquantError",
    "ModelReport",
    "QuantConfig",
    "QuantScheme",
    "QuantizedTensor",
    "__version__",
    "calibrate",
    "compare",
    "compare_layers",
    "cosine_similarity",
    "dequantize",
    "dequantize_model",
    "get_config",
    "load",
    "load_into",
    "max_abs_error",
    "mse",
    "quantize",
    "quantize_checkpoint",
    "quantize_model",
    "save",
    "sqnr",
]
