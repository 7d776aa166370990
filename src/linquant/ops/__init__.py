"""Pure functions on tensors: qparams, affine quantize/dequantize, grouping, packing, metrics."""
