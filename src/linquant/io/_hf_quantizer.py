"""linquant's classes in transformers' quantizer registry (see :mod:`linquant.io.hf`).

Imported only where transformers is; at module level so that a model holding the quantizer
pickles (``torch.save(model)``) and deep-copies."""

from __future__ import annotations

from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from linquant.errors import LinquantError
from linquant.io.hf import QUANT_METHOD, quantization_config


class LinquantHfConfig(QuantizationConfigMixin):  # type: ignore[misc]
    """The ``quantization_config`` of a linquant folder, as transformers reads it."""

    def __init__(self, **kwargs: Any) -> None:
        # quant_method is not in transformers' enum: a plain str, as custom quantizers use
        self.__dict__.update({**quantization_config(), **kwargs, "quant_method": QUANT_METHOD})


class LinquantHfQuantizer(HfQuantizer):  # type: ignore[misc]
    """Stands in transformers' ``hf_quantizer`` slot for linquant: refuses ``save_pretrained`` of
    a quantized model and ``from_pretrained`` of a linquant folder, each naming the linquant call
    that does the job."""

    requires_calibration = False
    config_class = LinquantHfConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        raise LinquantError(
            "from_pretrained cannot load a linquant checkpoint (config.json has "
            "quantization_config quant_method 'linquant'): transformers would leave the "
            "quantized layers freshly initialised. Load the folder with linquant.load(folder), "
            "or build the model and call linquant.load_into(model, folder)")

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        raise LinquantError(
            "save_pretrained cannot write linquant's quantized layers (transformers would save "
            "buffers that from_pretrained cannot load); save the model with "
            "linquant.save(model, folder): config, tokenizer files and the quantized weights, "
            "which linquant.load(folder) reads back")

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # torch.compile works on linquant's layers (README)

    def dequantize(self, model: Any, dtype: Any = None) -> Any:
        """transformers' ``model.dequantize()``: :func:`linquant.dequantize_model` (weights in
        ``dtype``, default each layer's own), which also drops this quantizer."""
        from linquant.restore import dequantize_model

        return dequantize_model(model, dtype)

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        return None

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model
