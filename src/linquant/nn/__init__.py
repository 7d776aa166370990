"""Quantized modules: thin layers whose forward is one call into :mod:`linquant.kernels`.

==================  ======================  =================================================
float module        weight-only             W8A8 (int8 weights and activations)
==================  ======================  =================================================
``nn.Linear``       :class:`QuantLinear`    :class:`W8A8Linear`
HF ``Conv1D``       :class:`QuantLinear`    :class:`W8A8Linear`
``nn.Embedding``    :class:`QuantEmbedding` –
``nn.Conv1d``       :class:`QuantConv1d`    –
``nn.Conv2d``       :class:`QuantConv2d`    –
MoE experts [#]_    :class:`QuantExperts`   – (weight-only, and the report says so)
==================  ======================  =================================================

.. [#] transformers' fused experts modules (3-D projections), recognised by their interface
   rather than by type (:mod:`linquant.nn.experts`); each projection becomes a
   :class:`QuantExpertsProj`.

Every class has ``from_float(module, ..., name=)`` (quantize a float module), ``skeleton(...)``
(an empty module of the right shape, to ``load_state_dict`` into), a ``qweight`` property and
a float ``bias`` when the float module has one. :func:`quant_module_for` looks the table up.
"""

from linquant.nn.base import QuantModule, clear_kernel_caches, kernel_cache_nbytes
from linquant.nn.conv import QuantConv1d, QuantConv2d
from linquant.nn.embedding import QuantEmbedding
from linquant.nn.experts import QuantExperts, QuantExpertsProj
from linquant.nn.linear import QuantLinear
from linquant.nn.registry import MODES, quant_module_for, register_qmodule, registered
from linquant.nn.w8a8 import W8A8Linear

__all__ = [
    "MODES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantExperts",
    "QuantExpertsProj",
    "QuantLinear",
    "QuantModule",
    "W8A8Linear",
    "clear_kernel_caches",
    "kernel_cache_nbytes",
    "quant_module_for",
    "register_qmodule",
    "registered",
]
